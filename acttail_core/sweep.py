"""Perplexity against sparsity: dense, uniform, a setting and the greedy baseline over a grid of targets.

``sweep`` builds every budget with the engine (``allocation.allocate``, ``greedy.greedy_budget``), measures
them all on the same chunks (``evaluate.evaluate_budgets``: one progress bar over every run) and returns one
row per run. Runs that would give the same budget (e.g. the setting *is* uniform) are measured once, and a
``cache`` kept by the caller makes repeated sweeps return earlier runs instead of measuring them again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import MutableMapping, Optional, Sequence

from .allocation import MAX_TARGET, AllocationSettings, allocate, check_target, uniform_budget
from .budget import Budget, budget_key, describe
from .errors import ActTailError
from .evaluate import EvalSettings, evaluate_budgets
from .greedy import BUILDERS
from .methods import is_measured
from .models import LoadedModel
from .progress import ProgressFn
from .spectra import Spectra

# "settings": the allocation the caller passes (the dashboard's sliders).
SWEEP_METHODS = ("dense", "uniform", "settings", "greedy")
MAX_SWEEP_POINTS = 20


@dataclass(frozen=True)
class SweepRun:
    method: str  # one of SWEEP_METHODS
    label: str  # how the budget was made (describe), "dense" for dense
    target: float
    budget: Optional[Budget]  # None = dense


def parse_targets(text: str) -> list[float]:
    """Sparsity targets from "0.3, 0.5 0.7" (sorted, duplicates dropped); one-line errors for anything else."""
    values = []
    for part in text.replace(",", " ").split():
        try:
            value = float(part)
        except ValueError:
            raise ActTailError(f"sparsity grid: {part[:20]!r} is not a number; write e.g. 0.3, 0.5, 0.7") from None
        if not 0 < value <= MAX_TARGET:
            raise ActTailError(f"sparsity grid: {value:g} is outside (0, {MAX_TARGET:g}]")
        values.append(round(value, 6))
    targets = sorted(set(values))
    if not targets:
        raise ActTailError("sparsity grid: give at least one target, e.g. 0.3, 0.5, 0.7")
    if len(targets) > MAX_SWEEP_POINTS:
        raise ActTailError(f"sparsity grid: {len(targets)} targets; at most {MAX_SWEEP_POINTS} per sweep")
    return targets


def sweep_runs(
    loaded: LoadedModel,
    spectra: Spectra,
    targets: Sequence[float],
    methods: Sequence[str],
    settings: AllocationSettings = AllocationSettings(),
    progress: Optional[ProgressFn] = None,
) -> list[SweepRun]:
    """The runs of a sweep, budgets built: dense once, then each method at each target; duplicates dropped."""
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown:
        raise ActTailError(f"unknown sweep method {unknown[0]!r}; choose from {', '.join(SWEEP_METHODS)}")
    if not methods:
        raise ActTailError("choose at least one method to sweep")
    runs = [SweepRun("dense", "dense", 0.0, None)] if "dense" in methods else []
    seen: set[str] = set()
    alphas = spectra.alphas()
    for target in targets:
        for method in (m for m in SWEEP_METHODS if m in methods and m != "dense"):
            chosen = settings if method == "settings" else AllocationSettings(method=method)
            check_target(target, chosen)
            if is_measured(chosen.method):
                budget = BUILDERS[chosen.method](loaded, target, alphas=alphas, progress=progress)
            elif chosen.method == "uniform":
                budget = uniform_budget(spectra.projections(), target, loaded.name, loaded.fingerprint, alphas)
            else:
                budget = allocate(spectra, target, chosen)
            key = budget_key(budget)
            if key in seen:
                continue
            seen.add(key)
            runs.append(SweepRun(method, describe(budget), target, budget))
    return runs


def sweep(
    loaded: LoadedModel,
    spectra: Spectra,
    targets: Sequence[float],
    methods: Sequence[str],
    settings: AllocationSettings = AllocationSettings(),
    evaluation: EvalSettings = EvalSettings(),
    progress: Optional[ProgressFn] = None,
    cache: Optional[MutableMapping] = None,
) -> list[dict]:
    """Perplexity of every sweep run on the same tokens: one row per run (a point of perplexity vs sparsity)."""
    runs = sweep_runs(loaded, spectra, targets, methods, settings, progress)
    results = evaluate_budgets(loaded, [(run.label, run.budget) for run in runs], evaluation, progress, cache=cache)
    rows = []
    for run, result in zip(runs, results):
        row = result.as_dict()
        row.update(method=run.method, label=run.label, target_sparsity=run.target, cached=result.cached,
                   corpus=evaluation.corpus, mode=evaluation.mode)
        rows.append(row)
    return rows
