"""What the dashboard shows of an allocation: the alpha -> sparsity curves and the settings a budget records."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acttail_core.allocation import AllocationSettings, allocate_sparsities, allocation_curves, settings_of
from acttail_core.budget import make_budget
from acttail_core.methods import METHODS
from tests.test_allocation import make_projections


def _on_curve(curves, groups) -> np.ndarray:
    """Each projection's sparsity read off its group's curve at its x."""
    by_label = {curve.label: curve for curve in curves.curves}
    return np.array([np.interp(x, by_label[g].x, by_label[g].sparsity) for x, g in zip(curves.x, groups)])


def _groups(projections, group: str) -> list[str]:
    if group == "type":
        return [p.type for p in projections]
    return ["layers" if group == "layer" else "all projections"] * len(projections)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["acttail", "linear", "uniform"]),
    group=st.sampled_from(["projection", "type", "layer"]),
    direction=st.sampled_from(["keep-heavy", "keep-light"]),
    knob=st.floats(0.0, 0.9),
    target=st.floats(0.05, 0.9),
    seed=st.integers(0, 1000),
)
def test_every_projection_lies_on_its_groups_curve(method, group, direction, knob, target, seed) -> None:
    projections = make_projections(4)
    alphas = 2.0 + 2.0 * np.random.default_rng(seed).random(len(projections))
    config = AllocationSettings(method=method, temperature=3 * knob, eps=knob, direction=direction, group=group)
    curves = allocation_curves(alphas, projections, target, config, points=4000)
    np.testing.assert_allclose(curves.sparsity, allocate_sparsities(alphas, projections, target, config))
    np.testing.assert_allclose(_on_curve(curves, _groups(projections, group)), curves.sparsity, atol=2e-3)
    assert curves.x_label == ("mean alpha of the layer" if group == "layer" else "alpha")
    assert len(curves.curves) == (7 if group == "type" else 1)


def test_direction_sets_the_slope_and_temperature_its_steepness() -> None:
    projections = make_projections(5)
    alphas = np.linspace(2.0, 5.0, len(projections))
    light = allocation_curves(alphas, projections, 0.5, AllocationSettings(temperature=1.0)).curves[0]
    heavy_settings = AllocationSettings(temperature=1.0, direction="keep-heavy")
    heavy = allocation_curves(alphas, projections, 0.5, heavy_settings).curves[0]
    # keep-light keeps high alpha (the bounds flatten the ends)
    assert np.all(np.diff(light.sparsity) <= 0) and light.sparsity[0] > light.sparsity[-1]
    assert np.all(np.diff(heavy.sparsity) >= 0) and heavy.sparsity[0] < heavy.sparsity[-1]
    steep = allocation_curves(alphas, projections, 0.5, AllocationSettings(temperature=3.0)).curves[0]
    assert np.ptp(steep.sparsity) > np.ptp(light.sparsity)
    flat = allocation_curves(alphas, projections, 0.5, AllocationSettings(temperature=0.0)).curves[0]
    assert np.all(flat.sparsity == 0.5)


def test_settings_of_a_budget_rebuild_it() -> None:
    projections = make_projections(3)
    alphas = np.linspace(2.0, 4.0, len(projections))
    for config in (AllocationSettings(temperature=0.7, direction="keep-heavy", group="type"),
                   AllocationSettings(method="linear", eps=0.4, group="layer"), AllocationSettings(method="uniform")):
        sparsities = allocate_sparsities(alphas, projections, 0.6, config)
        uses_alpha = config.method != "uniform"
        budget = make_budget(
            projections, sparsities, model_name="m", model_fingerprint="f", method=config.method, target_sparsity=0.6,
            params={knob.name: getattr(config, knob.name) for knob in METHODS[config.method].knobs},
            direction=config.direction if uses_alpha else None, group=config.group if uses_alpha else None,
        )
        target, rebuilt = settings_of(budget)
        assert target == 0.6
        np.testing.assert_allclose(allocate_sparsities(alphas, projections, target, rebuilt), sparsities)
        assert rebuilt.method == config.method


def test_greedy_has_no_curve() -> None:
    with pytest.raises(Exception, match="greedy"):
        allocation_curves(np.ones(7), make_projections(1), 0.5, AllocationSettings(method="greedy"))


def test_budget_differences_and_summaries() -> None:
    from acttail_core.budget import budget_key, describe, mean_sparsity_by, sparsity_difference
    from acttail_core.errors import BudgetError

    projections = make_projections(2)
    alphas = np.linspace(2.0, 4.0, len(projections))
    sparsities = allocate_sparsities(alphas, projections, 0.6, AllocationSettings(temperature=1.0))
    budget = make_budget(projections, sparsities, model_name="m", model_fingerprint="f", method="acttail",
                         target_sparsity=0.6, params={"temperature": 1.0}, direction="keep-light",
                         group="projection")
    uniform = make_budget(projections, [0.6] * len(projections), model_name="m", model_fingerprint="f",
                          method="uniform", target_sparsity=0.6)
    difference = sparsity_difference(budget, uniform)
    assert difference[projections[0].name] == pytest.approx(sparsities[0] - 0.6)
    params = np.array([p.params for p in projections])
    assert np.dot(params, list(difference.values())) == pytest.approx(0.0, abs=1e-9)  # same weighted mean
    by_layer = mean_sparsity_by(budget, "layer")
    assert list(by_layer) == [0, 1]
    first = slice(0, 7)
    assert by_layer[0] == pytest.approx(np.dot(params[first], sparsities[first]) / params[first].sum())
    assert list(mean_sparsity_by(budget, "type")) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert describe(budget) == "acttail (T=1, keep-light, projection)" and describe(uniform) == "uniform"
    assert budget_key(budget) != budget_key(uniform)
    again = make_budget(projections, [0.6] * len(projections), model_name="other", model_fingerprint="g",
                        method="uniform", target_sparsity=0.6)
    assert budget_key(again) == budget_key(uniform)  # what it does, not who made it
    with pytest.raises(BudgetError, match="different projections"):
        sparsity_difference(budget, make_budget(projections[:7], [0.6] * 7, model_name="m", model_fingerprint="f",
                                                method="uniform", target_sparsity=0.6))
    with pytest.raises(BudgetError):
        mean_sparsity_by(budget, "colour")
