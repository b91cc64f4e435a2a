"""``acttail study``: calibrated acttail against uniform and both greedies on held-out text (resumable)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..progress import TqdmProgress
from ..safe_io import check_output, check_output_folder
from ..study import STAGES, StudyConfig, run_study
from . import common


def _arguments(parser: argparse.ArgumentParser) -> None:
    d = StudyConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models))
    parser.add_argument("--calib-texts", nargs="+", default=list(d.calib_texts), help="calibration texts")
    parser.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="tokens per calibration text")
    parser.add_argument("--calib-sweeps", type=int, default=d.calib_sweeps, help="most sweeps of the search")
    parser.add_argument("--heldout-texts", nargs="+", default=list(d.heldout_texts))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(d.report_sparsities),
                        help="report sparsities")
    parser.add_argument("--tokens", type=int, default=d.report_tokens, help="tokens per held-out text")
    parser.add_argument("--seqlen", type=int, default=d.seqlen)
    parser.add_argument("--ablation-sparsities", nargs="+", type=float, default=list(d.ablation_sparsities))
    parser.add_argument("--ablation-tokens", type=int, default=d.ablation_tokens)
    parser.add_argument("--seeds", type=int, default=d.seeds, help="ablation (b): permutations")
    parser.add_argument("--threshold-sparsities", nargs="+", type=float, default=list(d.threshold_sparsities))
    parser.add_argument("--threshold-calib", default=d.threshold_calib, help="threshold mode's calibration text")
    parser.add_argument("--threshold-calib-tokens", type=int, default=d.threshold_calib_tokens)
    parser.add_argument("--greedy-tokens", type=int, default=d.greedy_tokens)
    parser.add_argument("--block-tokens", type=int, default=d.block_tokens, help="greedy-block's calibration tokens")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(d.stages))
    parser.add_argument("--out", default=d.out, help="folder for runs.jsonl, report.md and study.png")
    parser.add_argument("--device", default=d.device, help="cpu | cuda (the study's models are small)")
    parser.add_argument("--dtype", default=d.dtype, help="float32 keeps GPU and CPU results comparable")
    parser.add_argument("--plot", default=None, help="also save the plot here (e.g. assets/study.png)")


def _run(args: argparse.Namespace) -> int:
    args.out = str(check_output_folder(args.out))  # hours of runs must not end in a write error
    if args.plot:
        args.plot = str(check_output(args.plot))
    config = StudyConfig(
        models=tuple(args.models), calib_texts=tuple(args.calib_texts), calib_tokens=args.calib_tokens,
        calib_sweeps=args.calib_sweeps, heldout_texts=tuple(args.heldout_texts),
        report_sparsities=tuple(args.sparsities), report_tokens=args.tokens, seqlen=args.seqlen,
        ablation_sparsities=tuple(args.ablation_sparsities), ablation_tokens=args.ablation_tokens, seeds=args.seeds,
        threshold_sparsities=tuple(args.threshold_sparsities), threshold_calib=args.threshold_calib,
        threshold_calib_tokens=args.threshold_calib_tokens, greedy_tokens=args.greedy_tokens,
        block_tokens=args.block_tokens,
        stages=tuple(args.stages), out=args.out, device=args.device, dtype=args.dtype)
    path = run_study(config, TqdmProgress("study"), Path(args.plot) if args.plot else None)
    print(Path(path).read_text())
    print(f"wrote {path}, {Path(args.out) / 'runs.jsonl'}" + (f" and {args.plot}" if args.plot else ""))
    return 0


COMMANDS = (
    common.Command("study", "calibrate per model, compare with uniform and both greedies, ablations (resumable)",
                   _arguments, _run),
)
