"""Shared fixtures: a tiny random Llama (fast, for unit tests) and the real default model (end to end)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels of the sparse decode path run under Triton's interpreter.
    # It must be chosen before any kernel module is imported, hence here, first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from acttail_core.models import LoadedModel, from_module  # noqa: E402


def byte_tokenizer():
    """A tiny offline byte-level tokenizer (256 byte tokens + 3 specials), so unit tests need no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257, "<unk>": 258})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


# Tiny random models of every family the projection map covers, from transformers' own configs (no download).
TINY_FAMILIES: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8),
    "phi3": dict(num_key_value_heads=2),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt2": dict(n_inner=64),
    "gpt_neox": dict(),
    "falcon": dict(),  # multi-query: q | k | v
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64),
}


def make_tiny_family(family: str, seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    """A random ``family`` model with hidden size 32, 4 heads and the byte tokenizer's 259-token vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=259, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
                    pad_token_id=258)
    settings.update(TINY_FAMILIES.get(family, {}))
    settings.update(overrides)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings))
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    return from_module(make_tiny_llama(), byte_tokenizer(), name="tiny-llama")


@pytest.fixture
def tiny_everywhere(tiny_loaded, tmp_path, monkeypatch) -> LoadedModel:
    """The tiny Llama served for every model name, with a private cache (the demo texts copied in), so a CLI
    command or the study runs end to end in seconds and leaves the user's cache alone."""
    import shutil

    from acttail_core.corpora import demo_dir, ensure_demo_corpus

    real = ensure_demo_corpus()
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    shutil.copytree(real, demo_dir())
    monkeypatch.setattr("acttail_core.models.load_model", lambda ref, **kwargs: tiny_loaded)
    return tiny_loaded


@pytest.fixture(scope="session")
def default_loaded() -> LoadedModel:
    """The real default model (SmolLM2-135M), from the cache that scripts/setup.sh warms."""
    from acttail_core.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def gemma_loaded() -> LoadedModel:
    """The real Gemma-3-270M (scripts/setup.sh --test installs its packages), in float32."""
    from acttail_core.models import load_model

    return load_model("gemma3-270m")


REAL_MODEL_FIXTURES = ("default_loaded", "gemma_loaded")


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that uses a real model's fixture (directly or through another fixture) as ``slow``:
    loading a real model takes seconds, so ``-m "not slow"`` leaves these out."""
    for item in items:
        if set(REAL_MODEL_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The fuzz suite's count of inputs tried per class (tests/test_fuzz.py puts its Counter here).
FUZZ_COUNTS = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fuzz suite's counts at the end of the run (the closing note of issue 14 reports them)."""
    counts = terminalreporter.config.stash.get(FUZZ_COUNTS, None)
    if counts:
        summary = ", ".join(f"{name} {count}" for name, count in counts.items())
        terminalreporter.write_line(f"fuzz inputs tried: {summary} (total {sum(counts.values())})")
