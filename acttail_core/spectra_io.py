"""Spectra files and the spectra cache: compact JSON with eigenvalues, written atomically.

A spectra file is a JSON object (``kind`` "acttail-spectra", ``schema_version`` 1) holding
one entry per projection; eigenvalues travel as base64 little-endian float32, about 5 MB for
a 7B model. The cache keeps one such file per (model fingerprint, backend, xmin rule) under
``$ACTTAIL_CACHE/spectra`` with its SHA-256 beside it (``integrity``); a file that fails the
checksum, is corrupt or belongs to another model is ignored (with a warning) and recomputed.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import ActTailError, SpectraError
from .esd import BACKENDS, XMIN_RULES, ProjectionSpectrum, Spectra
from .integrity import CacheIntegrityError, read_with_digest, write_with_digest
from .models import cache_root
from .projections import Projection
from .safe_io import write_text

log = logging.getLogger(__name__)

SPECTRA_SCHEMA_VERSION = 1


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.asarray(array, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: str, count: int) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4")
    if array.size != count:
        raise ValueError(f"expected {count} eigenvalues, found {array.size}")
    return array.astype(np.float32)


def spectra_to_dict(spectra: Spectra) -> dict:
    entries = []
    for e in spectra.entries:
        row = {k: v for k, v in asdict(e).items() if k != "eigenvalues"}
        row["eigenvalues_f32_b64"] = _encode(e.eigenvalues)
        entries.append(row)
    return {
        "schema_version": SPECTRA_SCHEMA_VERSION,
        "kind": "acttail-spectra",
        "model_name": spectra.model_name,
        "fingerprint": spectra.fingerprint,
        "rule": spectra.rule,
        "backend": spectra.backend,
        "entries": entries,
    }


def spectra_from_dict(data: dict) -> Spectra:
    try:
        if data.get("kind") != "acttail-spectra":
            raise ValueError("not an ActTail spectra file")
        if data.get("schema_version") != SPECTRA_SCHEMA_VERSION:
            raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {SPECTRA_SCHEMA_VERSION}")
        entries = []
        for row in data["entries"]:
            row = dict(row)
            eigs = _decode(row.pop("eigenvalues_f32_b64"), int(row["num_eigs"]))
            entry = ProjectionSpectrum(eigenvalues=eigs, **row)
            entries.append(entry)
        if not entries:
            raise ValueError("no entries")
        return Spectra(data["model_name"], data["fingerprint"], data["rule"], data["backend"], entries)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise SpectraError(f"corrupt spectra file: {exc}") from exc


def save_spectra(spectra: Spectra, path: str | Path) -> Path:
    """Write atomically (temporary file, then rename): an interrupted write leaves no half file."""
    path = Path(path)
    text = json.dumps(spectra_to_dict(spectra))
    if _in_cache(path):  # compute_spectra stores its cache through here: the cache copy gets a checksum
        _store_cached(path, text.encode("utf-8"))
        return path
    return write_text(path, text)


def _in_cache(path: Path) -> bool:
    return Path(os.path.expanduser(path)).resolve().parent == (cache_root() / "spectra").resolve()


def _store_cached(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_with_digest(path, data)
    except (OSError, ActTailError) as exc:  # a read-only cache must not stop the analysis
        log.warning("could not write spectra cache %s: %s", path, exc)


def _parse(raw: bytes, path: Path) -> Spectra:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpectraError(
            f"corrupt spectra file {path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from exc
    except (ValueError, RecursionError) as exc:  # absurd numbers or nesting
        raise SpectraError(f"corrupt spectra file {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise SpectraError(f"corrupt spectra file {path}: expected a JSON object")
    return spectra_from_dict(data)


def load_spectra(path: str | Path) -> Spectra:
    path = Path(path)
    if not path.is_file():
        raise SpectraError(f"spectra file not found: {path}")
    return _parse(path.read_bytes(), path)


def cache_path(fingerprint: str, rule: str, backend: str) -> Path:
    return cache_root() / "spectra" / f"{fingerprint}-{backend}-{rule}.json"


def cached_spectra(
    fingerprint: str, rule: str, backend: str, projections: Sequence[Projection], warn: bool = True
) -> Optional[Spectra]:
    """The cached spectra if present and intact; ``warn`` says so in one line when a file is refused."""
    path = cache_path(fingerprint, rule, backend)
    if not path.exists():
        return None
    try:
        spectra = _parse(read_with_digest(path), path)
    except (CacheIntegrityError, SpectraError, OSError) as exc:
        if warn:
            log.warning("ignoring spectra cache %s (%s); recomputing", path, exc)
        return None
    if spectra.fingerprint != fingerprint or spectra.projections() != list(projections):
        if warn:
            log.warning("spectra cache %s does not match the model; recomputing", path)
        return None
    return spectra


def cached_eigenvalues(fingerprint: str, projections: Sequence[Projection]) -> Optional[list[np.ndarray]]:
    """Eigenvalues from any cached spectra of this model: they do not depend on the xmin rule."""
    for backend in BACKENDS:
        for rule in XMIN_RULES:
            hit = cached_spectra(fingerprint, rule, backend, projections, warn=False)  # the caller warned already
            if hit is not None:
                return [e.eigenvalues.astype(np.float64) for e in hit.entries]
    return None
