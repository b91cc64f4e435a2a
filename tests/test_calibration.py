"""Per-model calibration: the search's guarantees on synthetic objectives, and a tiny end-to-end run."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_core import calibration
from acttail_core.budget import load_budget
from acttail_core.calibration import (
    DIRECTIONS,
    GROUPS,
    MIN_GAIN,
    TEMPERATURES,
    UNIFORM,
    Choice,
    calibrate,
    coordinate_search,
    max_runs,
)
from acttail_core.errors import ActTailError
from acttail_core.projections import find_projections
from acttail_core.spectra import XMIN_RULES


def hashed_objective(seed: int, calls: list):
    """A reproducible random landscape over every possible choice (uniform included)."""

    def objective(choice: Choice) -> float:
        calls.append(choice)
        digest = hashlib.sha256(f"{seed}|{choice}".encode()).digest()
        return 5.0 + int.from_bytes(digest[:4], "little") / 2**32

    return objective


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 100_000), sweeps=st.integers(1, 4), gain=st.sampled_from([0.0, MIN_GAIN, 0.2]))
def test_search_guarantees_on_any_landscape(seed, sweeps, gain) -> None:
    """Any objective: each choice run once, at most max_runs runs, and the result is uniform or the best
    setting run, which then beats uniform by at least min_gain."""
    calls: list[Choice] = []
    result = coordinate_search(hashed_objective(seed, calls), max_sweeps=sweeps, min_gain=gain)
    assert len(calls) == len(set(calls)) == result.runs <= max_runs(sweeps)
    assert [c for c, _ in result.trace] == calls
    values = dict(result.trace)
    assert result.uniform_nll == values[UNIFORM]
    others = {c: v for c, v in values.items() if not c.is_uniform}
    if result.choice.is_uniform:
        assert min(others.values()) > values[UNIFORM] - gain
    else:
        assert result.nll == min(others.values()) <= values[UNIFORM] - gain
    assert result.nll <= result.uniform_nll  # on the calibration text, never worse than uniform


@pytest.mark.parametrize("best_t", TEMPERATURES)
@pytest.mark.parametrize("best_rule, best_group, best_direction", [
    ("mid", "projection", "keep-light"), ("ks", "layer", "keep-heavy"), ("peak", "type", "keep-light")])
def test_finds_the_optimum_of_a_separable_landscape(best_t, best_rule, best_group, best_direction) -> None:
    """Coordinate descent finds the optimum when the objective is separable and unimodal along the ladder."""
    rank = {v: i for values in (XMIN_RULES, GROUPS, DIRECTIONS) for i, v in enumerate(values)}

    def objective(choice: Choice) -> float:
        if choice.is_uniform:
            return 10.0
        return (math.log(choice.temperature / best_t) ** 2 + 0.3 * (choice.rule != best_rule)
                + 0.2 * (choice.group != best_group) + 0.5 * (choice.direction != best_direction)
                + 0.01 * rank[choice.rule])

    result = coordinate_search(objective)
    assert result.choice == Choice(best_t, best_direction, best_group, best_rule)
    assert result.runs <= max_runs()


def test_uniform_when_no_setting_gains_enough() -> None:
    result = coordinate_search(lambda c: 1.0 if c.is_uniform else 1.0 - MIN_GAIN / 2)
    assert result.choice == UNIFORM and result.nll == result.uniform_nll == 1.0


def test_nan_counts_as_worst_and_bad_arguments_are_refused() -> None:
    result = coordinate_search(lambda c: 1.0 if c.is_uniform else (math.nan if c.temperature > 0.15 else 0.5))
    assert result.choice.temperature <= 0.15 and math.isfinite(result.nll)
    with pytest.raises(ActTailError, match="above 0"):
        coordinate_search(lambda c: 1.0, start=UNIFORM)
    with pytest.raises(ActTailError, match="max_sweeps"):
        coordinate_search(lambda c: 1.0, max_sweeps=0)


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    """A fresh cache holding a copy of the demo texts (set-up downloaded them; no network here)."""
    from acttail_core.corpora import demo_dir, ensure_demo_corpus

    real = ensure_demo_corpus()
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    shutil.copytree(real, demo_dir())
    return tmp_path


def test_calibrate_tiny_model_end_to_end(tiny_loaded, demo_cache, tmp_path) -> None:
    """Real perplexity runs on a tiny model: the chosen budget carries the record and loads back (schema 2)."""
    found = calibrate(tiny_loaded, 0.6, texts=("demo:lcet10", "demo:asyoulik"), tokens=64, seqlen=64, max_sweeps=1)
    assert found.tokens == 2 * 63 and found.search.runs == len(found.search.trace) <= max_runs(1)
    assert found.search.nll <= found.search.uniform_nll
    spectra_for = calibration.SpectraByRule(tiny_loaded)
    budget = found.budget(spectra_for)
    assert abs(budget.effective_sparsity - 0.6) < 1e-9
    assert budget.knob("temperature") == found.choice.temperature and budget.xmin_rule == found.choice.rule
    record = budget.calibration
    assert record.runs == found.search.runs and record.texts == ["demo:lcet10", "demo:asyoulik"]
    path = tmp_path / "calibrated.json"
    path.write_text(budget.to_json())
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and data["calibration"]["search"] == "coordinate"
    again = load_budget(path, find_projections(tiny_loaded.model), tiny_loaded.fingerprint)
    assert again == budget
    # the recorded NLLs are the search's, and the chosen setting's is what evaluating its budget gives
    objective = calibration.PerplexityObjective(
        tiny_loaded, 0.6, calibration.calibration_chunks(tiny_loaded, found.texts, 64, 64), spectra_for)
    assert np.isclose(objective(found.choice), record.nll, rtol=1e-9)


@pytest.mark.parametrize("texts, message", [(("demo:alice29",), "demo evaluation text"), ((), "at least one")])
def test_refuses_evaluation_text_and_nothing(tiny_loaded, demo_cache, texts, message) -> None:
    with pytest.raises(ActTailError, match=message):
        calibrate(tiny_loaded, 0.5, texts=texts, tokens=64, seqlen=64)


def test_refuses_sparsity_zero_and_out_of_range(tiny_loaded) -> None:
    with pytest.raises(ActTailError, match="nothing to calibrate"):
        calibrate(tiny_loaded, 0.0)
    with pytest.raises(ActTailError, match="sparsity must be in"):
        calibrate(tiny_loaded, 0.99)
