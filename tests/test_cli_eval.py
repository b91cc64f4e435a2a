"""CLI eval / bench / prepare: end to end on the default model and a tiny saved model, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from acttail_core.cli import main
from tests.conftest import byte_tokenizer, make_tiny_llama

TEXT = " ".join(f"sentence {i}: a small model reads a small text about {i % 7} birds." for i in range(300))
OTHER = " ".join(f"row {i}: the river carries {i % 5} boats past the old mill." for i in range(300))


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """A tiny Llama saved as a safetensors directory, text files, and a private cache."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir, safe_serialization=True)
    byte_tokenizer().save_pretrained(model_dir)
    (tmp_path / "eval.txt").write_text(TEXT)
    (tmp_path / "calib.txt").write_text(OTHER)
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # loads the real default model
def test_eval_default_model_end_to_end(tmp_path, capsys):
    out_path = tmp_path / "results.json"
    code, out, err = run(
        ["eval", "--model", "default", "--sparsity", "0.5", "--corpus", "demo", "--max-tokens", "256",
         "--seqlen", "128", "--out", str(out_path)], capsys,
    )
    assert code == 0, err
    assert "dense" in out and "uniform" in out and "acttail" in out and "realized_sparsity" in out
    data = json.loads(out_path.read_text())
    assert data["config"]["corpus"] == "demo" and data["config"]["seqlen"] == 128
    runs = data["runs"]
    assert [r["method"] for r in runs] == ["dense", "uniform", "acttail"]
    for r in runs:
        assert set(r) == {"method", "sparsity", "ppl", "nll", "tokens", "realized_sparsity", "seconds"}
        assert r["tokens"] == 254
    assert runs[0]["ppl"] < runs[1]["ppl"]
    assert abs(runs[1]["realized_sparsity"] - 0.5) < 0.01 and abs(runs[2]["realized_sparsity"] - 0.5) < 0.01


@pytest.mark.slow  # three CLI pipelines end to end
def test_eval_budget_file_threshold_and_bench_on_tiny_model(tiny_env, capsys):
    model = str(tiny_env / "tiny")
    budget = tiny_env / "budget.json"
    code, out, err = run(["allocate", "--model", model, "--sparsity", "0.6", "--out", str(budget)], capsys)
    assert code == 0, err
    results = tiny_env / "r.json"
    code, out, err = run(
        ["eval", "--model", model, "--budget", str(budget), "--uniform", "--corpus", str(tiny_env / "eval.txt"),
         "--seqlen", "64", "--max-tokens", "256", "--mode", "threshold", "--calib-corpus", str(tiny_env / "calib.txt"),
         "--calib-tokens", "512", "--out", str(results)], capsys,
    )
    assert code == 0, err
    runs = json.loads(results.read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "uniform", "acttail"]
    assert all(abs(r["realized_sparsity"] - r["sparsity"]) < 0.05 for r in runs)
    code, out, err = run(
        ["bench", "--model", model, "--sparsity", "0.5", "--method", "uniform", "--prompt-len", "16",
         "--new-tokens", "2", "--repeats", "1"], capsys,
    )
    assert code == 0, err
    assert "prefill_tokens_per_s" in out and "decode_tokens_per_s" in out and "dense" in out
    assert "does not skip" in out or "still reads every weight" in out


def other_budget(tmp_path):
    from acttail_core.allocation import uniform_budget
    from acttail_core.budget import save_budget
    from acttail_core.models import from_module
    from acttail_core.projections import find_projections

    other = from_module(make_tiny_llama(layers=3), name="other")
    budget = uniform_budget(find_projections(other.model), 0.5, "other", other.fingerprint)
    return save_budget(budget, tmp_path / "other.json")


ERRORS = [
    (["--sparsity", "1.0"], "sparsity must be in [0, 0.95]"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 0.95]"),
    (["--sparsity", "0.99"], "sparsity must be in [0, 0.95]"),  # the help says [0, 0.95]
    ([], "exactly one of --sparsity"),
    (["--sparsity", "0.5", "--max-tokens", "32", "--seqlen", "64"], "smaller than one chunk"),
    (["--sparsity", "0.5", "--max-tokens", "32"], "smaller than one chunk"),  # seqlen from the model (512)
    (["--sparsity", "0.5", "--corpus", "{empty}"], "empty"),
    (["--sparsity", "0.5", "--corpus", "{missing}"], "not found"),
    (["--budget", "{other}"], "not a projection of this model"),
    (["--sparsity", "0.5", "--mode", "threshold"], "--calib-corpus"),
    (["--sparsity", "0.5", "--mode", "threshold", "--calib-corpus", "{eval}"], "evaluation text"),
    # options that were silently ignored: the run used the budget file, or the method's own settings
    (["--budget", "{other}", "--method", "greedy", "--temp", "5"],
     "--method, --temperature would be ignored: --budget FILE already says how sparsity is allocated"),
    (["--budget", "{other}", "--spectra", "{eval}"], "--spectra would be ignored"),
    (["--sparsity", "0.5", "--temperature", "0.3"], "--temperature would be ignored: --method uniform does not read"),
    (["--sparsity", "0.5", "--direction", "keep-heavy", "--group", "type"],
     "--direction, --group would be ignored: --method uniform does not read them"),
    (["--sparsity", "0.5", "--calib-corpus", "demo"], "--calib-corpus and --calib-tokens would be ignored"),
]


@pytest.mark.parametrize("extra, message", ERRORS)
def test_eval_errors_are_one_line_and_write_nothing(tiny_env, capsys, extra, message):
    (tiny_env / "empty.txt").write_text("\n \n")
    names = {"empty": tiny_env / "empty.txt", "missing": tiny_env / "missing.txt", "eval": tiny_env / "eval.txt"}
    if any("{other}" in e for e in extra):
        names["other"] = other_budget(tiny_env)
    extra = [e.format(**names) for e in extra]
    method = [] if "--budget" in extra else ["--method", "uniform"]  # a budget file says its own method
    argv = ["eval", "--model", str(tiny_env / "tiny"), "--corpus", str(tiny_env / "eval.txt"), *method]
    code, out, err = run(argv + extra + ["--out", str(tiny_env / "never.json")], capsys)
    lines = err.strip().splitlines()
    assert code == 2, out
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in err
    assert not (tiny_env / "never.json").exists()


def test_threshold_eval_with_a_too_short_calibration_text_fails_before_any_run(tiny_env, capsys, monkeypatch):
    (tiny_env / "short.txt").write_text("only a few words")
    monkeypatch.setattr("acttail_core.evaluate.perplexity", lambda *a, **k: pytest.fail("a run started"))
    code, out, err = run(["eval", "--model", str(tiny_env / "tiny"), "--corpus", str(tiny_env / "eval.txt"),
                          "--method", "uniform", "--sparsity", "0.5", "--seqlen", "64", "--max-tokens", "128",
                          "--mode", "threshold", "--calib-corpus", str(tiny_env / "short.txt"),
                          "--out", str(tiny_env / "never.json")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: the corpus has only 16 tokens, fewer than one chunk of 64; "
                                            "lower --seqlen")
    assert not (tiny_env / "never.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_cuda_without_gpu(capsys, command, tmp_path):
    code, out, err = run([command, "--model", "default", "--sparsity", "0.5", "--device", "cuda",
                          "--out", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "no CUDA GPU" in err.strip().splitlines()[-1]
    assert not (tmp_path / "x.json").exists()


def test_prepare_reports_what_it_did(capsys):
    code, out, err = run(["prepare"], capsys)
    assert code == 0, err
    assert "demo corpus" in out and "spectra: 210 projections" in out
