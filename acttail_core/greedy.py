"""A direct baseline: greedy allocation from measured output error (in TEAL's spirit).

Alpha is a proxy read off the weights alone. This module instead *measures*
what sparsifying each projection's input costs, so users can see how far alpha
gets compared to looking at the activations:

1. One dense forward over calibration text (``demo`` -> asyoulik.txt, never the
   evaluation text) records every projection's input ``X``.
2. For each projection and each sparsity level on a grid (0, 0.05, ..., 0.95)
   the relative output error ``||W (X - topk(X))||^2 / ||W X||^2`` is measured,
   with the same TopK semantics as the sparsifier. These error curves are
   cached per model fingerprint, calibration text and token count.
3. Starting from all-dense, the greedy repeatedly takes the grid step with the
   smallest error increase per unit of parameter-weighted sparsity gained,
   ``(e_i(s + step) - e_i(s)) / (P_i * step)``, until the weighted mean reaches
   the target; the last step is taken partially so the mean is exact.
   ``scope="layer"`` runs this inside each decoder layer (each layer at the
   target, like TEAL's block-wise greedy); ``scope="global"`` across the model.

Errors are treated as additive and independent between projections (TEAL
measures a block's output jointly); that keeps the baseline to one forward
pass plus a few matmuls per projection and level.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .budget import Budget, keep_count, make_budget
from .errors import ActTailError
from .integrity import CacheIntegrityError, read_with_digest, write_with_digest
from .intercept import intercept
from .models import LoadedModel, cache_root
from .progress import ProgressFn, report
from .projections import Projection, find_projections, weight_of

log = logging.getLogger(__name__)

LEVELS = np.round(np.arange(0.0, 0.951, 0.05), 4)
SCOPES = ("layer", "global")
DEFAULT_TOKENS = 512


@dataclass
class ErrorCurves:
    """Relative output error of every projection at every sparsity level."""

    projections: list[Projection]
    levels: np.ndarray  # [L], ascending, levels[0] == 0
    errors: np.ndarray  # [P, L]
    corpus: str
    tokens: int


def _dropped_parts(x: torch.Tensor, keeps: Sequence[int]) -> torch.Tensor:
    """For each keep count, the part of ``x`` the sparsifier's TopK would zero: ``x * (|x| < kth)``.

    One sort per input serves every level (the sparsifier keeps |x| >= the keep-th largest magnitude).
    Returns [len(keeps), tokens, features].
    """
    magnitude = x.abs()
    ordered = magnitude.sort(dim=-1, descending=True).values
    index = torch.tensor([max(k, 1) - 1 for k in keeps], device=x.device)
    kth = ordered[:, index].T.unsqueeze(-1)  # [levels, tokens, 1]
    dropped = x.unsqueeze(0) * (magnitude.unsqueeze(0) < kth)
    zero_keep = torch.tensor([k <= 0 for k in keeps], device=x.device)
    return torch.where(zero_keep[:, None, None], x.unsqueeze(0), dropped)


def _cache_file(fingerprint: str, corpus: str, tokens: int) -> Path:
    key = hashlib.sha256(f"{corpus}|{tokens}|{LEVELS.tolist()}".encode()).hexdigest()[:12]
    return cache_root() / "greedy" / f"{fingerprint}-{key}.json"


def _capture_inputs(loaded: LoadedModel, projections: Sequence[Projection], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str, x: torch.Tensor) -> None:
        x = x.detach()
        captured[name] = x.reshape(-1, x.shape[-1])  # q/k/v share one tensor: stored once, referenced thrice

    with torch.no_grad(), intercept(loaded.model, projections, capture):
        loaded.model(ids.to(loaded.input_device))
    return captured


def measure_error_curves(
    loaded: LoadedModel,
    corpus: str = "demo",
    tokens: int = DEFAULT_TOKENS,
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
) -> ErrorCurves:
    """Error curves of every projection on ``tokens`` tokens of the corpus's calibration text."""
    from .corpora import load_text, tokenize_corpus

    projections = find_projections(loaded.model)
    path = _cache_file(loaded.fingerprint, corpus, tokens)
    if use_cache and path.exists():
        try:
            data = json.loads(read_with_digest(path))
            if data["names"] == [p.name for p in projections]:
                return ErrorCurves(projections, np.array(data["levels"]), np.array(data["errors"]), corpus, tokens)
        except (CacheIntegrityError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring greedy cache %s (%s); measuring again", path, exc)
    ids = tokenize_corpus(loaded, load_text(corpus, role="calibration"), seqlen=tokens, max_tokens=tokens)[:1]
    report(progress, 0, len(projections), "recording projection inputs")
    inputs = _capture_inputs(loaded, projections, ids)
    errors = np.zeros((len(projections), len(LEVELS)))
    dropped_cache: dict[int, torch.Tensor] = {}  # q/k/v (and gate/up) share an input: one sort for all three
    with torch.no_grad():
        for i, proj in enumerate(projections):
            weight = weight_of(loaded.model, proj)
            x = inputs.get(proj.name)
            if x is None or x.shape[0] == 0:  # an expert no calibration token was routed to: filled in below
                errors[i, 1:] = np.nan
                continue
            if id(x) not in dropped_cache:
                dropped_cache.clear()
                keeps = [keep_count(level, proj.in_features) for level in LEVELS[1:]]
                dropped_cache[id(x)] = _dropped_parts(x.to(weight.dtype), keeps)
            dropped = dropped_cache[id(x)]
            reference = torch.linalg.vector_norm((x.to(weight.dtype) @ weight.T).float()) ** 2
            lost = torch.linalg.vector_norm((dropped @ weight.T).float(), dim=(1, 2)) ** 2
            errors[i, 1:] = (lost / reference.clamp_min(1e-30)).cpu().numpy()
            report(progress, i + 1, len(projections), f"error curves {i + 1}/{len(projections)}")
    _fill_unvisited(projections, errors)
    curves = ErrorCurves(projections, LEVELS.copy(), errors, corpus, tokens)
    if use_cache:
        data = {"names": [p.name for p in projections], "levels": LEVELS.tolist(), "errors": errors.tolist()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with_digest(path, json.dumps(data).encode("utf-8"))
        except (OSError, ActTailError) as exc:  # a read-only cache must not stop the allocation
            log.warning("could not write greedy cache: %s", exc)
    return curves


def _fill_unvisited(projections: Sequence[Projection], errors: np.ndarray) -> None:
    """Give each projection that saw no input (an unvisited expert) the mean curve of its type in its layer.

    Its measured error would be zero at every level, which the greedy walk would read as free sparsity.
    """
    missing = np.isnan(errors[:, 1:]).any(axis=1)
    for i in np.flatnonzero(missing):
        peers = [j for j, p in enumerate(projections) if not missing[j] and p.layer == projections[i].layer
                 and p.type == projections[i].type]
        if not peers:
            raise ActTailError(f"no calibration token reached {projections[i].name} or any projection of its type "
                               "in its layer; use more calibration tokens")
        errors[i] = errors[peers].mean(axis=0)


def _greedy_path(errors: np.ndarray, levels: np.ndarray, params: np.ndarray, target: float) -> np.ndarray:
    """Sparsities from the greedy walk, with the final step cut so the weighted mean equals ``target``."""
    n, count = errors.shape
    weights = params / params.sum()
    sparsity = np.zeros(n)
    level_index = np.zeros(n, dtype=int)
    reached = 0.0
    heap = []

    def push(i: int) -> None:
        j = level_index[i]
        if j + 1 < count:
            step = levels[j + 1] - levels[j]
            cost = max(errors[i, j + 1] - errors[i, j], 0.0) / (weights[i] * step)
            heapq.heappush(heap, (cost, i))

    for i in range(n):
        push(i)
    while heap and reached < target - 1e-15:
        _, i = heapq.heappop(heap)
        j = level_index[i]
        gain = weights[i] * (levels[j + 1] - levels[j])
        if reached + gain >= target:
            sparsity[i] = levels[j] + (target - reached) / weights[i]
            reached = target
            break
        level_index[i] = j + 1
        sparsity[i] = levels[j + 1]
        reached += gain
        push(i)
    return sparsity  # target <= levels[-1], so the walk always reaches it


def greedy_sparsities(curves: ErrorCurves, sparsity: float, scope: str = "layer") -> np.ndarray:
    if scope not in SCOPES:
        raise ActTailError(f"unknown greedy scope {scope!r}; choose layer or global")
    if not (0 <= sparsity <= curves.levels[-1]):
        raise ActTailError(f"greedy allocation supports sparsity in [0, {curves.levels[-1]}], got {sparsity}")
    params = np.array([p.params for p in curves.projections], dtype=np.float64)
    if scope == "global":
        return _greedy_path(curves.errors, curves.levels, params, sparsity)
    result = np.zeros(len(curves.projections))
    layers = np.array([p.layer for p in curves.projections])
    for layer in np.unique(layers):
        mask = layers == layer
        result[mask] = _greedy_path(curves.errors[mask], curves.levels, params[mask], sparsity)
    return result


def greedy_budget(
    loaded: LoadedModel,
    sparsity: float,
    scope: str = "layer",
    corpus: str = "demo",
    tokens: int = DEFAULT_TOKENS,
    alphas: Optional[Sequence[float]] = None,
    progress: Optional[ProgressFn] = None,
) -> Budget:
    """A validated ``Budget`` (method ``greedy``) at the target sparsity."""
    if not np.isfinite(sparsity) or not (0 <= sparsity < 1):
        raise ActTailError(f"sparsity must be in [0, 1), got {sparsity}")
    curves = measure_error_curves(loaded, corpus=corpus, tokens=tokens, progress=progress)
    sparsities = greedy_sparsities(curves, sparsity, scope)
    return make_budget(
        curves.projections,
        sparsities,
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        method="greedy",
        target_sparsity=sparsity,
        alphas=alphas,
        group="layer" if scope == "layer" else "projection",
    )
