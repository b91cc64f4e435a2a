"""Threshold calibration for ``threshold`` mode (TEAL-style).

One dense pass over calibration text records, per projection, a random
subsample of its input magnitudes ``|x|`` (bounded memory), and stores their
quantiles on a grid of 1001 levels together with the calibration token ids.
Tables are cached as safetensors (never pickle) under
``cache_root()/calibration``, keyed by the model fingerprint, the corpus, a
digest of the calibration text, the token count and the chunk length.

Dense quantiles alone miss the target once upstream projections are sparse
(measured on SmolLM2-135M at 0.5: up to 5 points for q/k/v/gate/up and 10 for
o/down), so ``ThresholdTable.thresholds_for`` re-derives each budget's
thresholds in one forward over the stored calibration ids with the upstream
thresholds applied (``budget_thresholds``); the dense quantiles remain
available as ``dense_thresholds_for``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .budget import Budget, check_budget_matches
from .corpora import default_seqlen, load_calibration_text, text_digest, tokenize_corpus
from .errors import ActTailError
from .integrity import file_digest_problem, record_file_digest
from .intercept import intercept
from .models import LoadedModel, cache_root
from .progress import ProgressFn, report
from .projections import Projection, find_projections

log = logging.getLogger(__name__)

GRID_POINTS = 1001
DEFAULT_CALIB_TOKENS = 4096
DEFAULT_SAMPLES = 1 << 16  # per projection: 256 KiB of float32, quantile error ~0.2 points
CALIB_SCHEMA_VERSION = 1


@dataclass
class ThresholdTable:
    """Per-projection |x| quantiles at levels ``linspace(0, 1, GRID_POINTS)``."""

    fingerprint: str
    corpus: str
    tokens: int
    names: list[str]
    quantiles: np.ndarray  # [len(names), GRID_POINTS] float32, non-decreasing along axis 1
    calib_ids: Optional[torch.Tensor] = None  # [n, seqlen] calibration token ids (kept for budget-aware thresholds)
    model: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)  # runtime only, never saved
    _by_budget: dict = field(default_factory=dict, repr=False, compare=False)

    def bind(self, model: torch.nn.Module) -> "ThresholdTable":
        """Attach the (same-fingerprint) model so ``thresholds_for`` can be budget-aware."""
        self.model = model
        return self

    def threshold(self, name: str, sparsity: float) -> float:
        """Magnitude below which a fraction ``sparsity`` of this projection's inputs fall."""
        if sparsity <= 0:
            return 0.0
        row = self.quantiles[self.names.index(name)]
        grid = np.linspace(0.0, 1.0, row.shape[0])
        return float(np.interp(sparsity, grid, row))

    def thresholds_for(self, budget: Budget) -> dict[str, float]:
        """Per-projection thresholds for a budget.

        With a bound model and stored calibration ids (what ``calibrate_thresholds``
        returns) they are budget-aware (``budget_thresholds``: one forward over the
        calibration text, memoised per budget), which is what keeps the realized
        sparsity at the budget; otherwise the dense quantiles (TEAL's convention),
        which drift by several points once upstream projections are sparse.
        """
        if self.model is not None and self.calib_ids is not None:
            key = hashlib.sha256(json.dumps(budget.sparsity_by_name(), sort_keys=True).encode()).hexdigest()
            if key not in self._by_budget:
                # an expert no calibration token was routed to keeps its dense-quantile threshold
                self._by_budget[key] = self.dense_thresholds_for(budget) | budget_thresholds(
                    self.model, budget, self.calib_ids)
            return dict(self._by_budget[key])
        return self.dense_thresholds_for(budget)

    def dense_thresholds_for(self, budget: Budget) -> dict[str, float]:
        """Thresholds from the dense model's input quantiles (no forward pass)."""
        missing = [e.name for e in budget.projections if e.name not in set(self.names)]
        if missing:
            raise ActTailError(f"threshold calibration has no entry for {missing[0]}: calibrated for another model")
        index = {n: i for i, n in enumerate(self.names)}
        grid = np.linspace(0.0, 1.0, self.quantiles.shape[1])
        return {
            e.name: 0.0 if e.sparsity <= 0 else float(np.interp(e.sparsity, grid, self.quantiles[index[e.name]]))
            for e in budget.projections
        }

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "schema_version": str(CALIB_SCHEMA_VERSION),
            "fingerprint": self.fingerprint,
            "corpus": self.corpus,
            "tokens": str(self.tokens),
            "names": json.dumps(self.names),
        }
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tensors = {"quantiles": torch.from_numpy(np.ascontiguousarray(self.quantiles, dtype=np.float32))}
        if self.calib_ids is not None:
            tensors["calib_ids"] = self.calib_ids.to(torch.int64).contiguous()
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ThresholdTable":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                quantiles = handle.get_tensor("quantiles").numpy()
                calib_ids = handle.get_tensor("calib_ids") if "calib_ids" in handle.keys() else None
            if meta.get("schema_version") != str(CALIB_SCHEMA_VERSION):
                raise ValueError(f"schema_version {meta.get('schema_version')}")
            names = json.loads(meta["names"])
            if quantiles.shape != (len(names), GRID_POINTS):
                raise ValueError(f"quantiles have shape {quantiles.shape}")
            return cls(meta["fingerprint"], meta["corpus"], int(meta["tokens"]), names, quantiles, calib_ids)
        except Exception as exc:  # any corrupt file: recalibrate rather than trust it
            raise ActTailError(f"threshold calibration file {path} is unreadable: {exc}") from None


def calibrate_on_chunks(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    *,
    projections: Optional[Sequence[Projection]] = None,
    samples: int = DEFAULT_SAMPLES,
    fingerprint: str = "",
    corpus: str = "",
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
) -> ThresholdTable:
    """Run the dense model over ``chunks`` ([n, seqlen] token ids), one chunk per forward,
    and tabulate |x| quantiles."""
    projections = list(projections or find_projections(model))
    n_chunks = int(chunks.shape[0])
    per_call = max(1, -(-samples // n_chunks))
    generator = torch.Generator().manual_seed(seed)
    collected: dict[str, list[torch.Tensor]] = {p.name: [] for p in projections}

    def record(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel():
            idx = torch.randint(0, flat.numel(), (min(per_call, flat.numel()),), generator=generator)
            collected[name].append(flat[idx.to(flat.device)].abs().float().cpu())

    device = model.get_input_embeddings().weight.device
    with torch.no_grad(), intercept(model, projections, record):
        for i in range(n_chunks):
            model(input_ids=chunks[i : i + 1].to(device), use_cache=False)
            report(progress, i + 1, n_chunks, "calibrating thresholds")
    grid = torch.linspace(0.0, 1.0, GRID_POINTS, dtype=torch.float64)
    rows = []
    for p in projections:
        if not collected[p.name]:  # an expert no calibration token was routed to: threshold 0, it stays dense
            rows.append(np.zeros(GRID_POINTS, dtype=np.float32))
            continue
        values = torch.cat(collected[p.name]).double()
        rows.append(torch.quantile(values, grid).float().numpy())
    return ThresholdTable(
        fingerprint, corpus, n_chunks * int(chunks.shape[1]), [p.name for p in projections], np.stack(rows),
        chunks.clone(),
    )


def budget_thresholds(
    model: torch.nn.Module,
    budget: Budget,
    chunks: torch.Tensor,
    *,
    samples: int = 1 << 18,
    seed: int = 0,
) -> dict[str, float]:
    """Thresholds that give each projection its budget *given the sparsity upstream of it*.

    Thresholds calibrated on the dense model drift once everything upstream is
    sparsified (the inputs of o and down, and via the residual stream every
    later layer; measured up to 10 points on SmolLM2-135M at 0.5). So the
    calibration chunks go through the model in one batch, and each hook sets its
    threshold to the ``sparsity``-quantile of its own (already upstream-sparsified)
    input over all calibration tokens, then applies it: one forward per budget.
    """

    projections = find_projections(model)
    check_budget_matches(budget, projections)
    generator = torch.Generator().manual_seed(seed)
    sparsity_of = budget.sparsity_by_name()
    found: dict[str, float] = {}

    def threshold_and_apply(name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        sparsity = sparsity_of[name]
        flat = x.detach().reshape(-1)
        if sparsity <= 0 or flat.numel() == 0:
            found[name] = 0.0
            return None
        if flat.numel() > samples:
            idx = torch.randint(0, flat.numel(), (samples,), generator=generator).to(flat.device)
            flat = flat[idx]
        values = flat.abs().float()
        rank = min(values.numel(), max(1, int(round(sparsity * values.numel()))))
        threshold = float(values.kthvalue(rank).values)
        found[name] = threshold
        return torch.nn.functional.hardshrink(x, threshold)

    device = model.get_input_embeddings().weight.device
    with torch.no_grad(), intercept(model, projections, threshold_and_apply):
        model(input_ids=chunks.to(device), use_cache=False)
    return found


def _cache_path(fingerprint: str, corpus: str, digest: str, max_tokens: int, seqlen: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name if corpus not in ("demo", "wikitext2") else corpus)[:40]
    return cache_root() / "calibration" / f"{fingerprint}-{slug}-{digest}-{max_tokens}x{seqlen}.safetensors"


def _calibration_seqlen(loaded: LoadedModel, max_tokens: int, seqlen: Optional[int]) -> int:
    return min(default_seqlen(loaded) if seqlen is None else seqlen, max_tokens)  # 0 is refused, not the default


def check_calibration_text(
    loaded: LoadedModel, corpus: str = "demo", max_tokens: int = DEFAULT_CALIB_TOKENS, seqlen: Optional[int] = None
) -> None:
    """Refuse a calibration text ``calibrate_thresholds`` would refuse (missing, empty, shorter than one chunk),
    with the same error, by tokenizing it alone (cheap): an evaluation calibrates only when its first sparse run
    comes, after the dense one."""
    tokenize_corpus(loaded, load_calibration_text(corpus), _calibration_seqlen(loaded, max_tokens, seqlen), max_tokens)


def calibrate_thresholds(
    loaded: LoadedModel,
    corpus: str = "demo",
    max_tokens: int = DEFAULT_CALIB_TOKENS,
    seqlen: Optional[int] = None,
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
) -> ThresholdTable:
    """Thresholds for ``loaded`` from the calibration text of ``corpus`` (cached on disk).

    ``corpus`` names the *calibration* text: ``demo`` reads asyoulik.txt (the
    demo evaluation text is alice29.txt), ``wikitext2`` its train split, and a
    path is read as given.
    """
    text = load_calibration_text(corpus)
    seqlen = _calibration_seqlen(loaded, max_tokens, seqlen)
    path = _cache_path(loaded.fingerprint, corpus, text_digest(text), max_tokens, seqlen)
    projections = find_projections(loaded.model)
    problem = file_digest_problem(path) if use_cache and path.exists() else "absent"
    if problem not in (None, "absent"):
        log.warning("ignoring threshold calibration cache %s (%s); recalibrating", path.name, problem)
    if problem is None:
        try:
            table = ThresholdTable.load(path)
            if table.fingerprint == loaded.fingerprint and table.names == [p.name for p in projections]:
                report(progress, 1, 1, "thresholds from cache")
                return table.bind(loaded.model)
        except ActTailError as exc:
            log.warning("%s; recalibrating", exc)
    chunks = tokenize_corpus(loaded, text, seqlen=seqlen, max_tokens=max_tokens)
    table = calibrate_on_chunks(
        loaded.model, chunks, projections=projections, fingerprint=loaded.fingerprint, corpus=corpus, progress=progress
    )
    if use_cache:
        try:
            table.save(path)
            record_file_digest(path)
        except (OSError, ActTailError) as exc:  # a read-only cache must not stop the evaluation
            log.warning("could not write threshold calibration cache: %s", exc)
    return table.bind(loaded.model)
