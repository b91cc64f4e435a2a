"""Stage 3: from per-projection alpha to per-projection sparsity at a global target.

Every method returns sparsities ``s_i`` whose parameter-weighted mean
``sum_i P_i s_i / sum_i P_i`` (``P_i`` = weight count) equals the target ``s``
exactly (to 1e-9), with every ``s_i`` inside ``[lower, upper]`` (default 0 to
0.99). All methods share one score per projection:

* ``group="projection"``: ``z_i`` = alpha standardised across all projections;
* ``group="type"``: alpha standardised within its type (q, k, ...), so only
  differences between layers of the same type matter;
* ``group="layer"``: one score per layer, the mean alpha of its projections,
  standardised across layers (AlphaPruning's block-wise allocation).

``direction="keep-heavy"`` (the HT-SR reading: lower alpha = better trained =
keep more) makes the score ``+z``; ``keep-light`` (the reverse) makes it ``-z``.
A higher score always means more sparsity.

Methods
-------
``uniform``: ``s_i = s``.

``acttail`` (temperature ``T >= 0``, default 0.15): the fraction of inputs kept is
log-linear in the score,

    keep_i = clip(c * exp(-T * score_i), 1 - upper, 1 - lower),  s_i = 1 - keep_i,

with ``c`` found by bisection so that the weighted mean sparsity is exactly
``s``. ``T = 0`` is exactly uniform; ``T = 1`` lets a projection one standard
deviation above the mean keep ``e`` times fewer inputs than one at the mean;
larger ``T`` is more strongly alpha-driven. Working on the kept fraction makes
``T`` mean the same relative change at every sparsity, and clipping with
redistribution keeps the mean exact at high targets.

``linear`` (``eps`` in [0, 1)): AlphaPruning's map on the min-max scaled score,
``eta_i = (1 - eps) + 2 eps (score_i - min) / (max - min)``,
``s_i = clip(c * eta_i, lower, upper)`` with ``c`` solved the same way.

Both maps are monotone in alpha in the chosen direction (clipping preserves
order), and both redistribute clipped mass by re-solving ``c``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from .budget import Budget, make_budget
from .errors import ActTailError
from .projections import Projection
from .spectra import Spectra, finite_alpha

METHODS = ("uniform", "acttail", "linear")
DIRECTIONS = ("keep-heavy", "keep-light")
GROUPS = ("projection", "type", "layer")
MAX_TARGET = 0.95


@dataclass(frozen=True)
class AllocationSettings:
    """How alpha becomes budget.

    The defaults (acttail, keep-light, projection, T = 0.15, with the ``mid``
    xmin rule of ``spectra.DEFAULT_RULE``) won the allocation study's selection
    on lcet10 over SmolLM2-135M and Gemma-3-270M at sparsities 0.5-0.8
    (bench/results/study/report.md): the HT-SR reading (keep-heavy) lost to
    uniform there, as METHOD.md section 3 also found.
    """

    method: str = "acttail"
    temperature: float = 0.15
    eps: float = 0.3
    direction: str = "keep-light"
    group: str = "projection"
    lower: float = 0.0
    upper: float = 0.99

    def validate(self) -> "AllocationSettings":
        if self.method not in METHODS:
            raise ActTailError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.direction not in DIRECTIONS:
            raise ActTailError(f"unknown direction {self.direction!r}; choose keep-heavy or keep-light")
        if self.group not in GROUPS:
            raise ActTailError(f"unknown group {self.group!r}; choose projection, type or layer")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ActTailError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 <= self.eps < 1):
            raise ActTailError(f"eps must be in [0, 1), got {self.eps}")
        if not (0 <= self.lower < self.upper < 1):
            raise ActTailError(f"bounds must satisfy 0 <= lower < upper < 1, got {self.lower}, {self.upper}")
        return self


def check_target(sparsity: float, settings: AllocationSettings) -> None:
    if not np.isfinite(sparsity) or not (0 <= sparsity < 1):
        raise ActTailError(f"sparsity must be in [0, 1), got {sparsity}")
    if not (settings.lower <= sparsity <= settings.upper):
        raise ActTailError(f"sparsity {sparsity} is outside the bounds [{settings.lower}, {settings.upper}]")


def _standardise(values: np.ndarray) -> np.ndarray:
    std = values.std()
    if not np.isfinite(std) or std < 1e-12:
        return np.zeros_like(values)
    return (values - values.mean()) / std


def scores(
    alphas: Sequence[float],
    projections: Sequence[Projection],
    group: str = "projection",
    direction: str = "keep-light",
) -> np.ndarray:
    """Per-projection score; higher means more sparsity (see the module docstring)."""
    alpha = finite_alpha(np.asarray(alphas, dtype=np.float64))
    if group == "projection":
        z = _standardise(alpha)
    elif group == "type":
        z = np.zeros_like(alpha)
        types = np.array([p.type for p in projections])
        for t in dict.fromkeys(types):
            mask = types == t
            z[mask] = _standardise(alpha[mask])
    elif group == "layer":
        layers = np.array([p.layer for p in projections])
        unique = list(dict.fromkeys(layers))
        layer_mean = np.array([alpha[layers == l].mean() for l in unique])
        layer_z = dict(zip(unique, _standardise(layer_mean)))
        z = np.array([layer_z[l] for l in layers])
    else:
        raise ActTailError(f"unknown group {group!r}")
    return z if direction == "keep-heavy" else -z


def _solve_scale(base: np.ndarray, weights: np.ndarray, target: float, low: float, high: float) -> np.ndarray:
    """Find c with mean_w(clip(c * base, low, high)) == target; return the clipped values.

    ``base`` > 0. The mean is continuous and non-decreasing in c, so bisection converges.
    """
    w = weights / weights.sum()

    def mean_at(c: float) -> float:
        return float(np.dot(w, np.clip(c * base, low, high)))

    if target <= low + 1e-15:
        return np.full_like(base, low)
    if target >= high - 1e-15:
        return np.full_like(base, high)
    lo, hi = 0.0, 1.0
    while mean_at(hi) < target:
        hi *= 2.0
        if hi > 1e300:
            raise ActTailError("allocation did not converge: target unreachable within the bounds")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-16 * hi:
            break
    values = np.clip(hi * base, low, high)
    # Remove the last ~1e-16 of error on the unclipped entries so the mean is exact.
    free = (values > low) & (values < high)
    if free.any():
        residual = target - float(np.dot(w, values))
        values[free] += residual / w[free].sum()
        values = np.clip(values, low, high)
    return values


def allocate_sparsities(
    alphas: Sequence[float],
    projections: Sequence[Projection],
    sparsity: float,
    settings: AllocationSettings = AllocationSettings(),
) -> np.ndarray:
    """Per-projection sparsities (same order as ``projections``)."""
    settings.validate()
    check_target(sparsity, settings)
    params = np.array([p.params for p in projections], dtype=np.float64)
    n = len(projections)
    if settings.method == "uniform" or sparsity == 0 or (settings.method == "linear" and settings.eps == 0):
        return np.full(n, float(sparsity))
    score = scores(alphas, projections, settings.group, settings.direction)
    if settings.method == "acttail":
        if settings.temperature == 0:
            return np.full(n, float(sparsity))
        keep_base = np.exp(-settings.temperature * (score - score.max()))  # shift: avoids overflow, c absorbs it
        keep = _solve_scale(keep_base, params, 1.0 - sparsity, 1.0 - settings.upper, 1.0 - settings.lower)
        return 1.0 - keep
    # linear (AlphaPruning)
    spread = score.max() - score.min()
    unit = (score - score.min()) / spread if spread > 1e-12 else np.full(n, 0.5)
    eta = (1 - settings.eps) + 2 * settings.eps * unit
    if settings.eps >= 1 - 1e-12:
        eta = np.maximum(eta, 1e-12)
    return _solve_scale(eta, params, sparsity, settings.lower, settings.upper)


def allocate(spectra: Spectra, sparsity: float, settings: AllocationSettings = AllocationSettings()) -> Budget:
    """A validated ``Budget`` for the spectra's model at the target sparsity."""
    projections = spectra.projections()
    sparsities = allocate_sparsities(spectra.alphas(), projections, sparsity, settings)
    uses_alpha = settings.method != "uniform"
    return make_budget(
        projections,
        sparsities,
        model_name=spectra.model_name,
        model_fingerprint=spectra.fingerprint,
        method=settings.method,
        target_sparsity=sparsity,
        alphas=spectra.alphas(),
        temperature=settings.temperature if settings.method == "acttail" else None,
        eps=settings.eps if settings.method == "linear" else None,
        direction=settings.direction if uses_alpha else None,
        group=settings.group if uses_alpha else None,
        xmin_rule=spectra.rule if uses_alpha else None,
    )


def uniform_budget(
    projections: Sequence[Projection], sparsity: float, model_name: str, fingerprint: str, alphas: Optional[Sequence[float]] = None
) -> Budget:
    """The uniform baseline (every projection at ``sparsity``), needs no spectra."""
    check_target(sparsity, AllocationSettings())
    return make_budget(
        projections,
        [float(sparsity)] * len(projections),
        model_name=model_name,
        model_fingerprint=fingerprint,
        method="uniform",
        target_sparsity=sparsity,
        alphas=alphas,
    )


def with_method(settings: AllocationSettings, **changes) -> AllocationSettings:
    return replace(settings, **changes).validate()
