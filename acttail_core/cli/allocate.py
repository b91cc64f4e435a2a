"""``acttail allocate``: the per-projection sparsity budget JSON."""
from __future__ import annotations

import argparse

from ..allocation import allocate, check_target
from ..budget import save_budget
from ..errors import ActTailError
from ..methods import is_measured
from ..safe_io import check_output
from ..spectra_io import load_spectra
from . import common


def _arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    common.add_allocation_arguments(parser)
    parser.add_argument("--spectra", default=None, help="use this spectra JSON instead of computing it")
    parser.add_argument("--out", default="budget.json", help="where to write the budget JSON")


def _run(args: argparse.Namespace) -> int:
    if args.sparsity is None:
        raise ActTailError("--sparsity is required (a number in [0, 0.95])")
    check_target(args.sparsity, common.settings_from_args(args))  # fail before the slow model load
    common.check_allocation_options(args)
    args.out = check_output(args.out, [args.spectra, common.model_input(args)])
    if args.spectra:
        load_spectra(args.spectra)  # a missing or corrupt file fails now; its model is checked after the load
    from_spectra = not is_measured(args.method) and not args.spectra
    streamed = common.streamed_spectra(args) if from_spectra else None
    if streamed is not None:  # a model too large to load: allocation needs only its spectra
        budget = allocate(streamed.spectra, args.sparsity, common.settings_from_args(args))
    else:
        budget = common.build_budget(args, common.load_from_args(args), args.sparsity)
    common.print_table(
        common.budget_summary(budget).round(3),
        f"{budget.model_name}: {budget.method} budget at target {budget.target_sparsity:g} "
        f"(effective {budget.effective_sparsity:.4f}, {len(budget.projections)} projections)",
    )
    path = save_budget(budget, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS = (common.Command("allocate", "per-projection sparsity budget JSON from alpha", _arguments, _run),)
