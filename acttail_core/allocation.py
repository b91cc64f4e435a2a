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

``acttail`` (temperature ``0 <= T <= 1000``, default 0.15): the fraction of inputs
kept is log-linear in the score,

    keep_i = clip(c * exp(-T * score_i), 1 - upper, 1 - lower),  s_i = 1 - keep_i,

with ``c`` found by bisection (on ``log c``, so no exponential overflows at any
accepted ``T``) so that the weighted mean sparsity is exactly ``s``. ``T = 0`` is
exactly uniform; ``T = 1`` lets a projection one standard deviation above the
mean keep ``e`` times fewer inputs than one at the mean; larger ``T`` is more
strongly alpha-driven. Working on the kept fraction makes ``T`` mean the same
relative change at every sparsity, and clipping with redistribution keeps the
mean exact at high targets.

``linear`` (``eps`` in [0, 1)): AlphaPruning's map on the min-max scaled score,
``eta_i = (1 - eps) + 2 eps (score_i - min) / (max - min)``,
``s_i = clip(c * eta_i, lower, upper)`` with ``c`` solved the same way.

Both maps are monotone in alpha in the chosen direction (clipping preserves
order), and both redistribute clipped mass by re-solving ``c``. The target must
lie in ``[0, 0.95]`` and in ``[lower, upper]``; anything else is refused.

``greedy`` and ``greedy-block`` are listed with the methods but need the model,
not alpha: see ``greedy.greedy_budget`` and ``greedy.greedy_block_budget``.

Ablations (where does the gain come from?)
------------------------------------------
Two transforms of the measured alphas, fed to the same maps, separate what
alpha says about a projection's *type* from what it says about the projection:

* ``type_mean_alphas``: every projection gets the mean alpha of its type, so
  only the differences between types remain;
* ``permuted_alphas``: the alphas of each type shuffled among that type's
  projections (a seeded permutation), so every type keeps its mean and its
  spread but the link between a projection and its own alpha is cut.

If the permuted alphas do as well as the measured ones, alpha carries no
signal beyond the projection type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

from .budget import MAX_TARGET, Budget, make_budget
from .errors import ActTailError
from .methods import KNOBS, METHOD_NAMES, METHODS, is_measured
from .projections import Projection
from .spectra import Spectra, finite_alpha

DIRECTIONS = ("keep-heavy", "keep-light")
GROUPS = ("projection", "type", "layer")


@dataclass(frozen=True)
class AllocationSettings:
    """How alpha becomes budget.

    The defaults (acttail, keep-light, projection, T = 0.15, with the ``mid``
    xmin rule of ``spectra.DEFAULT_RULE``) won the allocation study's selection
    on lcet10 over SmolLM2-135M and Gemma-3-270M at sparsities 0.5-0.8
    (bench/results/study/round1_h200/report.md): the HT-SR reading
    (keep-heavy) lost to uniform there. ``calibration.calibrate`` chooses
    them per model and target instead.
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
            raise ActTailError(f"unknown method {self.method!r}; choose one of {', '.join(METHOD_NAMES)}")
        if self.direction not in DIRECTIONS:
            raise ActTailError(f"unknown direction {self.direction!r}; choose keep-heavy or keep-light")
        if self.group not in GROUPS:
            raise ActTailError(f"unknown group {self.group!r}; choose projection, type or layer")
        for knob in KNOBS:
            value = getattr(self, knob.name)
            if not (np.isfinite(value) and knob.accepts(value)):
                raise ActTailError(f"{knob.name} must be in {knob.range_text()}, got {value}")
        if not (0 <= self.lower < self.upper < 1):
            raise ActTailError(f"bounds must satisfy 0 <= lower < upper < 1, got {self.lower}, {self.upper}")
        return self


def check_target(sparsity: float, settings: AllocationSettings) -> None:
    """Refuse a target outside [0, MAX_TARGET] (to rounding: a budget's effective sparsity may exceed it by 1e-9)."""
    if not np.isfinite(sparsity) or not (0 <= sparsity <= MAX_TARGET + 1e-9):
        raise ActTailError(f"sparsity must be in [0, {MAX_TARGET:g}], got {sparsity}")
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
        layer_mean = np.array([alpha[layers == layer].mean() for layer in unique])
        layer_z = dict(zip(unique, _standardise(layer_mean)))
        z = np.array([layer_z[layer] for layer in layers])
    else:
        raise ActTailError(f"unknown group {group!r}")
    return z if direction == "keep-heavy" else -z


def _solve(values_at: Callable[[float], np.ndarray], weights: np.ndarray, target: float, lo: float, hi: float,
           low: float, high: float) -> np.ndarray:
    """Values ``values_at(b)`` in [low, high] whose weighted mean is ``target``.

    ``values_at`` is continuous and non-decreasing in ``b`` for every entry, with every entry at
    ``low`` for ``b = lo`` and at ``high`` for ``b = hi``. So the mean crosses the target inside
    [lo, hi]: bisection runs until the bracket is two adjacent floats (a finite bracket, so it always
    ends), then the last rounding error is spread over the entries strictly inside their bounds.
    """
    w = weights / weights.sum()
    if target <= low:
        return np.full(len(w), low)
    if target >= high:
        return np.full(len(w), high)
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if float(np.dot(w, values_at(mid))) < target:
            lo = mid
        else:
            hi = mid
    values = values_at(hi)
    free = (values > low) & (values < high)
    if free.any():
        values[free] += (target - float(np.dot(w, values))) / w[free].sum()
        values = np.clip(values, low, high)
    return values


def allocate_sparsities(
    alphas: Sequence[float],
    projections: Sequence[Projection],
    sparsity: float,
    settings: AllocationSettings = AllocationSettings(),
) -> np.ndarray:
    """Per-projection sparsities (same order as ``projections``) from alpha; greedy needs the model instead."""
    settings.validate()
    check_target(sparsity, settings)
    if is_measured(settings.method):
        raise ActTailError(f"the {settings.method} method measures the model's output error: use the greedy module")
    params = np.array([p.params for p in projections], dtype=np.float64)
    n = len(projections)
    if settings.method == "uniform" or sparsity == 0 or (settings.method == "linear" and settings.eps == 0):
        return np.full(n, float(sparsity))
    score = scores(alphas, projections, settings.group, settings.direction)
    if settings.method == "acttail":
        if settings.temperature == 0:
            return np.full(n, float(sparsity))
        # In log space, log keep_i = clip(b - T score_i, log low, log high) with b = log c: no exp can
        # overflow or underflow to zero at any accepted T, and b has a finite bracket.
        low, high = 1.0 - settings.upper, 1.0 - settings.lower
        exponent = -settings.temperature * score
        log_low, log_high = math.log(low), math.log(high)

        def keep_at(b: float) -> np.ndarray:
            return np.exp(np.clip(b + exponent, log_low, log_high))

        keep = _solve(keep_at, params, 1.0 - sparsity, log_low - exponent.max(), log_high - exponent.min(), low, high)
        # 1 - (1 - lower) can round below lower (lower = 1e-300 gives 0): clip back into the bounds
        return np.clip(1.0 - keep, settings.lower, settings.upper)
    # linear (AlphaPruning)
    spread = score.max() - score.min()
    unit = (score - score.min()) / spread if spread > 1e-12 else np.full(n, 0.5)
    eta = (1 - settings.eps) + 2 * settings.eps * unit  # >= 1 - eps > 0

    def sparsity_at(c: float) -> np.ndarray:
        return np.clip(c * eta, settings.lower, settings.upper)

    return _solve(sparsity_at, params, sparsity, 0.0, settings.upper / eta.min(), settings.lower, settings.upper)


def type_mean_alphas(alphas: Sequence[float], projections: Sequence[Projection]) -> np.ndarray:
    """Ablation: each projection's alpha replaced by the mean (finite) alpha of its type."""
    alpha = finite_alpha(np.asarray(alphas, dtype=np.float64))
    types = np.array([p.type for p in projections])
    out = np.empty_like(alpha)
    for t in dict.fromkeys(types):
        mask = types == t
        out[mask] = alpha[mask].mean()
    return out


def permuted_alphas(alphas: Sequence[float], projections: Sequence[Projection], seed: int) -> np.ndarray:
    """Ablation: the (finite) alphas of each type shuffled among that type's projections, reproducibly per seed."""
    alpha = finite_alpha(np.asarray(alphas, dtype=np.float64))
    types = np.array([p.type for p in projections])
    rng = np.random.default_rng(seed)
    out = alpha.copy()
    for t in dict.fromkeys(types):
        index = np.flatnonzero(types == t)
        out[index] = alpha[rng.permutation(index)]
    return out


def allocate(
    spectra: Spectra,
    sparsity: float,
    settings: AllocationSettings = AllocationSettings(),
    alphas: Optional[Sequence[float]] = None,
) -> Budget:
    """A validated ``Budget`` for the spectra's model at the target sparsity.

    ``alphas`` replaces the measured alphas (the ablations above); the budget then records those.
    """
    projections = spectra.projections()
    alphas = spectra.alphas() if alphas is None else np.asarray(alphas, dtype=np.float64)
    sparsities = allocate_sparsities(alphas, projections, sparsity, settings)
    uses_alpha = settings.method != "uniform"
    return make_budget(
        projections,
        sparsities,
        model_name=spectra.model_name,
        model_fingerprint=spectra.fingerprint,
        method=settings.method,
        target_sparsity=sparsity,
        alphas=alphas,
        params={knob.name: getattr(settings, knob.name) for knob in METHODS[settings.method].knobs},
        direction=settings.direction if uses_alpha else None,
        group=settings.group if uses_alpha else None,
        xmin_rule=spectra.rule if uses_alpha else None,
    )


def uniform_budget(
    projections: Sequence[Projection],
    sparsity: float,
    model_name: str,
    fingerprint: str,
    alphas: Optional[Sequence[float]] = None,
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


# --------------------------------------------------------------------------- what the map looks like


@dataclass(frozen=True)
class AllocationCurve:
    """The sparsity the allocation gives as a function of alpha, for one standardisation group."""

    label: str  # "all projections", a projection type, or "layers"
    x: np.ndarray  # grid over the group's range of alpha (or of a layer's mean alpha)
    sparsity: np.ndarray


@dataclass(frozen=True)
class AllocationCurves:
    """Every projection's (x, sparsity) point and the curves they lie on, at one target and setting."""

    x_label: str  # "alpha" or "mean alpha of the layer" (group="layer" scores layers, not projections)
    x: np.ndarray  # per projection, in the projections' order
    sparsity: np.ndarray  # per projection: the allocation itself
    curves: list[AllocationCurve]


def _score_inputs(alphas: np.ndarray, projections: Sequence[Projection], group: str) -> tuple[np.ndarray, list[str]]:
    """What each projection's score standardises (alpha, or its layer's mean alpha) and its standardisation group."""
    if group == "layer":
        layers = np.array([p.layer for p in projections])
        means = {layer: alphas[layers == layer].mean() for layer in dict.fromkeys(layers)}
        return np.array([means[layer] for layer in layers]), ["layers"] * len(projections)
    if group == "type":
        return alphas, [p.type for p in projections]
    return alphas, ["all projections"] * len(projections)


def _sparsity_of_score(score: np.ndarray, sparsities: np.ndarray, settings: AllocationSettings) -> Callable:
    """The solved map score -> sparsity, recovered from the projections that no bound clipped.

    ``allocate_sparsities`` solves one constant for all projections (acttail: ``keep = c exp(-T score)``;
    linear: ``s = c eta(score)``); any unclipped projection gives it back exactly (the median of all of
    them absorbs the last rounding spread).
    """
    low, high = settings.lower, settings.upper
    free = (sparsities > low + 1e-12) & (sparsities < high - 1e-12)
    if settings.method == "acttail":
        if free.any():
            log_c = float(np.median(np.log1p(-sparsities[free]) + settings.temperature * score[free]))
            return lambda s: np.clip(1.0 - np.exp(log_c - settings.temperature * s), low, high)
    else:  # linear
        spread = score.max() - score.min()

        def eta(s: np.ndarray) -> np.ndarray:
            unit = (s - score.min()) / spread if spread > 1e-12 else np.full(np.shape(s), 0.5)
            return (1 - settings.eps) + 2 * settings.eps * unit

        if free.any():
            c = float(np.median(sparsities[free] / eta(score[free])))
            return lambda s: np.clip(c * eta(s), low, high)
    # every projection at a bound: the map is a step through the points themselves
    order = np.argsort(score)
    return lambda s: np.interp(s, score[order], sparsities[order])


def allocation_curves(
    alphas: Sequence[float],
    projections: Sequence[Projection],
    sparsity: float,
    settings: AllocationSettings = AllocationSettings(),
    points: int = 80,
) -> AllocationCurves:
    """Where the allocation puts each projection and the curve(s) of alpha -> sparsity it follows.

    One curve per standardisation group: one for ``projection`` grouping, one per type for ``type``, and for
    ``layer`` one over the layer's mean alpha. The temperature sets the curve's steepness and the direction
    its sign; the target moves it up or down. ``uniform`` (and T = 0, eps = 0) is a flat line.
    """
    sparsities = allocate_sparsities(alphas, projections, sparsity, settings)
    alpha = finite_alpha(np.asarray(alphas, dtype=np.float64))
    x, groups = _score_inputs(alpha, projections, settings.group)
    x_label = "mean alpha of the layer" if settings.group == "layer" else "alpha"
    knob = settings.temperature if settings.method == "acttail" else settings.eps
    flat = settings.method == "uniform" or sparsity == 0 or knob == 0
    score = scores(alphas, projections, settings.group, settings.direction)
    mapping = None if flat else _sparsity_of_score(score, sparsities, settings)
    sign = 1.0 if settings.direction == "keep-heavy" else -1.0
    curves = []
    for label in dict.fromkeys(groups):
        members = np.array([g == label for g in groups])
        grid = np.linspace(x[members].min(), x[members].max(), points)
        if mapping is None:
            curves.append(AllocationCurve(label, grid, np.full(points, float(sparsity))))
            continue
        # The score is an affine function of x inside a group; standardised over the layers' means for "layer".
        reference = x[members]
        if settings.group == "layer":  # one value per layer, as scores() standardises them
            layers = np.array([p.layer for p in projections])
            reference = np.array([x[layers == layer][0] for layer in dict.fromkeys(layers)])
        std = reference.std()
        grid_score = np.zeros(points) if not np.isfinite(std) or std < 1e-12 else sign * (grid - reference.mean()) / std
        curves.append(AllocationCurve(label, grid, mapping(grid_score)))
    return AllocationCurves(x_label=x_label, x=x, sparsity=sparsities, curves=curves)


def settings_of(budget: Budget) -> tuple[float, AllocationSettings]:
    """The target and settings a budget records, so a view can be rebuilt (or a link written) from a budget file.

    Fields a method does not use keep their defaults. Whether the settings give back exactly this budget
    (not if it was edited, or made for other weights) is for the caller to check.
    """
    defaults = AllocationSettings()
    settings = AllocationSettings(
        method=budget.method,
        **{knob.name: getattr(defaults, knob.name) if budget.knob(knob.name) is None else budget.knob(knob.name)
           for knob in KNOBS},
        direction=budget.direction or defaults.direction,
        group=budget.group or defaults.group,
    )
    return budget.target_sparsity, settings
