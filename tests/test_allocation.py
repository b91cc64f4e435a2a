"""Allocation invariants: exact weighted mean, bounds, monotone in alpha, uniform at the knob's end."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acttail_core.allocation import (
    MAX_TARGET,
    AllocationSettings,
    allocate_sparsities,
    permuted_alphas,
    scores,
    type_mean_alphas,
)
from acttail_core.errors import ActTailError
from acttail_core.methods import MAX_TEMPERATURE
from acttail_core.projections import PROJECTION_TYPES, Projection


def make_projections(layers: int, hidden: int = 64, inter: int = 160) -> list[Projection]:
    shapes = {"q": (hidden, hidden), "k": (hidden // 2, hidden), "v": (hidden // 2, hidden), "o": (hidden, hidden),
              "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return [Projection(f"model.layers.{layer}.{t}", layer, t, shapes[t][1], shapes[t][0])
            for layer in range(layers) for t in PROJECTION_TYPES]


def weighted_mean(projections, sparsities) -> float:
    params = np.array([p.params for p in projections], dtype=float)
    return float(np.dot(params, sparsities) / params.sum())


# The whole range the API accepts: any temperature up to the cap (the T = 70 missed the target),
# eps up to just below 1, any bounds 0 <= lower < upper < 1.
temperatures = st.one_of(st.floats(0.0, 6.0), st.floats(0.0, MAX_TEMPERATURE), st.sampled_from([70.0, MAX_TEMPERATURE]))


@st.composite
def accepted_inputs(draw):
    lower = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
    upper = draw(st.one_of(st.just(0.99), st.floats(lower, 1.0, exclude_min=True, exclude_max=True)))
    config = AllocationSettings(
        method=draw(st.sampled_from(["uniform", "acttail", "linear"])),
        temperature=draw(temperatures),
        eps=draw(st.floats(0.0, 1.0, exclude_max=True)),
        direction=draw(st.sampled_from(["keep-heavy", "keep-light"])),
        group=draw(st.sampled_from(["projection", "type", "layer"])),
        lower=lower,
        upper=upper,
    )
    target = draw(st.floats(lower, min(upper, MAX_TARGET)))
    return config, target


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 6),
    inputs=accepted_inputs(),
    seed=st.integers(0, 10_000),
    spread=st.one_of(st.floats(0.0, 10.0), st.floats(0.0, 1e6)),
    nan_at=st.one_of(st.none(), st.integers(0, 6)),
)
def test_mean_exact_and_bounds(layers, inputs, seed, spread, nan_at) -> None:
    config, target = inputs
    projections = make_projections(layers)
    alphas = 1.0 + spread * np.random.default_rng(seed).random(len(projections))
    if nan_at is not None:
        alphas[nan_at] = np.nan  # a degenerate fit
    s = allocate_sparsities(alphas, projections, target, config)
    assert np.all(np.isfinite(s))
    assert abs(weighted_mean(projections, s) - target) < 1e-9
    assert np.all(s >= config.lower) and np.all(s <= config.upper)


@pytest.mark.parametrize("temperature", [70.0, 1e3])
def test_large_temperature_meets_the_target(temperature) -> None:
    """The issue's case: exp overflowed and `--sparsity 0.5 --temperature 70` gave 0.3785."""
    projections = make_projections(30)
    alphas = 2.0 + 8.0 * np.random.default_rng(5).random(len(projections))
    s = allocate_sparsities(alphas, projections, 0.5, AllocationSettings(temperature=temperature))
    assert abs(weighted_mean(projections, s) - 0.5) < 1e-12


@settings(max_examples=200, deadline=None)
@given(
    target=st.floats(0.0, 0.95),
    temperature=st.floats(0.01, 6.0),
    eps=st.floats(0.01, 0.95),
    method=st.sampled_from(["acttail", "linear"]),
    direction=st.sampled_from(["keep-heavy", "keep-light"]),
    seed=st.integers(0, 10_000),
)
def test_monotone_in_alpha(target, temperature, eps, method, direction, seed) -> None:
    projections = make_projections(4)
    alphas = 2.0 + 8.0 * np.random.default_rng(seed).random(len(projections))
    config = AllocationSettings(method=method, temperature=temperature, eps=eps, direction=direction,
                                group="projection")
    s = allocate_sparsities(alphas, projections, target, config)
    order = np.argsort(alphas)
    ordered = s[order]
    if direction == "keep-heavy":  # lower alpha keeps more -> sparsity rises with alpha
        assert np.all(np.diff(ordered) >= -1e-9)
    else:
        assert np.all(np.diff(ordered) <= 1e-9)


def test_monotone_within_type_for_type_grouping() -> None:
    projections = make_projections(6)
    alphas = 2.0 + 8.0 * np.random.default_rng(1).random(len(projections))
    s = allocate_sparsities(alphas, projections, 0.6,
                            AllocationSettings(group="type", direction="keep-heavy", temperature=1.5))
    types = np.array([p.type for p in projections])
    for t in PROJECTION_TYPES:
        mask = types == t
        order = np.argsort(alphas[mask])
        assert np.all(np.diff(s[mask][order]) >= -1e-9)


def test_layer_grouping_gives_one_sparsity_per_layer() -> None:
    projections = make_projections(5)
    alphas = 2.0 + 8.0 * np.random.default_rng(2).random(len(projections))
    s = allocate_sparsities(alphas, projections, 0.5, AllocationSettings(group="layer", temperature=2.0))
    for layer in range(5):
        values = s[[i for i, p in enumerate(projections) if p.layer == layer]]
        assert np.ptp(values) < 1e-12
    assert np.ptp(s) > 0.01


@pytest.mark.parametrize("target", [0.0, 0.3, 0.7, 0.95])
def test_uniform_at_the_knobs_end(target) -> None:
    projections = make_projections(3)
    alphas = 2.0 + 8.0 * np.random.default_rng(3).random(len(projections))
    for config in (AllocationSettings(method="acttail", temperature=0.0), AllocationSettings(method="linear", eps=0.0),
                   AllocationSettings(method="uniform")):
        s = allocate_sparsities(alphas, projections, target, config)
        np.testing.assert_array_equal(s, np.full(len(projections), target))


def test_temperature_is_a_smooth_knob() -> None:
    projections = make_projections(4)
    alphas = 2.0 + 8.0 * np.random.default_rng(4).random(len(projections))
    spreads = [np.std(allocate_sparsities(alphas, projections, 0.5, AllocationSettings(temperature=t)))
               for t in (0, 0.25, 0.5, 1, 2)]
    assert spreads[0] == 0 and all(b > a for a, b in zip(spreads, spreads[1:]))


def test_direction_reverses_scores() -> None:
    projections = make_projections(2)
    alphas = np.linspace(2, 9, len(projections))
    np.testing.assert_allclose(scores(alphas, projections, "projection", "keep-heavy"),
                               -scores(alphas, projections, "projection", "keep-light"))


def test_nan_alpha_is_tolerated() -> None:
    projections = make_projections(2)
    alphas = np.linspace(2, 9, len(projections))
    alphas[3] = np.nan
    s = allocate_sparsities(alphas, projections, 0.5, AllocationSettings())
    assert np.all(np.isfinite(s)) and abs(weighted_mean(projections, s) - 0.5) < 1e-6


@pytest.mark.parametrize(
    "target, config, message",
    [
        (1.5, AllocationSettings(), "sparsity must be in"),
        (-0.1, AllocationSettings(), "sparsity must be in"),
        (float("nan"), AllocationSettings(), "sparsity must be in"),
        (0.5, AllocationSettings(method="magic"), "unknown method"),
        (0.5, AllocationSettings(direction="up"), "unknown direction"),
        (0.5, AllocationSettings(group="row"), "unknown group"),
        (0.5, AllocationSettings(temperature=-1), "temperature"),
        (0.5, AllocationSettings(temperature=1e6), r"temperature must be in \[0, 1000\]"),
        (0.5, AllocationSettings(temperature=float("inf")), "temperature"),
        (0.99, AllocationSettings(), r"sparsity must be in \[0, 0.95\]"),
        (0.5, AllocationSettings(method="greedy"), "greedy method measures"),
        (0.5, AllocationSettings(method="greedy-block"), "greedy-block method measures"),
        (0.5, AllocationSettings(eps=1.0), "eps"),
        (0.5, AllocationSettings(lower=0.6, upper=0.9), "outside the bounds"),
    ],
)
def test_bad_settings_are_clear_errors(target, config, message) -> None:
    projections = make_projections(1)
    with pytest.raises(ActTailError, match=message):
        allocate_sparsities(np.linspace(2, 5, 7), projections, target, config)


# --------------------------------------------------------------------------- ablation transforms


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 8), seed=st.integers(0, 10_000), nan_at=st.one_of(st.none(), st.integers(0, 6)))
def test_type_means_and_permutations_keep_each_type_s_alphas(layers, seed, nan_at) -> None:
    """(a) one value per type, equal to the type's mean; (b) each type's multiset of alphas, reproducible per seed."""
    projections = make_projections(layers)
    alphas = 1.5 + 8.0 * np.random.default_rng(seed).random(len(projections))
    if nan_at is not None:
        alphas[nan_at] = np.nan  # treated as allocation treats it: the median of the finite alphas
    finite = np.where(np.isfinite(alphas), alphas, np.nanmedian(alphas))
    types = np.array([p.type for p in projections])
    means = type_mean_alphas(alphas, projections)
    shuffled = permuted_alphas(alphas, projections, seed)
    for t in PROJECTION_TYPES:
        mask = types == t
        np.testing.assert_allclose(means[mask], finite[mask].mean())
        np.testing.assert_allclose(np.sort(shuffled[mask]), np.sort(finite[mask]))
    np.testing.assert_array_equal(shuffled, permuted_alphas(alphas, projections, seed))


def test_permutation_moves_alphas_between_layers_and_seeds_differ() -> None:
    projections = make_projections(12)
    alphas = np.arange(len(projections), dtype=float) + 2.0  # all distinct
    first, second = (permuted_alphas(alphas, projections, seed) for seed in (0, 1))
    assert np.mean(first != alphas) > 0.5 and np.any(first != second)


def test_type_means_make_type_grouping_uniform_and_projection_grouping_type_only() -> None:
    """With type-mean alphas, within-type standardisation has nothing left (uniform), and across-type
    grouping gives every projection of a type the same sparsity."""
    projections = make_projections(5)
    alphas = type_mean_alphas(2.0 + 8.0 * np.random.default_rng(7).random(len(projections)), projections)
    by_type = allocate_sparsities(alphas, projections, 0.6, AllocationSettings(group="type", temperature=1.0))
    np.testing.assert_allclose(by_type, 0.6)
    across = allocate_sparsities(alphas, projections, 0.6, AllocationSettings(temperature=1.0))
    types = np.array([p.type for p in projections])
    assert all(np.ptp(across[types == t]) < 1e-12 for t in PROJECTION_TYPES) and np.ptp(across) > 0.01
