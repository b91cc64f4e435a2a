"""Stage 4: apply a budget to a loaded model, reversibly, and measure what it did.

``sparsify(model, budget)`` is a context manager that routes the input of every
budgeted projection through a mask (``intercept``: a forward pre-hook on a whole
``nn.Linear`` or ``Conv1D``, a hook recomputing the slices of a fused module, the
masked experts implementation inside a mixture of experts) and removes all of it on
exit (also on exceptions); weights are never touched, so the model is
bit-identical afterwards.

Two modes:

* ``topk`` (ActTail): for every token keep the ``keep`` entries of the
  projection's input with the largest magnitude. The k-th largest magnitude
  per row is found by a selection (no full sort, no scatter) and the input is
  masked with ``|x| >= kth``; ties at the k-th value keep a few extra entries,
  which the measurement reports. q, k and v (and gate, up) read the same
  tensor, also when they are slices of one fused weight: the selection is done
  once per distinct input and keep count.
* ``threshold`` (TEAL): one magnitude threshold per projection, calibrated on
  sample text (``calibrate_thresholds``) so that the expected fraction of zeros
  equals the budget; the mask is a single fused ``hardshrink``. On held-out text
  the realized sparsity drifts from the budget, most for o_proj: its input, an
  attention-weighted mean of v, depends on the position in the chunk and on the
  text, which one scalar threshold cannot follow (the README gives the measured
  drift). TopK has no such drift.

Realized sparsity is counted on the device (int64 counters, one reduction per
call) and only synchronised when read through ``SparsityStats``.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .budget import Budget, check_budget_matches
from .errors import ActTailError
from .intercept import intercept
from .projections import Projection, find_projections

log = logging.getLogger(__name__)

SPARSITY_MODES = ("topk", "threshold")
TOPK_IMPLS = ("auto", "triton", "kthvalue", "topk", "sort")
_ACTIVE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _check_mode(mode: str, topk_impl: str = "auto") -> None:
    if mode not in SPARSITY_MODES:
        raise ActTailError(f"unknown sparsity mode {mode!r}; choose topk or threshold")
    if topk_impl not in TOPK_IMPLS:
        raise ActTailError(f"unknown topk implementation {topk_impl!r}; choose one of {', '.join(TOPK_IMPLS)}")


_TRITON: list = []


def _triton_topk():
    """The fused Triton TopK mask (acttail_core.triton_topk.topk_mask) when importable, else None (imported once)."""
    if not _TRITON:
        try:
            if not torch.cuda.is_available():
                raise ImportError("no CUDA")
            from .triton_topk import topk_mask

            _TRITON.append(topk_mask)
        except Exception as exc:  # no triton, no GPU, or the module is absent: fall back to torch selections
            log.info("fused Triton TopK unavailable (%s); using torch selections", exc)
            _TRITON.append(None)
    return _TRITON[0]


class SparsityStats:
    """Realized sparsity per projection: zeros in the (masked) input / input entries seen."""

    def __init__(self, params: dict[str, int], targets: dict[str, float], mode: str) -> None:
        self.params = params
        self.targets = targets  # budget sparsity per projection (0 for dense)
        self.mode = mode
        self._kept: dict[str, torch.Tensor] = {}  # nonzeros passed on, int64 on the input's device
        self._total: dict[str, int] = {}

    def _add(self, name: str, kept: torch.Tensor | int, total: int) -> None:
        acc = self._kept.get(name)
        if acc is None:
            self._kept[name] = torch.as_tensor(kept, dtype=torch.int64).clone()
        else:
            acc.add_(kept)
        self._total[name] = self._total.get(name, 0) + total

    def reset(self) -> None:
        self._kept.clear()
        self._total.clear()

    def per_projection(self) -> dict[str, float]:
        """Realized sparsity of every projection that has seen input (one sync per device)."""
        names = list(self._kept)
        kept: dict[str, int] = {}
        by_device: dict[torch.device, list[str]] = {}
        for name in names:
            by_device.setdefault(self._kept[name].device, []).append(name)
        for group in by_device.values():
            values = torch.stack([self._kept[n] for n in group]).cpu().tolist()
            kept.update(zip(group, values))
        return {n: 1.0 - kept[n] / self._total[n] for n in names if self._total[n] > 0}

    def overall(self) -> float:
        """Parameter-weighted mean realized sparsity (NaN before any forward)."""
        realized = self.per_projection()
        if not realized:
            return float("nan")
        weight = sum(self.params[n] for n in realized)
        return sum(self.params[n] * s for n, s in realized.items()) / weight

    def max_deviation(self) -> float:
        """Largest |realized - target| over projections (0 before any forward)."""
        realized = self.per_projection()
        return max((abs(s - self.targets.get(n, 0.0)) for n, s in realized.items()), default=0.0)

    def to_frame(self):
        import pandas as pd

        realized = self.per_projection()
        rows = [
            {"name": n, "target": self.targets.get(n, 0.0), "realized": s, "params": self.params[n]}
            for n, s in realized.items()
        ]
        return pd.DataFrame(rows)


@dataclass
class _Rule:
    name: str
    keep: int  # topk: entries kept per token
    threshold: float  # threshold mode: zero |x| <= threshold (0 = no-op)


class _Masker:
    """The hooks' shared state: rules, measurement and the per-input selection cache."""

    def __init__(self, rules: dict[str, _Rule], mode: str, topk_impl: str, stats: SparsityStats, measure: bool) -> None:
        self.rules = rules
        self.mode = mode
        self.topk_impl = topk_impl
        self.stats = stats
        self.measure = measure
        self._last: Optional[torch.Tensor] = None  # held so its id cannot be reused while cached
        self._last_version: Optional[int] = None
        self._cache: dict[tuple, object] = {}

    def clear(self) -> None:
        self._last = None
        self._cache = {}

    def _cache_for(self, x: torch.Tensor) -> dict:
        try:
            version: Optional[int] = x._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
        if x is not self._last or version != self._last_version:
            self._last, self._last_version, self._cache = x, version, {}
        return self._cache

    def _impl(self, x: torch.Tensor) -> str:
        if self.topk_impl != "auto":
            return self.topk_impl
        if not x.is_cuda:
            return "topk"  # fastest of the torch selections on the CPU
        return "triton" if _triton_topk() is not None else "kthvalue"

    def _kth(self, a: torch.Tensor, keep: int, cache: dict, impl: str) -> torch.Tensor:
        """Per-row k-th largest magnitude, shape [..., 1], in the input dtype."""
        if impl == "sort":
            ordered = cache.get("sorted")
            if ordered is None:
                ordered = cache["sorted"] = a.sort(dim=-1, descending=True).values
            return ordered[..., keep - 1 : keep]
        if impl == "kthvalue":
            try:
                return a.kthvalue(a.shape[-1] - keep + 1, dim=-1, keepdim=True).values
            except (RuntimeError, NotImplementedError):  # a build without a half-precision kthvalue kernel
                return a.float().kthvalue(a.shape[-1] - keep + 1, dim=-1, keepdim=True).values.to(a.dtype)
        return a.topk(keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)

    def apply(self, rule: _Rule, x: torch.Tensor) -> Optional[torch.Tensor]:
        d = x.shape[-1]
        cache = self._cache_for(x)
        if self.mode == "threshold":
            key: tuple = ("thr", rule.threshold)
            active = rule.threshold > 0
        else:
            key = ("keep", rule.keep)
            active = rule.keep < d
        hit = cache.get(key)
        if hit is None:
            if not active:
                out = None
            elif self.mode == "threshold":
                out = F.hardshrink(x, rule.threshold)
            elif rule.keep <= 0:
                out = torch.zeros_like(x)
            elif (impl := self._impl(x)) == "triton":
                fused = _triton_topk()
                if fused is None:
                    raise ActTailError(
                        "topk_impl='triton' needs a CUDA GPU, the triton package and acttail_core.triton_topk"
                    )
                out = fused(x, rule.keep)
            else:
                a = cache.get("abs")
                if a is None:
                    a = cache["abs"] = x.abs()
                out = x * (a >= self._kth(a, rule.keep, cache, impl))
            kept = torch.count_nonzero(x if out is None else out) if self.measure else None
            hit = cache[key] = (out, kept)
        out, kept = hit
        if self.measure:
            self.stats._add(rule.name, kept, x.numel() // d * d)
        return out

    def transform(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``intercept``'s transform: the masked input of projection ``name`` (None: unchanged)."""
        try:
            return self.apply(self.rules[name], x)
        except BaseException:
            self.clear()  # e.g. CUDA OOM: drop cached tensors so a retry with a smaller batch has the memory
            raise


def _rules(
    projections: Sequence[Projection], budget: Optional[Budget], mode: str, thresholds: Optional[dict[str, float]]
) -> dict[str, _Rule]:
    if budget is None:
        return {p.name: _Rule(p.name, p.in_features, 0.0) for p in projections}
    check_budget_matches(budget, projections)
    rules = {}
    for entry in budget.projections:
        threshold = 0.0
        if mode == "threshold" and entry.sparsity > 0:
            if thresholds is None or entry.name not in thresholds:
                raise ActTailError(
                    f"threshold mode needs a calibrated threshold for {entry.name}; "
                    f"use calibrate_thresholds(...).thresholds_for(budget)"
                )
            threshold = float(thresholds[entry.name])
            if not np.isfinite(threshold) or threshold < 0:
                raise ActTailError(f"threshold for {entry.name} must be a finite number >= 0, got {threshold}")
        rules[entry.name] = _Rule(entry.name, entry.keep, threshold)
    return rules


@contextmanager
def sparsify(
    model: torch.nn.Module,
    budget: Optional[Budget],
    mode: str = "topk",
    thresholds: Optional[dict[str, float]] = None,
    *,
    measure: bool = True,
    topk_impl: str = "auto",
) -> Iterator[SparsityStats]:
    """Sparsify the inputs of the budget's projections inside the ``with`` block.

    ``budget=None`` leaves the model dense but still measures its natural zeros
    (no hooks at all when ``measure`` is False). ``thresholds`` (threshold mode)
    maps projection names to magnitude thresholds. ``topk_impl`` picks the
    selection kernel (``auto``: triton, else kthvalue on CUDA, topk on CPU; ``sort`` sorts
    each shared input once; ``triton`` the fused kernel of acttail_core.triton_topk,
    which ``auto`` picks on CUDA when it imports), for benchmarking.
    """
    _check_mode(mode, topk_impl)
    if model in _ACTIVE:
        raise ActTailError("this model is already inside a sparsify() block; nesting is not supported")
    projections = find_projections(model)
    rules = _rules(projections, budget, mode, thresholds)
    targets = budget.sparsity_by_name() if budget is not None else {p.name: 0.0 for p in projections}
    stats = SparsityStats({p.name: p.params for p in projections}, targets, mode if budget is not None else "dense")
    masker = _Masker(rules, mode, topk_impl, stats, measure)
    hooked = [p for p in projections if p.name in rules] if budget is not None or measure else []
    _ACTIVE.add(model)
    try:
        with intercept(model, hooked, masker.transform):
            yield stats
    finally:
        masker.clear()
        _ACTIVE.discard(model)


__all__ = [
    "SPARSITY_MODES",
    "TOPK_IMPLS",
    "SparsityStats",
    "sparsify",
]
