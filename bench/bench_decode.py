"""Decode speed of the CUDA-graphed step (acttail_core.decode): dense cuBLAS vs the sparse kernels.

    # the benchmark of record: random Llama-2-7B shapes, bf16, batch 1 (and batch 4), one H200
    python bench/bench_decode.py --synthetic llama2-7b --sweep --select-micro --profile --kernels gather,slice \
        --hint-windows 0,128,256 --pdl-compare --threshold 0.5,0.8 --json bench/results/decode_h200.json
    # the one-kernel-per-group path next to the default
    python bench/bench_decode.py --synthetic llama2-7b --fused-sweep --profile \
        --json bench/results/decode_h200_fused.json
    # CPU smoke test of the same code (Triton interpreter; numbers meaningless)
    TRITON_INTERPRET=1 python bench/bench_decode.py --synthetic tiny --device cpu --new-tokens 3 --repeats 1

In one run: the device-to-device copy bandwidth (bytes read + written), the dense step's tokens/s
and the weight bandwidth it achieves, uniform TopK budgets at 0.4-0.9, the engine's own acttail
budgets at 0.5 and 0.8 (spectra of these weights -> allocation: random weights still give a
non-uniform budget, which is what matters for speed), each batch-1 sparse path of ``--kernels``
(``gather``: one compacted list per group; ``slice``: each GEMV program compacts its own rows;
``fused``: one kernel per group, its grid picked by ``--fused-sweep``), the TopK search started at
the last token's cut (``--hint-windows``: the first for every row, the others for the 0.5 and 0.8
budgets; the hit rate is in each row), threshold mode, and batch 4. Every sparse configuration is
timed against the dense step of the same run. ``achieved_gbps`` counts the weight bytes a step must
read (kept input rows of every projection + the dense LM head) per second. ``--profile`` captures a
graph of each phase alone (selects, GEMVs, attention, head) and reports its time per token and, for
the GEMVs, its bandwidth against the copy bandwidth. Before the other paths are timed, ``agreement``
decodes 8 tokens at 0.5 with each of them and compares tokens and logits with the default path and
with transformers' masked forward, so a fast path that computes something else shows. The JSON is
rewritten after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from acttail_core.allocation import allocate, uniform_budget
from acttail_core.decode import Decoder, input_major, measure_decode, weight_bytes_per_step
from acttail_core.eigensolver import SolverPlan
from acttail_core.kernels.gather_gemv import GemvConfig, default_config
from acttail_core.models import from_module, load_model
from acttail_core.projections import find_projections
from acttail_core.spectra import compute_spectra

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (128, 320, 2, 4, 2, 512),
}
# tiles (block_n, block_k, warps, stages) were swept first (128 x 64, 8 warps, 4 stages won over 128 x 32,
# 256 x 32, 64 x 64 and 4 warps), then programs per SM (4 won over 2 and 8); this sweep asks whether the
# hand-pipelined loads and split-K without power-of-two rounding (fewer programs than slots) pay
SWEEP = [GemvConfig(n, k, w, s, p, pipe, pow2) for n, k, w, s, p, pipe, pow2 in [
    (128, 64, 8, 4, 4, False, True), (128, 64, 8, 4, 4, True, True), (128, 64, 8, 4, 4, False, False),
    (128, 64, 8, 4, 4, True, False), (128, 32, 8, 4, 4, True, True),
]]
# the fused kernel's grid: programs per SM sets how many programs repeat the select (and split the rows)
FUSED_SWEEP = [GemvConfig(n, k, w, s, p) for n, k, w, s, p in [
    (128, 64, 8, 4, 1), (128, 64, 8, 4, 2), (128, 64, 8, 4, 4), (256, 32, 8, 3, 1), (256, 64, 8, 3, 2),
    (64, 64, 4, 4, 2), (128, 32, 8, 4, 2),
]]


def synthetic(preset: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype directly: a 7B model in fp32 first doubles memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return from_module(model.eval().requires_grad_(False), None, name=f"random {preset}")


def copy_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 20 copies of 1 GiB)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**29, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def profile(decoder: Decoder, gemv_bytes: int, copy: float, replays: int = 50) -> dict:
    """Per phase: ms per token when its launches alone replay as a graph (after a real step)."""
    decoder.prefill(torch.zeros(decoder.batch, 4, dtype=torch.long))
    out = {}
    for phase in ("embed", "select", "gemv", "attention", "head"):
        try:
            graph = decoder.phase_graph(phase)
        except Exception as exc:  # a phase with no launches (e.g. no selects in the dense step)
            out[phase] = {"error": str(exc).splitlines()[0]}
            continue
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / replays
        out[phase] = {"ms_per_token": ms}
        if phase == "gemv":
            out[phase]["gbps"] = gemv_bytes / (ms / 1e3) / 1e9
            out[phase]["fraction_of_copy"] = out[phase]["gbps"] / copy
    decoder.reset()
    return out


def save(result: dict, where: str) -> None:
    """Write the results atomically (after every configuration too: a run cut short keeps what it measured)."""
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def agreement(loaded, budget, weights, config: GemvConfig, variants: list[tuple[str, dict]],
              steps: int = 1) -> list[dict]:
    """Do the variants compute what the gather kernel with the full TopK search computes? Greedy tokens and
    last logits of each after a 16-token prompt, against that path run once more (split-K adds with atomics,
    so its own runs differ in the last bits: the noise floor) and against transformers with sparsify()'s
    masked inputs (cuBLAS, another summation order). A TopK cut turns last-bit differences into different
    kept inputs wherever an input sits at it, and on random weights that compounds over the prompt's
    tokens, so compare each variant with the noise floor, not with zero."""
    from acttail_core.sparsify import sparsify

    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(7))

    def run(opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = Decoder(loaded, budget=budget, weights=weights, max_len=32, **{"gemv_config": config, **opts})
        tokens = decoder.generate(prompt, steps)
        return tokens, decoder.logits.float().clone()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    ref_tokens, ref_logits = run({"kernel": "gather", "hint_window": 0})
    with torch.no_grad(), sparsify(loaded.model, budget, measure=False):  # logits that chose the last token
        ids = torch.cat([prompt, ref_tokens[:, :-1]], dim=1).to(ref_logits.device)
        masked_logits = loaded.model(input_ids=ids).logits[:, -1].float()
    rows = [{"budget": f"{budget.method} {budget.effective_sparsity:.2f}", "variant": "gather, full search",
             "same_tokens": True, "logit_rel_diff": 0.0, "vs_masked_rel_diff": relative(ref_logits, masked_logits)}]
    for label, opts in variants:
        tokens, logits = run(opts)
        rows.append({"budget": rows[0]["budget"], "variant": label,
                     "same_tokens": bool(torch.equal(tokens, ref_tokens)),
                     "logit_rel_diff": relative(logits, ref_logits),
                     "vs_masked_rel_diff": relative(logits, masked_logits)})
    return rows


def select_micro(device: torch.device) -> list[dict]:
    """Time the select kernel alone (100 launches in a graph) in variants that add one stage at a time."""
    from acttail_core.kernels import select as sel

    rows = []
    for n_cols, groups in [(4096, 1), (4096, 3), (11008, 1)]:
        x = torch.randn(1, n_cols, device=device, dtype=torch.bfloat16)
        x_out = torch.empty_like(x)
        lists = sel.CompactLists(groups, 1, n_cols, x.dtype, device)
        params = torch.full((groups,), n_cols // 2, dtype=torch.int32, device=device)
        block = 1 << (n_cols - 1).bit_length()
        if groups > 1:  # distinct k per projection, as an acttail budget has (equal k share one search)
            params += torch.arange(groups, dtype=torch.int32, device=device) * 7
        hints = sel.CutHints(device)
        stages = [("prologue only", 0, False, 0), ("+ cuts", 1, False, 0), ("+ cuts + compaction", 1, True, 0)]
        stages += [(f"+ hinted cuts ({w} bins) + compaction", 1, True, w) for w in (64, 128, 256)]
        for label, mode, compact, window in stages:
            for warps in (8, 16):
                def launch():
                    sel._select_kernel[(1,)](
                        x, x.stride(0), x, 0, x, 0, x, x, 1e-6, 1.0 / n_cols, x_out, x_out.stride(0), params,
                        lists.cuts, lists.idx, lists.val, lists.count, x, 0, x, 0, 0, n_cols, hints.values, hints.stats,
                        MODE=mode, G=groups, LISTS=True, COMPACT=compact, MASK_OUT=False, PROLOGUE=0, HAS_DELTA=False,
                        POST_NORM=False, STYLE=0, ACT=0, PASSES=4, EXTRA=0, WINDOW=window, BLOCK=block, ZERO_BLOCK=16,
                        PDL=False, num_warps=warps)
                try:
                    launch()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(100):
                            launch()
                    graph.replay()
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    us = start.elapsed_time(end) * 1e3 / 100
                except Exception as exc:  # a variant that does not compile or run: record and go on
                    us = float("nan")
                    print(f"  select micro {n_cols} G{groups} {label} w{warps}: {type(exc).__name__}: {exc}")
                rows.append({"n_cols": n_cols, "groups": groups, "variant": label, "warps": warps, "us": us})
                print(f"  select micro n={n_cols} G={groups} {label:<22} warps={warps:2d}: {us:6.2f} us", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", choices=sorted(PRESETS), default=None)
    source.add_argument("--model", default=None, help="a model reference (default, gemma3-270m, a directory, ...)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uniform", default="0.4,0.5,0.7,0.8,0.9")
    parser.add_argument("--acttail", default="0.5,0.8")
    parser.add_argument("--batch", type=int, default=4, help="the batched comparison (dense vs uniform 0.5)")
    parser.add_argument("--sweep", action="store_true", help="time GEMV tile configurations first, keep the best")
    parser.add_argument("--fused-sweep", action="store_true", help="time the fused kernel's grids first, keep the best")
    parser.add_argument("--kernels", default="gather,slice,fused",
                        help="batch-1 sparse paths to time (gather, slice, fused)")
    parser.add_argument("--profile", action="store_true", help="time every phase of the step on its own")
    parser.add_argument("--select-micro", action="store_true", help="time the select kernel's stages alone")
    parser.add_argument("--pdl-compare", action="store_true", help="also time uniform 0.5 and 0.8 with PDL on")
    parser.add_argument("--hint-windows", default="0,128,256",
                        help="TopK hint windows (histogram bins; 0 = full search every time): the first for every "
                             "configuration, the others for uniform and acttail at 0.5 and 0.8")
    parser.add_argument("--pipeline-compare", action="store_true",
                        help="also time uniform and acttail at 0.5 and 0.8 with the GEMV's hand-pipelined loads")
    parser.add_argument("--threshold", default="", help="threshold-mode budgets to time (uniform sparsities)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA GPU")
    t0 = time.perf_counter()
    loaded = synthetic(args.synthetic or "llama2-7b", args.device, dtype) if not args.model else \
        load_model(args.model, dtype=args.dtype, device=args.device)
    build_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    import triton

    result: dict = {
        "model": loaded.name, "gpu": gpu, "dtype": args.dtype, "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "configurations": [], "errors": [],
    }
    result["copy_gbps"] = copy_gbps(device)
    if args.select_micro and device.type == "cuda":
        result["select_micro"] = select_micro(device)
    print(f"{loaded.name} on {gpu}, {args.dtype}; built in {build_s:.1f} s; copy bandwidth "
          f"{result['copy_gbps']:.0f} GB/s", flush=True)
    projections = find_projections(loaded.model)
    windows = [int(w) for w in args.hint_windows.split(",")]
    kw = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, hint_window=windows[0])

    def record(speed, note=""):
        row = speed.as_dict()
        row["note"] = note
        result["configurations"].append(row)
        hits = f"hint hits {row['hint_hit_rate']:.3f}" if row["hint_hit_rate"] is not None else ""
        print(f"  {row['method']:<8} s={row['sparsity']:.3f} batch={row['batch']} {row['path']:<13} "
              f"{row['tokens_per_s']:8.1f} tok/s  {row['achieved_gbps']:7.0f} GB/s {note} {hits}", flush=True)
        if args.json:
            save(result, args.json)
        return row

    def attempt(label, fn):
        try:
            return fn()
        except Exception as exc:  # keep going: one broken configuration must not lose the rest of the run
            result["errors"].append({"what": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  FAILED {label}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            return None

    dense = attempt("dense", lambda: record(measure_decode(loaded, None, **kw)))
    dense_b = attempt("dense batch", lambda: record(measure_decode(loaded, None, batch=args.batch, **kw)))
    t0 = time.perf_counter()
    spectra = attempt("spectra", lambda: compute_spectra(loaded)) if args.acttail else None
    if spectra is None and args.acttail:  # the GPU solver's PyTorch panels and LAPACK tridiagonal stage
        spectra = attempt("spectra (torch panels, LAPACK)", lambda: compute_spectra(
            loaded, plan=SolverPlan(tridiagonal="cpu", panel="torch")))
    result["spectra_s"] = time.perf_counter() - t0
    budgets = [uniform_budget(projections, float(s), loaded.name, loaded.fingerprint)
               for s in args.uniform.split(",") if s]
    if spectra is not None:
        budgets += [allocate(spectra, float(s)) for s in args.acttail.split(",") if s]

    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    with input_major(loaded.model) as weights:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["conversion"] = {
            "seconds": time.perf_counter() - t0, "weights_bytes": weights.bytes,
            "peak_extra_bytes": weights.peak_extra_bytes,
            "allocated_change_bytes": (torch.cuda.memory_allocated(device) - allocated) if device.type == "cuda" else 0,
        }
        print(f"input-major conversion: {result['conversion']}", flush=True)
        uniform_mid = [b for b in budgets if b.method == "uniform"]
        probe = [uniform_mid[1], uniform_mid[3]] if len(uniform_mid) >= 4 else uniform_mid[:1]

        def sweep(candidates: list[GemvConfig], kernel: str, fallback: GemvConfig) -> tuple[GemvConfig, list]:
            """Short decodes of the probe budgets with every candidate; the best by geometric mean."""
            rows = []
            for candidate in candidates:
                speeds = attempt(f"{kernel} sweep {candidate}", lambda: [
                    measure_decode(loaded, b, weights=weights, prompt_len=8, new_tokens=64, repeats=3,
                                   gemv_config=candidate, kernel=kernel).tokens_per_s for b in probe])
                if speeds:
                    rows.append({"config": candidate.__dict__, "tokens_per_s": speeds,
                                 "score": statistics.geometric_mean(speeds)})
                    print(f"  {kernel} sweep {candidate}: {[round(s, 1) for s in speeds]}", flush=True)
            best = GemvConfig(**max(rows, key=lambda r: r["score"])["config"]) if rows else fallback
            return best, rows

        config = default_config(device)
        if args.sweep:
            config, result["sweep"] = sweep(SWEEP, "gather", config)
        result["gemv_config"] = config.__dict__
        print(f"GEMV config: {config}", flush=True)
        fused_config = config
        if args.fused_sweep:
            fused_config, result["fused_sweep"] = sweep(FUSED_SWEEP, "fused", config)
        result["fused_config"] = fused_config.__dict__
        print(f"fused config: {fused_config}", flush=True)
        attempt("dense (input-major views)", lambda: record(measure_decode(loaded, None, **kw),
                                                            "dense step on the converted (transposed-view) weights"))
        kernels = set(args.kernels.split(","))
        for budget in budgets if "gather" in kernels else []:
            attempt(f"{budget.method} {budget.effective_sparsity:.2f}", lambda: record(
                measure_decode(loaded, budget, weights=weights, gemv_config=config, kernel="gather", **kw),
                "kernel=gather"))
        variants = [("gather, full search, run again", {"kernel": "gather", "hint_window": 0})]
        variants += [(f"{kernel}, hint window {window}", {"kernel": kernel, "hint_window": window})
                    for kernel in ("gather", "slice") for window in sorted({0, *windows})
                    if (kernel, window) != ("gather", 0)]
        variants.append(("gather, hand-pipelined loads", {"kernel": "gather", "gemv_config": GemvConfig(
            **{**config.__dict__, "pipeline": not config.pipeline})}))
        result["agreement"] = []
        for budget in [b for b in budgets if round(b.effective_sparsity, 2) == 0.5]:
            rows = attempt(f"agreement {budget.method}", lambda: agreement(loaded, budget, weights, config, variants))
            for row in rows or []:
                result["agreement"].append(row)
                print(f"  agreement {row['budget']} {row['variant']:<28} same tokens {row['same_tokens']!s:<5} "
                      f"logits {row['logit_rel_diff']:.2e}, vs masked {row['vs_masked_rel_diff']:.2e}", flush=True)
        for budget in budgets if "slice" in kernels else []:  # compaction inside the GEMV programs
            attempt(f"slice {budget.method} {budget.effective_sparsity:.2f}", lambda: record(
                measure_decode(loaded, budget, weights=weights, gemv_config=config, kernel="slice", **kw),
                "kernel=slice (each GEMV program compacts its own rows)"))
        for budget in budgets if "fused" in kernels else []:  # the one-kernel-per-group path, same budgets
            if budget.method != "uniform" or round(budget.effective_sparsity, 3) in (0.5, 0.8):
                attempt(f"fused {budget.method} {budget.effective_sparsity:.2f}", lambda: record(
                    measure_decode(loaded, budget, weights=weights, gemv_config=fused_config, kernel="fused", **kw),
                    "kernel=fused (select inside every GEMV program)"))
        compared = [b for b in budgets if round(b.effective_sparsity, 2) in (0.5, 0.8)]
        for window in windows[1:]:
            for budget in compared:
                attempt(f"hint window {window} {budget.method} {budget.effective_sparsity:.2f}", lambda: record(
                    measure_decode(loaded, budget, weights=weights, gemv_config=config,
                                   **{**kw, "hint_window": window}),
                    (f"hint window {window}" if window else "no hints: the full TopK search every token")
                    + " (kernel=auto: slice)"))
        if args.pipeline_compare:
            piped = GemvConfig(**{**config.__dict__, "pipeline": not config.pipeline})
            for budget in compared:
                attempt(f"pipeline {budget.method} {budget.effective_sparsity:.2f}", lambda: record(
                    measure_decode(loaded, budget, weights=weights, gemv_config=piped, **kw),
                    f"GEMV pipeline={piped.pipeline} (kernel=auto: slice)"))
        for sparsity in [float(v) for v in args.threshold.split(",") if v]:
            def threshold_row(sparsity=sparsity):
                from acttail_core.thresholds import budget_thresholds

                budget = uniform_budget(projections, sparsity, loaded.name, loaded.fingerprint)
                calib = torch.randint(0, loaded.model.get_input_embeddings().weight.shape[0], (4, 128),
                                      generator=torch.Generator().manual_seed(1))
                taus = budget_thresholds(loaded.model, budget, calib)
                for kernel in [k for k in ("gather", "slice") if k in kernels]:
                    record(measure_decode(loaded, budget, weights=weights, gemv_config=config, mode="threshold",
                                          thresholds=taus, method="uniform-threshold", kernel=kernel, **kw),
                           f"threshold mode (thresholds fitted on 512 random tokens), kernel={kernel}")
            attempt(f"threshold {sparsity}", threshold_row)
        pdl_rows = [b for b in budgets if b.method == "uniform" and b.effective_sparsity in (0.5, 0.8)]
        for budget in pdl_rows if args.pdl_compare else []:
            os.environ["ACTTAIL_PDL"] = "1"  # what programmatic dependent launch buys, same run
            try:
                attempt(f"PDL {budget.effective_sparsity}", lambda: record(
                    measure_decode(loaded, budget, weights=weights, gemv_config=config, **kw),
                    "with programmatic dependent launch"))
            finally:
                os.environ.pop("ACTTAIL_PDL")
        half = next((b for b in budgets if b.method == "uniform" and abs(b.effective_sparsity - 0.5) < 1e-9), None)
        if half is not None:
            for kernel in ("auto", "gather"):
                attempt(f"batch uniform 0.5 {kernel}", lambda: record(measure_decode(
                    loaded, half, weights=weights, batch=args.batch, gemv_config=config, kernel=kernel, **kw),
                    f"kernel={kernel}"))
        if args.profile and device.type == "cuda":
            result["profile"] = {}
            chosen = [(None, "auto")] + [(b, k) for b in budgets if b.method == "uniform"
                                         and b.effective_sparsity in (0.5, 0.8) for k in ("gather", "slice")]
            for budget, kernel in chosen:
                label = "dense" if budget is None else f"uniform {budget.effective_sparsity:.1f} {kernel}"

                def run_profile(budget=budget, kernel=kernel):
                    decoder = Decoder(loaded, budget=budget, weights=weights if budget else None, kernel=kernel,
                                      gemv_config=config, max_len=64, hint_window=windows[0])
                    head = loaded.model.get_output_embeddings().weight
                    gemv_bytes = weight_bytes_per_step(loaded, budget) - head.numel() * head.element_size()
                    return profile(decoder, gemv_bytes, result["copy_gbps"])

                result["profile"][label] = attempt(f"profile {label}", run_profile)
                print(f"  profile {label}: {result['profile'][label]}", flush=True)

    # speed-ups against the dense step of the same batch, measured in this run
    base = {1: dense["tokens_per_s"] if dense else float("nan"),
            args.batch: dense_b["tokens_per_s"] if dense_b else float("nan")}
    for row in result["configurations"]:
        row["speedup_vs_dense"] = row["tokens_per_s"] / base.get(row["batch"], float("nan"))
    dense_bytes = weight_bytes_per_step(loaded, None)
    result["bandwidth_bound_tokens_per_s"] = result["copy_gbps"] * 1e9 / dense_bytes
    if dense:
        result["dense_fraction_of_bound"] = dense["tokens_per_s"] / result["bandwidth_bound_tokens_per_s"]

    print(f"\n{loaded.name}, {gpu}, {args.dtype}, copy {result['copy_gbps']:.0f} GB/s, bound "
          f"{result['bandwidth_bound_tokens_per_s']:.0f} tok/s (dense at "
          f"{result.get('dense_fraction_of_bound', float('nan')):.0%} of it)")
    print(f"{'method':<8} | {'sparsity':>8} | {'batch':>5} | {'path':<13} | {'tok/s':>8} | {'vs dense':>8} | "
          f"{'GB/s':>6}")
    for row in result["configurations"]:
        print(f"{row['method']:<8} | {row['sparsity']:8.3f} | {row['batch']:5d} | {row['path']:<13} | "
              f"{row['tokens_per_s']:8.1f} | {row['speedup_vs_dense']:7.2f}x | {row['achieved_gbps']:6.0f} "
              f"{row['note']}")
    if result["errors"]:
        print(f"{len(result['errors'])} errors: {[e['what'] for e in result['errors']]}")
    if args.json:
        save(result, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
