"""Benchmark the spectra stage: our two-stage solver vs a plain batched eigvalsh vs weightwatcher.

    # one GPU, random Llama-2-7B shapes (32 layers, 224 projections, bf16, built on the GPU)
    python bench/bench_spectra.py --synthetic llama2-7b --device cuda --ww-layers 2 \\
        --json bench/results/spectra_h200.json

    # CPU smoke run of the same code paths (seconds; the test suite runs it)
    python bench/bench_spectra.py --synthetic tiny --device cpu --ww-layers 1 --json /tmp/spectra_tiny.json

    # the default model on this machine's CPU (the float64 LAPACK reference path)
    python bench/bench_spectra.py --model default

What one run measures (each step records its error and the run goes on):

1. reference: every projection's eigenvalues by a plain batched float64 ``eigvalsh`` (the pre-two-stage
   path), timed; float64 LAPACK on the CPU for a sample (``--cpu-check``), the "float64 CPU path";
2. candidates: a few ``SolverPlan``s (band width, panel kernel, where the tridiagonal stage runs, CUDA
   graphs) timed on a quarter of the matrices after a warm-up that compiles the kernels; the fastest
   whose alphas match the reference within 0.5% for every xmin rule is chosen;
3. ours: ``compute_spectra`` end to end (eigenvalues + fit) on all projections with that plan, with peak
   GPU and host memory; alpha agreement for every rule against the float64 reference;
4. weightwatcher 0.7 on ``--ww-layers`` layers of the same model, extrapolated per projection;
5. streaming: a ``--stream-layers``-layer model of the same shapes saved as safetensors shards and read
   back layer by layer, with peak memory, against the same model in memory.

Prints a table and writes ``--json``. Timings are wall-clock with every GPU synchronised.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from acttail_core.eigensolver import SolverPlan, Unit, default_plan, gram_matrix, solve, visible_devices
from acttail_core.models import from_module, load_model
from acttail_core.projections import find_projections, weight_of
from acttail_core.spectra import XMIN_RULES, compute_spectra, fit_power_law, weightwatcher_fits
from acttail_core.streaming import HostPeak, stream_spectra

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (256, 640, 2, 4, 2, 512),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256),
}
ALPHA_TOLERANCE = 0.005


# --------------------------------------------------------------------------- helpers shared with bench_multigpu


class Report:
    """Table rows, a JSON record, and error capture so that one failing step does not end the run."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.data: dict = {"errors": {}}

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name}: {value}", flush=True)

    @contextmanager
    def step(self, name: str):
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        try:
            yield
        except Exception as exc:  # a benchmark records the failure and continues
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.row(f"{name}: FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            traceback.print_exc()

    def print_table(self) -> None:
        width = max((len(r[0]) for r in self.rows), default=10)
        print(f"\n{'measurement'.ljust(width)} | result")
        print(f"{'-' * width}-|-------")
        for name, value in self.rows:
            print(f"{name.ljust(width)} | {value}")

    def write(self, path: Optional[str]) -> None:
        if not path:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"wrote {target}")


def environment(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    return info


def synchronize() -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def timed(fn: Callable):
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def llama_config(name: str, layers: Optional[int] = None):
    from transformers import LlamaConfig

    hidden, inter, n_layers, heads, kv, vocab = SHAPES[name]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=2048)


def synthetic_model(name: str, device: str, layers: Optional[int] = None, seed: int = 0) -> torch.nn.Module:
    """A random Llama with the named shapes, initialised directly on ``device`` in bf16 (no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(name, layers), dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def alpha_table(eigenvalues: list[np.ndarray], fit_device: str) -> dict[str, np.ndarray]:
    return {rule: np.array([fit_power_law(torch.as_tensor(e, device=fit_device), rule).alpha for e in eigenvalues])
            for rule in XMIN_RULES}


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {rule: float(np.nanmax(np.abs(a[rule] - b[rule]) / np.abs(b[rule]))) for rule in a}


def weight_units(model: torch.nn.Module, projections, indices: list[int], per_unit: int) -> list[Unit]:
    chunks = [indices[i : i + per_unit] for i in range(0, len(indices), per_unit)]
    return [Unit(lambda _device, chunk=chunk: [(i, weight_of(model, projections[i])) for i in chunk])
            for chunk in chunks]


def batched_eigvalsh(model, projections, indices: list[int], device: str, dtype: torch.dtype) -> list[np.ndarray]:
    """The plain route: Gram matrices in ``dtype``, ``torch.linalg.eigvalsh`` on batches of one shape."""
    out: dict[int, np.ndarray] = {}
    by_shape: dict[tuple, list[int]] = {}
    for i in indices:
        by_shape.setdefault(projections[i].shape, []).append(i)
    for group in by_shape.values():
        for start in range(0, len(group), 16):
            batch = group[start : start + 16]
            grams = torch.stack([gram_matrix(weight_of(model, projections[i]).to(device)) for i in batch]).to(dtype)
            values = torch.linalg.eigvalsh(grams).double().cpu().numpy()
            out.update(zip(batch, values))
    return [out[i] for i in indices]


class Fallbacks(logging.Handler):
    """Collects the solver's warnings: a plan whose kernels fell back did not run as described."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextmanager
    def watching(self):
        logger = logging.getLogger("acttail_core.eigensolver")
        self.messages = []
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def candidate_plans(device: str) -> list[SolverPlan]:
    if not device.startswith("cuda"):  # the CPU smoke run: the same pipeline with PyTorch panels and LAPACK
        base = SolverPlan(panel="torch", tridiagonal="cpu", min_dim=2)
        return [base, replace(base, bandwidth=16)]
    base = default_plan(torch.device(device))
    return [
        base,
        replace(base, bandwidth=16),
        replace(base, bandwidth=4, group=32),
        replace(base, panel="torch"),
        replace(base, graphs=True),
        replace(base, tridiagonal="cpu"),
    ]


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model reference (default: the packaged SmolLM2)")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the synthetic model's layer count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ww-layers", type=int, default=2, help="decoder layers to time weightwatcher on (0 = skip)")
    parser.add_argument("--rule", default="ks", help="xmin rule of the timed end-to-end run")
    parser.add_argument("--cpu-check", type=int, default=8, help="matrices checked against float64 LAPACK on the CPU")
    parser.add_argument("--stream-layers", type=int, default=4, help="layers of the streamed model (0 = skip)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    report = Report()
    data = report.data
    data.update(environment(args.device), device=args.device, rule=args.rule)
    gpu = args.device.startswith("cuda")

    if args.synthetic:  # nothing else can run without the model, so no error capture here
        (model, seconds) = timed(lambda: synthetic_model(args.synthetic, args.device, args.layers))
        loaded = from_module(model, name=args.synthetic)
        report.row(f"build random {args.synthetic} ({args.device}, bf16)", f"{seconds:.1f} s")
    else:
        loaded = load_model(args.model or "default", device=args.device)
    data["model"] = loaded.name
    projections = find_projections(loaded.model)
    everything = list(range(len(projections)))
    data["matrices"] = len(projections)
    devices = visible_devices(torch.device(args.device))[:1]  # one device: bench_multigpu measures several
    where = str(devices[0])
    reference: dict[int, np.ndarray] = {}
    fit_device = where

    with report.step("plain batched eigvalsh, float64"):
        values, seconds = timed(lambda: batched_eigvalsh(loaded.model, projections, everything, where, torch.float64))
        reference = dict(zip(everything, values))
        data["eigvalsh_float64_ms_per_matrix"] = 1000 * seconds / len(everything)
        report.row(f"plain batched eigvalsh float64, {len(everything)} matrices",
                   f"{seconds:.2f} s ({data['eigvalsh_float64_ms_per_matrix']:.1f} ms / matrix)")
    with report.step("plain batched eigvalsh, float32"):
        sample = everything[:16]
        _, seconds = timed(lambda: batched_eigvalsh(loaded.model, projections, sample, where, torch.float32))
        data["eigvalsh_float32_ms_per_matrix"] = 1000 * seconds / len(sample)
        report.row(f"plain batched eigvalsh float32, {len(sample)} matrices",
                   f"{data['eigvalsh_float32_ms_per_matrix']:.1f} ms / matrix")
    with report.step("float64 CPU path (sample)"):
        step = max(1, len(everything) // max(1, args.cpu_check))
        sample = everything[::step][: args.cpu_check]
        cpu_eigs = [torch.linalg.eigvalsh(gram_matrix(weight_of(loaded.model, projections[i]).cpu())).numpy()
                    for i in sample]
        diff = max_rel_diff(alpha_table([reference[i] for i in sample], "cpu"), alpha_table(cpu_eigs, "cpu"))
        data["reference_vs_cpu_float64_alpha_rel_diff"] = diff
        report.row(f"float64 {args.device} eigvalsh vs float64 CPU LAPACK, {len(sample)} matrices, max alpha diff",
                   ", ".join(f"{r} {v:.1e}" for r, v in diff.items()))

    best = default_plan(devices[0]) if gpu else candidate_plans(args.device)[0]
    with report.step("candidate plans"):
        quarter = everything[: max(4, len(everything) // 4)]
        per_unit = max(1, len(quarter) // 4)
        warm = everything[:2]
        results = []
        for plan in candidate_plans(args.device):
            row = {"plan": asdict(plan)}
            try:
                with Fallbacks().watching() as fallbacks:
                    solve(weight_units(loaded.model, projections, warm, 2), len(warm), devices, plan)  # compile
                    got, seconds = timed(lambda: solve(weight_units(loaded.model, projections, quarter, per_unit),
                                                       len(quarter), devices, plan))
                if fallbacks.messages:
                    raise RuntimeError("the plan fell back: " + "; ".join(fallbacks.messages))
                diff = max_rel_diff(alpha_table([got[i] for i in quarter], fit_device),
                                    alpha_table([reference[i] for i in quarter], fit_device))
                eig_err = max(float(np.max(np.abs(got[i] - np.maximum(reference[i], 0))) / reference[i].max())
                              for i in quarter)
                row.update(seconds=seconds, ms_per_matrix=1000 * seconds / len(quarter), alpha_rel_diff=diff,
                           max_eig_err_rel_to_lambda_max=eig_err, ok=max(diff.values()) < ALPHA_TOLERANCE)
                report.row(f"candidate {plan.describe()}",
                           f"{row['ms_per_matrix']:.1f} ms / matrix, alpha diff {max(diff.values()):.1e}, "
                           f"eig err {eig_err:.1e}{'' if row['ok'] else ' (WRONG)'}")
            except Exception as exc:  # one plan failing must not stop the others
                row.update(error=f"{type(exc).__name__}: {exc}", ok=False)
                report.row(f"candidate {plan.describe()}: FAILED", row["error"].splitlines()[0])
                traceback.print_exc()
            results.append(row)
        data["candidates"] = results
        good = [r for r in results if r.get("ok")]
        if good:
            best = SolverPlan(**min(good, key=lambda r: r["seconds"])["plan"])
        data["chosen_plan"] = asdict(best)
        report.row("chosen plan", best.describe())

    ours_ms = None
    with report.step("ours, end to end"):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with HostPeak() as host, Fallbacks().watching() as fallbacks:
            spectra, seconds = timed(
                lambda: compute_spectra(loaded, rule=args.rule, use_cache=False, device=where, plan=best)
            )
        data["fallbacks"] = fallbacks.messages
        ours_ms = 1000 * seconds / len(projections)
        data.update(total_s=seconds, per_matrix_ms=ours_ms, peak_host_bytes=host.peak_bytes,
                    peak_gpu_bytes=torch.cuda.max_memory_allocated() if gpu else None)
        report.row(f"ours: spectra of all {len(projections)} projections ({args.rule}, eigenvalues + fit)",
                   f"{seconds:.2f} s ({ours_ms:.1f} ms / projection)")
        gpu_peak = f"GPU {data['peak_gpu_bytes'] / 2**30:.2f} GiB, " if gpu else ""
        report.row("ours: peak memory", f"{gpu_peak}host +{host.peak_bytes / 2**30:.2f} GiB")
        if reference:
            ours_eigs = [e.eigenvalues.astype(np.float64) for e in spectra.entries]  # float32, as cached
            theirs = alpha_table([reference[i] for i in everything], fit_device)
            diff = max_rel_diff(alpha_table(ours_eigs, fit_device), theirs)
            data["max_alpha_rel_diff_vs_float64"] = max(diff.values())
            data["alpha_rel_diff_vs_float64_by_rule"] = diff
            report.row("ours vs float64 eigvalsh: max alpha rel. diff over all projections",
                       ", ".join(f"{r} {v:.1e}" for r, v in diff.items()))
        if "eigvalsh_float64_ms_per_matrix" in data:
            data["speedup_vs_eigvalsh_float64"] = data["eigvalsh_float64_ms_per_matrix"] / ours_ms
            report.row("speed-up over plain batched float64 eigvalsh", f"{data['speedup_vs_eigvalsh_float64']:.1f}x")
    with report.step("from the disk cache"):
        previous = os.environ.get("ACTTAIL_CACHE")
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ACTTAIL_CACHE"] = cache
            compute_spectra(loaded, rule=args.rule, device=where, plan=best)
            _, seconds = timed(lambda: compute_spectra(loaded, rule=args.rule, device=where, plan=best))
        if previous is None:
            os.environ.pop("ACTTAIL_CACHE")
        else:
            os.environ["ACTTAIL_CACHE"] = previous
        report.row("spectra again, from the disk cache", f"{seconds:.2f} s")

    if args.ww_layers > 0:
        with report.step("weightwatcher"):
            per_layer = len(projections) // (max(p.layer for p in projections) + 1)
            subset = projections[: args.ww_layers * per_layer]
            fits, ww_time = timed(lambda: weightwatcher_fits(loaded.model, subset))
            ww_ms = 1000 * ww_time / len(subset)
            data["weightwatcher_ms_per_matrix"] = ww_ms
            report.row(f"weightwatcher 0.7, {len(subset)} projections ({args.ww_layers} layers)",
                       f"{ww_time:.2f} s ({ww_ms:.1f} ms / projection)")
            report.row("weightwatcher extrapolated to all projections", f"{ww_ms * len(projections) / 1000:.1f} s")
            if ours_ms:
                data["speedup_vs_weightwatcher"] = ww_ms / ours_ms
                report.row("speed-up of ours over weightwatcher (per projection)", f"{ww_ms / ours_ms:.1f}x")
                if args.rule == "ks":
                    theirs = np.array([f.alpha for f in fits])
                    rel = np.abs(spectra.alphas()[: len(subset)] - theirs) / np.abs(theirs)
                    data["weightwatcher_alpha_median_rel_diff"] = float(np.median(rel))
                    report.row("alpha agreement with weightwatcher (ks, median rel. diff)", f"{np.median(rel):.2e}")

    if args.synthetic and args.stream_layers > 0:
        with report.step("streaming"):
            stream_benchmark(report, args, best, where)

    report.print_table()
    report.write(args.json)


def stream_benchmark(report: Report, args, plan: SolverPlan, device: str) -> None:
    """Save a few layers of the same shapes as shards, stream them back, compare with the model in memory."""
    model = synthetic_model(args.synthetic, args.device, args.stream_layers, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size="1GB")
        on_disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        in_memory = compute_spectra(from_module(model), rule=args.rule, use_cache=False, device=device, plan=plan)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result, seconds = timed(lambda: stream_spectra(folder, rule=args.rule, device=device, dtype="bfloat16",
                                                       use_cache=False, plan=plan))
    diff = float(np.max(np.abs(result.spectra.alphas() - in_memory.alphas()) / np.abs(in_memory.alphas())))
    report.data["streaming"] = {
        "layers": result.layers, "checkpoint_bytes": on_disk, "largest_layer_bytes": result.largest_layer_bytes,
        "peak_host_bytes": result.peak_host_bytes, "peak_gpu_bytes": result.peak_gpu_bytes, "seconds": seconds,
        "max_alpha_rel_diff_vs_in_memory": diff,
    }
    report.row(f"streaming {result.layers} layers from {on_disk / 2**30:.2f} GiB of shards", result.memory_line())
    report.row("streamed vs in memory: max alpha rel. diff", f"{diff:.1e}")


if __name__ == "__main__":
    main()
