"""Greedy baseline: exact target, cheap projections sparsified first, per-layer scope, cached curves."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_core import greedy
from acttail_core.budget import make_budget
from acttail_core.corpora import demo_dir, ensure_demo_corpus
from acttail_core.errors import ActTailError
from acttail_core.greedy import LEVELS, ErrorCurves, greedy_budget, greedy_sparsities
from acttail_core.intercept import intercept
from acttail_core.models import from_module
from acttail_core.projections import Projection, decoder_layers, find_projections
from acttail_core.sparsify import sparsify
from tests.conftest import byte_tokenizer, make_tiny_family


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


# --------------------------------------------------------------------------- greedy-block (TEAL)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=7),
    target=st.floats(0.0, 0.95),
    step=st.sampled_from([0.05, 0.1, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_block_walk_exact_mean_and_bounds(sizes, target, step, seed) -> None:
    """Any layer shape and any convex separable error: weighted mean exactly the target, every s in [0, upper]."""
    params = np.array(sizes, dtype=float)
    costs = np.random.default_rng(seed).exponential(size=len(sizes))
    s = greedy._walk_block(lambda trials: trials**2 @ costs, params, target, step)
    assert abs(np.dot(params, s) / params.sum() - target) < 1e-9
    assert np.all(s >= 0) and np.all(s <= greedy.BLOCK_UPPER + 1e-12)


def test_block_walk_takes_the_step_with_least_output_error() -> None:
    """Equal sizes: every step has the same weighted gain, so the cheaper projection is sparsified first (TEAL)."""
    params = np.array([100.0, 100.0, 100.0])
    batches = []

    def errors_of(trials):
        batches.append(trials.copy())
        return trials**2 @ np.array([1.0, 50.0, 5.0])

    s = greedy._walk_block(errors_of, params, 0.2, 0.1)
    assert s[0] > s[2] > s[1] - 1e-12 and abs(s.mean() - 0.2) < 1e-12
    # each step tried every projection once, each candidate one step beyond the current sparsities
    assert all(len(b) == 3 and np.allclose(np.diag(b - b.min(axis=0)), 0.1) for b in batches)
    np.testing.assert_allclose(greedy.block_steps(np.array([400.0, 100.0]), 0.1), [0.1, 0.4])


def test_greedy_block_on_tiny_model_applies_upstream_sparsity_and_caches(tiny_loaded, tmp_path, monkeypatch) -> None:
    real = ensure_demo_corpus()
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    shutil.copytree(real, demo_dir())
    seen = []
    original = greedy._layer_forward

    def spy(call, hidden):
        seen.append((call.module, hidden.clone()))
        return original(call, hidden)

    monkeypatch.setattr(greedy, "_layer_forward", spy)
    budget = greedy.greedy_block_budget(tiny_loaded, 0.6, tokens=64, step=0.25)
    assert budget.method == "greedy-block" and budget.group == "layer" and budget.calibration is None
    assert abs(budget.effective_sparsity - 0.6) < 1e-9
    per_layer = {}
    for entry in budget.projections:
        per_layer.setdefault(entry.layer, []).append((entry.params, entry.sparsity))
    for values in per_layer.values():  # TEAL's constraint: every block at the target
        assert abs(sum(p * s for p, s in values) / sum(p for p, _ in values) - 0.6) < 1e-9
    assert len({round(e.sparsity, 6) for e in budget.projections}) > 2  # not uniform
    # layer 1's first call (its dense target) reads layer 0's output *with layer 0's chosen sparsities*
    _, layers = decoder_layers(tiny_loaded.model)
    first_of_layer1 = next(h for module, h in seen if module is layers[1])
    first_of_layer0 = next(h for module, h in seen if module is layers[0])
    _, calls = greedy._record_layer_calls(tiny_loaded, first_of_layer1.new_zeros(1, 64, dtype=torch.long))
    with torch.no_grad():
        dense = original(greedy._LayerCall(layers[0], calls[0].args, calls[0].kwargs), first_of_layer0)
        with sparsify(tiny_loaded.model, budget, measure=False):
            sparse = original(greedy._LayerCall(layers[0], calls[0].args, calls[0].kwargs), first_of_layer0)
    torch.testing.assert_close(first_of_layer1, sparse)
    assert not torch.allclose(first_of_layer1, dense)
    # a second request is read from the cache: no layer runs at all
    seen.clear()
    again = greedy.greedy_block_budget(tiny_loaded, 0.6, tokens=64, step=0.25)
    assert not seen and again.sparsity_by_name() == budget.sparsity_by_name()
    with pytest.raises(ActTailError, match="greedy-block supports"):
        greedy.greedy_block_sparsities(tiny_loaded, 0.97)


def test_block_masks_match_the_sparsifier_row_by_row(tiny_loaded) -> None:
    """One batched run of copies of a layer's input with a keep count per row equals, row by row, the same
    layer run under sparsify() with each row's budget (the engine's TopK semantics)."""
    projections = find_projections(tiny_loaded.model)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    hidden, calls = greedy._record_layer_calls(tiny_loaded, ids)
    block = [i for i, p in enumerate(projections) if p.layer == 0]
    rows = np.random.default_rng(3).uniform(0, 0.9, size=(4, len(block)))
    rows[0] = 0.0  # a dense row among sparse ones
    masks = greedy._BlockMasks([projections[i] for i in block])
    assert masks.batched  # no experts in a Llama layer
    masks.set(rows)
    with torch.no_grad(), intercept(tiny_loaded.model, masks.projections, masks):
        batched = greedy._layer_forward(calls[0], hidden.expand(len(rows), *hidden.shape[1:]))
    for row, sparsities in zip(batched, rows):
        full = np.zeros(len(projections))
        full[block] = sparsities
        effective = float(np.dot([p.params for p in projections], full) / sum(p.params for p in projections))
        budget = make_budget(projections, full, model_name="tiny", model_fingerprint="x", method="greedy-block",
                             target_sparsity=effective)
        with torch.no_grad(), sparsify(tiny_loaded.model, budget, measure=False):
            alone = greedy._layer_forward(calls[0], hidden)
        torch.testing.assert_close(row, alone[0], rtol=1e-5, atol=1e-5)
    assert not any(h for module in tiny_loaded.model.modules() for h in module._forward_pre_hooks.values())


@pytest.mark.parametrize("family", ["mixtral", "phi3"])
def test_greedy_block_on_experts_and_fused_projections(family, tmp_path, monkeypatch) -> None:
    """Experts (measured one candidate at a time) and fused slices (q/k/v of one qkv_proj) reach the exact per-layer
    target through the same intercept as the sparsifier."""
    real = ensure_demo_corpus()
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    shutil.copytree(real, demo_dir())
    loaded = from_module(make_tiny_family(family, layers=1), byte_tokenizer(), name=f"tiny-{family}")
    projections = find_projections(loaded.model)
    masks = greedy._BlockMasks(projections)
    assert masks.batched == (family != "mixtral")
    s = greedy.greedy_block_sparsities(loaded, 0.3, tokens=16, step=0.3, use_cache=False)  # coarse: seconds
    params = np.array([p.params for p in projections], dtype=float)
    for layer in {p.layer for p in projections}:
        block = [i for i, p in enumerate(projections) if p.layer == layer]
        assert abs(np.dot(params[block], s[block]) / params[block].sum() - 0.3) < 1e-9
    assert np.ptp(s) > 0  # the walk chose, it did not spread evenly
