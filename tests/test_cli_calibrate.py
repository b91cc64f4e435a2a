"""CLI ``calibrate`` end to end (tiny random model for "default"), its one-line errors, ``--method greedy-block``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from acttail_core.budget import load_budget
from acttail_core.calibration import max_runs
from acttail_core.cli import main


def test_calibrate_writes_the_chosen_budget(tmp_path, capsys, tiny_everywhere) -> None:
    out = tmp_path / "calibrated.json"
    code = main(["calibrate", "--model", "default", "--sparsity", "0.7", "--calib-texts", "demo:lcet10",
                 "--calib-tokens", "64", "--seqlen", "64", "--max-sweeps", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen: " in printed and "perplexity runs on 63 tokens of demo:lcet10" in printed
    budget = load_budget(out)
    record = budget.calibration
    assert record is not None and record.texts == ["demo:lcet10"] and record.tokens == 63
    assert 2 <= record.runs <= max_runs(1) and record.nll <= record.uniform_nll
    assert budget.method == "acttail" and abs(budget.effective_sparsity - 0.7) < 1e-9
    assert json.loads(out.read_text())["schema_version"] == 2
    # the printed table has one row per run, and the chosen setting is what the budget records
    chosen = printed.split("chosen: ")[1].split(" (ppl")[0]
    if chosen == "uniform":
        assert budget.knob("temperature") == 0 and np.ptp([e.sparsity for e in budget.projections]) == 0
    else:
        temperature = budget.knob("temperature")
        assert chosen == f"acttail {budget.direction} {budget.group} {budget.xmin_rule} T={temperature:g}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "0"], "nothing to calibrate"),
        (["--sparsity", "1.5"], "sparsity must be in [0, 0.95]"),
        (["--sparsity", "0.5", "--calib-texts", "demo:alice29"], "demo evaluation text"),
        (["--sparsity", "0.5", "--calib-tokens", "64", "--seqlen", "128"], "--seqlen <= --calib-tokens"),
        (["--sparsity", "0.5", "--max-sweeps", "0"], "--max-sweeps must be at least 1"),
        (["--sparsity", "0.5", "--calib-texts", "/no/such/text.txt"], "not found"),
    ],
)
def test_calibrate_errors_are_one_line(extra, message, tmp_path, capsys) -> None:
    code = main(["calibrate", "--model", "default", *extra, "--out", str(tmp_path / "never.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "never.json").exists()


def test_allocate_greedy_block(tmp_path, capsys, tiny_everywhere) -> None:
    out = tmp_path / "block.json"
    assert main(["allocate", "--model", "default", "--method", "greedy-block", "--sparsity", "0.5",
                 "--out", str(out)]) == 0
    budget = load_budget(out)
    assert budget.method == "greedy-block" and abs(budget.effective_sparsity - 0.5) < 1e-9
    layers = {}
    for entry in budget.projections:
        layers.setdefault(entry.layer, []).append(entry)
    for entries in layers.values():  # every decoder layer at the target
        assert abs(sum(e.params * e.sparsity for e in entries) / sum(e.params for e in entries) - 0.5) < 1e-9
