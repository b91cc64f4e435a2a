"""CLI: spectra and allocate end to end, and one-line errors with a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from acttail_core.budget import load_budget
from acttail_core.cli import main


@pytest.mark.slow  # loads the real default model
def test_spectra_and_allocate_on_default_model(tmp_path, capsys) -> None:
    spectra_path = tmp_path / "spectra.json"
    assert main(["spectra", "--model", "default", "--out", str(spectra_path)]) == 0
    out = capsys.readouterr().out
    assert "210 projections" in out and "gate" in out and "mean" in out
    assert len(json.loads(spectra_path.read_text())["entries"]) == 210

    budget_path = tmp_path / "budget.json"
    code = main(["allocate", "--model", "default", "--sparsity", "0.7", "--temperature", "1.0",
                 "--spectra", str(spectra_path), "--out", str(budget_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "mean_sparsity" in out and "effective 0.7000" in out
    budget = load_budget(budget_path)
    assert len(budget.projections) == 210 and abs(budget.effective_sparsity - 0.7) < 1e-6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["allocate", "--model", "/no/such/dir", "--sparsity", "0.5"], "not found"),
        (["allocate", "--model", "default", "--sparsity", "1.5"], "sparsity must be in [0, 0.95]"),
        (["allocate", "--model", "default"], "--sparsity is required"),
        (["allocate", "--model", "default", "--sparsity", "0.5", "--temperature", "-2"], "temperature"),
        # the greedy measures on text and was silently given neither the spectra nor the rule it ignores
        (["allocate", "--model", "default", "--sparsity", "0.5", "--method", "greedy", "--rule", "ks", "--spectra",
          "s.json"], "--rule, --spectra would be ignored: --method greedy does not read them"),
        (["allocate", "--model", "default", "--sparsity", "0.5", "--method", "linear", "--temperature", "0.3"],
         "--temperature would be ignored"),
    ],
)
def test_errors_are_one_line(argv, message, capsys, tmp_path) -> None:
    code = main(argv + ["--out", str(tmp_path / "never.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "never.json").exists()


def test_corrupt_spectra_file(tmp_path, capsys) -> None:
    bad = tmp_path / "spectra.json"
    bad.write_text('{"kind": "acttail-spectra", "schema_version": 1, "entries": [{"name": 1}]}')
    code = main(["allocate", "--model", "default", "--sparsity", "0.5", "--spectra", str(bad),
                 "--out", str(tmp_path / "b.json")])
    assert code == 2 and "corrupt spectra file" in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python process importing the engine
def test_module_entry_point_exit_code(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "acttail_core", "allocate", "--sparsity", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: sparsity must be in [0, 0.95], got 2.0"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family, printed", [
    ("phi3", ["the phi3 projection map", "taken: self_attn.qkv_proj -> q, k, v; self_attn.o_proj -> o; "
              "mlp.gate_up_proj -> gate, up; mlp.down_proj -> down", "skipped: lm_head (outside the decoder layers)"]),
    ("mixtral", ["mlp.experts -> gate, up, down of 4 experts", "skipped: model.layers.*.mlp.gate (router)"]),
    ("starcoder2", ["model family 'starcoder2' is not in the projection map: every linear layer of the decoder layers "
                    "was taken", "mlp.c_fc -> c_fc; mlp.c_proj -> c_proj"]),
])
def test_cli_says_which_linear_layers_it_took_and_skipped(family, printed, tmp_path, monkeypatch, capsys) -> None:
    from tests.conftest import byte_tokenizer, make_tiny_family

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / family
    make_tiny_family(family).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert main(["spectra", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    for line in printed:
        assert line in out
