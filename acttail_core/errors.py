"""User-facing errors.

Every problem a user can cause (bad path, bad number, corrupt file) raises an
``ActTailError`` whose message is one readable line; the CLI prints it and exits
non-zero, the dashboard shows it with ``st.error``. Anything else is a bug and
keeps its traceback.
"""


class ActTailError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelLoadError(ActTailError):
    """The model could not be found, read or loaded."""


class BudgetError(ActTailError):
    """A budget file or budget object is invalid or does not match the model."""


class SpectraError(ActTailError):
    """A spectra file is corrupt or does not match the model."""


class CorpusError(ActTailError):
    """A text corpus is missing, empty or too short."""
