"""Command line: ``python -m acttail_core <command> ...``.

A thin layer: it parses arguments, calls the engine, prints a short table and
writes files. Any ``ActTailError`` ends the program with one line on stderr and
exit code 2; nothing is half-written because the engine writes atomically.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import SETTING_WORDS, ActTailError
from .safe_io import check_output

# Each command module registers itself here: name -> (add_arguments, run)
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error: ...`` line (exit 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


# An error names a setting by the flag that sets it (``seqlen`` -> ``--seqlen``).
FLAG_OF_SETTING = {name: "--" + name.replace("_", "-") for name in SETTING_WORDS}


def one_line(message: str) -> str:
    """A message kept to one line even when it quotes user input with line breaks (a path, an argument)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def model_input(args: argparse.Namespace) -> Optional[str]:
    """The model argument unless it names a packaged model: a local file or folder that ``--out`` must not replace."""
    from .models import PACKAGED_MODELS

    return None if args.model in PACKAGED_MODELS else args.model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="default | gemma3-270m | HF directory | .gguf file | hub id")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | float16 | bfloat16 (auto: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N | auto (accelerate device_map over all GPUs)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own Python code (off by default)")


def add_allocation_arguments(parser: argparse.ArgumentParser, with_sparsity: bool = True) -> None:
    from .allocation import DIRECTIONS, GROUPS, METHODS, AllocationSettings
    from .spectra import DEFAULT_RULE, XMIN_RULES

    defaults = AllocationSettings()
    if with_sparsity:
        parser.add_argument("--sparsity", type=float, default=None,
                            help="global target: parameter-weighted mean sparsity in [0, 0.95]")
    parser.add_argument("--method", default=defaults.method, choices=METHODS)
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="acttail, in [0, 1000]: 0 = uniform, larger = more alpha-driven")
    parser.add_argument("--eps", type=float, default=defaults.eps, help="linear (AlphaPruning) map: spread in [0, 1)")
    parser.add_argument("--direction", default=defaults.direction, choices=DIRECTIONS)
    parser.add_argument("--group", default=defaults.group, choices=GROUPS)
    parser.add_argument("--rule", default=DEFAULT_RULE, choices=XMIN_RULES, help="xmin rule of the power-law fit")
    parser.add_argument("--lower", type=float, default=defaults.lower, help="lowest sparsity any projection may get")
    parser.add_argument("--upper", type=float, default=defaults.upper, help="highest sparsity any projection may get")


def settings_from_args(args: argparse.Namespace):
    from .allocation import AllocationSettings

    return AllocationSettings(
        method=args.method,
        temperature=args.temperature,
        eps=args.eps,
        direction=args.direction,
        group=args.group,
        lower=args.lower,
        upper=args.upper,
    ).validate()


def load_from_args(args: argparse.Namespace):
    from .models import load_model
    from .progress import TqdmProgress
    from .projections import projection_coverage

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        progress=TqdmProgress("load"))
    print_coverage(projection_coverage(loaded.model))  # a layer the family map does not match fails here, by name
    return loaded


def print_coverage(coverage) -> None:
    """Which linear layers became projections and which were skipped: nothing is left out silently."""
    for line in coverage.lines():
        print(line)


def print_table(frame, title: str = "") -> None:
    if title:
        print(title)
    print(frame.to_string())


# --------------------------------------------------------------------------- spectra


def _spectra_arguments(parser: argparse.ArgumentParser) -> None:
    from .spectra import BACKENDS, DEFAULT_RULE, XMIN_RULES

    add_model_arguments(parser)
    parser.add_argument("--rule", default=DEFAULT_RULE, choices=XMIN_RULES, help="ks = weightwatcher's default fit")
    parser.add_argument("--backend", default="acttail", choices=BACKENDS,
                        help="weightwatcher: the reference implementation (slow)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    parser.add_argument("--out", default=None, help="write the spectra (with eigenvalues) to this JSON file")


def streamed_spectra(args: argparse.Namespace, use_cache: bool = True):
    """Spectra read layer by layer (a ``streaming.StreamResult``) when ``--model`` is a local directory
    whose weights would not fit where ``--device`` would load them; None when loading is fine."""
    from .models import check_device, resolve_model_source
    from .progress import TqdmProgress
    from .streaming import model_layout, should_stream, stream_spectra

    check_device(args.device)
    source, is_local = resolve_model_source(args.model, TqdmProgress("model"))
    if not (is_local and Path(source).is_dir() and any(Path(source).glob("*.safetensors"))):
        return None  # nothing to stream: the regular load explains what is missing
    layout = model_layout(source, args.dtype, args.device, args.trust_remote_code)
    if not should_stream(layout, args.device):
        return None
    print_coverage(layout.coverage)
    progress = TqdmProgress("spectra")
    return stream_spectra(source, args.model, args.rule, args.device, args.dtype, use_cache, progress, layout=layout)


def _spectra_run(args: argparse.Namespace) -> int:
    from .progress import TqdmProgress
    from .spectra import compute_spectra
    from .spectra_io import save_spectra

    if args.out is not None:
        args.out = check_output(args.out, [model_input(args)])  # before the slow work, not after it
    streamed = streamed_spectra(args, not args.no_cache) if args.backend == "acttail" else None
    if streamed is not None:
        spectra, name = streamed.spectra, args.model
        print("spectra from the cache (the model was not loaded)" if streamed.from_cache else streamed.memory_line())
    else:
        loaded = load_from_args(args)
        spectra, name = compute_spectra(
            loaded, rule=args.rule, backend=args.backend, use_cache=not args.no_cache, progress=TqdmProgress("spectra")
        ), loaded.name
    summary = spectra.type_summary().round(3)
    what = f"{args.rule} rule, {spectra.backend}, {len(spectra.entries)} projections"
    print_table(summary, f"{name}: alpha per projection type ({what})")
    if args.out:
        path = save_spectra(spectra, args.out)
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- allocate


def _allocate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_allocation_arguments(parser)
    parser.add_argument("--spectra", default=None, help="use this spectra JSON instead of computing it")
    parser.add_argument("--out", default="budget.json", help="where to write the budget JSON")


def budget_summary(budget):
    frame = budget.to_frame()
    return frame.groupby("type", sort=False).agg(
        count=("sparsity", "size"),
        mean_alpha=("alpha", "mean"),
        min_alpha=("alpha", "min"),
        max_alpha=("alpha", "max"),
        mean_sparsity=("sparsity", "mean"),
    )


def build_budget(args: argparse.Namespace, loaded, sparsity: float):
    """The budget the CLI arguments ask for (acttail/linear/uniform, or a greedy)."""
    from .allocation import allocate, check_target
    from .progress import TqdmProgress
    from .spectra import check_spectra_match
    from .spectra_io import load_spectra
    from .streaming import spectra_of

    if args.method in ("greedy", "greedy-block"):
        from .greedy import greedy_block_budget, greedy_budget

        check_target(sparsity, settings_from_args(args))
        make = greedy_budget if args.method == "greedy" else greedy_block_budget
        return make(loaded, sparsity, progress=TqdmProgress(args.method))
    settings = settings_from_args(args)
    if getattr(args, "spectra", None):
        spectra = load_spectra(args.spectra)
        check_spectra_match(spectra, loaded)
    else:
        spectra = spectra_of(loaded, rule=args.rule, progress=TqdmProgress("spectra"))
    return allocate(spectra, sparsity, settings)


def _allocate_run(args: argparse.Namespace) -> int:
    from .allocation import check_target
    from .budget import save_budget

    if args.sparsity is None:
        raise ActTailError("--sparsity is required (a number in [0, 0.95])")
    check_target(args.sparsity, settings_from_args(args))  # fail before the slow model load
    args.out = check_output(args.out, [args.spectra, model_input(args)])
    if args.spectra:
        from .spectra_io import load_spectra

        load_spectra(args.spectra)  # a missing or corrupt file fails now; its model is checked after the load
    streamed = streamed_spectra(args) if args.method not in ("greedy", "greedy-block") and not args.spectra else None
    if streamed is not None:  # a model too large to load: allocation needs only its spectra
        from .allocation import allocate

        budget = allocate(streamed.spectra, args.sparsity, settings_from_args(args))
    else:
        budget = build_budget(args, load_from_args(args), args.sparsity)
    print_table(
        budget_summary(budget).round(3),
        f"{budget.model_name}: {budget.method} budget at target {budget.target_sparsity:g} "
        f"(effective {budget.effective_sparsity:.4f}, {len(budget.projections)} projections)",
    )
    path = save_budget(budget, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS: dict[str, tuple[str, Command]] = {
    "spectra": ("per-projection ESD and heavy-tail alpha", (_spectra_arguments, _spectra_run)),
    "allocate": ("per-projection sparsity budget JSON from alpha", (_allocate_arguments, _allocate_run)),
}


def register(name: str, help_text: str, add_arguments, run) -> None:
    COMMANDS[name] = (help_text, (add_arguments, run))


def _load_plugins() -> None:
    """Commands defined next to the stage they drive (eval, bench, calibrate, study)."""
    import importlib

    for module in ("cli_eval", "cli_calibrate", "study"):
        try:
            importlib.import_module(f"acttail_core.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"acttail_core.{module}":
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = OneLineParser(prog="acttail",
                           description="ActTail Explorer: heavy-tail guided activation sparsity")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, (add_arguments, run)) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(cmd)
        cmd.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' own progress bars and advice are noise in a CLI summary
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        return args.run(args)
    except ActTailError as exc:
        print(f"error: {one_line(exc.worded(FLAG_OF_SETTING))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
