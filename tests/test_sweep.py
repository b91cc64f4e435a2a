"""Perplexity against sparsity (acttail_core.sweep) and the progress helper it relies on."""
from __future__ import annotations

import pytest

from acttail_core import evaluate
from acttail_core.allocation import AllocationSettings
from acttail_core.errors import ActTailError
from acttail_core.evaluate import EvalSettings
from acttail_core.progress import part
from acttail_core.spectra import compute_spectra
from acttail_core.sweep import parse_targets, sweep, sweep_runs
from tests.test_evaluate import TEXT


@pytest.fixture
def tiny_spectra(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    return compute_spectra(tiny_loaded)


def test_part_maps_a_step_onto_the_whole_job():
    seen = []
    step = part(lambda done, total, message: seen.append((done, total, message)), 2, 4)
    step(1, 3, "x")
    assert seen == [(7, 12, "x")]
    assert part(None, 0, 1) is None


def test_parse_targets():
    assert parse_targets("0.7, 0.3 0.5,0.5") == [0.3, 0.5, 0.7]
    for bad, message in (("0.3, x", "not a number"), ("0.99", "outside"), ("", "at least one"), ("0", "outside")):
        with pytest.raises(ActTailError, match=message):
            parse_targets(bad)


def test_sweep_runs_dense_once_and_drops_duplicate_budgets(tiny_loaded, tiny_spectra):
    runs = sweep_runs(tiny_loaded, tiny_spectra, [0.3, 0.6], ["dense", "uniform", "settings"], AllocationSettings())
    assert [(r.method, r.target) for r in runs] == [("dense", 0.0), ("uniform", 0.3), ("settings", 0.3),
                                                     ("uniform", 0.6), ("settings", 0.6)]
    assert runs[2].label.startswith("acttail (T=0.15")
    assert runs[2].budget.effective_sparsity == pytest.approx(0.3)
    same = sweep_runs(tiny_loaded, tiny_spectra, [0.5], ["uniform", "settings"], AllocationSettings(method="uniform"))
    assert [r.method for r in same] == ["uniform"]  # the setting is uniform: measured once
    with pytest.raises(ActTailError, match="unknown sweep method"):
        sweep_runs(tiny_loaded, tiny_spectra, [0.5], ["magic"])


def test_sweep_measures_each_point_once(tiny_loaded, tiny_spectra, tmp_path, monkeypatch):
    corpus = tmp_path / "eval.txt"
    corpus.write_text(TEXT)
    cache: dict = {}
    progress = []
    evaluation = EvalSettings(corpus=str(corpus), max_tokens=128, seqlen=64)
    rows = sweep(tiny_loaded, tiny_spectra, [0.3, 0.6], ["dense", "uniform", "settings"], evaluation=evaluation,
                 cache=cache, progress=lambda d, t, m: progress.append((d, t)))
    assert [(r["method"], r["target_sparsity"]) for r in rows][:3] == [("dense", 0.0), ("uniform", 0.3),
                                                                       ("settings", 0.3)]
    assert progress[-1] == (10, 10)  # 5 runs x 2 chunks
    assert len({r["ppl"] for r in rows}) == 5 and rows[4]["sparsity"] == pytest.approx(0.6)
    assert all(not r["cached"] for r in rows)

    calls = []
    real = evaluate.perplexity
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = sweep(tiny_loaded, tiny_spectra, [0.3, 0.6, 0.8], ["dense", "uniform", "settings"],
                  evaluation=evaluation, cache=cache)
    assert len(calls) == 2  # only the new target's two runs
    assert [r["ppl"] for r in again[:5]] == [r["ppl"] for r in rows] and sum(r["cached"] for r in again) == 5
