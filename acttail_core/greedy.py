"""Two direct baselines: greedy allocation from measured output error, per projection and per block (TEAL).

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

Errors are treated as additive and independent between projections; that
keeps this baseline to one forward pass plus a few matmuls per projection and
level.

``greedy-block`` is TEAL's block-wise greedy (``teal/greedyopt.py``) on our TopK:

1. One dense forward over calibration text records every decoder layer's call
   (its input and its other arguments: mask, positions, rotary embeddings).
2. Decoder layers are taken in order. Layer ``i`` reads ``h_i``, the output of
   layers ``0..i-1`` *with the sparsities already chosen for them*; its target
   is the dense layer's output on that same ``h_i``.
3. Inside the layer, starting from all-dense, every projection is tried one
   step sparser and the layer run again (all candidates of a step in one
   batched run); the step that adds the least squared error at the layer's
   output per unit of parameter-weighted sparsity wins.
   As in TEAL every step adds the same weighted sparsity: the largest
   projection of the layer moves by ``step``, a projection a quarter of its
   size by ``4 * step`` (capped at ``upper``, with its gain cut to match). The
   walk stops at the target; the last step is taken partially so the layer's
   weighted mean is exactly the target.
4. ``h_{i+1}`` = layer ``i`` with its chosen sparsities.

Differences from TEAL's code, all forced by cost on a CPU: the error is summed
over all positions of one chunk (TEAL: the last quarter of ten 2048-token
sequences), and the step is coarser (TEAL moves q by 0.05 and the MLP by about
0.02 on Llama-2-7B); TEAL records dense layer inputs, the issue asks for the
upstream sparsity applied, which is what this module does. One walk per
target, cached per model fingerprint, text, tokens, step and target.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .budget import MAX_TARGET, Budget, keep_count, make_budget
from .corpora import load_text, tokenize_corpus
from .errors import ActTailError
from .integrity import CacheIntegrityError, read_with_digest, write_with_digest
from .intercept import intercept
from .models import LoadedModel, cache_root
from .progress import ProgressFn, report
from .projections import Projection, decoder_layers, find_projections, weight_of

log = logging.getLogger(__name__)

LEVELS = np.round(np.arange(0.0, 0.951, 0.05), 4)
SCOPES = ("layer", "global")
DEFAULT_TOKENS = 512
BLOCK_STEP = 0.1  # greedy-block: the largest projection of a layer moves by this per step
BLOCK_TOKENS = 128
BLOCK_UPPER = 0.99


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


def _capture_inputs(
    loaded: LoadedModel, projections: Sequence[Projection], ids: torch.Tensor
) -> dict[str, torch.Tensor]:
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


# --------------------------------------------------------------------------- greedy-block (TEAL)


@dataclass
class _LayerCall:
    """One decoder layer's call, recorded during the dense forward (everything but the hidden state)."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict


def _record_layer_calls(loaded: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[_LayerCall]]:
    """The first decoder layer's input and every layer's call, from one dense forward."""
    _, layers = decoder_layers(loaded.model)
    calls: list[Optional[_LayerCall]] = [None] * len(layers)
    first: list[torch.Tensor] = []
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first.append(hidden.detach())
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[index] = _LayerCall(module, tuple(args[1:]), rest)

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            loaded.model(ids.to(loaded.input_device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not first or any(c is None for c in calls):
        raise ActTailError("greedy-block needs every decoder layer to run in the forward pass")
    return first[0], calls  # type: ignore[return-value]


def _layer_forward(call: _LayerCall, hidden: torch.Tensor) -> torch.Tensor:
    out = call.module(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _block_cache_file(fingerprint: str, corpus: str, tokens: int, step: float, target: float) -> Path:
    key = hashlib.sha256(f"block|{corpus}|{tokens}|{step}|{BLOCK_UPPER}|{target!r}".encode()).hexdigest()[:12]
    return cache_root() / "greedy" / f"{fingerprint}-block-{key}.json"


def block_steps(params: np.ndarray, step: float, upper: float = BLOCK_UPPER) -> np.ndarray:
    """Per-projection sparsity step: equal parameter-weighted gain, the largest projection moving by ``step``."""
    return np.minimum(step * params.max() / params, upper)


def _walk_block(errors_of, params: np.ndarray, target: float, step: float, upper: float = BLOCK_UPPER) -> np.ndarray:
    """TEAL's walk inside one layer, with an exact weighted mean.

    ``errors_of(trials)`` gives the layer's output error for each row of ``trials`` ([candidates, projections]
    sparsities): every step's candidates are measured together.
    """
    weights = params / params.sum()
    steps = block_steps(params, step, upper)
    current = np.zeros(len(params))
    error = 0.0
    reached = 0.0
    while reached < target - 1e-12:
        movable = [i for i in range(len(params)) if upper - current[i] > 1e-12]
        if not movable:  # every projection at the cap: the target is above upper (refused earlier)
            break
        increments = np.array([min(steps[i], upper - current[i]) for i in movable])
        trials = np.repeat(current[None, :], len(movable), axis=0)
        trials[np.arange(len(movable)), movable] += increments
        errors = np.asarray(errors_of(trials), dtype=np.float64)
        costs = (errors - error) / (weights[movable] * increments)
        best = int(np.argmin(costs))
        i, increment, error = movable[best], increments[best], float(errors[best])
        if reached + weights[i] * increment >= target:
            current[i] += (target - reached) / weights[i]
            break
        current[i] += increment
        reached += weights[i] * increment
    return current


class _BlockMasks:
    """TopK masks on one layer's projections, one keep count per projection *and batch row*.

    The sparsifier's semantics (keep |x| >= the keep-th largest magnitude of each token), applied through
    ``intercept`` like the sparsifier, so one forward over a batch of copies of the layer input measures every
    candidate of a step; ``tests/test_greedy.py`` checks each row against ``sparsify()``. Experts see their routed
    tokens of all rows mixed together, so a layer with experts is measured one candidate at a time
    (``batched`` False).
    """

    def __init__(self, projections: Sequence[Projection]) -> None:
        self.projections = list(projections)
        self.batched = all(p.expert is None for p in self.projections)
        self.keeps: dict[str, torch.Tensor] = {}

    def set(self, sparsities: np.ndarray) -> None:
        """Keep counts from ``sparsities`` ([rows, len(projections)])."""
        for j, proj in enumerate(self.projections):
            self.keeps[proj.name] = torch.tensor([keep_count(float(s), proj.in_features) for s in sparsities[:, j]])

    def __call__(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        keep = self.keeps[name].to(x.device)
        width = x.shape[-1]
        if bool((keep >= width).all()):
            return None
        # one keep count per batch row, or a single count for every token
        shape = (-1,) + (1,) * (x.dim() - 1) if keep.numel() > 1 else (1,) * x.dim()
        magnitude = x.abs()
        top = magnitude.topk(int(keep.clamp(1, width).max()), dim=-1).values
        index = (keep.clamp(1, width) - 1).view(shape).expand(*x.shape[:-1], 1)
        kth = top.gather(-1, index)
        kth = torch.where((keep >= width).view(shape), torch.zeros_like(kth), kth)
        kth = torch.where((keep <= 0).view(shape), torch.full_like(kth, math.inf), kth)  # keep 0: all masked
        return x * (magnitude >= kth)


def _squared_errors(masks: _BlockMasks, trials: np.ndarray, call: _LayerCall, hidden: torch.Tensor,
                    target: torch.Tensor) -> list[float]:
    """The layer's squared output error for each row of ``trials``, all rows in one batched run."""
    masks.set(trials)
    out = _layer_forward(call, hidden.expand(len(trials), *hidden.shape[1:]))
    return ((out - target) ** 2).float().sum(dim=tuple(range(1, out.dim()))).tolist()


def greedy_block_sparsities(
    loaded: LoadedModel,
    sparsity: float,
    corpus: str = "demo",
    tokens: int = BLOCK_TOKENS,
    step: float = BLOCK_STEP,
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
) -> np.ndarray:
    """Per-projection sparsities from TEAL's block-wise greedy (module docstring), every layer at ``sparsity``."""
    if not np.isfinite(sparsity) or not (0 <= sparsity <= MAX_TARGET):
        raise ActTailError(f"greedy-block supports sparsity in [0, {MAX_TARGET:g}], got {sparsity}")
    if not (0 < step <= 1):
        raise ActTailError(f"greedy-block step must be in (0, 1], got {step}")
    projections = find_projections(loaded.model)
    path = _block_cache_file(loaded.fingerprint, corpus, tokens, step, float(sparsity))
    if use_cache and path.exists():
        try:
            data = json.loads(read_with_digest(path))
            if data["names"] == [p.name for p in projections]:
                return np.array(data["sparsities"], dtype=np.float64)
        except (CacheIntegrityError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring greedy-block cache %s (%s); walking again", path, exc)
    result = np.zeros(len(projections))
    if sparsity > 0:
        ids = tokenize_corpus(loaded, load_text(corpus, role="calibration"), seqlen=tokens, max_tokens=tokens)[:1]
        hidden, calls = _record_layer_calls(loaded, ids)
        params = np.array([p.params for p in projections], dtype=np.float64)
        with torch.no_grad():
            for index, call in enumerate(calls):
                report(progress, index, len(calls), f"greedy-block layer {index + 1}/{len(calls)}")
                block = [i for i, p in enumerate(projections) if p.layer == index]
                masks = _BlockMasks([projections[i] for i in block])
                with intercept(loaded.model, masks.projections, masks):
                    masks.set(np.zeros((1, len(block))))
                    target = _layer_forward(call, hidden)  # the dense layer on the same (upstream-sparse) input

                    def errors_of(trials: np.ndarray) -> list[float]:
                        if masks.batched:
                            return _squared_errors(masks, trials, call, hidden, target)
                        return [_squared_errors(masks, trial[None, :], call, hidden, target)[0] for trial in trials]

                    if block:
                        result[block] = _walk_block(errors_of, params[block], sparsity, step)
                    masks.set(result[block][None, :])
                    hidden = _layer_forward(call, hidden)
        report(progress, len(calls), len(calls), "greedy-block done")
    if use_cache:
        data = {"names": [p.name for p in projections], "sparsities": result.tolist()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with_digest(path, json.dumps(data).encode("utf-8"))
        except (OSError, ActTailError) as exc:  # a read-only cache must not stop the allocation
            log.warning("could not write greedy-block cache: %s", exc)
    return result


def greedy_block_budget(
    loaded: LoadedModel,
    sparsity: float,
    corpus: str = "demo",
    tokens: int = BLOCK_TOKENS,
    step: float = BLOCK_STEP,
    alphas: Optional[Sequence[float]] = None,
    progress: Optional[ProgressFn] = None,
) -> Budget:
    """A validated ``Budget`` (method ``greedy-block``, group ``layer``) at the target sparsity."""
    sparsities = greedy_block_sparsities(loaded, sparsity, corpus=corpus, tokens=tokens, step=step, progress=progress)
    return make_budget(find_projections(loaded.model), sparsities, model_name=loaded.name,
                       model_fingerprint=loaded.fingerprint, method="greedy-block", target_sparsity=sparsity,
                       alphas=alphas, group="layer")


# The measured methods of ``methods.METHODS``, by name: ``(loaded, sparsity, alphas=..., progress=...) -> Budget``.
BUILDERS = {"greedy": greedy_budget, "greedy-block": greedy_block_budget}
