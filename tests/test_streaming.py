"""Streaming spectra from safetensors shards: equal to the model loaded whole, same cache key, bounded memory,
chosen by the CLI without a flag, and used for models a device map partly offloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acttail_core import cli, models, streaming
from acttail_core import spectra as spectra_mod
from acttail_core.checkpoint import Checkpoint, tensor_sample
from acttail_core.errors import ModelLoadError
from acttail_core.models import LoadedModel, load_model
from acttail_core.projections import projection_coverage
from acttail_core.spectra import XMIN_RULES, compute_spectra
from acttail_core.streaming import model_layout, spectra_of, stream_spectra

from .conftest import byte_tokenizer, make_tiny_family, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """A 3-layer tiny Llama saved as many safetensors shards (an index file maps tensors to shards)."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    make_tiny_llama(seed=5, layers=3).save_pretrained(folder, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 5
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("rule", XMIN_RULES)
def test_streamed_spectra_equal_loaded_whole(sharded_dir, cache, rule) -> None:
    loaded = load_model(str(sharded_dir))
    whole = compute_spectra(loaded, rule, use_cache=False)
    messages: list[str] = []
    result = stream_spectra(sharded_dir, name=str(sharded_dir), rule=rule, use_cache=False,
                            progress=lambda done, total, message: messages.append(message))
    streamed = result.spectra
    assert streamed.fingerprint == loaded.fingerprint
    assert streamed.projections() == whole.projections()
    for a, b in zip(whole.entries, streamed.entries):
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
        assert (a.alpha, a.xmin, a.tail_size, a.ks_distance) == (b.alpha, b.xmin, b.tail_size, b.ks_distance)
    assert [m for m in messages if m.startswith("layer")] == [f"layer {k}/3: eigenvalues {7 * k}/21" for k in (1, 2, 3)]
    assert result.layers == 3 and result.largest_layer_bytes == sum(e.params for e in whole.entries[:7]) * 4


def test_streamed_and_loaded_share_the_cache(sharded_dir, cache, monkeypatch) -> None:
    stream_spectra(sharded_dir, rule="ks")
    calls = []
    monkeypatch.setattr(spectra_mod, "gram_eigenvalues", lambda w: calls.append(w))
    again = stream_spectra(sharded_dir, rule="ks")
    assert again.from_cache
    compute_spectra(load_model(str(sharded_dir)), "mid")  # another rule: eigenvalues from the cached file
    assert calls == []


def test_checkpoint_reader(sharded_dir, tmp_path) -> None:
    checkpoint = Checkpoint(sharded_dir)
    for shard in sorted(sharded_dir.glob("*.safetensors"))[:3]:
        for name, tensor in load_file(shard).items():
            torch.testing.assert_close(checkpoint.read(name), tensor, rtol=0, atol=0)
            torch.testing.assert_close(checkpoint.sample(name), tensor_sample(tensor), rtol=0, atol=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        Checkpoint(broken)


def test_layout_without_weights(sharded_dir) -> None:
    layout = model_layout(sharded_dir)
    assert len(layout.projections) == 21 and layout.layers == [0, 1, 2]
    assert layout.dtype == torch.float32
    assert layout.fingerprint() == load_model(str(sharded_dir)).fingerprint


MEMORY_CHECK = textwrap.dedent(
    """
    import json, sys
    from acttail_core.streaming import stream_spectra
    result = stream_spectra(sys.argv[1], rule="ks", use_cache=False)
    print(json.dumps({"peak": result.peak_host_bytes, "layer": result.largest_layer_bytes,
                      "gpu": result.peak_gpu_bytes, "entries": len(result.spectra.entries)}))
    """
)


@pytest.mark.slow  # a 225 MiB model streamed in a fresh process
def test_streaming_peak_host_memory_is_bounded(tmp_path) -> None:
    """A model of 5 layers of 45 MiB (float32): streaming (in a fresh process, so nothing else counts) holds at
    most one layer plus 48 MiB (one float64 weight, its Gram matrix, LAPACK's workspace, the fits), which is
    under half of the model."""
    folder = tmp_path / "model"
    make_tiny_llama(seed=1, layers=5, hidden=1024, intermediate=2816).save_pretrained(folder, max_shard_size="40MB")
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACTTAIL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["entries"] == 35 and report["gpu"] == {}
    bound = report["layer"] + (48 << 20)
    assert 0 < report["peak"] <= bound, (report, bound)
    assert bound < model_bytes / 2


def test_cli_streams_a_model_that_does_not_fit(sharded_dir, cache, monkeypatch, capsys) -> None:
    """No flag: when the weights exceed the free memory the CLI reads them layer by layer and never loads the model."""
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 1000)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(models, "load_model", no_load)
    out = cache.parent / "spectra.json"
    assert cli.main(["spectra", "--model", str(sharded_dir), "--rule", "ks", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "streamed 3 layers" in printed and "peak host memory" in printed
    assert json.loads(out.read_text())["fingerprint"] == streaming.model_layout(sharded_dir).fingerprint()
    budget = cache.parent / "budget.json"
    assert cli.main(["allocate", "--model", str(sharded_dir), "--sparsity", "0.5", "--out", str(budget)]) == 0
    assert json.loads(budget.read_text())["model_fingerprint"] == json.loads(out.read_text())["fingerprint"]


def test_cli_loads_a_model_that_fits(sharded_dir, cache, monkeypatch, capsys) -> None:
    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cli.main(["spectra", "--model", str(sharded_dir)]) == 0
    assert calls and "streamed" not in capsys.readouterr().out


def test_offloaded_model_spectra_are_streamed(sharded_dir, cache, tmp_path) -> None:
    """Weights a device map offloaded to disk sit on ``meta``: fingerprint and spectra come from the checkpoint."""
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(sharded_dir, device_map=device_map, offload_folder=tmp_path / "off",
                                                 dtype=torch.float32)
    offloaded = LoadedModel(model, None, "offloaded", str(sharded_dir), "auto", torch.float32)
    assert streaming.is_offloaded(offloaded)
    whole = load_model(str(sharded_dir))
    assert offloaded.fingerprint == whole.fingerprint
    streamed = spectra_of(offloaded, "ks", use_cache=False)
    np.testing.assert_array_equal(streamed.alphas(), compute_spectra(whole, "ks", use_cache=False).alphas())


def _saved(family: str, folder: Path, strip_prefix: str = "") -> Path:
    """A tiny ``family`` model directory; ``strip_prefix`` renames its tensors as hub checkpoints of GPT-2 do."""
    from safetensors.torch import save_file

    make_tiny_family(family, seed=2).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    if strip_prefix:
        tensors = load_file(folder / "model.safetensors")
        save_file({k.removeprefix(strip_prefix): v for k, v in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("family, strip", [("phi3", ""), ("gpt2", "transformer.")])
def test_fused_and_conv1d_projections_stream_like_the_loaded_model(family, strip, tmp_path, cache) -> None:
    folder = _saved(family, tmp_path / family, strip)
    loaded = load_model(str(folder))
    whole = compute_spectra(loaded, "ks", use_cache=False)
    streamed = stream_spectra(folder, rule="ks", use_cache=False).spectra
    assert streamed.fingerprint == loaded.fingerprint
    assert streamed.projections() == whole.projections()
    for a, b in zip(whole.entries, streamed.entries):
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)


@pytest.mark.parametrize("family, tensor", [("mixtral", "model.layers.0.mlp.gate.weight"),
                                            ("gpt_neox", "lm_head.weight")])
def test_renamed_checkpoints_cannot_be_streamed_and_say_why(family, tensor, tmp_path, cache) -> None:
    """transformers renames Mixtral's router and fuses its experts, and renames GPT-NeoX's head, at load time: the
    layout says so, streaming refuses by name, and a model that fits is loaded whole (the CLI reads the layout of
    every local directory)."""
    folder = _saved(family, tmp_path / family)
    layout = model_layout(folder)
    assert f"no tensor {tensor} " in layout.unreadable
    with pytest.raises(ModelLoadError, match="cannot be read one decoder layer at a time: the checkpoint has no"):
        stream_spectra(folder, use_cache=False)
    assert cli.main(["spectra", "--model", str(folder)]) == 0
    assert projection_coverage(load_model(str(folder)).model).projections == len(layout.projections)
