"""The Evaluate tab: quick perplexity and throughput of dense, uniform and the current budget.

Results accumulate in a per-session run history so several allocations can be
compared; the history downloads as CSV or JSON. All measuring is done by
``acttail_core.evaluate``; this module only collects settings and shows results.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pandas as pd
import streamlit as st

from acttail_core.allocation import uniform_budget
from acttail_core.budget import Budget
from acttail_core.evaluate import THROUGHPUT_NOTE
from app import charts
from app.allocation_tab import describe
from app.state import AppContext, StreamlitProgress, gpu_available, guarded, history, show_error

CPU_DEFAULT_TOKENS = 512
GPU_DEFAULT_TOKENS = 16384
TEXT_FILE = "text file"
HISTORY_COLUMNS = (
    "run", "kind", "label", "ppl", "decode_tokens_per_s", "decode_speedup", "decode_path", "prefill_tokens_per_s",
    "tokens", "realized_sparsity",
    "target_sparsity", "corpus", "mode", "model", "device",
)


def evaluation_engine() -> Optional[dict[str, ModuleType]]:
    """The engine's evaluation modules, or None while they are not installed."""
    modules = {}
    for name in ("evaluate", "corpora", "sparsify"):
        try:
            modules[name] = importlib.import_module(f"acttail_core.{name}")
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("acttail_core"):
                return None
            raise
    return modules


def greedy_available() -> bool:
    return importlib.util.find_spec("acttail_core.greedy") is not None


def corpus_choices(corpora: ModuleType) -> list[str]:
    names = []
    for entry in getattr(corpora, "DEMO_FILES", ()):
        name = Path(str(entry)).stem
        if name:
            names.append(f"demo:{name}")
    return ["demo", *names, "wikitext2", TEXT_FILE]


def _label(method: str, budget: Budget, target: float) -> str:
    if method == "dense":
        return "dense"
    if method == "uniform":
        return f"uniform @ {target:.2f}"
    if method == "greedy":
        return f"greedy @ {target:.2f}"
    return f"{describe(budget)} @ {target:.2f}"


def _short_label(method: str, target: float) -> str:
    """For chart axes: the full settings are in the hover text and the table."""
    return "dense" if method == "dense" else f"{method} @ {target:.2f}"


def _budget_fields(budget: Budget) -> dict[str, Any]:
    return {
        "target_sparsity": budget.target_sparsity,
        "temperature": budget.temperature,
        "eps": budget.eps,
        "direction": budget.direction,
        "group": budget.group,
        "rule": budget.xmin_rule,
    }


def _next_run() -> int:
    st.session_state["run_counter"] = st.session_state.get("run_counter", 0) + 1
    return st.session_state["run_counter"]


def _common(ctx: AppContext, run: int, kind: str) -> dict[str, Any]:
    return {
        "run": run,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "model": ctx.loaded.name,
        "device": ctx.loaded.device,
    }


def run_perplexity(ctx: AppContext, engine: dict[str, ModuleType], budget: Budget, corpus: str, tokens: int, mode: str, with_greedy: bool) -> list[dict]:
    """Measure and return history rows (one per method)."""
    evaluate = engine["evaluate"]
    run = _next_run()
    target = budget.target_sparsity
    rows = []
    # A quick check may score fewer tokens than the model's default chunk: then one chunk of all of them.
    default_seqlen = getattr(evaluate, "default_seqlen", None)
    seqlen = min(tokens, default_seqlen(ctx.loaded)) if default_seqlen else None
    with st.status(f"Perplexity run {run} on {corpus} ({tokens} tokens)...", expanded=True) as status:
        results = evaluate.compare(
            ctx.loaded,
            budget,
            corpus=corpus,
            seqlen=seqlen,
            max_tokens=tokens,
            mode=mode,
            include_dense=True,
            include_uniform=budget.method != "uniform",
            progress=StreamlitProgress(st, "perplexity"),
        )
        if with_greedy:
            from acttail_core.greedy import greedy_budget  # optional engine module

            greedy = greedy_budget(ctx.loaded, target, alphas=ctx.spectra.alphas(), progress=StreamlitProgress(st, "greedy search"))
            results += evaluate.compare(
                ctx.loaded, greedy, corpus=corpus, seqlen=seqlen, max_tokens=tokens, mode=mode,
                include_dense=False, include_uniform=False, progress=StreamlitProgress(st, "greedy perplexity"),
            )
        status.update(label=f"Perplexity run {run} done", state="complete", expanded=False)
    for result in results:
        row = _common(ctx, run, "perplexity")
        row.update({"corpus": corpus, "mode": mode, "seqlen": seqlen})
        row.update(_budget_fields(budget))
        row.update(result.as_dict())
        row["tokens"] = row.get("tokens", tokens)
        row["label"] = _label(str(row.get("method")), budget, target)
        row["short_label"] = _short_label(str(row.get("method")), target)
        rows.append(row)
    return rows


def run_throughput(ctx: AppContext, engine: dict[str, ModuleType], budget: Budget, prompt_len: int, new_tokens: int, repeats: int, mode: str) -> list[dict]:
    evaluate = engine["evaluate"]
    run = _next_run()
    target = budget.target_sparsity
    uniform = uniform_budget(ctx.projections, target, ctx.loaded.name, ctx.loaded.fingerprint, ctx.spectra.alphas())
    budgets: list[Optional[Budget]] = [None, uniform] if budget.method == "uniform" else [None, uniform, budget]
    with st.status(f"Throughput run {run}...", expanded=True) as status:
        results = evaluate.throughput(
            ctx.loaded, budgets, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, mode=mode,
            progress=StreamlitProgress(st, "throughput"),
        )
        status.update(label=f"Throughput run {run} done", state="complete", expanded=False)
    rows = []
    for result in results:
        row = _common(ctx, run, "throughput")
        row.update({"mode": mode})
        row.update(_budget_fields(budget))
        row.update(result.as_dict())
        row["label"] = _label(str(row.get("method")), budget, target)
        row["short_label"] = _short_label(str(row.get("method")), target)
        rows.append(row)
    return rows


def _show_latest(rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    kind = frame["kind"].iloc[0]
    run = int(frame["run"].iloc[0])
    st.markdown(f"**Run {run}** ({kind})")
    table_col, chart_col = st.columns([1.3, 1])
    if kind == "perplexity":
        shown = [c for c in ("label", "ppl", "nll", "tokens", "realized_sparsity", "seconds") if c in frame]
        table_col.dataframe(frame[shown], hide_index=True, width="stretch")
        chart_col.plotly_chart(charts.perplexity_chart(frame), key=f"ppl_chart_{run}", config=charts.plotly_config(f"acttail-perplexity-run{run}"))
    else:
        frame = charts.with_decode_spread(frame)
        shown = [c for c in ("label", "decode_tokens_per_s", "decode_min", "decode_max", "decode_speedup", "decode_path",
                             "prefill_tokens_per_s", "prompt_len", "new_tokens") if c in frame]
        table_col.dataframe(frame[shown], hide_index=True, width="stretch")
        if "decode_path" in frame and (frame["decode_path"] == "masked").any():
            table_col.caption(THROUGHPUT_NOTE)
        chart_col.plotly_chart(charts.throughput_chart(frame), key=f"tps_chart_{run}", config=charts.plotly_config(f"acttail-throughput-run{run}"))


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
    if (frame["kind"] == "perplexity").any():
        st.plotly_chart(charts.history_chart(frame), key="history_chart", config=charts.plotly_config("acttail-run-history"))
    st.dataframe(frame, hide_index=True, width="stretch")
    csv_col, json_col, clear_col = st.columns([1, 1, 1])
    csv_col.download_button(
        "Download history (CSV)", frame.to_csv(index=False).encode(), file_name="acttail-run-history.csv",
        mime="text/csv", on_click="ignore", key="download_history_csv", icon=":material/download:",
    )
    json_col.download_button(
        "Download history (JSON)", json.dumps(rows, indent=1, default=str).encode(), file_name="acttail-run-history.json",
        mime="application/json", on_click="ignore", key="download_history_json", icon=":material/download:",
    )
    if clear_col.button("Clear history", key="clear_history", help="Forget this session's runs."):
        st.session_state["run_history"] = []
        st.session_state.pop("latest_run", None)
        st.rerun(scope="fragment")


@st.fragment
@guarded
def evaluate_fragment(ctx: AppContext) -> None:
    engine = evaluation_engine()
    if engine is None:
        st.info(
            "The evaluation engine (`acttail_core.evaluate`, `corpora`, `sparsify`) is not installed in this checkout yet, "
            "so quick perplexity and throughput are unavailable. Spectra and allocation work without it."
        )
        return
    budget: Optional[Budget] = st.session_state.get("current_budget")
    if budget is None:
        st.info("Open the Allocation tab once to make a budget.")
        return
    on_gpu = ctx.loaded.device != "cpu" and gpu_available()
    st.markdown(
        f"Compares **dense**, **uniform** and the current budget **{describe(budget)}** "
        f"at target {budget.target_sparsity:.2f} (from the Allocation tab) on **{ctx.loaded.device}**."
    )
    if not on_gpu:
        st.caption(
            f"Running on CPU: defaults are small ({CPU_DEFAULT_TOKENS} tokens) so a run takes seconds; "
            "perplexities from few tokens are noisy, compare them only with each other."
        )
    corpora, sparsify = engine["corpora"], engine["sparsify"]
    with st.container(border=True):
        st.markdown("**Quick perplexity**")
        c1, c2, c3, c4 = st.columns([1.3, 1, 1, 1])
        corpus_choice = c1.selectbox(
            "Corpus", corpus_choices(corpora), key="eval_corpus",
            help="demo: English text shipped with the tool (held-out part). wikitext2 needs the datasets package and network "
            "or a local copy. Or a UTF-8 text file of your own.",
        )
        corpus = corpus_choice
        if corpus_choice == TEXT_FILE:
            corpus = c1.text_input("Text file path", key="eval_corpus_path", help="A UTF-8 text file on the server.").strip()
        tokens = int(
            c2.number_input(
                "Tokens", min_value=64, max_value=1_000_000, value=GPU_DEFAULT_TOKENS if on_gpu else CPU_DEFAULT_TOKENS,
                step=256, key="eval_tokens", help="How many tokens of the corpus to score (more = steadier, slower).",
            )
        )
        modes = list(getattr(sparsify, "SPARSITY_MODES", ("topk",)))
        mode = c3.selectbox(
            "Sparsity mode", modes, index=modes.index("topk") if "topk" in modes else 0, key="eval_mode",
            help="topk: keep the largest-magnitude inputs of every token (ActTail). threshold: calibrated magnitude cut (TEAL).",
        )
        with_greedy = False
        if greedy_available():
            with_greedy = c4.checkbox("Also greedy", key="eval_greedy", help="TEAL-style greedy allocation (slow: it measures output error per block).")
        if st.button("Run perplexity", key="run_perplexity", type="primary", icon=":material/play_arrow:"):
            if not corpus:
                st.error("Enter a text file path first.\n\n**Hint:** or pick the demo corpus.")
            else:
                try:
                    rows = run_perplexity(ctx, engine, budget, corpus, tokens, mode, with_greedy)
                    history().extend(rows)
                    st.session_state["latest_run"] = rows
                except Exception as error:
                    show_error(error, "Perplexity")

    with st.container(border=True):
        st.markdown("**Throughput** (prefill and decode tokens/s, decode speed-up over dense)")
        why_not = engine["evaluate"].fused_decode_unavailable(ctx.loaded, mode)
        if why_not is None:
            st.caption(engine["evaluate"].FUSED_NOTE)
        else:
            st.caption(f"{engine['evaluate'].THROUGHPUT_NOTE} Here: {why_not}.")
        t1, t2, t3 = st.columns(3)
        prompt_len = int(t1.number_input("Prompt tokens", 8, 8192, 128 if on_gpu else 32, 8, key="tp_prompt", help="Prefill length."))
        new_tokens = int(t2.number_input("New tokens", 1, 2048, 32 if on_gpu else 8, 1, key="tp_new", help="Decoded tokens per repeat."))
        repeats = int(t3.number_input("Repeats", 1, 20, 3 if on_gpu else 2, 1, key="tp_repeats", help="The median of the repeats is reported."))
        if st.button("Measure throughput", key="run_throughput", icon=":material/speed:"):
            try:
                rows = run_throughput(ctx, engine, budget, prompt_len, new_tokens, repeats, mode)
                history().extend(rows)
                st.session_state["latest_run"] = rows
            except Exception as error:
                show_error(error, "Throughput")

    latest = st.session_state.get("latest_run")
    if latest:
        _show_latest(latest)
    _show_history()


def render(ctx: AppContext) -> None:
    st.subheader("Evaluate: quick perplexity and throughput")
    evaluate_fragment(ctx)
