"""A tiny version of the allocation study on the real default model: runs, resumes, reports, plots."""
from __future__ import annotations

import json

import pytest

from acttail_core import study as study_mod
from acttail_core.study import Setting, StudyConfig, run_study


@pytest.mark.slow  # runs the study on the real default model
def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    config = StudyConfig(models=("default",), select_text="demo:lcet10", heldout_texts=("demo:alice29",),
                         select_sparsities=(0.5, 0.7), report_sparsities=(0.5, 0.7), select_tokens=128,
                         report_tokens=128, seqlen=128, grid="tiny", greedy_tokens=128, out=str(tmp_path / "study"))
    chosen, report = run_study(config, plot_path=tmp_path / "plot.png")
    assert chosen.method == "acttail"
    rows = [json.loads(line) for line in (tmp_path / "study" / "runs.jsonl").read_text().splitlines()]
    # selection: (uniform + 2 acttail settings) x 2 sparsities; held-out: dense + 2 sparsities x 3 methods
    assert len(rows) == 6 + 7
    assert {r["label"] for r in rows if r["phase"] == "heldout"} >= {"dense", "uniform", "greedy", chosen.label}
    text = report.read_text()
    assert "Chosen default" in text and "| default | demo:alice29 | 0.7 |" in text
    assert (tmp_path / "plot.png").stat().st_size > 10_000

    calls = {"n": 0}

    def no_new_runs(*args, **kwargs):
        calls["n"] += 1
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr("acttail_core.evaluate.perplexity", no_new_runs)
    again, _ = run_study(config)
    assert again == chosen and calls["n"] == 0


def test_selection_prefers_settings_that_always_beat_uniform(tmp_path) -> None:
    config = StudyConfig(models=("m",), select_sparsities=(0.5, 0.7), grid="tiny", out=str(tmp_path))
    s = study_mod.Study(config)
    heavy, light = study_mod.grid_settings("tiny")
    ppl = {Setting("uniform"): (10, 100), heavy: (5, 120), light: (9, 90)}  # heavy: better mean, loses at 0.7
    for setting, values in ppl.items():
        for sparsity, value in zip((0.5, 0.7), values):
            key = study_mod.RunLog.key("m", config.select_text, config.select_tokens, config.seqlen, sparsity, setting)
            s.log.add({"key": key, "ppl": value})
    assert s.best_setting() == light
