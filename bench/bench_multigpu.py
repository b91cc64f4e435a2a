"""Benchmark several GPUs: spectra shared by all of them, evaluation spread by a device map, a 70B model.

    # 2 H200s (the nvidia-h200-x2 machine); reuses the plan bench_spectra.py chose on one GPU if its JSON exists
    python bench/bench_multigpu.py --plan-from bench/results/spectra_h200.json --json bench/results/spectra_h200x2.json

    # CPU smoke run of the same code paths, two CPU "devices" (the test suite runs it)
    python bench/bench_multigpu.py --smoke --json /tmp/multigpu_smoke.json

What one run measures (each step records its error and the run goes on):

1. spectra of random Llama-2-7B shapes (224 projections) on one GPU, then on every GPU: times and ratio,
   and the largest alpha difference between the two runs;
2. a random model with Llama-2-13B shapes (40 layers, bf16) on one GPU, then spread over the GPUs by
   accelerate's balanced device map (what ``--device auto`` / ``device_map="auto"`` does): perplexity and
   realized sparsity of dense, uniform and acttail TopK at ``--sparsity``, on ``--chunks`` x ``--seqlen``
   random token ids; every timing synchronises every GPU. One GPU and several must agree;
3. spectra of random Llama-3-70B shapes (80 layers, hidden 8192, MLP 28672, 8 KV heads) on every GPU,
   each layer's weights generated on the GPU that takes it and freed after its Gram matrices: time and
   peak memory per GPU and on the host. The model never exists whole.

Prints a table and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from bench_spectra import Report, environment, llama_config, synthetic_model, timed

from acttail_core.allocation import allocate, uniform_budget
from acttail_core.eigensolver import (
    SolverPlan,
    Unit,
    batch_size_for,
    default_plan,
    gram_dim,
    solve,
    visible_devices,
)
from acttail_core.evaluate import perplexity
from acttail_core.models import LoadedModel, from_module
from acttail_core.projections import find_projections, weight_of
from acttail_core.spectra import spectra_from_eigenvalues
from acttail_core.streaming import HostPeak

SMOKE = {"7b": "tiny", "13b": "tiny", "70b": "tiny"}
FULL = {"7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama3-70b"}


def load_plan(path: Optional[str], device: torch.device) -> SolverPlan:
    """The plan bench_spectra.py chose (its JSON's chosen_plan), else the default."""
    if path and Path(path).is_file():
        chosen = json.loads(Path(path).read_text()).get("chosen_plan")
        if chosen:
            return SolverPlan(**chosen)
    return default_plan(device)


def eigenvalues_on(model, projections, devices: list[torch.device], plan: SolverPlan) -> list[np.ndarray]:
    """What compute_eigenvalues does on GPUs, for an explicit device list (so the CPU smoke run can use two)."""
    by_dim: dict[int, list[int]] = {}
    for i, p in enumerate(projections):
        by_dim.setdefault(gram_dim(p.shape), []).append(i)
    units = []
    for dim, indices in by_dim.items():
        size = batch_size_for(dim, len(indices), devices[0], plan)
        for start in range(0, len(indices), size):
            batch = indices[start : start + size]
            units.append(Unit(lambda _device, batch=batch: [(i, weight_of(model, projections[i])) for i in batch]))
    results = solve(units, len(projections), devices, plan)
    return [results[i] for i in range(len(projections))]


def spectra_on(loaded: LoadedModel, devices: list[torch.device], plan: SolverPlan, rule: str):
    projections = find_projections(loaded.model)
    values = eigenvalues_on(loaded.model, projections, devices, plan)
    return spectra_from_eigenvalues(projections, values, rule, loaded.name, "bench", str(devices[0]))


def warm_up(loaded: LoadedModel, devices: list[torch.device], plan: SolverPlan) -> None:
    """Compile and load the Triton kernels on every device before timing (one matrix each)."""
    projections = find_projections(loaded.model)
    units = [Unit(lambda _d, i=i: [(i, weight_of(loaded.model, projections[i]))]) for i in range(len(devices))]
    for device in devices:
        solve(units[:1], 1, [device], plan)


def part_spectra(report: Report, args, names: dict, devices: list[torch.device], plan: SolverPlan) -> None:
    model = synthetic_model(names["7b"], str(devices[0]) if not args.smoke else "cpu")
    loaded = from_module(model, name=names["7b"])
    warm_up(loaded, devices, plan)
    one, t1 = timed(lambda: spectra_on(loaded, devices[:1], plan, args.rule))
    every, tn = timed(lambda: spectra_on(loaded, devices, plan, args.rule))
    n = len(one.entries)
    diff = float(np.max(np.abs(one.alphas() - every.alphas()) / np.abs(one.alphas())))
    report.data["spectra_7b"] = {
        "model": names["7b"], "matrices": n, "one_gpu_s": t1, "all_gpus_s": tn, "gpus": len(devices),
        "speedup": t1 / tn, "max_alpha_rel_diff_one_vs_all": diff,
        "compute_spectra_uses_gpus": len(visible_devices(torch.device("cuda"))) if torch.cuda.is_available() else 0,
    }
    report.row(f"spectra {names['7b']}, {n} projections, 1 device", f"{t1:.2f} s ({1000 * t1 / n:.1f} ms / projection)")
    report.row(f"spectra {names['7b']}, {n} projections, {len(devices)} devices",
               f"{tn:.2f} s ({1000 * tn / n:.1f} ms / projection): {t1 / tn:.2f}x")
    report.row("alphas, 1 device vs all: max rel. diff", f"{diff:.1e}")


def _runs(loaded: LoadedModel, chunks: torch.Tensor, budgets: list, label: str) -> dict:
    out = {}
    perplexity(loaded, chunks[:1], budgets[1])  # warm-up: kernel compilation, cuBLAS handles on every GPU
    for budget in budgets:
        result = perplexity(loaded, chunks, budget)
        out[result.method] = {"ppl": result.ppl, "realized_sparsity": result.realized_sparsity,
                              "seconds": result.seconds, "worst_projection": list(result.worst_projection())}
        print(f"    {label} {result.method}: ppl {result.ppl:.4f}, realized {result.realized_sparsity:.4f}, "
              f"{result.seconds:.2f} s", flush=True)
    return out


def part_eval(report: Report, args, names: dict, devices: list[torch.device], plan: SolverPlan) -> None:
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = synthetic_model(names["13b"], str(devices[0]) if not args.smoke else "cpu", seed=2)
    loaded = from_module(model, name=names["13b"])
    spectra, seconds = timed(lambda: spectra_on(loaded, devices, plan, "mid"))
    what = f"spectra {names['13b']} ({len(spectra.entries)} projections) on {len(devices)} devices"
    report.row(what, f"{seconds:.2f} s")
    projections = find_projections(model)
    budgets = [None, uniform_budget(projections, args.sparsity, loaded.name, loaded.fingerprint),
               allocate(spectra, args.sparsity)]
    vocab = model.get_input_embeddings().weight.shape[0]
    chunks = torch.randint(0, vocab, (args.chunks, args.seqlen), generator=torch.Generator().manual_seed(0))
    one = _runs(loaded, chunks, budgets, "1 device")
    no_split = list(model._no_split_modules or [])
    if args.smoke:
        device_map = {"": "cpu"}
    else:
        memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=torch.bfloat16)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    model = dispatch_model(model, device_map=device_map)
    spread = LoadedModel(model, None, names["13b"], "bench", "auto", torch.bfloat16)
    placed = {}
    for p in projections:
        where = str(weight_of(model, p).device)
        placed[where] = placed.get(where, 0) + 1
    report.row("projections per device after the balanced device map", ", ".join(f"{d} {n}" for d, n in placed.items()))
    every = _runs(spread, chunks, budgets, f"{len(placed)} devices")
    compare = {}
    for method in one:
        a, b = one[method], every[method]
        compare[method] = {"ppl_rel_diff": abs(a["ppl"] - b["ppl"]) / a["ppl"],
                           "realized_abs_diff": abs(a["realized_sparsity"] - b["realized_sparsity"])}
        report.row(f"{method}: ppl 1 device / spread", f"{a['ppl']:.4f} / {b['ppl']:.4f} "
                   f"(rel. diff {compare[method]['ppl_rel_diff']:.1e}); realized {a['realized_sparsity']:.4f} / "
                   f"{b['realized_sparsity']:.4f}; {a['seconds']:.2f} s / {b['seconds']:.2f} s")
    ok = all(c["ppl_rel_diff"] < 1e-3 and c["realized_abs_diff"] < 1e-4 for c in compare.values())
    report.data["eval_13b"] = {"model": names["13b"], "sparsity": args.sparsity, "tokens": int(chunks.numel()),
                               "seqlen": args.seqlen, "text": "random token ids (seed 0)", "one_device": one,
                               "spread": every, "placement": placed, "compare": compare, "agree": ok}
    report.row("1 device and spread agree (ppl within 1e-3 rel., realized sparsity within 1e-4)", str(ok))


def part_70b(report: Report, args, names: dict, devices: list[torch.device], plan: SolverPlan) -> None:
    from transformers import AutoModelForCausalLM

    config = llama_config(names["70b"], args.layers_70b)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    projections = find_projections(skeleton)
    layers = sorted({p.layer for p in projections})

    def generate(members):
        def load(device: torch.device):
            out = []
            for i in members:
                p = projections[i]
                generator = torch.Generator(device).manual_seed(1000 + i)
                w = torch.randn(p.out_features, p.in_features, generator=generator, device=device, dtype=torch.bfloat16)
                out.append((i, w.mul_(0.02)))
            return out
        return load

    units = [Unit(generate([i for i, p in enumerate(projections) if p.layer == layer]), f"layer {k}/{len(layers)}")
             for k, layer in enumerate(layers, start=1)]
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    with HostPeak() as host:
        results, seconds = timed(lambda: solve(units, len(projections), devices, plan))
        values = [results[i] for i in range(len(projections))]
        spectra, fit_s = timed(lambda: spectra_from_eigenvalues(projections, values, args.rule, names["70b"], "bench",
                                                              str(devices[0])))
    peaks = {str(d): torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"}
    n = len(projections)
    report.data["spectra_70b"] = {
        "model": names["70b"], "layers": len(layers), "matrices": n, "eigenvalues_s": seconds, "fit_s": fit_s,
        "total_s": seconds + fit_s, "per_matrix_ms": 1000 * (seconds + fit_s) / n, "gpus": len(devices),
        "peak_gpu_bytes": peaks, "peak_host_bytes": host.peak_bytes,
        "alpha_by_type": {t: float(np.mean([e.alpha for e in spectra.entries if e.type == t]))
                          for t in ("q", "k", "v", "o", "gate", "up", "down")},
    }
    total = seconds + fit_s
    report.row(f"spectra {names['70b']}, {len(layers)} layers generated layer by layer, {n} projections, "
               f"{len(devices)} devices", f"{total:.1f} s ({1000 * total / n:.1f} ms / projection)")
    report.row("  peak memory", ", ".join(f"{d} {b / 2**30:.1f} GiB" for d, b in peaks.items())
               + f"; host +{host.peak_bytes / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on two CPU 'devices' (seconds)")
    parser.add_argument("--plan-from", default=None, help="bench_spectra.py's JSON: reuse its chosen plan")
    parser.add_argument("--rule", default="ks")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--layers-70b", type=int, default=None, help="fewer layers of the 70B shapes (default 80)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: spectra,eval,70b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = Report()
    names = SMOKE if args.smoke else FULL
    if args.smoke:
        devices = [torch.device("cpu"), torch.device("cpu")]
        plan = SolverPlan(panel="torch", tridiagonal="cpu", min_dim=2)
        args.seqlen, args.chunks = min(args.seqlen, 64), min(args.chunks, 2)
    else:
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if len(devices) < 2:
            report.data["errors"]["gpus"] = f"{len(devices)} GPU(s) visible; this benchmark needs 2 or more"
            print(report.data["errors"]["gpus"])
        plan = load_plan(args.plan_from, devices[0] if devices else torch.device("cpu"))
    report.data.update(environment("cpu" if args.smoke else "cuda"), plan=asdict(plan), smoke=args.smoke)
    report.row("devices", ", ".join(str(d) for d in devices))
    report.row("plan", plan.describe())
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    for name, part in (("spectra", part_spectra), ("eval", part_eval), ("70b", part_70b)):
        if name not in skip and devices:
            with report.step(name):
                part(report, args, names, devices, plan)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    report.data["wall_s"] = time.perf_counter() - start
    report.print_table()
    report.write(args.json)


if __name__ == "__main__":
    main()
