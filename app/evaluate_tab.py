"""The Evaluate tab: quick perplexity, perplexity against sparsity (a sweep), and throughput.

All measuring is done by ``acttail_core.evaluate`` and ``acttail_core.sweep``; this module collects settings,
shows progress (one bar over every chunk of every run, with the time left) and results. Every run joins a
per-session history that downloads as CSV or JSON; runs already measured on this server (same weights, text,
mode and budget) come from a cache instead of being measured again.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import pandas as pd
import streamlit as st

from acttail_core import evaluate
from acttail_core.allocation import AllocationSettings, settings_of
from acttail_core.budget import Budget, describe
from acttail_core.corpora import DEMO_FILES, default_seqlen
from acttail_core.sparsify import SPARSITY_MODES
from acttail_core.sweep import SWEEP_METHODS, parse_targets, sweep
from app import charts, layout, state
from app.state import AppContext, StreamlitProgress, gpu_available, guarded, history, show_error

CPU_DEFAULT_TOKENS = 256
GPU_DEFAULT_TOKENS = 16384
DEFAULT_GRID = "0.3, 0.5, 0.7"
TEXT_FILE = "text file"
SWEEP_LABELS = {"dense": "dense", "uniform": "uniform", "settings": "the current settings", "greedy": "greedy"}
HISTORY_COLUMNS = (
    "run", "kind", "label", "ppl", "sparsity", "decode_tokens_per_s", "decode_speedup", "decode_within_noise",
    "decode_path", "prefill_tokens_per_s", "prefill_within_noise", "tokens", "realized_sparsity", "target_sparsity",
    "corpus", "mode", "cached", "model", "device",
)


def corpus_choices() -> list[str]:
    return ["demo", *(f"demo:{name}" for name in DEMO_FILES), "wikitext2", TEXT_FILE]


def _next_run() -> int:
    state.session.run_counter += 1
    return state.session.run_counter


def _common(ctx: AppContext, run: int, kind: str) -> dict[str, Any]:
    return {
        "run": run,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "model": ctx.loaded.name,
        "device": ctx.loaded.device,
    }


def _eval_settings() -> tuple[str, int, str]:
    """(corpus, tokens, mode) as set in this tab's widgets (also used by the Compare tab)."""
    corpus = state.widget("eval_corpus", "demo")
    if corpus == TEXT_FILE:
        corpus = (state.widget("eval_corpus_path") or "").strip()
    tokens = int(state.widget("eval_tokens", CPU_DEFAULT_TOKENS))
    return corpus, tokens, state.widget("eval_mode", "topk")


def _speed_key(ctx: AppContext, mode: str) -> tuple:
    return (ctx.loaded.fingerprint, ctx.loaded.device, str(ctx.loaded.dtype), mode)


def _perplexity_settings(ctx: AppContext, corpus: str, tokens: int, mode: str) -> evaluate.EvalSettings:
    """The Evaluate tab's settings; a quick check may score fewer tokens than the model's default chunk, and is then
    one chunk of all of them."""
    return evaluate.EvalSettings(corpus=corpus, seqlen=min(tokens, default_seqlen(ctx.loaded)), max_tokens=tokens,
                                 mode=mode)


def estimate(ctx: AppContext, tokens: int, runs: int, mode: str) -> str:
    """What a perplexity action will cost, from this model's measured speed on this server (never a guess)."""
    seconds = evaluate.estimate_seconds(state.speed_log().get(_speed_key(ctx, mode), []), tokens, runs)
    what = f"{runs} run{'s' if runs != 1 else ''} of {tokens:,} tokens"
    if seconds is None:
        return (f"{what}. The speed on this machine is not known until the first run; its progress bar shows the "
                "time left after the first chunk.")
    return (f"{what}: about {seconds:,.0f} s at the speed measured earlier on this model (runs already measured "
            "come from the cache, at no cost).")


def run_budgets(ctx: AppContext, runs: Sequence[tuple[str, Optional[Budget]]], kind: str) -> list[dict]:
    """Perplexity of labelled budgets on the same tokens, with one progress bar; rows join the history."""
    corpus, tokens, mode = _eval_settings()
    if not corpus:
        st.error("Enter a text file path first.\n\n**Hint:** or pick the demo corpus.", icon=":material/error:")
        return []
    run = _next_run()
    slot = st.empty()
    try:
        with slot.container():
            results = evaluate.evaluate_budgets(
                ctx.loaded, runs, _perplexity_settings(ctx, corpus, tokens, mode),
                progress=StreamlitProgress(st, f"perplexity run {run}"), cache=state.results_cache(),
            )
    except Exception as error:
        slot.empty()
        show_error(error, "Perplexity")
        return []
    slot.empty()
    rows = []
    for (label, budget), result in zip(runs, results):
        row = _common(ctx, run, kind)
        row.update(result.as_dict())
        row.update({"label": label, "method": "dense" if budget is None else budget.method, "corpus": corpus,
                    "mode": mode, "cached": result.cached,
                    "target_sparsity": None if budget is None else budget.target_sparsity})
        rows.append(row)
    _record(ctx, mode, rows)
    return rows


def _record(ctx: AppContext, mode: str, rows: list[dict]) -> None:
    state.speed_log().setdefault(_speed_key(ctx, mode), []).extend(r for r in rows if not r.get("cached"))
    history().extend(rows)
    state.session.latest_run = rows


def _quick_runs(ctx: AppContext, with_greedy: bool) -> list[tuple[str, Optional[Budget]]]:
    current = state.active_budget(ctx)
    target = current.budget.target_sparsity
    # Labels name how a budget was made, not its target (the sparsity column has it): a setting's runs at
    # several targets, quick or swept, then form one line of perplexity against sparsity.
    runs: list[tuple[str, Optional[Budget]]] = [("dense", None)]
    if current.budget.method != "uniform":
        runs.append(("uniform", state.uniform_for(ctx, target)))
    runs.append((current.label, current.budget))
    if with_greedy and current.budget.method != "greedy":
        greedy = state.budget_for(ctx, target, AllocationSettings(method="greedy"),
                                  StreamlitProgress(st, "greedy error curves"))
        runs.append((describe(greedy), greedy))
    return runs


def _quick_box(ctx: AppContext, active: bool) -> None:
    with st.container(border=True):
        st.markdown("**Quick perplexity**: dense, uniform and the current budget on the same tokens")
        with_greedy = st.checkbox("Also greedy", key="eval_greedy", bind="query-params",
                                  help="TEAL-style greedy allocation at the same target (measures error curves once "
                                  "per model, then cached).")
        if not active:
            return
        _, tokens, mode = _eval_settings()
        current = state.active_budget(ctx)
        runs = 2 + with_greedy + (current.budget.method != "uniform")
        st.caption(estimate(ctx, tokens, runs, mode))
        if st.button("Run perplexity", key="run_perplexity", type="primary", icon=":material/play_arrow:"):
            try:
                run_budgets(ctx, _quick_runs(ctx, with_greedy), kind="perplexity")
            except Exception as error:
                show_error(error, "Perplexity")


def _sweep_box(ctx: AppContext, active: bool) -> None:
    with st.container(border=True):
        st.markdown("**Sweep: perplexity against sparsity** (one point per run, all on the same tokens)")
        with layout.control_row("sweep"):
            methods = st.multiselect(
                "Methods", SWEEP_METHODS, default=["dense", "uniform", "settings"], key="sweep_methods",
                bind="query-params", format_func=SWEEP_LABELS.get, width=420,
                help="settings: the Allocation tab's method, temperature, direction and grouping at each target.",
            )
            grid = st.text_input("Sparsity targets", DEFAULT_GRID, key="sweep_grid", bind="query-params", width=260,
                                 help="Comma- or space-separated targets in (0, 0.95].")
        if not active:
            return
        corpus, tokens, mode = _eval_settings()
        try:
            targets = parse_targets(grid)
        except Exception as error:
            show_error(error, "Sweep")
            return
        per_target = len([m for m in methods if m != "dense"])
        st.caption(estimate(ctx, tokens, ("dense" in methods) + per_target * len(targets), mode))
        if st.button("Run sweep", key="run_sweep", icon=":material/show_chart:"):
            _run_sweep(ctx, targets, methods, corpus, tokens, mode)
        latest = state.session.latest_sweep
        if latest and latest[0].get("model") == ctx.loaded.name:
            _show_sweep(latest)


@guarded
def _run_sweep(ctx: AppContext, targets: list[float], methods: list[str], corpus: str, tokens: int,
               mode: str) -> None:
    if not corpus:
        st.error("Enter a text file path first.\n\n**Hint:** or pick the demo corpus.", icon=":material/error:")
        return
    _, settings = state.settings_from_state()
    upload = state.active_upload(ctx)
    if upload is not None:  # the uploaded file's recorded settings, at every target of the grid
        _, settings = settings_of(upload["budget"])
    run = _next_run()
    slot = st.empty()
    with slot.container():
        evaluation = _perplexity_settings(ctx, corpus, tokens, mode)
        results = sweep(ctx.loaded, ctx.spectra, targets, methods, settings, evaluation,
                        progress=StreamlitProgress(st, f"sweep (run {run})"), cache=state.results_cache())
    slot.empty()
    rows = []
    for result in results:
        row = _common(ctx, run, "sweep")
        row.update(result)
        rows.append(row)
    _record(ctx, mode, rows)
    state.session.latest_sweep = rows


def _show_sweep(rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    run = int(frame["run"].iloc[0])
    measured = int((~frame["cached"].astype(bool)).sum())
    subtitle = (f"{frame['corpus'].iloc[0]}, {int(frame['tokens'].iloc[0]):,} tokens scored per point, "
                f"{frame['mode'].iloc[0]}; {measured} measured, {len(frame) - measured} from the cache")
    layout.show_chart(charts.perplexity_vs_sparsity(frame, f"Sweep (run {run}): perplexity against sparsity", subtitle),
                    key="sweep_chart")
    shown = [c for c in ("label", "target_sparsity", "sparsity", "ppl", "realized_sparsity", "seconds", "cached")
             if c in frame]
    st.dataframe(frame[shown], hide_index=True, width="stretch")
    with layout.control_row("sweep-downloads"):
        st.download_button("Sweep (CSV)", frame.to_csv(index=False).encode(), file_name=f"acttail-sweep-{run}.csv",
                           mime="text/csv", on_click="ignore", key="download_sweep_csv", icon=":material/download:")
        st.download_button("Sweep (JSON)", json.dumps(rows, indent=1, default=str).encode(),
                           file_name=f"acttail-sweep-{run}.json", mime="application/json", on_click="ignore",
                           key="download_sweep_json", icon=":material/download:")


def _throughput_box(ctx: AppContext, on_gpu: bool, active: bool) -> None:
    with st.container(border=True):
        st.markdown("**Throughput** (prefill and decode tokens/s; decode speed-up over dense)")
        with layout.control_row("throughput"):
            prompt_len = int(st.number_input("Prompt tokens", 8, 8192, 128 if on_gpu else 16, 8, key="tp_prompt",
                                             bind="query-params", width=140, help="Prefill length."))
            new_tokens = int(st.number_input("New tokens", 1, 2048, 32 if on_gpu else 4, 1, key="tp_new",
                                             bind="query-params", width=140, help="Decoded tokens per repeat."))
            repeats = int(st.number_input("Repeats", 1, 20, 3, 1, key="tp_repeats", bind="query-params", width=140,
                                          help="Every method once per round, after a warm-up round; the median is "
                                          "reported with the min..max of the repeats."))
        if not active:
            return
        _, _, mode = _eval_settings()
        why_not = evaluate.fused_decode_unavailable(ctx.loaded, mode)
        if why_not is None:
            st.caption(evaluate.FUSED_NOTE)
        else:
            st.caption(f"{evaluate.THROUGHPUT_NOTE} Here: {why_not}. On a CPU the defaults are small so a check takes "
                       "seconds, and shared or throttled cores make the repeats spread: the results say when a "
                       "difference is within that spread.")
        if st.button("Measure throughput", key="run_throughput", icon=":material/speed:"):
            try:
                _run_throughput(ctx, prompt_len, new_tokens, repeats, mode)
            except Exception as error:
                show_error(error, "Throughput")


def _run_throughput(ctx: AppContext, prompt_len: int, new_tokens: int, repeats: int, mode: str) -> None:
    current = state.active_budget(ctx)
    target = current.budget.target_sparsity
    budgets: list[Optional[Budget]] = [None, state.uniform_for(ctx, target)]
    labels = ["dense", f"uniform @ {target:.2f}"]
    if current.budget.method != "uniform":
        budgets.append(current.budget)
        labels.append(f"{current.label} @ {target:.2f}")
    run = _next_run()
    slot = st.empty()
    with slot.container():
        settings = evaluate.EvalSettings(mode=mode, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
        results = evaluate.throughput(ctx.loaded, budgets, settings,
                                      progress=StreamlitProgress(st, f"throughput run {run}"))
    slot.empty()
    rows = []
    for label, budget, result in zip(labels, budgets, results):
        row = _common(ctx, run, "throughput")
        row.update(result.as_dict())
        row.update({"label": label, "mode": mode, "target_sparsity": None if budget is None else target,
                    "short_label": "dense" if budget is None else f"{result.method} @ {target:.2f}"})
        rows.append(row)
    state.session.latest_throughput = {"rows": rows, "note": evaluate.noise_note(results),
                                             "paths": evaluate.throughput_note(results)}
    history().extend(rows)
    state.session.latest_run = rows


def _show_perplexity(rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    run = int(frame["run"].iloc[0])
    st.markdown(f"**Run {run}** ({frame['kind'].iloc[0]}, {frame['corpus'].iloc[0]}, "
                f"{int(frame['tokens'].iloc[0]):,} tokens scored)")
    with layout.chart_row("latest-perplexity"):
        shown = [c for c in ("label", "ppl", "nll", "sparsity", "realized_sparsity", "seconds", "cached") if c in frame]
        st.dataframe(frame[shown], hide_index=True, width="stretch")
        layout.show_chart(charts.perplexity_chart(frame), key=f"ppl_chart_{run}")


def _show_throughput(latest: dict) -> None:
    frame = charts.with_spread(pd.DataFrame(latest["rows"]))
    run = int(frame["run"].iloc[0])
    st.markdown(f"**Throughput run {run}**")
    if latest["note"]:
        st.warning(latest["note"], icon=":material/graphic_eq:")
    shown = [c for c in ("label", "decode_tokens_per_s", "decode_min", "decode_max", "decode_speedup",
                         "decode_within_noise", "decode_path", "prefill_tokens_per_s", "prefill_min",
                         "prefill_max", "prefill_within_noise", "prompt_len", "new_tokens") if c in frame]
    st.dataframe(frame[shown], hide_index=True, width="stretch")
    # Below the table, not beside it: two fixed-width panels (prefill, decode) need the row's width.
    layout.show_chart(charts.throughput_chart(frame), key=f"tps_chart_{run}")
    st.caption(latest["paths"])


def _show_history() -> None:
    rows = history()
    if not rows:
        st.caption("No runs yet in this session. Each run adds rows here, so you can compare allocations.")
        return
    frame = pd.DataFrame(rows)
    # Results first, provenance after: the table is read left to right.
    first = [c for c in HISTORY_COLUMNS if c in frame]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    st.markdown(f"**Run history** ({frame['run'].nunique()} runs this session)")
    ppl = frame[frame["ppl"].notna()] if "ppl" in frame else frame.iloc[0:0]
    if not ppl.empty:
        texts = ppl[["corpus", "tokens", "mode"]].drop_duplicates().astype(str).agg(" · ".join, axis=1).tolist()
        # Perplexities of different texts or token counts are not comparable: one of them at a time.
        text = st.selectbox("Runs on", texts[::-1], key="history_text", width=360,
                            help="Perplexities are compared only between runs on the same text and token count.")
        corpus, tokens, mode = text.split(" · ")
        same = ppl[(ppl["corpus"].astype(str) == corpus) & (ppl["tokens"].astype(str) == tokens)
                   & (ppl["mode"].astype(str) == mode)]
        layout.show_chart(charts.perplexity_vs_sparsity(same, "Run history: perplexity against sparsity",
                                                      f"{corpus}, {tokens} tokens scored, {mode}; one line per budget"),
                        key="history_chart")
    st.dataframe(frame, hide_index=True, width="stretch")
    with layout.control_row("history-actions"):
        st.download_button(
            "Download history (CSV)", frame.to_csv(index=False).encode(), file_name="acttail-run-history.csv",
            mime="text/csv", on_click="ignore", key="download_history_csv", icon=":material/download:",
        )
        st.download_button(
            "Download history (JSON)", json.dumps(rows, indent=1, default=str).encode(),
            file_name="acttail-run-history.json", mime="application/json", on_click="ignore",
            key="download_history_json", icon=":material/download:",
        )
        if st.button("Clear history", key="clear_history", help="Forget this session's runs."):
            state.session.run_history = []
            del state.session.latest_run, state.session.latest_sweep, state.session.latest_throughput
            st.rerun(scope="fragment")


def _settings_row(on_gpu: bool) -> None:
    with layout.control_row("evaluate"):
        choice = st.selectbox(
            "Corpus", corpus_choices(), key="eval_corpus", bind="query-params", width=190,
            help="demo: English text shipped with the tool (held-out part). wikitext2 needs the datasets package and "
            "network or a local copy. Or a UTF-8 text file of your own.",
        )
        if choice == TEXT_FILE:
            st.text_input("Text file path", key="eval_corpus_path", width=320,
                          help="A UTF-8 text file on the server (not put in the page URL).")
        st.number_input(
            "Tokens", min_value=64, max_value=1_000_000, value=GPU_DEFAULT_TOKENS if on_gpu else CPU_DEFAULT_TOKENS,
            step=256, key="eval_tokens", bind="query-params", width=150,
            help="How many tokens of the corpus each run scores (more = steadier, slower).",
        )
        st.selectbox("Sparsity mode", SPARSITY_MODES, index=SPARSITY_MODES.index("topk"), key="eval_mode",
                     bind="query-params", width=150,
                     help="topk: keep the largest-magnitude inputs of every token (ActTail). threshold: calibrated "
                     "magnitude cut (TEAL).")


@st.fragment
@guarded
def evaluate_fragment(ctx: AppContext, active: bool) -> None:
    on_gpu = ctx.loaded.device != "cpu" and gpu_available()
    if active:
        current = state.active_budget(ctx)
        st.markdown(
            f"Compares **dense**, **uniform** and the current budget **{current.label}** at target "
            f"{current.budget.target_sparsity:.2f} ({'an uploaded file' if current.uploaded else 'the Allocation tab'}"
            f") on **{ctx.loaded.device}**."
        )
        if not on_gpu:
            st.caption("Running on CPU: the defaults are small; perplexities from few tokens are noisy, so compare "
                       "them only with each other (same text, same token count).")
    _settings_row(on_gpu)
    _quick_box(ctx, active)
    _sweep_box(ctx, active)
    _throughput_box(ctx, on_gpu, active)
    if not active:
        return
    latest = state.session.latest_run
    if latest and latest[0].get("kind") == "perplexity":
        _show_perplexity(latest)
    throughput = state.session.latest_throughput
    if throughput:
        _show_throughput(throughput)
    _show_history()


def render(ctx: AppContext, active: bool = True) -> None:
    if active:
        st.subheader("Evaluate: perplexity and throughput")
    evaluate_fragment(ctx, active)
