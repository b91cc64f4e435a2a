"""Progress reporting without prints: library code calls a ``ProgressFn``.

The CLI passes a tqdm-backed callback, the dashboard a ``st.progress`` one, and
tests nothing at all.
"""
from __future__ import annotations

from typing import Callable, Optional

# progress(done, total, message)
ProgressFn = Callable[[int, int, str], None]


def report(progress: Optional[ProgressFn], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)


class TqdmProgress:
    """A ``ProgressFn`` that drives one tqdm bar per distinct message prefix."""

    def __init__(self, desc: str = "") -> None:
        self.desc = desc
        self._bar = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = tqdm(total=total, desc=self.desc or message, leave=False)
        self._bar.n = done
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def part(progress: Optional[ProgressFn], index: int, count: int) -> Optional[ProgressFn]:
    """The progress of step ``index`` of ``count`` equal steps, reported as progress of the whole job.

    A step that reports ``(done, total)`` becomes ``(index * total + done, count * total)``: one bar
    advances through every step (e.g. every chunk of every run) instead of refilling for each.
    """
    if progress is None:
        return None

    def step(done: int, total: int, message: str = "") -> None:
        progress(index * total + done, count * total, message)

    return step
