"""``acttail calibrate``: the acttail settings for this model, chosen on calibration text.

    python -m acttail_core calibrate --model gemma3-270m --sparsity 0.7 --out budget.json

Chooses temperature, direction, grouping and xmin rule for this model at this target on calibration text
(``acttail_core.calibration``), prints every run of the search, and writes the chosen budget with its
calibration record. Arguments are checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import math

import pandas as pd

from ..allocation import AllocationSettings, check_target
from ..budget import save_budget
from ..calibration import (
    DEFAULT_SEQLEN,
    DEFAULT_TEXTS,
    DEFAULT_TOKENS,
    MAX_SWEEPS,
    MIN_GAIN,
    SpectraByRule,
    calibrate,
    check_calibration_texts,
)
from ..errors import ActTailError
from ..models import check_device
from ..progress import TqdmProgress
from ..safe_io import check_output
from . import common


def _arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--sparsity", type=float, required=True, help="target in (0, 0.95]")
    parser.add_argument("--calib-texts", nargs="+", default=list(DEFAULT_TEXTS),
                        help="calibration texts (demo:NAME, wikitext2 or files); never your evaluation text")
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_TOKENS, help="tokens from each calibration text")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per chunk")
    parser.add_argument("--max-sweeps", type=int, default=MAX_SWEEPS, help="most sweeps of the coordinate search")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help="nats of mean NLL a setting must beat uniform by (else uniform is chosen)")
    parser.add_argument("--out", default="budget.json", help="where to write the calibrated budget JSON")


def _run(args: argparse.Namespace) -> int:
    check_device(args.device)
    check_target(args.sparsity, AllocationSettings())
    if args.sparsity == 0:
        raise ActTailError("nothing to calibrate at --sparsity 0: every setting is the dense model")
    if min(args.calib_tokens, args.seqlen) < 2 or args.seqlen > args.calib_tokens:
        raise ActTailError("need 2 <= --seqlen <= --calib-tokens")
    if args.max_sweeps < 1 or not (math.isfinite(args.min_gain) and args.min_gain >= 0):
        raise ActTailError("--max-sweeps must be at least 1 and --min-gain a number >= 0")
    check_calibration_texts(args.calib_texts)
    args.out = check_output(args.out, [common.model_input(args)] + list(args.calib_texts))
    loaded = common.load_from_args(args)
    spectra_for = SpectraByRule(loaded, TqdmProgress("spectra"))
    found = calibrate(loaded, args.sparsity, texts=tuple(args.calib_texts), tokens=args.calib_tokens,
                      seqlen=args.seqlen, spectra_for=spectra_for, max_sweeps=args.max_sweeps,
                      min_gain=args.min_gain, progress=TqdmProgress("calibrate"))
    uniform = found.search.uniform_nll
    frame = pd.DataFrame([{"setting": choice.label, "ppl": math.exp(nll),
                           "vs uniform": f"{math.exp(nll - uniform) - 1:+.1%}"} for choice, nll in found.search.trace])
    frame.index = range(1, len(frame) + 1)
    title = (f"{loaded.name} at sparsity {args.sparsity:g}: {found.search.runs} perplexity runs on {found.tokens} "
             f"tokens of {', '.join(found.texts)} in {found.seconds:.0f} s")
    common.print_table(frame.round({"ppl": 3}), title)
    print(f"chosen: {found.choice.label} (ppl {math.exp(found.search.nll):.3f} vs uniform {math.exp(uniform):.3f})")
    path = save_budget(found.budget(spectra_for), args.out)
    print(f"wrote {path}")
    return 0


COMMANDS = (
    common.Command("calibrate", "choose temperature, direction, grouping and xmin rule for this model on calibration "
                   "text", _arguments, _run),
)
