"""Benchmark the spectra stage (nanoGPT-style: honest numbers, printed as a table).

    # default model on this machine's CPU: load from the safetensors cache, then spectra uncached
    python bench/bench_spectra.py --model default

    # a random model with Llama-2-7B shapes on a GPU (32 layers, 224 projections),
    # against weightwatcher on 2 of its layers in the same run
    python bench/bench_spectra.py --synthetic llama2-7b --device cuda --ww-layers 2

Timings are wall-clock with CUDA synchronised; weightwatcher's per-layer time is
extrapolated to the whole model (stated as such in the table).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from acttail_core.models import from_module, load_model  # noqa: E402
from acttail_core.projections import find_projections  # noqa: E402
from acttail_core.spectra import compute_spectra, weightwatcher_fits  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_model(name: str, device: str, layers: int | None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, n_layers, heads, kv, vocab = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model reference (default: the packaged SmolLM2)")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the synthetic model's layer count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ww-layers", type=int, default=2, help="decoder layers to time weightwatcher on (0 = skip)")
    parser.add_argument("--rule", default="ks")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []

    if args.synthetic:
        start = time.perf_counter()
        loaded = from_module(synthetic_model(args.synthetic, args.device, args.layers), name=args.synthetic)
        synchronize(args.device)
        rows.append((f"build random {args.synthetic} ({args.device}, bf16)", f"{time.perf_counter() - start:.1f} s"))
    else:
        ref = args.model or "default"
        load_model(ref, device=args.device)  # converts the GGUF once if the cache is cold
        start = time.perf_counter()
        loaded = load_model(ref, device=args.device)
        rows.append((f"load {ref} from safetensors cache", f"{time.perf_counter() - start:.2f} s"))

    projections = find_projections(loaded.model)
    start = time.perf_counter()
    fingerprint = loaded.fingerprint
    rows.append(("fingerprint (sampled weight hash)", f"{time.perf_counter() - start:.2f} s"))
    del fingerprint
    synchronize(args.device)
    start = time.perf_counter()
    spectra = compute_spectra(loaded, rule=args.rule, use_cache=False)
    synchronize(args.device)
    ours = time.perf_counter() - start
    per = ours / len(projections)
    rows.append((f"spectra, all {len(projections)} projections ({args.rule}, {args.device})", f"{ours:.2f} s ({per * 1000:.1f} ms / projection)"))
    compute_spectra(loaded, rule=args.rule, use_cache=True)  # writes the cache
    start = time.perf_counter()
    compute_spectra(loaded, rule=args.rule, use_cache=True)
    rows.append(("spectra again, from the disk cache", f"{time.perf_counter() - start:.2f} s"))

    if args.ww_layers > 0:
        per_layer = len(projections) // (max(p.layer for p in projections) + 1)
        subset = projections[: args.ww_layers * per_layer]
        start = time.perf_counter()
        fits = weightwatcher_fits(loaded.model, subset)
        ww_time = time.perf_counter() - start
        ww_per = ww_time / len(subset)
        rows.append((f"weightwatcher 0.7, {len(subset)} projections ({args.ww_layers} layers)", f"{ww_time:.2f} s ({ww_per * 1000:.1f} ms / projection)"))
        rows.append(("weightwatcher extrapolated to all projections", f"{ww_per * len(projections):.1f} s"))
        rows.append(("speed-up of ours over weightwatcher (per projection)", f"{ww_per / per:.1f}x"))
        ours_alpha = spectra.alphas()[: len(subset)]
        theirs = torch.tensor([f.alpha for f in fits], dtype=torch.float64)
        rel = (torch.as_tensor(ours_alpha) - theirs).abs() / theirs.abs()
        rows.append(("alpha agreement with weightwatcher (median rel. diff)", f"{float(rel.median()):.2e}"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement'.ljust(width)} | result")
    print(f"{'-' * width}-|-------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
