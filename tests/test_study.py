"""A tiny version of the allocation study (tiny random model): every stage runs, resumes, reports, plots."""
from __future__ import annotations

import json
import math

import pytest

from acttail_core import study as study_mod
from acttail_core.calibration import coordinate_search, max_runs
from acttail_core.errors import ActTailError
from acttail_core.study import Setting, StudyConfig, run_study


def tiny_config(out: str, **changes) -> StudyConfig:
    fields = dict(models=("default",), calib_texts=("demo:lcet10",), calib_tokens=64, calib_sweeps=1,
                  heldout_texts=("demo:alice29",), report_sparsities=(0.3,), report_tokens=128, seqlen=128,
                  ablation_sparsities=(0.3,), ablation_tokens=64, seeds=2, threshold_sparsities=(0.3,),
                  threshold_calib="demo", threshold_calib_tokens=128, greedy_tokens=64, block_tokens=32, out=out)
    fields.update(changes)
    return StudyConfig(**fields)


@pytest.mark.slow  # every stage of the study, about a minute on two cores
def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch, tiny_everywhere) -> None:
    """Every stage on the tiny random Llama standing in for "default" (the real models take minutes a run)."""
    config = tiny_config(str(tmp_path / "study"))
    report = run_study(config, plot_path=tmp_path / "plot.png")
    rows = [json.loads(line) for line in (tmp_path / "study" / "runs.jsonl").read_text().splitlines()]
    phases = {p: [r for r in rows if r["phase"] == p] for p in ("calibrate", "heldout", "ablation")}
    assert 2 <= len(phases["calibrate"]) <= max_runs(1)
    assert all(r["device"] == "cpu" and r["text"] == "demo:lcet10" for r in phases["calibrate"])
    # held-out: dense, uniform, calibrated (unless it chose uniform), both greedies; then threshold mode
    labels = {r["label"] for r in phases["heldout"] if r["mode"] == "topk"}
    assert {"dense", "uniform", "greedy", "greedy-block"} <= labels
    assert {r["label"] for r in phases["heldout"] if r["mode"] == "threshold"} >= {"uniform", "greedy-block"}
    # ablation: uniform, (a), (c), (d) and one run per seed, at 64 tokens in one chunk
    assert len(phases["ablation"]) == 4 + 2 and {r["tokens"] for r in phases["ablation"]} == {63}
    assert {r["setting"]["alphas"] for r in phases["ablation"]} == {"", "type-mean", "permuted:0", "permuted:1"}
    text = report.read_text()
    for heading in ("## Calibration", "## Held-out texts", "## Ablations", "## Threshold mode", "## Time per"):
        assert heading in text
    assert "| default | 0.3 |" in text and "| default | demo:alice29 | 0.3 |" in text
    assert "Every cell of the tables above is measured." in text
    assert (tmp_path / "plot.png").stat().st_size > 10_000

    def no_new_runs(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr("acttail_core.evaluate.perplexity", no_new_runs)
    monkeypatch.setattr(study_mod, "calibrate", no_new_runs)  # nor the search: it replays from the log
    again = study_mod.Study(config)
    assert again.write_report().read_text() == text
    assert again.calibration_rows()[0]["runs"] == len(phases["calibrate"])
    run_study(config)  # every stage again: all from the log


def test_held_out_text_that_is_calibration_text_is_refused(tmp_path) -> None:
    with pytest.raises(ActTailError, match="held-out text demo:lcet10 is also calibration text"):
        study_mod.Study(tiny_config(str(tmp_path), heldout_texts=("demo:lcet10",)))
    with pytest.raises(ActTailError, match="held-out text demo:asyoulik is also calibration text"):
        study_mod.Study(tiny_config(str(tmp_path), heldout_texts=("demo:asyoulik",), threshold_calib="demo"))
    with pytest.raises(ActTailError, match="unknown stage"):
        study_mod.Study(tiny_config(str(tmp_path), stages=("select",)))



@pytest.mark.parametrize("change, message", [
    (dict(seeds=0), "--seeds and --calib-sweeps must be at least 1"),  # crashed in the report (StatisticsError)
    (dict(seeds=-3), "--seeds and --calib-sweeps must be at least 1"),
    (dict(calib_sweeps=0), "--seeds and --calib-sweeps must be at least 1"),
    (dict(seqlen=0), "--seqlen must be at least 2, got 0"),  # was read as the default seqlen
    (dict(report_sparsities=(0.3, 1.5)), r"--sparsities must be in \(0, 0.95\], got 1.5"),
    (dict(ablation_sparsities=(math.nan,)), r"--ablation-sparsities must be in \(0, 0.95\], got nan"),
    (dict(threshold_sparsities=(0.0,)), r"--threshold-sparsities must be in \(0, 0.95\], got 0.0"),
    (dict(greedy_tokens=1), "--greedy-tokens must be at least 2, got 1"),
    (dict(models=()), "give at least one of each"),
    (dict(heldout_texts=("demo:plrabn12", "missing.txt")), "corpus 'missing.txt' not found"),
    (dict(calib_texts=("demo:lcet10", "empty.txt")), "corpus 'empty.txt' .* is empty"),
    # the second model was looked up only after the first one's runs
    (dict(models=("default", "nosuchmodel")), "model 'nosuchmodel' not found"),
    (dict(models=("default", "nobody/no-such-model")), "not in the local Hugging Face cache"),
    (dict(dtype="int3"), "unknown dtype"),
])
def test_bad_study_settings_are_refused_before_any_run(tmp_path, monkeypatch, tiny_everywhere, change, message) -> None:
    """A bad value met late (a sparsity, a text, a model after hours of the first model's runs) stopped the study
    with runs.jsonl and report.md half-filled, or with a traceback; now the settings are checked before any run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text(" \n")

    def no_runs(*args, **kwargs):
        raise AssertionError("a run started before the settings were checked")

    monkeypatch.setattr("acttail_core.evaluate.perplexity", no_runs)
    monkeypatch.setattr(study_mod, "load_model", no_runs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ActTailError, match=message):
        run_study(tiny_config(str(tmp_path / "study"), **change))
    assert not (tmp_path / "study").exists()


def test_study_cli_with_a_bad_model_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    from acttail_core.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["study", "--models", "default", "nosuchmodel", "--out", str(tmp_path / "study")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: model 'nosuchmodel' not found: not a packaged model (default, gemma3-270m), "
                                 "a local path or a hub id"]
    assert list(tmp_path.iterdir()) == []

def test_report_tables_from_a_run_log(tmp_path, monkeypatch) -> None:
    """The ablation table's statistics and the calibration replay, from a hand-written run log (no model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()  # model "m": a model directory here, never loaded
    (tmp_path / "m" / "config.json").write_text("{}")
    config = tiny_config(str(tmp_path), models=("m",), report_sparsities=(0.7,), ablation_sparsities=(0.7,), seeds=3)
    s = study_mod.Study(config)
    ppl = {"uniform": 100.0, "d: measured alpha": 60.0, "a: type-mean alpha": 90.0,
           "c: within-type z (group type)": 70.0,
           "b: permuted, seed 0": 80.0, "b: permuted, seed 1": 100.0, "b: permuted, seed 2": 90.0}
    for name, setting in study_mod.ablation_settings(3).items():
        key = s.key("m", ("demo:alice29",), 64, 0.7, setting)
        s.log.add({"key": key, "ppl": ppl[name], "nll": math.log(ppl[name])})
    (row,) = s.ablation_rows()
    assert row["d"] == pytest.approx(-0.4) and row["a"] == pytest.approx(-0.1) and row["c"] == pytest.approx(-0.3)
    assert row["b_mean"] == pytest.approx(-0.1) and row["b_std"] == pytest.approx(0.1)
    assert (row["b_min"], row["b_max"]) == (pytest.approx(-0.2), pytest.approx(0.0))
    # calibration: every setting worse than uniform except none -> uniform, replayed from the log alone
    assert s.search("m", 0.7) is None  # nothing logged yet
    assert "m at 0.7: calibration not finished" in s.missing()[0]
    assert "m / demo:alice29 at 0.7 (topk): uniform, greedy, greedy-block" in s.missing()
    assert "## Not yet measured" in s.write_report().read_text()
    def nll(choice) -> float:
        return 5.0 if choice.is_uniform else 5.5

    trace = coordinate_search(nll, max_sweeps=config.calib_sweeps).trace
    for choice, value in trace:
        s.log.add({"key": s.key("m", config.calib_texts, config.calib_tokens, 0.7, Setting.of(choice)), "nll": value,
                   "seconds": 2.0})
    found = s.search("m", 0.7)
    assert found.choice.is_uniform and s.calibration_seconds("m", 0.7, found) == 2.0 * len(trace)
    assert Setting.of(found.choice) == Setting("uniform")
