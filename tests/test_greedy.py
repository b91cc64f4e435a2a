"""Greedy baseline: exact target, cheap projections sparsified first, per-layer scope, cached curves."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_core import greedy
from acttail_core.errors import ActTailError
from acttail_core.greedy import LEVELS, ErrorCurves, greedy_budget, greedy_sparsities
from acttail_core.projections import Projection


def synthetic_curves(costs: list[float], layers: list[int]) -> ErrorCurves:
    projections = [Projection(f"model.layers.{layer}.p{i}", layer, "q", 64, 64) for i, layer in enumerate(layers)]
    errors = np.array([[c * level**2 for level in LEVELS] for c in costs])
    return ErrorCurves(projections, LEVELS.copy(), errors, "synthetic", 0)


@pytest.mark.parametrize("target", [0.0, 0.13, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_target_and_bounds(target, scope) -> None:
    curves = synthetic_curves([1.0, 3.0, 0.5, 10.0], [0, 0, 1, 1])
    s = greedy_sparsities(curves, target, scope)
    assert abs(s.mean() - target) < 1e-9  # equal sizes: weighted mean = mean
    assert np.all(s >= 0) and np.all(s <= LEVELS[-1] + 1e-12)
    if scope == "layer":
        assert abs(s[:2].mean() - target) < 1e-9 and abs(s[2:].mean() - target) < 1e-9


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 512), st.integers(1, 512)), min_size=1, max_size=12),
    target=st.floats(0.0, float(LEVELS[-1])),
    scope=st.sampled_from(["layer", "global"]),
    seed=st.integers(0, 10_000),
)
def test_exact_target_for_any_curves(sizes, target, scope, seed) -> None:
    """Any projection sizes and any non-decreasing error curves: weighted mean exact, every s_i in [0, 0.95]."""
    projections = [Projection(f"model.layers.{layer}.p{i}", layer, "q", n_in, n_out)
                   for i, (layer, n_in, n_out) in enumerate(sizes)]
    steps = np.random.default_rng(seed).exponential(size=(len(sizes), len(LEVELS) - 1))
    errors = np.concatenate([np.zeros((len(sizes), 1)), np.cumsum(steps, axis=1)], axis=1)
    s = greedy_sparsities(ErrorCurves(projections, LEVELS.copy(), errors, "synthetic", 0), target, scope)
    params = np.array([p.params for p in projections], dtype=float)
    groups = [np.arange(len(sizes))] if scope == "global" else [
        np.flatnonzero([p.layer == layer for p in projections]) for layer in {p.layer for p in projections}]
    for index in groups:
        assert abs(np.dot(params[index], s[index]) / params[index].sum() - target) < 1e-9
    assert np.all(s >= 0) and np.all(s <= LEVELS[-1] + 1e-12)


def test_cheaper_projection_gets_more_sparsity() -> None:
    curves = synthetic_curves([1.0, 8.0], [0, 0])
    s = greedy_sparsities(curves, 0.5, "global")
    assert s[0] > s[1]


def test_rejects_out_of_range_target() -> None:
    with pytest.raises(ActTailError, match="greedy allocation supports"):
        greedy_sparsities(synthetic_curves([1.0], [0]), 0.97)
    with pytest.raises(ActTailError, match="scope"):
        greedy_sparsities(synthetic_curves([1.0], [0]), 0.5, "row")


def test_tiny_model_budget_and_cache(tiny_loaded, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    import shutil

    from acttail_core.corpora import demo_dir, ensure_demo_corpus

    # reuse the demo corpus of the real cache (set-up downloaded it) instead of downloading again
    monkeypatch.undo()
    real = ensure_demo_corpus()
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    shutil.copytree(real, demo_dir())

    calls = {"n": 0}
    original = greedy._capture_inputs

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(greedy, "_capture_inputs", counting)
    budget = greedy_budget(tiny_loaded, 0.6, tokens=128)
    assert budget.method == "greedy" and abs(budget.effective_sparsity - 0.6) < 1e-6
    assert len(budget.projections) == 14
    curves = greedy.measure_error_curves(tiny_loaded, tokens=128)
    assert calls["n"] == 1, "second measurement should come from the cache"
    assert np.all(curves.errors[:, 0] == 0) and np.all(curves.errors[:, -1] > curves.errors[:, 1])
    # more inputs zeroed never loses less output energy on the same tokens
    assert np.all(np.diff(curves.errors, axis=1) >= -1e-6)
