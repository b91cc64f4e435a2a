"""What every command shares: model and allocation arguments, loading, tables, one-line errors."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from .. import models, streaming
from ..allocation import DIRECTIONS, GROUPS, AllocationSettings, allocate, check_target
from ..budget import Budget
from ..errors import SETTING_WORDS, ActTailError
from ..greedy import BUILDERS
from ..methods import KNOBS, METHOD_NAMES, METHODS, is_measured, methods_help
from ..progress import TqdmProgress
from ..projections import projection_coverage
from ..spectra import DEFAULT_RULE, XMIN_RULES, check_spectra_match
from ..spectra_io import load_spectra

# An error names a setting by the flag that sets it (``seqlen`` -> ``--seqlen``).
FLAG_OF_SETTING = {name: "--" + name.replace("_", "-") for name in SETTING_WORDS}


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, its one-line help, how it adds its arguments, and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error: ...`` line (exit 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """A message kept to one line even when it quotes user input with line breaks (a path, an argument)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class Given(argparse.Action):
    """Store the value and note the flag as given: a default cannot tell whether the user typed it, and an option
    the rest of the command line makes pointless must be refused rather than silently ignored."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.option_strings[0]}


def check_allocation_options(args: argparse.Namespace) -> None:
    """Refuse allocation options that would be ignored: all of them beside ``--budget FILE`` (the file says how
    sparsity is allocated), and those the chosen ``--method`` does not read (``--temperature`` for linear)."""
    given = set(getattr(args, "given", ()))
    if getattr(args, "spectra", None):
        given.add("--spectra")
    if getattr(args, "budget", None) is not None:
        unused = given
        why = "--budget FILE already says how sparsity is allocated"
    else:
        method = METHODS[args.method]
        unused = {f"--{knob.name}" for knob in KNOBS if knob not in method.knobs}
        if method.kind != "alpha":
            unused |= {"--direction", "--group"}
        if method.kind == "measured":  # measured on text: no alphas, so no spectra and no xmin rule either
            unused |= {"--spectra", "--rule"}
        unused &= given
        why = f"--method {args.method} does not read {'it' if len(unused) == 1 else 'them'}"
    if unused:
        raise ActTailError(f"{', '.join(sorted(unused))} would be ignored: {why}; leave them out")


def model_input(args: argparse.Namespace) -> Optional[str]:
    """The model argument unless it names a packaged model: a local file or folder that ``--out`` must not replace."""
    return None if args.model in models.PACKAGED_MODELS else args.model

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="default | gemma3-270m | HF directory | .gguf file | hub id")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | float16 | bfloat16 (auto: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N | auto (accelerate device_map over all GPUs)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own Python code (off by default)")


def add_allocation_arguments(parser: argparse.ArgumentParser, with_sparsity: bool = True) -> None:
    defaults = AllocationSettings()
    if with_sparsity:
        parser.add_argument("--sparsity", type=float, default=None,
                            help="global target: parameter-weighted mean sparsity in [0, 0.95]")
    parser.add_argument("--method", action=Given, default=defaults.method, choices=METHOD_NAMES, help=methods_help())
    for knob in KNOBS:
        parser.add_argument(f"--{knob.name}", action=Given, type=float, default=getattr(defaults, knob.name),
                            help=f"{knob.help}; in {knob.range_text()}")
    parser.add_argument("--direction", action=Given, default=defaults.direction, choices=DIRECTIONS)
    parser.add_argument("--group", action=Given, default=defaults.group, choices=GROUPS)
    parser.add_argument("--rule", action=Given, default=DEFAULT_RULE, choices=XMIN_RULES,
                        help="xmin rule of the power-law fit")
    parser.add_argument("--lower", action=Given, type=float, default=defaults.lower,
                        help="lowest sparsity any projection may get")
    parser.add_argument("--upper", action=Given, type=float, default=defaults.upper,
                        help="highest sparsity any projection may get")


def settings_from_args(args: argparse.Namespace) -> AllocationSettings:
    knobs = {knob.name: getattr(args, knob.name) for knob in KNOBS}
    return AllocationSettings(method=args.method, direction=args.direction, group=args.group, lower=args.lower,
                              upper=args.upper, **knobs).validate()


def load_from_args(args: argparse.Namespace) -> models.LoadedModel:
    loaded = models.load_model(args.model, dtype=args.dtype, device=args.device,
                               trust_remote_code=args.trust_remote_code,
                        progress=TqdmProgress("load"))
    print_coverage(projection_coverage(loaded.model))  # a layer the family map does not match fails here, by name
    return loaded


def print_coverage(coverage) -> None:
    """Which linear layers became projections and which were skipped: nothing is left out silently."""
    for line in coverage.lines():
        print(line)


def print_table(frame: pd.DataFrame, title: str = "") -> None:
    if title:
        print(title)
    print(frame.to_string())


def streamed_spectra(args: argparse.Namespace, use_cache: bool = True) -> Optional[streaming.StreamResult]:
    """Spectra read layer by layer (a ``streaming.StreamResult``) when ``--model`` is a local directory
    whose weights would not fit where ``--device`` would load them; None when loading is fine."""
    models.check_device(args.device)
    source, is_local = models.resolve_model_source(args.model, TqdmProgress("model"))
    if not (is_local and Path(source).is_dir() and any(Path(source).glob("*.safetensors"))):
        return None  # nothing to stream: the regular load explains what is missing
    layout = streaming.model_layout(source, args.dtype, args.device, args.trust_remote_code)
    if not streaming.should_stream(layout, args.device):
        return None
    print_coverage(layout.coverage)
    progress = TqdmProgress("spectra")
    return streaming.stream_spectra(source, args.model, args.rule, args.device, args.dtype, use_cache, progress,
                                    layout=layout)


def budget_summary(budget: Budget) -> pd.DataFrame:
    frame = budget.to_frame()
    return frame.groupby("type", sort=False).agg(
        count=("sparsity", "size"),
        mean_alpha=("alpha", "mean"),
        min_alpha=("alpha", "min"),
        max_alpha=("alpha", "max"),
        mean_sparsity=("sparsity", "mean"),
    )


def build_budget(args: argparse.Namespace, loaded: models.LoadedModel, sparsity: float) -> Budget:
    """The budget the CLI arguments ask for (acttail/linear/uniform, or a greedy)."""
    if is_measured(args.method):
        check_target(sparsity, settings_from_args(args))
        return BUILDERS[args.method](loaded, sparsity, progress=TqdmProgress(args.method))
    settings = settings_from_args(args)
    if getattr(args, "spectra", None):
        spectra = load_spectra(args.spectra)
        check_spectra_match(spectra, loaded)
    else:
        spectra = streaming.spectra_of(loaded, rule=args.rule, progress=TqdmProgress("spectra"))
    return allocate(spectra, sparsity, settings)
