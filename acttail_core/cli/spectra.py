"""``acttail spectra``: every projection's ESD and heavy-tail alpha, read layer by layer when the model does not fit."""
from __future__ import annotations

import argparse

from ..progress import TqdmProgress
from ..safe_io import check_output
from ..spectra import BACKENDS, DEFAULT_RULE, XMIN_RULES, compute_spectra
from ..spectra_io import save_spectra
from . import common


def _arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--rule", default=DEFAULT_RULE, choices=XMIN_RULES, help="ks = weightwatcher's default fit")
    parser.add_argument("--backend", default="acttail", choices=BACKENDS,
                        help="weightwatcher: the reference implementation (slow)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    parser.add_argument("--out", default=None, help="write the spectra (with eigenvalues) to this JSON file")


def _run(args: argparse.Namespace) -> int:
    if args.out is not None:
        args.out = check_output(args.out, [common.model_input(args)])  # before the slow work, not after it
    streamed = common.streamed_spectra(args, not args.no_cache) if args.backend == "acttail" else None
    if streamed is not None:
        spectra, name = streamed.spectra, args.model
        print("spectra from the cache (the model was not loaded)" if streamed.from_cache else streamed.memory_line())
    else:
        loaded = common.load_from_args(args)
        spectra, name = compute_spectra(
            loaded, rule=args.rule, backend=args.backend, use_cache=not args.no_cache, progress=TqdmProgress("spectra")
        ), loaded.name
    summary = spectra.type_summary().round(3)
    what = f"{args.rule} rule, {spectra.backend}, {len(spectra.entries)} projections"
    common.print_table(summary, f"{name}: alpha per projection type ({what})")
    if args.out:
        path = save_spectra(spectra, args.out)
        print(f"wrote {path}")
    return 0


COMMANDS = (common.Command("spectra", "per-projection ESD and heavy-tail alpha", _arguments, _run),)
