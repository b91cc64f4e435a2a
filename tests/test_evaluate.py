"""Perplexity (SparseGPT/Wanda convention), compare and throughput."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from acttail_core import evaluate
from acttail_core.allocation import uniform_budget
from acttail_core.corpora import tokenize_corpus
from acttail_core.errors import ActTailError, CorpusError
from acttail_core.evaluate import EvalSettings, compare, perplexity, throughput
from acttail_core.projections import find_projections

TEXT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(200))


def hf_ppl(model, chunks) -> float:
    with torch.no_grad():
        losses = [model(input_ids=chunks[i : i + 1], labels=chunks[i : i + 1]).loss.double()
                  for i in range(chunks.shape[0])]
    return math.exp(torch.stack(losses).mean().item())


def test_tokenize_corpus_chunks_and_errors(tiny_loaded):
    chunks = tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=300)
    assert chunks.shape == (4, 64) and chunks.dtype == torch.long
    full = tiny_loaded.tokenizer(TEXT)["input_ids"]
    assert chunks.reshape(-1).tolist() == full[:256]  # no BOS added: the byte tokenizer does not ask for one
    assert tokenize_corpus(tiny_loaded, TEXT, seqlen=64).shape[0] == len(full) // 64
    assert tokenize_corpus(tiny_loaded, TEXT).shape[1] == 512  # min(2048, model context)
    with pytest.raises(CorpusError, match="smaller than one chunk"):
        tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=63)
    with pytest.raises(CorpusError, match="empty"):
        tokenize_corpus(tiny_loaded, "  \n", seqlen=64)
    with pytest.raises(CorpusError, match="fewer than one chunk"):
        tokenize_corpus(tiny_loaded, "short text", seqlen=64)
    with pytest.raises(CorpusError, match="context length"):
        tokenize_corpus(tiny_loaded, TEXT, seqlen=4096)
    with pytest.raises(CorpusError, match="must be at least 2 tokens, got 0"):  # 0 was read as "the default"
        tokenize_corpus(tiny_loaded, TEXT, seqlen=0)


def test_dense_perplexity_equals_transformers_labels_loss(tiny_loaded):
    chunks = tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=256)
    result = perplexity(tiny_loaded, chunks)
    assert result.method == "dense" and result.tokens == 4 * 63
    assert result.ppl == pytest.approx(hf_ppl(tiny_loaded.model, chunks), rel=1e-5)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-12)
    batched = perplexity(tiny_loaded, chunks, batch_size=3)
    assert batched.ppl == pytest.approx(result.ppl, rel=1e-5)


def test_zero_budget_gives_exactly_the_dense_result(tiny_loaded):
    chunks = tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=128)
    zero = uniform_budget(find_projections(tiny_loaded.model), 0.0, tiny_loaded.name, tiny_loaded.fingerprint)
    dense = perplexity(tiny_loaded, chunks)
    same = perplexity(tiny_loaded, chunks, zero)
    assert same.ppl == dense.ppl and same.nll == dense.nll and same.realized_sparsity == dense.realized_sparsity


def test_oom_halves_the_batch_then_fails_clearly(tiny_loaded, monkeypatch):
    chunks = tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=256)
    real = evaluate._chunk_nll
    sizes = []

    def fake(model, batch):
        sizes.append(batch.shape[0])
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch)

    monkeypatch.setattr(evaluate, "_chunk_nll", fake)
    with torch.no_grad():
        total = evaluate._nll_batches(tiny_loaded.model, chunks, torch.device("cpu"), 4, retry_oom=True)
        assert sizes[:3] == [4, 2, 1]
        monkeypatch.setattr(evaluate, "_chunk_nll", real)
        unbatched = evaluate._nll_batches(tiny_loaded.model, chunks, torch.device("cpu"), 1, retry_oom=False)
        assert total == pytest.approx(unbatched)

        def always(model, batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(evaluate, "_chunk_nll", always)
        with pytest.raises(ActTailError, match="out of memory even at batch size 1"):
            evaluate._nll_batches(tiny_loaded.model, chunks, torch.device("cpu"), 4, retry_oom=True)


def test_compare_dense_uniform_budget_on_shared_tokens(tiny_loaded, tmp_path):
    from tests.test_sparsify import acttail_like

    corpus = tmp_path / "eval.txt"
    corpus.write_text(TEXT)
    budget = acttail_like(tiny_loaded, 0.5)
    results = compare(tiny_loaded, budget, EvalSettings(corpus=str(corpus), seqlen=64, max_tokens=192))
    assert [r.method for r in results] == ["dense", "uniform", "acttail"]
    assert len({r.tokens for r in results}) == 1
    assert results[0].realized_sparsity < 0.01
    assert results[1].realized_sparsity == pytest.approx(0.5, abs=0.01)
    assert results[2].realized_sparsity == pytest.approx(budget.effective_sparsity, abs=0.01)
    assert set(results[0].as_dict()) == {"method", "sparsity", "ppl", "nll", "tokens", "realized_sparsity", "seconds"}
    with pytest.raises(ActTailError, match="calibration text"):
        compare(tiny_loaded, budget, EvalSettings(corpus=str(corpus), seqlen=64, max_tokens=192, mode="threshold"))


def test_a_too_short_calibration_text_is_refused_before_the_dense_run(tiny_loaded, tmp_path, monkeypatch):
    """Threshold mode calibrates when its first sparse run comes: a calibration text shorter than one chunk stopped
    the evaluation only after the dense run. It is tokenized and refused first, with the same error; a long enough
    one is still calibrated lazily, once."""
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "eval.txt").write_text(TEXT)
    (tmp_path / "short.txt").write_text("a few words")
    (tmp_path / "calib.txt").write_text(TEXT.replace("fox", "cat"))
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    settings = EvalSettings(corpus=str(tmp_path / "eval.txt"), seqlen=64, max_tokens=128, mode="threshold",
                            calib_corpus=str(tmp_path / "short.txt"), calib_tokens=256)
    real_perplexity, real_calibrate = evaluate.perplexity, evaluate.calibrate_thresholds
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(CorpusError, match="the corpus has only 11 tokens, fewer than one chunk of 64"):
        evaluate.evaluate_budgets(tiny_loaded, [("dense", None), ("uniform", budget)], settings)
    calls = []
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: calls.append("run") or real_perplexity(*a, **k))
    monkeypatch.setattr(evaluate, "calibrate_thresholds",
                        lambda *a, **k: calls.append("calibrate") or real_calibrate(*a, **k))
    long_enough = replace(settings, calib_corpus=str(tmp_path / "calib.txt"))
    results = evaluate.evaluate_budgets(tiny_loaded, [("dense", None), ("uniform", budget)], long_enough)
    assert calls == ["run", "calibrate", "run"] and [r.method for r in results] == ["dense", "uniform"]


def test_throughput_reports_all_budgets(tiny_loaded):
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    results = throughput(tiny_loaded, [None, budget], EvalSettings(prompt_len=16, new_tokens=3, repeats=2))
    assert [r.method for r in results] == ["dense", "uniform"]
    assert all(r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 for r in results)
    assert [r.decode_path for r in results] == ["masked", "masked"]  # no CUDA here
    assert all(len(r.decode_runs) == 2 for r in results) and results[0].decode_speedup == 1.0
    assert "cannot be faster than dense" in evaluate.throughput_note(results)
    assert evaluate.fused_decode_unavailable(tiny_loaded, "topk") == "no CUDA GPU"
    with pytest.raises(ActTailError, match="context length"):
        throughput(tiny_loaded, [None], EvalSettings(prompt_len=600, new_tokens=3))


def test_default_model_perplexity_matches_transformers(default_loaded):
    from acttail_core.corpora import load_text

    chunks = tokenize_corpus(default_loaded, load_text("demo"), seqlen=128, max_tokens=256)
    result = perplexity(default_loaded, chunks)
    assert result.tokens == 254
    assert result.ppl == pytest.approx(hf_ppl(default_loaded.model, chunks), rel=1e-4)


def test_results_carry_per_projection_sparsity_outside_the_json_keys(tiny_loaded):
    chunks = tokenize_corpus(tiny_loaded, TEXT, seqlen=64, max_tokens=64)
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    result = perplexity(tiny_loaded, chunks, budget)
    assert len(result.per_projection) == len(budget.projections)
    name, gap = result.worst_projection()
    assert name in result.per_projection and abs(gap) <= 0.5 / 64 + 1 / 64  # rounding, and ties at position 0 of o
    assert "per_projection" not in result.as_dict() and "targets" not in result.as_dict()


@pytest.mark.slow  # Triton kernels under the interpreter
def test_throughput_decodes_on_the_fused_step_where_it_can(tiny_loaded, monkeypatch):
    """With the GPU check answered yes, decode goes through acttail_core.decode (here under Triton's interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(evaluate, "fused_decode_unavailable", lambda loaded, mode: None)
    before = {n: p.detach().clone() for n, p in tiny_loaded.model.named_parameters()}
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    results = throughput(tiny_loaded, [None, budget], EvalSettings(prompt_len=3, new_tokens=2, repeats=1))
    assert [r.decode_path for r in results] == ["dense-graph", "sparse-slice"]
    assert all(r.decode_tokens_per_s > 0 and len(r.decode_runs) == 1 for r in results)
    assert results[1].decode_speedup == pytest.approx(results[1].decode_tokens_per_s / results[0].decode_tokens_per_s)
    assert "only the weight rows of kept inputs" in evaluate.throughput_note(results)
    for name, param in tiny_loaded.model.named_parameters():  # the input-major weights were restored
        assert param.is_contiguous() and torch.equal(param, before[name])


def test_one_progress_bar_over_every_chunk_of_every_run_and_a_cache(tiny_loaded, tmp_path, monkeypatch):
    from tests.test_sparsify import acttail_like

    corpus = tmp_path / "eval.txt"
    corpus.write_text(TEXT)
    budget = acttail_like(tiny_loaded, 0.5)
    seen = []
    cache: dict = {}
    results = compare(tiny_loaded, budget, EvalSettings(corpus=str(corpus), seqlen=64, max_tokens=192),
                      progress=lambda done, total, message: seen.append((done, total)), cache=cache)
    assert {total for _, total in seen} == {9}  # 3 runs x 3 chunks, one bar
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1] == (9, 9)
    assert len({done for done, _ in seen}) == 10  # it advanced after every chunk
    assert not any(r.cached for r in results) and len(cache) == 3

    calls = []
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: calls.append(a))
    again = evaluate.evaluate_budgets(tiny_loaded, [("mine", budget), ("dense", None)],
                                      EvalSettings(corpus=str(corpus), seqlen=64, max_tokens=192), cache=cache)
    assert calls == [] and all(r.cached for r in again)  # nothing measured twice
    assert again[0].method == "mine" and again[0].ppl == results[2].ppl and again[1].ppl == results[0].ppl
    assert "cached" not in again[0].as_dict()


def test_estimate_seconds_from_earlier_runs():
    past = [{"seconds": 2.0, "tokens": 100}, {"seconds": 4.0, "tokens": 100, "cached": True},
            {"seconds": 3.0, "tokens": 100}]
    assert evaluate.estimate_seconds(past, tokens=200, runs=3) == pytest.approx(0.025 * 200 * 3)  # cached runs cost 0
    assert evaluate.estimate_seconds([], tokens=200, runs=3) is None


@pytest.mark.slow  # timed decode runs, seconds
def test_throughput_says_when_the_repeats_cannot_tell_methods_apart(tiny_loaded):
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    results = throughput(tiny_loaded, [None, budget], EvalSettings(prompt_len=8, new_tokens=2, repeats=3))
    assert all(len(r.prefill_runs) == 3 and len(r.decode_runs) == 3 for r in results)
    assert results[0].prefill_within_noise is None and results[1].decode_within_noise in (True, False)
    assert evaluate.within_noise([10, 12], [11, 13]) and not evaluate.within_noise([10, 11], [20, 21])
    assert evaluate.within_noise([20, 21], [10, 11], masked=True)  # the masked path cannot be faster than dense
    assert not evaluate.within_noise([5, 6], [10, 11], masked=True)  # but it can be measurably slower
    assert evaluate.relative_spread([8.0, 10.0, 12.0]) == pytest.approx(0.4)
    noisy = evaluate.ThroughputResult("uniform", 0.5, 10, 5, 8, 2, decode_runs=[4, 6], prefill_runs=[8, 12],
                                      decode_within_noise=True, prefill_within_noise=False)
    note = evaluate.noise_note([noisy])
    assert "uniform decode" in note and "uniform prefill" not in note and "40%" in note  # (6 - 4) / 5
    noisy.decode_within_noise = False
    assert evaluate.noise_note([noisy]) is None


def test_throughput_rounds_interleave_the_methods(tiny_loaded):
    budget = uniform_budget(find_projections(tiny_loaded.model), 0.5, tiny_loaded.name, tiny_loaded.fingerprint)
    messages = []
    throughput(tiny_loaded, [None, budget], EvalSettings(prompt_len=8, new_tokens=1, repeats=2),
               progress=lambda done, total, message: messages.append(message))
    assert messages[:6] == ["dense: warm-up", "uniform: warm-up", "dense: repeat 1/2", "uniform: repeat 1/2",
                            "dense: repeat 2/2", "uniform: repeat 2/2"]
