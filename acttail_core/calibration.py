"""Per-model calibration: the allocation settings that suit one model at one target, chosen on calibration text.

The defaults (``AllocationSettings``: acttail, keep-light, projection grouping, ``mid`` rule, T = 0.15) won
one study over two models, but what they gain over uniform differs a lot between models. ``calibrate`` chooses,
for one model and one target sparsity, the four settings of the acttail map -- temperature T, direction,
grouping and xmin rule -- by the perplexity they give on calibration text (default: the first 1024 tokens of
``lcet10`` and of ``asyoulik``; never an evaluation text).

Search: coordinate descent, memoised (every distinct setting costs one perplexity run, none twice):

1. run uniform (T = 0) and the start point (the defaults);
2. temperature: walk the ladder ``TEMPERATURES`` from the current T, upward while the NLL falls, else
   downward while it falls;
3. xmin rule, then grouping, then direction: run each other value with the rest fixed and move whenever
   the NLL falls;
4. repeat 2-3 while anything moved, at most ``max_sweeps`` sweeps (settings already run cost nothing).

The choice is the best setting run if its mean NLL is at least ``min_gain`` below uniform's (0.01 nats: 1% in
perplexity), otherwise uniform itself (T = 0). So on the calibration text the calibrated budget is never worse
than uniform, and a gain too small to trust does not replace it. Each sweep makes at most
``len(TEMPERATURES) - 1 + 2 + 2 + 1`` runs; ``max_runs`` is the bound the progress bar counts to.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .allocation import DIRECTIONS, GROUPS, AllocationSettings, allocate, check_target
from .budget import Budget, CalibrationRecord
from .corpora import load_calibration_text, same_text, tokenize_corpus
from .errors import ActTailError
from .evaluate import perplexity
from .models import LoadedModel
from .progress import ProgressFn, report
from .spectra import DEFAULT_RULE, XMIN_RULES, Spectra
from .streaming import spectra_of

TEMPERATURES = (0.05, 0.1, 0.15, 0.2, 0.35, 0.5, 0.75, 1.0)
DEFAULT_TEXTS = ("demo:lcet10", "demo:asyoulik")
DEFAULT_TOKENS = 1024  # per text
DEFAULT_SEQLEN = 1024
MIN_GAIN = 0.01  # nats of mean NLL: a non-uniform setting must beat uniform by 1% in perplexity
MAX_SWEEPS = 2
COORDINATES = (("rule", XMIN_RULES), ("group", GROUPS), ("direction", DIRECTIONS))


@dataclass(frozen=True)
class Choice:
    """One point of the search: the acttail map's four settings (T = 0 is uniform whatever the others say)."""

    temperature: float
    direction: str = AllocationSettings.direction
    group: str = AllocationSettings.group
    rule: str = DEFAULT_RULE

    @property
    def is_uniform(self) -> bool:
        return self.temperature == 0

    def settings(self) -> AllocationSettings:
        return AllocationSettings(method="acttail", temperature=self.temperature, direction=self.direction,
                                  group=self.group).validate()

    @property
    def label(self) -> str:
        if self.is_uniform:
            return "uniform"
        return f"acttail {self.direction} {self.group} {self.rule} T={self.temperature:g}"


UNIFORM = Choice(0.0)
DEFAULT_START = Choice(AllocationSettings.temperature)
Objective = Callable[[Choice], float]  # mean NLL per token (nats) on the calibration text


def max_runs(max_sweeps: int = MAX_SWEEPS) -> int:
    """The most perplexity runs a search can make (uniform, the start, then each sweep's alternatives)."""
    per_sweep = len(TEMPERATURES) - 1 + sum(len(values) - 1 for _, values in COORDINATES)
    return 2 + max_sweeps * per_sweep


@dataclass
class SearchResult:
    choice: Choice
    nll: float
    uniform_nll: float
    trace: list[tuple[Choice, float]] = field(default_factory=list)  # every run, in the order made

    @property
    def runs(self) -> int:
        return len(self.trace)


def coordinate_search(
    objective: Objective,
    start: Choice = DEFAULT_START,
    max_sweeps: int = MAX_SWEEPS,
    min_gain: float = MIN_GAIN,
    progress: Optional[ProgressFn] = None,
) -> SearchResult:
    """The search of the module docstring over ``objective`` (lower is better; NaN counts as infinitely bad)."""
    if start.is_uniform:
        raise ActTailError("the search must start from a temperature above 0 (T = 0 is the uniform baseline)")
    if max_sweeps < 1:
        raise ActTailError(f"max_sweeps must be at least 1, got {max_sweeps}")
    memo: dict[Choice, float] = {}
    trace: list[tuple[Choice, float]] = []
    bound = max_runs(max_sweeps)

    def run(choice: Choice) -> float:
        choice = UNIFORM if choice.is_uniform else choice
        if choice not in memo:
            value = float(objective(choice))
            memo[choice] = value if math.isfinite(value) else math.inf
            trace.append((choice, memo[choice]))
            report(progress, len(trace), bound, choice.label)
        return memo[choice]

    def walk_temperature(current: Choice) -> Choice:
        ladder = sorted(set(TEMPERATURES) | {current.temperature})
        here = ladder.index(current.temperature)
        for step in (1, -1):
            moved = False
            index = here + step
            while 0 <= index < len(ladder):
                candidate = replace(current, temperature=ladder[index])
                if run(candidate) >= run(current):
                    break
                current, moved = candidate, True
                index += step
            if moved:
                break
        return current

    uniform = run(UNIFORM)
    current = start
    run(current)
    for _ in range(max_sweeps):
        before = current
        current = walk_temperature(current)
        for name, values in COORDINATES:
            for value in values:
                candidate = replace(current, **{name: value})
                if candidate != current and run(candidate) < run(current):
                    current = candidate
        if current == before:
            break
    best = min((c for c in memo if not c.is_uniform), key=lambda c: memo[c])
    if not memo[best] <= uniform - min_gain:
        best = UNIFORM
    report(progress, bound, bound, f"chose {best.label}")
    return SearchResult(best, memo[best], uniform, trace)


def check_calibration_texts(texts: Sequence[str]) -> None:
    """Calibration text must exist and must not be the demo evaluation text (alice29)."""
    if not texts:
        raise ActTailError("give at least one calibration text")
    for text in texts:
        if same_text("demo", text):
            raise ActTailError(f"{text} is the demo evaluation text; calibrate on other text (e.g. demo:lcet10)")
        load_calibration_text(text)


def calibration_chunks(loaded: LoadedModel, texts: Sequence[str], tokens: int, seqlen: int) -> torch.Tensor:
    """``[n, seqlen]`` token ids: the first ``tokens`` tokens of every calibration text, in order."""
    return torch.cat([tokenize_corpus(loaded, load_calibration_text(t), seqlen, tokens) for t in texts])


class SpectraByRule:
    """The model's spectra for each xmin rule, computed (or read from the cache) once."""

    def __init__(self, loaded: LoadedModel, progress: Optional[ProgressFn] = None) -> None:
        self.loaded = loaded
        self.progress = progress
        self._spectra: dict[str, Spectra] = {}

    def __call__(self, rule: str) -> Spectra:
        if rule not in self._spectra:
            self._spectra[rule] = spectra_of(self.loaded, rule=rule, progress=self.progress)
        return self._spectra[rule]


def choice_budget(spectra_for: Callable[[str], Spectra], sparsity: float, choice: Choice) -> Budget:
    """The budget of one search point (uniform: the acttail map at T = 0, which is exactly uniform)."""
    return allocate(spectra_for(choice.rule), sparsity, choice.settings())


class PerplexityObjective:
    """Mean NLL of a search point's budget on fixed calibration chunks (the CLI's and dashboard's objective)."""

    def __init__(self, loaded: LoadedModel, sparsity: float, chunks: torch.Tensor,
                 spectra_for: Callable[[str], Spectra]) -> None:
        self.loaded = loaded
        self.sparsity = sparsity
        self.chunks = chunks
        self.spectra_for = spectra_for

    def __call__(self, choice: Choice) -> float:
        return perplexity(self.loaded, self.chunks, choice_budget(self.spectra_for, self.sparsity, choice)).nll


@dataclass
class Calibration:
    """The outcome of ``calibrate``: the chosen point, its search, and what it ran on."""

    sparsity: float
    search: SearchResult
    texts: tuple[str, ...]
    tokens: int  # tokens scored per run
    seqlen: int
    seconds: float

    @property
    def choice(self) -> Choice:
        return self.search.choice

    def record(self) -> CalibrationRecord:
        return CalibrationRecord(texts=list(self.texts), tokens=self.tokens, seqlen=self.seqlen, search="coordinate",
                                 runs=self.search.runs, seconds=round(self.seconds, 3),
                                 uniform_nll=self.search.uniform_nll, nll=self.search.nll)

    def budget(self, spectra_for: Callable[[str], Spectra]) -> Budget:
        """The budget of the chosen settings, carrying the calibration record."""
        return choice_budget(spectra_for, self.sparsity, self.choice).model_copy(update={"calibration": self.record()})


def calibrate(
    loaded: LoadedModel,
    sparsity: float,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS,
    tokens: int = DEFAULT_TOKENS,
    seqlen: int = DEFAULT_SEQLEN,
    objective: Optional[Objective] = None,
    spectra_for: Optional[Callable[[str], Spectra]] = None,
    max_sweeps: int = MAX_SWEEPS,
    min_gain: float = MIN_GAIN,
    progress: Optional[ProgressFn] = None,
) -> Calibration:
    """Choose T, direction, grouping and xmin rule for ``loaded`` at ``sparsity`` on the calibration texts.

    ``objective`` replaces the perplexity runs (the study passes one that caches them on disk).
    """
    check_target(sparsity, AllocationSettings())
    if sparsity == 0:
        raise ActTailError("nothing to calibrate at sparsity 0: every setting is the dense model")
    check_calibration_texts(texts)
    chunks = calibration_chunks(loaded, texts, tokens, seqlen)
    spectra_for = spectra_for or SpectraByRule(loaded)
    objective = objective or PerplexityObjective(loaded, sparsity, chunks, spectra_for)
    started = time.perf_counter()
    search = coordinate_search(objective, max_sweeps=max_sweeps, min_gain=min_gain, progress=progress)
    scored = int(chunks.shape[0]) * (int(chunks.shape[1]) - 1)
    return Calibration(sparsity, search, tuple(texts), scored, int(chunks.shape[1]), time.perf_counter() - started)
