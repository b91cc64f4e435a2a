"""Command line: ``acttail <command> ...`` (or ``python -m acttail_core <command> ...``).

A thin layer: it parses arguments, calls the engine, prints a short table and writes files. One module
per group of commands, each listing its ``COMMANDS``; ``common`` holds what they share. Any
``ActTailError`` ends the program with one line on stderr and exit code 2, naming settings by their
flags; nothing is half-written because the engine writes atomically.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from transformers.utils import logging as hf_logging

from .. import __version__
from ..errors import ActTailError
from . import allocate, calibrate, evaluate, spectra, study
from .common import FLAG_OF_SETTING, Command, OneLineParser, one_line

COMMANDS: tuple[Command, ...] = (
    *spectra.COMMANDS, *allocate.COMMANDS, *evaluate.COMMANDS, *calibrate.COMMANDS, *study.COMMANDS,
)

__all__ = ["COMMANDS", "FLAG_OF_SETTING", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="acttail", description="ActTail Explorer: heavy-tail guided activation sparsity")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        cmd = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(cmd)
        cmd.set_defaults(run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' own progress bars and advice are noise in a CLI summary
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.run(args)
    except ActTailError as exc:
        print(f"error: {one_line(exc.worded(FLAG_OF_SETTING))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
