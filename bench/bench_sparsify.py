"""Cost of activation sparsification through ``acttail_core.sparsify``: forward time and decode speed.

    python bench/bench_sparsify.py --model default                       # the real default model, CPU
    python bench/bench_sparsify.py --synthetic llama2-7b --layers 8 --device cuda --dtype bfloat16
    python bench/bench_sparsify.py --synthetic llama2-7b --layers 2 --seqlen 256   # CPU smoke test

Rows: dense (no hooks at all), TopK with every selection implementation the device
has (uniform budget; ``auto`` is what eval uses), TopK with a non-uniform (acttail)
budget, TopK with the realized-sparsity measurement on (what ``eval`` pays), and
calibrated thresholds (TEAL-style). Columns: one prefill forward over ``--seqlen``
tokens at batch 1 (median of ``--repeats`` after a warm-up, CUDA synchronised), its
ratio to dense, the ratio of the fastest runs (robust on a shared, noisy CPU); variants
are interleaved round by round, so drifting load hits all alike;
greedy decode tokens/s at batch 1 with the KV cache (``--prompt-len`` prompt,
``--new-tokens`` steps, interleaved the same way), and its ratio.

The synthetic model is a randomly initialised LlamaForCausalLM with Llama-2-7B
shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000; ``--layers`` of
them), built on the device, no download. Masking alone never skips weight reads,
so no row can be faster than dense; this measures the overhead a sparse kernel
would have to win back. Needs only torch, transformers, numpy, pydantic, pandas.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_model(preset: str, layers: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from acttail_core.models import from_module

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **PRESETS[preset])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: 7B in fp32 first would double memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return from_module(model, None, name=f"random {preset} x{layers} layers")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_s(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
    return time.perf_counter() - start


def interleaved(loaded, ids: torch.Tensor, prompt: torch.Tensor, variants: list, table, repeats: int, new_tokens: int):
    """Median forward ms and decode tokens/s per variant.

    The variants take turns in every round, so drifting load (a shared CPU, GPU
    clocks) hits all of them alike. Round 0 is the warm-up; each decode timing
    also runs its own warm-up (evaluate._median_timings). new_tokens 0 skips decode.
    """
    from acttail_core.evaluate import _median_timings
    from acttail_core.sparsify import sparsify

    forward: list[list[float]] = [[] for _ in variants]
    decode: list[list[float]] = [[] for _ in variants]
    for rnd in range(repeats + 1):
        for i, (_, budget, mode, impl, measure) in enumerate(variants):
            thresholds = table.thresholds_for(budget) if (mode == "threshold" and budget is not None) else None
            with torch.no_grad(), sparsify(loaded.model, budget, mode, thresholds, measure=measure, topk_impl=impl):
                elapsed = forward_s(loaded.model, ids)
                if rnd > 0 and new_tokens > 0:
                    decode[i].append(new_tokens / _median_timings(loaded, prompt, new_tokens, 1)[1])
            if rnd > 0:
                forward[i].append(elapsed)
    nan = float("nan")
    return (
        [1e3 * statistics.median(t) for t in forward],
        [1e3 * min(t) for t in forward],
        [statistics.median(t) if t else nan for t in decode],
    )


def acttail_like(loaded, sparsity: float):
    """Per-projection budget from random alphas (synthetic model) or the real spectra (real model)."""
    from acttail_core.allocation import allocate, allocate_sparsities
    from acttail_core.budget import make_budget
    from acttail_core.projections import find_projections

    if loaded.tokenizer is not None:
        from acttail_core.spectra import compute_spectra

        return allocate(compute_spectra(loaded), sparsity)
    projections = find_projections(loaded.model)
    alphas = np.random.default_rng(0).uniform(2, 8, len(projections))
    return make_budget(
        projections, allocate_sparsities(alphas, projections, sparsity), model_name=loaded.name,
        model_fingerprint=loaded.fingerprint, method="acttail", target_sparsity=sparsity, alphas=alphas,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="a model reference for acttail_core.models.load_model (e.g. default)")
    source.add_argument("--synthetic", choices=sorted(PRESETS), default=None, help="random model with these shapes")
    parser.add_argument("--layers", type=int, default=4, help="synthetic: decoder layers (7B has 32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--seqlen", type=int, default=2048, help="prefill tokens for the forward timing")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-decode", action="store_true", help="skip the decode timing")
    args = parser.parse_args()

    from acttail_core.allocation import uniform_budget
    from acttail_core.evaluate import THROUGHPUT_NOTE
    from acttail_core.models import load_model
    from acttail_core.projections import find_projections
    from acttail_core.sparsify import _triton_topk
    from acttail_core.thresholds import calibrate_on_chunks

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    dtype = DTYPES[args.dtype or ("float32" if args.device == "cpu" else "bfloat16")]
    if args.synthetic:
        loaded = synthetic_model(args.synthetic, args.layers, args.device, dtype)
    else:
        loaded = load_model(args.model or "default", dtype=str(dtype).replace("torch.", ""), device=args.device)
    model = loaded.model
    device = loaded.input_device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, args.seqlen), generator=generator).to(device)
    calib = torch.randint(0, vocab, (2, min(args.seqlen, 512)), generator=generator)

    projections = find_projections(model)
    uniform = uniform_budget(projections, args.sparsity, loaded.name, loaded.fingerprint)
    acttail = acttail_like(loaded, args.sparsity)
    table = calibrate_on_chunks(model, calib, fingerprint=loaded.fingerprint, corpus="random ids").bind(model)

    impls = ["auto", "topk", "kthvalue", "sort"]
    if device.type == "cuda" and _triton_topk() is not None:
        impls.insert(1, "triton")
    # (label, budget, mode, impl, measure)
    rows = [("dense", None, "topk", "auto", False)]
    rows += [(f"topk uniform [{impl}]", uniform, "topk", impl, False) for impl in impls]
    rows.append(("topk acttail [auto]", acttail, "topk", "auto", False))
    rows.append(("topk uniform [auto] + measure", uniform, "topk", "auto", True))
    rows.append(("threshold uniform", uniform, "threshold", "auto", False))
    rows.append(("threshold acttail", acttail, "threshold", "auto", False))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{loaded.name} on {name}, {str(dtype).replace('torch.', '')}, sparsity {args.sparsity}, "
          f"{len(projections)} projections; prefill {args.seqlen} tokens at batch 1, median of {args.repeats}")
    print(f"{'variant':<30} | {'forward ms':>10} | {'vs dense':>8} | {'min vs min':>11} | {'decode tok/s':>12} | "
          f"{'vs dense':>8}")
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=generator).to(device)
    new_tokens = 0 if args.no_decode else args.new_tokens
    forward, fastest, decode = interleaved(loaded, ids, prompt, rows, table, args.repeats, new_tokens)
    dense_ms = dense_min = dense_tps = None
    for (label, budget, mode, impl, measure), ms, low, tps in zip(rows, forward, fastest, decode):
        if budget is None:
            dense_ms, dense_min, dense_tps = ms, low, tps
        print(f"{label:<30} | {ms:10.2f} | {ms / dense_ms:7.2f}x | {low / dense_min:10.2f}x | {tps:12.1f} | "
              f"{tps / dense_tps:7.2f}x", flush=True)
    print(f"note: {THROUGHPUT_NOTE}")
    print("target: topk [auto] forward at most 1.5x dense on the H200 (Llama-2-7B shapes, 2048-token prefill)")


if __name__ == "__main__":
    main()
