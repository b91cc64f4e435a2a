"""Issue 14 details outside the fuzz suite: the writer's own guarantees, fail-fast order, memory, safetensors only."""
from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import tracemalloc
from pathlib import Path

import pytest

from acttail_core import models
from acttail_core.errors import ActTailError, ModelLoadError
from acttail_core.safe_io import OutputError, check_output, sweep_stale_temps, write_bytes
from acttail_core.spectra import compute_spectra
from acttail_core.streaming import model_layout

from .conftest import byte_tokenizer, make_tiny_llama


def saved_tiny(folder: Path) -> Path:
    """The tiny Llama as a local Hugging Face directory (safetensors), as a user would point --model at it."""
    make_tiny_llama().save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_safetensors_header(path: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))


def test_new_file_gets_the_usual_mode_and_an_existing_one_keeps_its_own(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        fresh = write_bytes(tmp_path / "new.json", b"{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # like open(): 0o666 less the umask, not mkstemp's 0o600
        (tmp_path / "old.json").write_bytes(b"old")
        (tmp_path / "old.json").chmod(0o604)
        write_bytes(tmp_path / "old.json", b"new")
        assert stat.S_IMODE((tmp_path / "old.json").stat().st_mode) == 0o604
        assert (tmp_path / "old.json").read_bytes() == b"new"
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]


def test_sweep_removes_what_dead_runs_left_and_spares_live_ones(tmp_path) -> None:
    dead = tmp_path / ".out.json.dead.tmp"
    live = tmp_path / ".out.json.live.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"in progress")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a writer in another process holds
    try:
        assert sweep_stale_temps(tmp_path, ".out.json.*.tmp") == [dead]
        assert live.exists() and not dead.exists()
        write_bytes(tmp_path / "out.json", b"{}")
        assert live.exists()
    finally:
        os.close(fd)
    write_bytes(tmp_path / "out.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_tilde_expands_to_home_and_never_makes_a_folder_named_tilde(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert check_output("~/x.json") == tmp_path / "home" / "x.json"
    assert not (tmp_path / "~").exists()


def test_errors_are_output_errors_of_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    for bad in ("", "   ", str(tmp_path), str(tmp_path / "file" / "x.json"), str(tmp_path / "no" / "x.json")):
        with pytest.raises(OutputError) as info:
            check_output(bad)
        assert "\n" not in str(info.value) and isinstance(info.value, ActTailError)


def test_eval_refuses_a_bad_out_before_loading_the_model(tmp_path, monkeypatch, capsys) -> None:
    """A bad --out on eval was found only after the whole run (58-75 s lost)."""
    import acttail_core.cli.common as cli_common
    from acttail_core.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli_common, "load_from_args", no_load)
    (tmp_path / "results").mkdir()
    code = main(["eval", "--sparsity", "0.5", "--max-tokens", "64", "--out", str(tmp_path / "results")])
    assert code == 2 and "is a folder" in capsys.readouterr().err


def test_budget_as_out_of_eval_is_refused_and_kept(tiny_loaded, tmp_path, capsys) -> None:
    """`eval --budget b.json --out b.json` silently destroyed the budget."""
    from acttail_core.allocation import uniform_budget
    from acttail_core.cli import main
    from acttail_core.projections import find_projections

    budget = tmp_path / "b.json"
    text = uniform_budget(find_projections(tiny_loaded.model), 0.5, "tiny", tiny_loaded.fingerprint).to_json()
    budget.write_text(text)
    code = main(["eval", "--budget", str(budget), "--out", str(tmp_path / "." / "b.json")])
    err = capsys.readouterr().err
    assert code == 2 and "is the input" in err and budget.read_text() == text


def test_quick_check_of_a_huge_corpus_reads_only_its_start(tiny_loaded, tmp_path) -> None:
    """A 405 MB corpus took 1.8 GB of memory with --max-tokens 256: now a megabyte or so, whatever the file's size."""
    from acttail_core.allocation import uniform_budget
    from acttail_core.evaluate import EvalSettings, compare
    from acttail_core.projections import find_projections

    corpus = tmp_path / "huge.txt"
    line = "The quick brown fox jumps over the lazy dog. " * 20 + "\n"
    with corpus.open("w") as handle:
        for _ in range((24 << 20) // len(line)):  # 24 MB
            handle.write(line)
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    tracemalloc.start()
    try:
        results = compare(tiny_loaded, budget, EvalSettings(corpus=str(corpus), seqlen=64, max_tokens=256),
                          include_dense=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert results[-1].tokens == 4 * 63
    assert peak < 8 << 20, f"peak Python memory {peak / 2**20:.1f} MB for a 24 MB corpus"


def test_hub_ids_load_safetensors_only(monkeypatch) -> None:
    """torch's weights_only loader stopped a malicious pickle from a hub cache, but the promise is never to unpickle."""
    import transformers

    from acttail_core import models

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ActTailError, match="could not load model 'someone/model'"):
        models.load_model("someone/model")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


ENTRY = {"dtype": "F32", "shape": [259, 64], "data_offsets": [0, 259 * 64 * 4]}


@pytest.mark.parametrize("damage, message", [
    ("cut", "is truncated"),
    ([1, 2], "header is not a JSON object"),
    ({"model.embed_tokens.weight": 5}, "malformed header entry"),
    ({"model.embed_tokens.weight": {**ENTRY, "data_offsets": "x"}}, "malformed shape or data_offsets"),
    ({"model.embed_tokens.weight": {**ENTRY, "shape": [259, True]}}, "malformed shape or data_offsets"),
    ({"model.embed_tokens.weight": {**ENTRY, "data_offsets": [0, 8]}}, "has 8 bytes for shape"),
    ({"model.embed_tokens.weight": ENTRY}, "is truncated"),
])
def test_damaged_safetensors_are_refused_by_name(tmp_path, damage, message) -> None:
    """A cut-off or garbled model.safetensors reached the user as transformers' SafetensorError traceback (exit 1)
    from load_model, or an AttributeError/ValueError from the streaming reader."""
    folder = saved_tiny(tmp_path / "model")
    weights = folder / "model.safetensors"
    if damage == "cut":
        weights.write_bytes(weights.read_bytes()[:200_000])
    else:
        write_safetensors_header(weights, damage)
    for load in (models.load_model, model_layout):
        with pytest.raises(ModelLoadError, match=message) as info:
            load(str(folder))
        assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 3}, "tensor model.layers.2.input_layernorm.weight is missing from the checkpoint"),
    ({"intermediate_size": 96}, r"tensor model.layers.0.mlp.\w+_proj.weight has another shape in the checkpoint"),
])
def test_weights_that_do_not_match_config_are_refused(tmp_path, change, message) -> None:
    """A config.json with a layer more than the weights loaded silently, that layer filled with random values (only a
    suppressed log line said so), and every alpha and perplexity after it was of noise; another width crashed."""
    folder = saved_tiny(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=f"does not match its config.json: {message}"):
        models.load_model(str(folder))
    if "intermediate_size" in change:  # the streaming reader would compute spectra of the checkpoint's other matrix
        with pytest.raises(ModelLoadError, match=message):
            model_layout(folder)


def test_cached_spectra_name_the_model_asked_for(tiny_loaded, tmp_path, monkeypatch) -> None:
    """The spectra cache is keyed by the weights, so a cache hit named whichever model computed it first (a test's
    temporary folder turned up in a user's budget as its model_name)."""
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    assert compute_spectra(tiny_loaded).model_name == "tiny-llama"
    tiny_loaded.name = "/models/my-copy"
    assert compute_spectra(tiny_loaded).model_name == "/models/my-copy"
