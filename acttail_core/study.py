"""The allocation study: which alpha-to-budget settings beat uniform sparsity?

``python -m acttail_core study`` runs two phases on real models, with every run
appended to ``runs.jsonl`` as it finishes (so an interrupted study resumes
where it stopped) and a markdown report rewritten after each phase:

1. **Selection** on one text (default ``demo:lcet10``): at the selection
   sparsities, every acttail setting of the grid (direction x grouping x xmin
   rule x temperature) and AlphaPruning's linear map are compared with uniform.
   The winner is the setting with the lowest mean ``log(ppl / ppl_uniform)``
   over all models and selection sparsities.
2. **Held-out report** on other texts (default ``demo:alice29`` and
   ``demo:plrabn12``): dense, uniform, acttail with the winning setting and the
   greedy baseline at every report sparsity. Nothing is tuned here.

Perplexity follows evaluate.perplexity (non-overlapping chunks, exp of mean NLL).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from .allocation import AllocationSettings, allocate, uniform_budget
from .cli import register
from .progress import ProgressFn, TqdmProgress, report
from .safe_io import check_output, check_output_folder, write_bytes, write_text

log = logging.getLogger(__name__)

GRIDS = {
    # name: (directions, groups, rules, temperatures, linear eps values)
    "full": (("keep-heavy", "keep-light"), ("projection", "type", "layer"), ("ks", "peak", "mid"),
             (0.05, 0.1, 0.15, 0.2, 0.35, 0.5), (0.1, 0.2, 0.3)),
    "small": (("keep-heavy", "keep-light"), ("projection", "type"), ("ks", "mid"), (0.2, 0.5), (0.2,)),
    "tiny": (("keep-heavy", "keep-light"), ("projection",), ("ks",), (0.3,), ()),
}


@dataclass(frozen=True)
class Setting:
    method: str  # uniform | acttail | linear | greedy | dense
    direction: str = ""
    group: str = ""
    rule: str = ""
    knob: float = 0.0  # temperature (acttail) or eps (linear)

    @property
    def label(self) -> str:
        if self.method in ("uniform", "greedy", "dense"):
            return self.method
        name = "T" if self.method == "acttail" else "eps"
        return f"{self.method} {self.direction} {self.group} {self.rule} {name}={self.knob:g}"

    def allocation(self) -> AllocationSettings:
        return AllocationSettings(
            method=self.method,
            temperature=self.knob if self.method == "acttail" else 1.0,
            eps=self.knob if self.method == "linear" else 0.3,
            direction=self.direction or "keep-light",
            group=self.group or "projection",
        )


def grid_settings(grid: str) -> list[Setting]:
    directions, groups, rules, temperatures, eps_values = GRIDS[grid]
    settings = [Setting("acttail", d, g, r, t) for d, g, r, t in itertools.product(directions, groups, rules, temperatures)]
    settings += [Setting("linear", d, g, "ks", e) for d, g, e in itertools.product(directions, groups, eps_values)]
    return settings


def default_setting() -> Setting:
    from .spectra import DEFAULT_RULE

    d = AllocationSettings()
    return Setting("acttail", d.direction, d.group, DEFAULT_RULE, d.temperature)


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
                except (json.JSONDecodeError, KeyError):
                    log.warning("skipping a damaged line in %s", path)  # e.g. cut off by an interruption

    @staticmethod
    def key(model: str, text: str, tokens: int, seqlen: int, sparsity: float, setting: Setting) -> str:
        return json.dumps([model, text, tokens, seqlen, round(sparsity, 4), asdict(setting)])

    def add(self, row: dict) -> None:
        self.runs[row["key"]] = row
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


@dataclass
class StudyConfig:
    models: tuple[str, ...] = ("default", "gemma3-270m")
    select_text: str = "demo:lcet10"
    heldout_texts: tuple[str, ...] = ("demo:alice29", "demo:plrabn12")
    select_sparsities: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    report_sparsities: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8)
    select_tokens: int = 2048
    report_tokens: int = 4096
    seqlen: int = 1024
    grid: str = "full"
    greedy_tokens: int = 512
    out: str = "study"
    device: str = "cpu"
    dtype: str = "float32"


class Study:
    def __init__(self, config: StudyConfig, progress: Optional[ProgressFn] = None) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.out / "runs.jsonl")
        self._loaded: dict = {}
        self._chunks: dict = {}
        self._spectra: dict = {}  # (model, rule) -> Spectra: ~1000 allocations must not re-read the cache file

    # ------------------------------------------------------------------ helpers
    def model(self, ref: str):
        if ref not in self._loaded:
            from .models import load_model

            self._loaded.clear()  # one model in memory at a time
            self._chunks.clear()
            self._spectra.clear()
            self._loaded[ref] = load_model(ref, dtype=self.config.dtype, device=self.config.device)
        return self._loaded[ref]

    def chunks(self, ref: str, text: str, tokens: int):
        from .corpora import load_text, tokenize_corpus

        key = (ref, text, tokens)
        if key not in self._chunks:
            self._chunks[key] = tokenize_corpus(self.model(ref), load_text(text, "eval"), self.config.seqlen, tokens)
        return self._chunks[key]

    def budget(self, ref: str, setting: Setting, sparsity: float):
        from .projections import find_projections
        from .spectra import compute_spectra

        loaded = self.model(ref)
        if setting.method == "dense":
            return None
        if setting.method == "uniform":
            return uniform_budget(find_projections(loaded.model), sparsity, loaded.name, loaded.fingerprint)
        if setting.method == "greedy":
            from .greedy import greedy_budget

            return greedy_budget(loaded, sparsity, tokens=self.config.greedy_tokens)
        if (ref, setting.rule) not in self._spectra:
            self._spectra[(ref, setting.rule)] = compute_spectra(loaded, rule=setting.rule)
        return allocate(self._spectra[(ref, setting.rule)], sparsity, setting.allocation())

    def run(self, ref: str, text: str, tokens: int, sparsity: float, setting: Setting, phase: str) -> dict:
        from .evaluate import perplexity

        key = RunLog.key(ref, text, tokens, self.config.seqlen, sparsity, setting)
        if key in self.log.runs:
            return self.log.runs[key]
        chunks = self.chunks(ref, text, tokens)
        result = perplexity(self.model(ref), chunks, self.budget(ref, setting, sparsity), method=setting.method)
        row = {"key": key, "phase": phase, "model": ref, "text": text, "tokens": int(chunks.numel()), "sparsity": sparsity,
               "setting": asdict(setting), "label": setting.label, **{k: v for k, v in result.as_dict().items() if k != "sparsity"}}
        self.log.add(row)
        return row

    # ------------------------------------------------------------------ phases
    def select(self) -> Setting:
        cfg = self.config
        settings = [Setting("uniform")] + grid_settings(cfg.grid)
        jobs = [(m, s, st) for m in cfg.models for s in cfg.select_sparsities for st in settings]
        for done, (ref, sparsity, setting) in enumerate(jobs, start=1):
            self.run(ref, cfg.select_text, cfg.select_tokens, sparsity, setting, "select")
            report(self.progress, done, len(jobs), f"select {ref} s={sparsity} {setting.label}")
        return self.best_setting()

    def selection_scores(self) -> dict[Setting, tuple[float, float]]:
        """(mean, worst) log(ppl / ppl_uniform) over models and selection sparsities, for every setting with all runs."""
        cfg = self.config
        scores: dict[Setting, tuple[float, float]] = {}
        for setting in grid_settings(cfg.grid):
            logs = []
            for ref, sparsity in itertools.product(cfg.models, cfg.select_sparsities):
                runs = [self.log.runs.get(RunLog.key(ref, cfg.select_text, cfg.select_tokens, cfg.seqlen, sparsity, s))
                        for s in (setting, Setting("uniform"))]
                if None in runs:
                    break
                logs.append(math.log(runs[0]["ppl"] / runs[1]["ppl"]) if math.isfinite(runs[0]["ppl"]) else float("inf"))
            else:
                scores[setting] = (sum(logs) / len(logs), max(logs))
        return scores

    def best_setting(self) -> Setting:
        """The acttail setting to make the default.

        Feasible settings beat uniform at every selection sparsity on every model; among them the lowest mean
        log-ratio wins. If none is feasible, the setting whose worst case is least bad wins. (The linear map is
        in the grid as AlphaPruning's baseline, not as a candidate default.)
        """
        scores = {s: v for s, v in self.selection_scores().items() if s.method == "acttail"}
        if not scores:
            return default_setting()
        feasible = {s: v for s, v in scores.items() if v[1] < 0}
        if feasible:
            return min(feasible, key=lambda s: feasible[s][0])
        return min(scores, key=lambda s: scores[s][1])

    def heldout(self, chosen: Setting) -> None:
        cfg = self.config
        jobs = [(m, t, 0.0, Setting("dense")) for m in cfg.models for t in cfg.heldout_texts]
        jobs += [(m, t, s, st) for m in cfg.models for t in cfg.heldout_texts for s in cfg.report_sparsities
                 for st in (Setting("uniform"), chosen, Setting("greedy"))]
        for done, (ref, text, sparsity, setting) in enumerate(jobs, start=1):
            self.run(ref, text, cfg.report_tokens, sparsity, setting, "heldout")
            report(self.progress, done, len(jobs), f"held-out {ref} {text} s={sparsity} {setting.label}")

    # ------------------------------------------------------------------ report
    def heldout_rows(self, chosen: Setting) -> list[dict]:
        cfg = self.config
        rows = []
        for ref, text in itertools.product(cfg.models, cfg.heldout_texts):
            get = lambda s, st: self.log.runs.get(RunLog.key(ref, text, cfg.report_tokens, cfg.seqlen, s, st))  # noqa: E731
            dense = get(0.0, Setting("dense"))
            for sparsity in cfg.report_sparsities:
                uni, act, greedy = (get(sparsity, st) for st in (Setting("uniform"), chosen, Setting("greedy")))
                if not (dense and uni and act and greedy):
                    continue
                rows.append({"model": ref, "text": text, "sparsity": sparsity, "dense": dense["ppl"], "uniform": uni["ppl"],
                             "acttail": act["ppl"], "greedy": greedy["ppl"],
                             "acttail_vs_uniform": act["ppl"] / uni["ppl"] - 1, "greedy_vs_uniform": greedy["ppl"] / uni["ppl"] - 1})
        return rows

    def write_report(self, chosen: Setting) -> Path:
        cfg = self.config
        lines = ["# Allocation study", "",
                 f"Models: {', '.join(cfg.models)}. Perplexity: non-overlapping {cfg.seqlen}-token chunks, exp(mean NLL).", "",
                 f"## Selection on `{cfg.select_text}` ({cfg.select_tokens} tokens, sparsities {', '.join(map(str, cfg.select_sparsities))})",
                 "", "Per setting, log(ppl / ppl_uniform) over models and sparsities: the mean and the worst case "
                 "(< 0 beats uniform). The default is the acttail setting with the best mean among those whose worst "
                 "case beats uniform.", "",
                 "| rank | setting | mean | worst | mean ppl / uniform |", "|---|---|---|---|---|"]
        scores = self.selection_scores()
        for rank, (setting, (mean, worst)) in enumerate(sorted(scores.items(), key=lambda kv: kv[1][0]), start=1):
            lines.append(f"| {rank} | {setting.label} | {mean:+.3f} | {worst:+.3f} | {math.exp(mean):.3f} |")
        lines += ["", f"Chosen default: **{chosen.label}**", "",
                  f"## Held-out texts ({cfg.report_tokens} tokens each; nothing tuned here)", "",
                  "| model | text | sparsity | dense | uniform | acttail | greedy | acttail vs uniform | greedy vs uniform |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in self.heldout_rows(chosen):
            lines.append(f"| {r['model']} | {r['text']} | {r['sparsity']:.1f} | {r['dense']:.2f} | {r['uniform']:.2f} | "
                         f"{r['acttail']:.2f} | {r['greedy']:.2f} | {r['acttail_vs_uniform']:+.1%} | {r['greedy_vs_uniform']:+.1%} |")
        return write_text(self.out / "report.md", "\n".join(lines) + "\n")

    def plot(self, chosen: Setting, path: Path) -> Optional[Path]:
        rows = self.heldout_rows(chosen)
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = sorted({(r["model"], r["text"]) for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (ref, text) in zip(axes[0], panels):
            sub = [r for r in rows if r["model"] == ref and r["text"] == text]
            xs = [r["sparsity"] for r in sub]
            for method, style in (("uniform", "o--"), ("acttail", "s-"), ("greedy", "^:")):
                ax.plot(xs, [r[method] for r in sub], style, label=method)
            ax.axhline(sub[0]["dense"], color="grey", lw=0.8, label="dense")
            ax.set_yscale("log")
            ax.set_title(f"{ref} / {text.split(':')[-1]}", fontsize=10)
            ax.set_xlabel("sparsity (parameter-weighted)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("perplexity (log scale)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"acttail = {chosen.label}", fontsize=9)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=130)
        plt.close(fig)
        return write_bytes(path, image.getvalue())


def run_study(config: StudyConfig, progress: Optional[ProgressFn] = None, plot_path: Optional[Path] = None) -> tuple[Setting, Path]:
    study = Study(config, progress)
    start = time.perf_counter()
    chosen = study.select()
    study.write_report(chosen)
    study.heldout(chosen)
    path = study.write_report(chosen)
    study.plot(chosen, study.out / "study.png")
    if plot_path is not None:
        study.plot(chosen, plot_path)
    log.info("study finished in %.0f s", time.perf_counter() - start)
    return chosen, path


# --------------------------------------------------------------------------- CLI


def _arguments(parser: argparse.ArgumentParser) -> None:
    d = StudyConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models))
    parser.add_argument("--select-text", default=d.select_text)
    parser.add_argument("--heldout-texts", nargs="+", default=list(d.heldout_texts))
    parser.add_argument("--select-sparsities", nargs="+", type=float, default=list(d.select_sparsities))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(d.report_sparsities), help="report sparsities")
    parser.add_argument("--select-tokens", type=int, default=d.select_tokens)
    parser.add_argument("--tokens", type=int, default=d.report_tokens, help="tokens per held-out text")
    parser.add_argument("--seqlen", type=int, default=d.seqlen)
    parser.add_argument("--grid", choices=sorted(GRIDS), default=d.grid)
    parser.add_argument("--greedy-tokens", type=int, default=d.greedy_tokens)
    parser.add_argument("--out", default=d.out, help="folder for runs.jsonl, report.md and study.png")
    parser.add_argument("--device", default=d.device, help="cpu | cuda (the study's models are small: a GPU makes it minutes)")
    parser.add_argument("--dtype", default=d.dtype, help="float32 keeps GPU and CPU results comparable")
    parser.add_argument("--plot", default=None, help="also save the plot here (e.g. assets/study.png)")


def _run(args: argparse.Namespace) -> int:
    args.out = str(check_output_folder(args.out))  # hours of runs must not end in a write error
    if args.plot:
        args.plot = str(check_output(args.plot))
    config = StudyConfig(tuple(args.models), args.select_text, tuple(args.heldout_texts), tuple(args.select_sparsities),
                         tuple(args.sparsities), args.select_tokens, args.tokens, args.seqlen, args.grid, args.greedy_tokens, args.out,
                         args.device, args.dtype)
    chosen, path = run_study(config, TqdmProgress("study"), Path(args.plot) if args.plot else None)
    print(Path(path).read_text())
    print(f"chosen setting: {chosen.label}")
    print(f"wrote {path}, {Path(args.out) / 'runs.jsonl'}" + (f" and {args.plot}" if args.plot else ""))
    return 0


register("study", "sweep allocation settings against uniform on real models (resumable)", _arguments, _run)


def iter_rows(path: str | Path) -> Iterable[dict]:
    """The runs of a study folder, for notebooks and the dashboard."""
    return RunLog(Path(path) / "runs.jsonl").runs.values()
