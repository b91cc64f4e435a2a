"""The allocation study: per-model calibration against uniform and both greedies, and where the gain comes from.

``python -m acttail_core study`` runs four stages on real models. Every perplexity run is appended to
``runs.jsonl`` as it finishes, keyed by model, text, tokens, chunk length, sparsity, setting, mode, device and
dtype, so an interrupted study resumes where it stopped (and numbers from different devices never mix); the
report is rewritten after each stage.

1. ``calibrate``: for each model and report sparsity, ``calibration.calibrate`` on the calibration texts (its
   perplexity runs are cached here like every other), then dense, uniform and the calibrated budget on the
   held-out texts.
2. ``baselines``: the per-projection greedy and TEAL's block greedy (``greedy-block``) on the held-out texts.
3. ``ablation``: at the ablation sparsities, on the first ``ablation_tokens`` tokens of each held-out text,
   the default settings fed (a) type-mean alphas, (b) alphas permuted within each type (one run per seed),
   (c) the measured alphas standardised within type (``group="type"``), (d) the measured alphas; and uniform.
4. ``threshold``: uniform, calibrated and both greedies in threshold mode at the threshold sparsities.

Held-out texts never take part in a choice: the study refuses one that is also a calibration text.
Order: stage 1 at the ``PRIORITY`` sparsities (the issue's targets), stage 2 at those sparsities, stage 3, then
stages 1 and 2 at the other sparsities, then stage 4; so an interrupted study has the numbers that matter most.
Perplexity follows evaluate.perplexity (non-overlapping chunks, exp of mean NLL).
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from .allocation import AllocationSettings, allocate, permuted_alphas, type_mean_alphas, uniform_budget
from .budget import MAX_TARGET
from .calibration import (
    MAX_SWEEPS,
    Calibration,
    Choice,
    SearchResult,
    calibrate,
    calibration_chunks,
    check_calibration_texts,
    coordinate_search,
)
from .corpora import load_text, same_text
from .errors import ActTailError
from .evaluate import EvalSettings, evaluate_budgets, perplexity
from .greedy import BLOCK_TOKENS, greedy_block_budget, greedy_budget
from .models import check_device, check_model_reference, load_model, resolve_dtype
from .progress import ProgressFn, report
from .projections import find_projections
from .safe_io import write_bytes, write_text
from .spectra import DEFAULT_RULE, compute_spectra
from .thresholds import ThresholdTable, calibrate_thresholds

log = logging.getLogger(__name__)

PRIORITY = (0.7, 0.8)  # the target sparsities run first
STAGES = ("calibrate", "baselines", "ablation", "threshold")
BASELINES = ("greedy", "greedy-block")


@dataclass(frozen=True)
class Setting:
    method: str  # dense | uniform | acttail | greedy | greedy-block
    direction: str = ""
    group: str = ""
    rule: str = ""
    knob: float = 0.0  # temperature (acttail)
    alphas: str = ""  # "" (measured) | "type-mean" | "permuted:SEED" (ablations)

    @property
    def label(self) -> str:
        if self.method != "acttail":
            return self.method
        tail = f" alphas={self.alphas}" if self.alphas else ""
        return f"acttail {self.direction} {self.group} {self.rule} T={self.knob:g}{tail}"

    def allocation(self) -> AllocationSettings:
        return AllocationSettings(temperature=self.knob, direction=self.direction, group=self.group)

    @classmethod
    def of(cls, choice: Choice) -> "Setting":
        if choice.is_uniform:
            return cls("uniform")
        return cls("acttail", choice.direction, choice.group, choice.rule, choice.temperature)


def default_setting(**changes) -> Setting:
    d = AllocationSettings()
    fields = dict(method="acttail", direction=d.direction, group=d.group, rule=DEFAULT_RULE, knob=d.temperature)
    fields.update(changes)
    return Setting(**fields)


def ablation_settings(seeds: int) -> dict[str, Setting]:
    """The ablation columns: name -> setting (b is one setting per seed)."""
    columns = {"uniform": Setting("uniform"), "d: measured alpha": default_setting(),
               "a: type-mean alpha": default_setting(alphas="type-mean"),
               "c: within-type z (group type)": default_setting(group="type")}
    columns.update({f"b: permuted, seed {seed}": default_setting(alphas=f"permuted:{seed}") for seed in range(seeds)})
    return columns


def by_priority(sparsities: Iterable[float]) -> list[float]:
    return sorted(sparsities, key=lambda s: (s not in PRIORITY, PRIORITY.index(s) if s in PRIORITY else 0, s))


class RunLog:
    """Append-only JSON-lines record of finished runs, keyed so a restart skips them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.runs[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("skipping a damaged line in %s", path)  # e.g. cut off by an interruption

    @staticmethod
    def key(model: str, text: str, tokens: int, seqlen: int, sparsity: float, setting: Setting, mode: str,
            device: str, dtype: str) -> str:
        return json.dumps({"model": model, "text": text, "tokens": tokens, "seqlen": seqlen,
                           "sparsity": round(sparsity, 4), "setting": asdict(setting), "mode": mode,
                           "device": device, "dtype": dtype}, sort_keys=True)

    def add(self, row: dict) -> None:
        self.runs[row["key"]] = row
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


@dataclass
class StudyConfig:
    models: tuple[str, ...] = ("default", "gemma3-270m")
    calib_texts: tuple[str, ...] = ("demo:lcet10", "demo:asyoulik")
    calib_tokens: int = 1024  # per calibration text
    calib_sweeps: int = MAX_SWEEPS
    heldout_texts: tuple[str, ...] = ("demo:alice29", "demo:plrabn12")
    report_sparsities: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
    report_tokens: int = 4096
    seqlen: int = 1024
    ablation_sparsities: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    ablation_tokens: int = 512  # of each held-out text, in one chunk: 224 runs must fit a CPU afternoon
    seeds: int = 10
    threshold_sparsities: tuple[float, ...] = (0.5, 0.7)
    threshold_calib: str = "demo"  # threshold mode's calibration text (demo -> asyoulik)
    threshold_calib_tokens: int = 2048
    greedy_tokens: int = 512
    block_tokens: int = BLOCK_TOKENS
    stages: tuple[str, ...] = STAGES
    out: str = "study"
    device: str = "cpu"
    dtype: str = "float32"

    def check(self) -> None:
        """Refuse a study that would tune on what it reports, or run nothing, or stop on a bad value hours in
        (a study runs its models and stages one after another, so a late value is found late)."""
        if not (self.models and self.calib_texts and self.heldout_texts):
            raise ActTailError("give at least one of each: --models, --calib-texts and --heldout-texts")
        for flag, values in (("--sparsities", self.report_sparsities), ("--ablation-sparsities",
                             self.ablation_sparsities), ("--threshold-sparsities", self.threshold_sparsities)):
            for sparsity in values:
                if not (math.isfinite(sparsity) and 0 < sparsity <= MAX_TARGET):
                    raise ActTailError(f"{flag} must be in (0, {MAX_TARGET:g}], got {sparsity}")
        counts = {"--calib-tokens": self.calib_tokens, "--tokens": self.report_tokens, "--seqlen": self.seqlen,
                  "--ablation-tokens": self.ablation_tokens, "--threshold-calib-tokens": self.threshold_calib_tokens,
                  "--greedy-tokens": self.greedy_tokens, "--block-tokens": self.block_tokens}
        for flag, count in counts.items():
            if count < 2:
                raise ActTailError(f"{flag} must be at least 2, got {count}")
        if self.seeds < 1 or self.calib_sweeps < 1:  # ablation (b) is a mean over the permutations
            raise ActTailError(
                f"--seeds and --calib-sweeps must be at least 1, got {self.seeds} and {self.calib_sweeps}")
        for text in self.heldout_texts:
            for calib in self.calib_texts + (self.threshold_calib,):
                if same_text(text, calib):
                    raise ActTailError(f"held-out text {text} is also calibration text ({calib}); keep them apart")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ActTailError(f"unknown stage {sorted(unknown)[0]!r}; choose from {', '.join(STAGES)}")
        if self.ablation_tokens > self.report_tokens or self.report_tokens < self.seqlen:
            raise ActTailError("need --ablation-tokens <= --tokens and --seqlen <= --tokens")
        check_calibration_texts(self.calib_texts + (self.threshold_calib,))
        for text in self.heldout_texts:
            load_text(text, "eval", max_chars=1 << 16)  # a missing or empty text fails now, reading only its start
        check_device(self.device)
        resolve_dtype(self.dtype, self.device)
        for ref in self.models:  # models load one after another: a bad one would be found after the others' runs
            check_model_reference(ref)

    def seqlen_for(self, tokens: int) -> int:
        """Chunk length: ``seqlen``, or one chunk when fewer tokens are asked for (the ablation's)."""
        return min(self.seqlen, tokens)


class Study:
    def __init__(self, config: StudyConfig, progress: Optional[ProgressFn] = None) -> None:
        config.check()
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.out / "runs.jsonl")
        self._loaded: dict = {}
        self._chunks: dict = {}
        self._spectra: dict = {}
        self._thresholds: dict = {}
        self._calibrations: dict[tuple[str, float], Calibration] = {}

    # ------------------------------------------------------------------ helpers
    def model(self, ref: str):
        if ref not in self._loaded:
            self._loaded.clear()  # one model in memory at a time
            self._chunks.clear()
            self._spectra.clear()
            self._thresholds.clear()
            self._loaded[ref] = load_model(ref, dtype=self.config.dtype, device=self.config.device)
        return self._loaded[ref]

    def chunks(self, ref: str, texts: tuple[str, ...], tokens: int):
        """Calibration chunks: ``tokens`` from each of the texts."""
        key = (ref, texts, tokens)
        if key not in self._chunks:
            self._chunks[key] = calibration_chunks(self.model(ref), texts, tokens, self.config.seqlen_for(tokens))
        return self._chunks[key]

    def spectra(self, ref: str, rule: str):
        if (ref, rule) not in self._spectra:
            self._spectra[(ref, rule)] = compute_spectra(self.model(ref), rule=rule)
        return self._spectra[(ref, rule)]

    def budget(self, ref: str, setting: Setting, sparsity: float):
        loaded = self.model(ref)
        if setting.method == "dense":
            return None
        if setting.method == "uniform":
            return uniform_budget(find_projections(loaded.model), sparsity, loaded.name, loaded.fingerprint)
        if setting.method == "greedy":
            return greedy_budget(loaded, sparsity, tokens=self.config.greedy_tokens)
        if setting.method == "greedy-block":
            return greedy_block_budget(loaded, sparsity, tokens=self.config.block_tokens)
        spectra = self.spectra(ref, setting.rule)
        alphas = None
        if setting.alphas == "type-mean":
            alphas = type_mean_alphas(spectra.alphas(), spectra.projections())
        elif setting.alphas.startswith("permuted:"):
            alphas = permuted_alphas(spectra.alphas(), spectra.projections(), int(setting.alphas.split(":")[1]))
        return allocate(spectra, sparsity, setting.allocation(), alphas=alphas)

    def table(self, ref: str, mode: str) -> Optional[ThresholdTable]:
        """Threshold mode's calibration of this model (once per study), None in TopK mode."""
        if mode != "threshold":
            return None
        if ref not in self._thresholds:
            cfg = self.config
            self._thresholds[ref] = calibrate_thresholds(self.model(ref), cfg.threshold_calib,
                                                         max_tokens=cfg.threshold_calib_tokens, seqlen=cfg.seqlen)
        return self._thresholds[ref]

    def thresholds(self, ref: str, budget):
        return self.table(ref, "threshold").thresholds_for(budget)

    def evaluation(self, text: str, tokens: int, mode: str) -> EvalSettings:
        """How a held-out run is measured: ``tokens`` of ``text`` in chunks of ``seqlen_for(tokens)``."""
        cfg = self.config
        return EvalSettings(corpus=text, seqlen=cfg.seqlen_for(tokens), max_tokens=tokens, mode=mode,
                            calib_corpus=cfg.threshold_calib, calib_tokens=cfg.threshold_calib_tokens)

    def key(self, ref: str, texts: tuple[str, ...], tokens: int, sparsity: float, setting: Setting,
            mode: str = "topk") -> str:
        cfg = self.config
        return RunLog.key(ref, "+".join(texts), tokens, cfg.seqlen_for(tokens), sparsity, setting, mode, cfg.device,
                          cfg.dtype)

    def get(self, ref: str, texts: tuple[str, ...], tokens: int, sparsity: float, setting: Setting,
            mode: str = "topk") -> Optional[dict]:
        return self.log.runs.get(self.key(ref, texts, tokens, sparsity, setting, mode))

    def run(self, ref: str, texts: tuple[str, ...], tokens: int, sparsity: float, setting: Setting, phase: str,
            mode: str = "topk") -> dict:
        key = self.key(ref, texts, tokens, sparsity, setting, mode)
        if key in self.log.runs:
            return self.log.runs[key]
        budget = self.budget(ref, setting, sparsity)
        if len(texts) == 1 and texts[0] in self.config.heldout_texts:  # measured as every evaluation is
            [result] = evaluate_budgets(self.model(ref), [(setting.method, budget)],
                                        self.evaluation(texts[0], tokens, mode), calibration=self.table(ref, mode))
        else:  # calibration: tokens from each of several texts (calibration.calibration_chunks)
            chunks = self.chunks(ref, texts, tokens)
            thresholds = self.thresholds(ref, budget) if (mode == "threshold" and budget is not None) else None
            result = perplexity(self.model(ref), chunks, budget, mode=mode, thresholds=thresholds,
                                method=setting.method)
        row = {"key": key, "phase": phase, "model": ref, "text": "+".join(texts), "tokens": int(result.tokens),
               "sparsity": sparsity, "setting": asdict(setting), "label": setting.label, "mode": mode,
               "device": self.config.device,
               **{k: v for k, v in result.as_dict().items() if k not in ("sparsity", "tokens")}}
        self.log.add(row)
        return row

    def calibration(self, ref: str, sparsity: float) -> Calibration:
        """The calibrated choice for one model and target; its runs come from (and go to) the run log."""
        if (ref, sparsity) not in self._calibrations:
            cfg = self.config
            texts = cfg.calib_texts

            def objective(choice: Choice) -> float:
                return self.run(ref, texts, cfg.calib_tokens, sparsity, Setting.of(choice), "calibrate")["nll"]

            self._calibrations[(ref, sparsity)] = calibrate(
                self.model(ref), sparsity, texts=texts, tokens=cfg.calib_tokens,
                seqlen=cfg.seqlen_for(cfg.calib_tokens),
                objective=objective, spectra_for=lambda rule: self.spectra(ref, rule), max_sweeps=cfg.calib_sweeps)
        return self._calibrations[(ref, sparsity)]

    def chosen(self, ref: str, sparsity: float) -> Setting:
        """The calibrated setting: replayed from the run log when the search is complete (a resumed study loads no
        model for it), else searched now."""
        found = self.search(ref, sparsity)
        return Setting.of(found.choice if found is not None else self.calibration(ref, sparsity).choice)

    def search(self, ref: str, sparsity: float) -> Optional[SearchResult]:
        """The calibration's search replayed from the run log alone (None while any of its runs is missing).

        The search is deterministic given the perplexities, so the report needs no model.
        """
        cfg = self.config
        missing: list[Choice] = []

        def objective(choice: Choice) -> float:
            row = self.get(ref, cfg.calib_texts, cfg.calib_tokens, sparsity, Setting.of(choice))
            if row is None:
                missing.append(choice)
                return math.inf
            return row["nll"]

        result = coordinate_search(objective, max_sweeps=cfg.calib_sweeps)
        return None if missing else result

    def calibration_seconds(self, ref: str, sparsity: float, search: SearchResult) -> float:
        """Time of the calibration's runs as measured when each ran (a resumed study replays them for free)."""
        cfg = self.config
        return sum(self.get(ref, cfg.calib_texts, cfg.calib_tokens, sparsity, Setting.of(c))["seconds"]
                   for c, _ in search.trace)

    def heldout(self, ref: str, text: str, sparsity: float, setting: Setting, mode: str = "topk") -> dict:
        return self.run(ref, (text,), self.config.report_tokens, sparsity, setting, "heldout", mode)

    # ------------------------------------------------------------------ stages
    def _jobs(self, jobs: list, what: str) -> None:
        for done, job in enumerate(jobs, start=1):
            job[0](*job[1:])
            report(self.progress, done, len(jobs), what)

    def stage_calibrate(self, sparsities: Iterable[float]) -> None:
        cfg = self.config
        for ref, text in itertools.product(cfg.models, cfg.heldout_texts):
            self.heldout(ref, text, 0.0, Setting("dense"))
        for sparsity, ref in itertools.product(by_priority(sparsities), cfg.models):
            chosen = self.chosen(ref, sparsity)
            log.info("calibrated %s at %s: %s", ref, sparsity, chosen.label)
            for text, setting in itertools.product(cfg.heldout_texts, (Setting("uniform"), chosen)):
                self.heldout(ref, text, sparsity, setting)

    def stage_baselines(self, sparsities: Iterable[float]) -> None:
        cfg = self.config
        jobs = [(self.heldout, ref, text, s, Setting(method)) for s in by_priority(sparsities) for ref in cfg.models
                for method in BASELINES for text in cfg.heldout_texts]
        self._jobs(jobs, "baselines")

    def stage_ablation(self) -> None:
        cfg = self.config
        columns = ablation_settings(cfg.seeds).values()
        jobs = [(self.run, ref, (text,), cfg.ablation_tokens, s, setting, "ablation") for s in
                by_priority(cfg.ablation_sparsities) for ref in cfg.models for text in cfg.heldout_texts
                for setting in columns]
        self._jobs(jobs, "ablation")

    def stage_threshold(self) -> None:
        cfg = self.config
        jobs = []
        for ref in cfg.models:
            for s in by_priority(cfg.threshold_sparsities):
                methods = (Setting("uniform"), self.chosen(ref, s)) + tuple(
                    Setting(m) for m in BASELINES)
                jobs += [(self.heldout, ref, text, s, setting, "threshold") for text in cfg.heldout_texts
                         for setting in dict.fromkeys(methods)]
        self._jobs(jobs, "threshold")

    # ------------------------------------------------------------------ tables
    def calibration_rows(self) -> list[dict]:
        """One row per finished calibration."""
        rows = []
        for ref, sparsity in itertools.product(self.config.models, self.config.report_sparsities):
            found = self.search(ref, sparsity)
            if found is not None:
                rows.append({"model": ref, "sparsity": sparsity, "chosen": found.choice.label, "runs": found.runs,
                             "seconds": self.calibration_seconds(ref, sparsity, found),
                             "uniform_ppl": math.exp(found.uniform_nll), "ppl": math.exp(found.nll)})
        return rows

    def heldout_rows(self, mode: str = "topk", sparsities: Optional[Iterable[float]] = None) -> list[dict]:
        """One row per model, text and sparsity with any run logged; a run not yet made is None."""
        cfg = self.config
        rows = []
        for ref, text in itertools.product(cfg.models, cfg.heldout_texts):
            dense = self.get(ref, (text,), cfg.report_tokens, 0.0, Setting("dense"))
            for sparsity in sorted(sparsities or cfg.report_sparsities):
                found = self.search(ref, sparsity)
                chosen = Setting.of(found.choice) if found is not None else None
                runs = {name: self.get(ref, (text,), cfg.report_tokens, sparsity, setting, mode)
                        if setting is not None else None for name, setting in
                        (("uniform", Setting("uniform")), ("acttail", chosen), ("greedy", Setting("greedy")),
                         ("greedy-block", Setting("greedy-block")))}
                if not any(runs.values()):
                    continue
                row = {"model": ref, "text": text, "sparsity": sparsity, "dense": dense["ppl"] if dense else None,
                       "chosen": chosen.label if chosen else None}
                for name, run in runs.items():
                    row[name] = run["ppl"] if run else None
                    row[f"{name}_realized"] = run["realized_sparsity"] if run else None
                rows.append(row)
        return rows

    def missing(self) -> list[str]:
        """What the report cannot show yet, one line per group of cells (an interrupted study says so)."""
        cfg = self.config
        lines = []
        for ref, sparsity in itertools.product(cfg.models, by_priority(cfg.report_sparsities)):
            if self.search(ref, sparsity) is None:
                lines.append(f"{ref} at {sparsity:g}: calibration not finished, so no calibrated held-out run")
        for mode, sparsities in (("topk", cfg.report_sparsities), ("threshold", cfg.threshold_sparsities)):
            for ref, text, sparsity in itertools.product(cfg.models, cfg.heldout_texts, by_priority(sparsities)):
                found = self.search(ref, sparsity)
                names = [("uniform", Setting("uniform"))] + [(m, Setting(m)) for m in BASELINES]
                if found is not None:
                    names.insert(1, ("acttail (calibrated)", Setting.of(found.choice)))
                absent = [name for name, setting in names
                          if self.get(ref, (text,), cfg.report_tokens, sparsity, setting, mode) is None]
                if absent:
                    lines.append(f"{ref} / {text} at {sparsity:g} ({mode}): {', '.join(absent)}")
        columns = ablation_settings(cfg.seeds)
        for ref, text, sparsity in itertools.product(cfg.models, cfg.heldout_texts,
                                                     by_priority(cfg.ablation_sparsities)):
            absent = sum(self.get(ref, (text,), cfg.ablation_tokens, sparsity, s) is None for s in columns.values())
            if absent:
                lines.append(f"{ref} / {text} at {sparsity:g} (ablation): {absent} of {len(columns)} runs")
        return lines

    def ablation_rows(self) -> list[dict]:
        cfg = self.config
        columns = ablation_settings(cfg.seeds)
        rows = []
        for ref, text, sparsity in itertools.product(cfg.models, cfg.heldout_texts, sorted(cfg.ablation_sparsities)):
            runs = {name: self.get(ref, (text,), cfg.ablation_tokens, sparsity, s) for name, s in columns.items()}
            if any(run is None for run in runs.values()):
                continue
            uniform = runs.pop("uniform")["ppl"]
            change = {name: run["ppl"] / uniform - 1 for name, run in runs.items()}
            permuted = [v for name, v in change.items() if name.startswith("b:")]
            rows.append({"model": ref, "text": text, "sparsity": sparsity, "uniform": uniform,
                         "d": change["d: measured alpha"], "a": change["a: type-mean alpha"],
                         "b_mean": statistics.mean(permuted), "b_std": statistics.stdev(permuted) if len(permuted) > 1
                         else 0.0, "b_min": min(permuted), "b_max": max(permuted),
                         "c": change["c: within-type z (group type)"]})
        return rows

    def seconds_per_run(self) -> list[dict]:
        """Median wall time of one perplexity run, per model, token count and mode (as measured here)."""
        groups: dict[tuple, list[float]] = {}
        for row in self.log.runs.values():
            if row.get("device") == self.config.device and row.get("setting", {}).get("method") != "dense":
                groups.setdefault((row["model"], row["tokens"], row["mode"]), []).append(row["seconds"])
        return [{"model": m, "tokens": t, "mode": mode, "runs": len(v), "median_s": statistics.median(v)}
                for (m, t, mode), v in sorted(groups.items())]

    def write_report(self) -> Path:
        cfg = self.config
        pct = lambda new, old: f"{new / old - 1:+.1%}" if new and old else "-"  # noqa: E731
        lines = ["# Allocation study", "",
                 f"Models: {', '.join(cfg.models)}; {cfg.device}, {cfg.dtype}. Perplexity: non-overlapping "
                 f"{cfg.seqlen}-token chunks, exp(mean NLL). Calibration text: the first {cfg.calib_tokens} tokens "
                 f"of {', '.join(cfg.calib_texts)}. Held-out texts (never used for a choice): "
                 f"{', '.join(cfg.heldout_texts)}, {cfg.report_tokens} tokens each.", "",
                 "## Calibration (`calibrate`: coordinate search on the calibration text)", "",
                 f"| model | sparsity | chosen | runs | seconds ({cfg.device}) | uniform ppl | chosen ppl |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.calibration_rows():
            lines.append(f"| {r['model']} | {r['sparsity']:.1f} | {r['chosen']} | {r['runs']} | {r['seconds']:.0f} | "
                         f"{r['uniform_ppl']:.2f} | {r['ppl']:.2f} |")
        lines += ["", "## Held-out texts: calibrated acttail against uniform and both greedies", "",
                  "| model | text | sparsity | dense | uniform | acttail (calibrated) | greedy | greedy-block | "
                  "acttail vs uniform | greedy vs uniform | greedy-block vs uniform |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        for r in self.heldout_rows():
            lines.append(f"| {r['model']} | {r['text']} | {r['sparsity']:.1f} | {fmt(r['dense'])} | "
                         f"{fmt(r['uniform'])} | {fmt(r['acttail'])} | {fmt(r['greedy'])} | {fmt(r['greedy-block'])} | "
                         f"{pct(r['acttail'], r['uniform'])} | {pct(r['greedy'], r['uniform'])} | "
                         f"{pct(r['greedy-block'], r['uniform'])} |")
        lines += ["", f"## Ablations ({cfg.ablation_tokens} tokens of each held-out text; change in perplexity vs "
                  "uniform)", "",
                  "Default settings (acttail keep-light, T = 0.15, `mid`) with: (d) the measured alphas, "
                  "(a) every projection at its type's mean alpha, (b) alphas permuted within each type "
                  f"({cfg.seeds} seeds: mean, standard deviation, range), (c) grouping by type (alpha standardised "
                  "within type).", "",
                  "| model | text | sparsity | uniform ppl | (d) measured | (a) type mean | (b) permuted mean +- sd | "
                  "(b) range | (c) within type |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.ablation_rows():
            lines.append(f"| {r['model']} | {r['text']} | {r['sparsity']:.1f} | {r['uniform']:.2f} | {r['d']:+.1%} | "
                         f"{r['a']:+.1%} | {r['b_mean']:+.1%} +- {r['b_std']:.1%} | {r['b_min']:+.1%} .. "
                         f"{r['b_max']:+.1%} | {r['c']:+.1%} |")
        lines += ["", f"## Threshold mode (thresholds calibrated on `{cfg.threshold_calib}`, "
                  f"{cfg.threshold_calib_tokens} tokens): perplexity, and change vs the same budget in TopK mode", "",
                  "| model | text | sparsity | uniform | acttail (calibrated) | greedy | greedy-block |",
                  "|---|---|---|---|---|---|---|"]
        topk = {(r["model"], r["text"], r["sparsity"]): r for r in self.heldout_rows()}
        for r in self.heldout_rows("threshold", cfg.threshold_sparsities):
            base = topk.get((r["model"], r["text"], r["sparsity"]), {})
            cells = [f"{fmt(r[m])} ({pct(r[m], base.get(m))})"
                     for m in ("uniform", "acttail", "greedy", "greedy-block")]
            lines.append(f"| {r['model']} | {r['text']} | {r['sparsity']:.1f} | " + " | ".join(cells) + " |")
        lines += ["", f"## Time per perplexity run ({cfg.device}, median)", "",
                  "| model | tokens scored | mode | runs | "
                  "seconds |", "|---|---|---|---|---|"]
        for r in self.seconds_per_run():
            lines.append(f"| {r['model']} | {r['tokens']} | {r['mode']} | {r['runs']} | {r['median_s']:.1f} |")
        missing = self.missing()
        lines += ["", "## Not yet measured", ""]
        lines += [f"* {line}" for line in missing] if missing else ["Every cell of the tables above is measured."]
        return write_text(self.out / "report.md", "\n".join(lines) + "\n")

    def plot(self, path: Path) -> Optional[Path]:
        rows = self.heldout_rows()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = sorted({(r["model"], r["text"]) for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (ref, text) in zip(axes[0], panels):
            sub = [r for r in rows if r["model"] == ref and r["text"] == text]
            for method, style in (("uniform", "o--"), ("acttail", "s-"), ("greedy", "^:"), ("greedy-block", "v-.")):
                points = [(r["sparsity"], r[method]) for r in sub if r[method]]
                if points:
                    ax.plot(*zip(*points), style, label="acttail (calibrated)" if method == "acttail" else method)
            if sub[0]["dense"]:
                ax.axhline(sub[0]["dense"], color="grey", lw=0.8, label="dense")
            ax.set_yscale("log")
            ax.set_title(f"{ref} / {text.split(':')[-1]}", fontsize=10)
            ax.set_xlabel("sparsity (parameter-weighted)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("perplexity (log scale)")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=130)
        plt.close(fig)
        return write_bytes(path, image.getvalue())


def run_study(config: StudyConfig, progress: Optional[ProgressFn] = None,
              plot_path: Optional[Path] = None) -> Path:
    study = Study(config, progress)
    start = time.perf_counter()
    first = [s for s in config.report_sparsities if s in PRIORITY]
    rest = [s for s in config.report_sparsities if s not in PRIORITY]
    # The targets first, their baselines, then the ablation, then the rest: an interrupted study has the
    # key numbers.
    plan = [("calibrate", study.stage_calibrate, (first,)), ("baselines", study.stage_baselines, (first,)),
            ("ablation", study.stage_ablation, ()), ("calibrate", study.stage_calibrate, (rest,)),
            ("baselines", study.stage_baselines, (rest,)), ("threshold", study.stage_threshold, ())]
    for stage, run, args in plan:
        if stage in config.stages:
            run(*args)
            study.write_report()
    path = study.write_report()
    study.plot(study.out / "study.png")
    if plot_path is not None:
        study.plot(plot_path)
    log.info("study finished in %.0f s", time.perf_counter() - start)
    return path


def iter_rows(path: str | Path) -> Iterable[dict]:
    """The runs of a study folder, for notebooks and the dashboard."""
    return RunLog(Path(path) / "runs.jsonl").runs.values()
