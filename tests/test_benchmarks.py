"""The benchmarks' CPU smoke modes run every step of the GPU benchmarks' code paths and write their JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test runs a benchmark script end to end in a subprocess


def test_bench_spectra_smoke(tmp_path) -> None:
    out = tmp_path / "spectra_tiny.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_spectra.py"), "--synthetic", "tiny", "--device", "cpu",
               "--ww-layers", "0", "--cpu-check", "2", "--stream-layers", "2", "--json", str(out)]
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["matrices"] == 14 and data["total_s"] > 0 and data["per_matrix_ms"] > 0
    assert data["max_alpha_rel_diff_vs_float64"] < 0.005
    assert all(c["ok"] for c in data["candidates"]) and data["chosen_plan"]["bandwidth"] in (8, 16)
    assert data["streaming"]["layers"] == 2 and data["streaming"]["max_alpha_rel_diff_vs_in_memory"] == 0
    assert "date" in data and "gpu" in data
    assert "measurement" in done.stdout and "chosen plan" in done.stdout


def test_bench_multigpu_smoke(tmp_path) -> None:
    """Two CPU 'devices': spectra shared, the 13B-shaped evaluation through accelerate's dispatch, the 70B-shaped
    layer-by-layer generation; every part runs and agrees."""
    out = tmp_path / "multigpu.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_multigpu.py"), "--smoke", "--json", str(out)]
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["spectra_7b"]["max_alpha_rel_diff_one_vs_all"] == 0
    assert data["eval_13b"]["agree"] and set(data["eval_13b"]["compare"]) == {"dense", "uniform", "acttail"}
    assert data["spectra_70b"]["matrices"] == 14 and data["spectra_70b"]["layers"] == 2
