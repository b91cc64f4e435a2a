"""User-facing errors.

Every problem a user can cause (bad path, bad number, corrupt file) raises an
``ActTailError`` whose message is one readable line; the CLI prints it and exits
non-zero, the dashboard shows it with ``st.error``. Anything else is a bug and
keeps its traceback.

The engine does not know whether a CLI flag or a dashboard widget set a value, so a message names a
setting through ``setting("seqlen")``; ``str(error)`` words it plainly ("the sequence length") and
each front end words it its own way with ``error.worded(...)`` ("--seqlen", "Sequence length").
"""
from __future__ import annotations

import re
from typing import Mapping

# How an error names each setting when no front end words it.
SETTING_WORDS = {
    "seqlen": "the sequence length",
    "max_tokens": "the token limit",
    "calib_corpus": "the calibration text",
    "corpus": "the evaluation text",
    "device": "the device",
    "dtype": "the dtype",
    "backend": "the spectra backend",
    "prompt_len": "the prompt length",
    "new_tokens": "the number of new tokens",
    "repeats": "the number of repeats",
    "sparsity": "the target sparsity",
    "allow_other_weights": "the option to accept a budget made for other weights",
}
_SETTING = re.compile(r"\x00(\w+)\x00")


def setting(name: str) -> str:
    """A placeholder for setting ``name`` in an error message (one of ``SETTING_WORDS``)."""
    if name not in SETTING_WORDS:
        raise KeyError(f"unknown setting {name!r}")
    return f"\x00{name}\x00"


class ActTailError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each setting named as ``names`` says (plain words for the rest)."""
        names = names or {}
        return _SETTING.sub(lambda m: names.get(m[1], SETTING_WORDS[m[1]]), super().__str__())

    def __str__(self) -> str:
        return self.worded()


class ModelLoadError(ActTailError):
    """The model could not be found, read or loaded."""


class BudgetError(ActTailError):
    """A budget file or budget object is invalid or does not match the model."""


class SpectraError(ActTailError):
    """A spectra file is corrupt or does not match the model."""


class CorpusError(ActTailError):
    """A text corpus is missing, empty or too short."""
