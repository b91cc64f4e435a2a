"""The Allocation tab: turn alpha into a per-projection sparsity budget, live.

Everything below runs inside one ``st.fragment``: moving a slider reruns only
the allocation (``acttail_core.allocation.allocate``) and its charts, not the
model loading, spectra or other tabs.
"""
from __future__ import annotations

import math
import time
from urllib.parse import urlencode

import streamlit as st

from acttail_core.allocation import (
    DIRECTIONS, GROUPS, MAX_TARGET, METHODS, AllocationSettings, allocate, check_target, uniform_budget,
)
from acttail_core import calibration
from acttail_core.budget import MAX_BUDGET_BYTES, Budget, load_budget
from acttail_core.errors import ActTailError
from acttail_core.greedy import greedy_block_budget, greedy_budget
from app import charts
from app.state import AppContext, StreamlitProgress, get_spectra, guarded, show_error

DEFAULTS = AllocationSettings()
DEFAULT_SPARSITY = 0.5
# Settings that, with the model ones, reproduce a view from its URL (see share_link).
URL_SETTINGS = ("model", "path", "dtype", "device", "rule", "sparsity", "temperature", "eps", "method", "direction", "group")


def settings_from_state() -> tuple[float, AllocationSettings]:
    """The target sparsity and AllocationSettings the widgets describe (widget keys are the URL's parameter names)."""
    state = st.session_state
    settings = AllocationSettings(
        method=state.get("method", DEFAULTS.method),
        temperature=float(state.get("temperature", DEFAULTS.temperature)),
        eps=float(state.get("eps", DEFAULTS.eps)),
        direction=state.get("direction", DEFAULTS.direction),
        group=state.get("group", DEFAULTS.group),
    )
    return float(state.get("sparsity", DEFAULT_SPARSITY)), settings


def describe(budget: Budget) -> str:
    """A short label of how a budget was made, for tables and legends."""
    if budget.method == "uniform":
        return "uniform"
    knobs = []
    if budget.temperature is not None:
        knobs.append(f"T={budget.temperature:g}")
    if budget.eps is not None:
        knobs.append(f"eps={budget.eps:g}")
    for value in (budget.direction, budget.group, budget.xmin_rule):
        if value:
            knobs.append(value)
    return f"{budget.method} ({', '.join(knobs)})" if knobs else budget.method


def share_link() -> str:
    """A URL with every setting spelled out (the live URL omits settings left at their defaults)."""
    state = st.session_state
    params = {key: state[key] for key in URL_SETTINGS if state.get(key) not in (None, "")}
    params["tab"] = "Allocation"
    base = st.context.url or "http://localhost:8501/"
    return f"{base}?{urlencode(params)}"


def _controls(disabled: bool) -> None:
    method_now = st.session_state.get("method", DEFAULTS.method)
    first, second, third, fourth, fifth = st.columns([2.2, 2.2, 1.2, 1.2, 1.2])
    first.slider(
        "Global sparsity",
        0.0,
        MAX_TARGET,
        DEFAULT_SPARSITY,
        0.01,
        key="sparsity",
        bind="query-params",
        disabled=disabled,
        help="Target fraction of projection inputs zeroed, as the parameter-weighted mean over all projections.",
    )
    second.slider(
        "Allocation temperature",
        0.0,
        5.0,
        float(DEFAULTS.temperature),
        0.05,
        key="temperature",
        bind="query-params",
        disabled=disabled or method_now != "acttail",
        help="acttail method: 0 = uniform; larger = sparsity follows alpha more strongly "
        "(T = 1: one standard deviation of alpha changes the kept fraction e-fold).",
    )
    second.slider(
        "Linear spread eps",
        0.0,
        0.9,
        float(DEFAULTS.eps),
        0.05,
        key="eps",
        bind="query-params",
        disabled=disabled or method_now != "linear",
        help="linear method (AlphaPruning's map): sparsity ranges over (1 - eps) to (1 + eps) times the target.",
    )
    third.selectbox(
        "Method",
        METHODS,
        index=METHODS.index(DEFAULTS.method),
        key="method",
        bind="query-params",
        disabled=disabled,
        help="uniform: every projection at the target. acttail: kept fraction log-linear in alpha (temperature). "
        "linear: AlphaPruning's linear map (eps). greedy: measured output error instead of alpha "
        "(one calibration pass on the demo text the first time, then cached).",
    )
    fourth.selectbox(
        "Direction",
        DIRECTIONS,
        index=DIRECTIONS.index(DEFAULTS.direction),
        key="direction",
        bind="query-params",
        disabled=disabled,
        help="keep-heavy: lower alpha keeps more inputs (the HT-SR reading). keep-light: the reverse, "
        "which measured better on the default model (see the README's study).",
    )
    fifth.selectbox(
        "Grouping",
        GROUPS,
        index=GROUPS.index(DEFAULTS.group),
        key="group",
        bind="query-params",
        disabled=disabled,
        help="projection: compare alpha across all projections. type: within each projection type only. "
        "layer: one score per layer (mean alpha), as AlphaPruning.",
    )


def _uploaded_budget(ctx: AppContext) -> Budget | None:
    uploaded = st.file_uploader(
        "Upload a budget JSON",
        type=["json"],
        key="budget_upload",
        max_upload_size=MAX_BUDGET_BYTES >> 20,  # refused in the browser, before any upload
        help="A budget written by this tool (this page or `python -m acttail_core allocate`) for this model. "
        "While a valid file is loaded it replaces the sliders; remove it to go back.",
    )
    allow_other = st.checkbox(
        "Allow a budget made for other weights",
        key="allow_other_weights",
        help="A budget records the fingerprint of the weights it was made for. One made for other weights of the "
        "same architecture (e.g. a fine-tune) is refused unless this is ticked: its alphas were measured elsewhere.",
    )
    if uploaded is None:
        return None
    try:
        budget = load_budget(uploaded.getvalue(), projections=ctx.projections, fingerprint=ctx.loaded.fingerprint,
                             allow_other_weights=allow_other)
    except ActTailError as error:
        show_error(error, f"Rejected {uploaded.name}")
        st.caption("Nothing changed: the budget shown still follows the sliders.")
        return None
    st.success(f"Using the uploaded budget **{uploaded.name}**: {describe(budget)} at target {budget.target_sparsity:g}.")
    if budget.model_fingerprint != ctx.loaded.fingerprint:
        st.warning(
            f"It was made for weights {budget.model_fingerprint}, not the loaded {ctx.loaded.fingerprint} "
            "(same architecture): its alphas were measured on the other weights."
        )
    return budget


@st.fragment
@guarded
def allocation_fragment(ctx: AppContext, uploaded: Budget | None) -> None:
    """Sliders -> engine -> charts. ``uploaded`` (validated outside, since an upload is rare) overrides the sliders."""
    started = time.perf_counter()
    _controls(disabled=uploaded is not None)
    if uploaded is not None:
        budget = uploaded
        target = budget.target_sparsity
    else:
        target, settings = settings_from_state()
        try:
            if settings.method in ("greedy", "greedy-block"):
                check_target(target, settings)
                make = greedy_budget if settings.method == "greedy" else greedy_block_budget
                budget = make(ctx.loaded, target, alphas=ctx.spectra.alphas())
            else:
                budget = _with_calibration(ctx, allocate(ctx.spectra, target, settings))
        except ActTailError as error:
            show_error(error, "Allocation")
            return
    uniform = uniform_budget(ctx.projections, target, ctx.loaded.name, ctx.loaded.fingerprint, ctx.spectra.alphas())
    st.session_state["current_budget"] = budget
    st.session_state["current_budget_label"] = describe(budget)

    sparsities = [entry.sparsity for entry in budget.projections]
    metrics = st.columns([1, 1.5, 1.1, 1])
    metrics[0].metric("Target sparsity", f"{target:.4f}")
    metrics[1].metric(
        "Effective sparsity (param-weighted)",
        f"{budget.effective_sparsity:.4f}",
        help="sum(params x sparsity) / sum(params) over all projections: the share of weight reads a sparse kernel "
        "skips. The engine makes it equal the target.",
    )
    metrics[2].metric("Per-projection range", f"{min(sparsities):.3f} - {max(sparsities):.3f}")
    metrics[3].metric("Method", budget.method, help=f"This budget: {describe(budget)}")
    left, right = st.columns(2)
    heatmap_height = max(420, 16 * len({e.layer for e in budget.projections}) + 140)
    with left:
        st.plotly_chart(
            charts.sparsity_heatmap(budget, f"Budget: {describe(budget)}", heatmap_height),
            key="budget_heatmap",
            config=charts.plotly_config("acttail-budget-heatmap"),
        )
    with right:
        st.plotly_chart(
            charts.sparsity_heatmap(uniform, f"Uniform at {target:.2f}", heatmap_height),
            key="uniform_heatmap",
            config=charts.plotly_config("acttail-uniform-heatmap"),
        )
    st.plotly_chart(
        charts.mean_sparsity_by_type({describe(budget): budget, "uniform": uniform}),
        key="sparsity_by_type",
        config=charts.plotly_config("acttail-sparsity-by-type"),
    )
    download_col, link_col = st.columns([1, 2.2], vertical_alignment="center")
    download_col.download_button(
        "Download budget JSON",
        # Deferred: the JSON is built only when clicked, not on every slider move.
        lambda chosen=budget: chosen.to_json(),
        file_name=f"acttail-budget-{budget.method}-{target:.2f}.json",
        mime="application/json",
        on_click="ignore",
        key="download_budget",
        help="The budget in the engine's versioned schema; `python -m acttail_core eval --budget FILE` reads it.",
        icon=":material/download:",
    )
    link_col.code(share_link(), language=None, wrap_lines=True)
    elapsed_ms = (time.perf_counter() - started) * 1000
    st.session_state["allocation_render_ms"] = elapsed_ms
    st.caption(f"Link to this view above. Allocation and charts took {elapsed_ms:.0f} ms (server side).")


# --------------------------------------------------------------------------- per-model calibration (issue 13)


def _apply_calibration(found: calibration.Calibration) -> None:
    """Button callback: it runs before the page is drawn again, so it may set the widgets (sidebar rule too)."""
    choice = found.choice
    st.session_state.update(method="acttail", sparsity=found.sparsity, temperature=choice.temperature,
                            direction=choice.direction, group=choice.group, rule=choice.rule)


def _stored_calibration(ctx: AppContext) -> calibration.Calibration | None:
    stored = st.session_state.get("calibration_result")
    return stored[1] if stored and stored[0] == ctx.loaded.fingerprint else None


def _with_calibration(ctx: AppContext, budget: Budget) -> Budget:
    """The budget with its calibration record when the sliders show exactly the calibrated settings."""
    found = _stored_calibration(ctx)
    if found is None or found.sparsity != budget.target_sparsity or budget.xmin_rule != found.choice.rule:
        return budget
    choice = found.choice
    if (budget.temperature, budget.direction, budget.group) != (choice.temperature, choice.direction, choice.group):
        return budget
    return budget.model_copy(update={"calibration": found.record()})


def _calibration_control(ctx: AppContext) -> None:
    """Run ``calibration.calibrate`` at the current target, show its choice, and apply it on request."""
    target = float(st.session_state.get("sparsity", DEFAULT_SPARSITY))
    texts = ", ".join(calibration.DEFAULT_TEXTS)
    st.caption(f"**Calibrate for this model**: choose temperature, direction, grouping and xmin rule at sparsity "
               f"{target:.2f} by perplexity on calibration text ({texts}, {calibration.DEFAULT_TOKENS} tokens each), "
               f"at most {calibration.max_runs()} perplexity runs (minutes on a CPU). Uniform is kept unless a setting "
               "beats it by 1%.")
    if st.button("Calibrate", key="calibrate", disabled=target == 0):
        try:
            found = calibration.calibrate(ctx.loaded, target, spectra_for=lambda rule: get_spectra(ctx.loaded, rule),
                                          progress=StreamlitProgress(st, "calibrating"))
        except ActTailError as error:
            show_error(error, "Calibration")
        else:
            st.session_state["calibration_result"] = (ctx.loaded.fingerprint, found)
    found = _stored_calibration(ctx)
    if found is not None:
        search = found.search
        st.markdown(f"At sparsity {found.sparsity:g}: **{found.choice.label}**, perplexity "
                    f"{math.exp(search.nll):.2f} against uniform's {math.exp(search.uniform_nll):.2f} on the "
                    f"calibration text ({search.runs} runs, {found.seconds:.0f} s).")
        st.button("Apply these settings", key="apply_calibration", on_click=_apply_calibration, args=(found,),
                  help="Sets the sliders and the sidebar's xmin rule; the downloaded budget then records "
                  "the calibration.")


def render(ctx: AppContext) -> None:
    st.subheader("Allocation: from alpha to a sparsity budget")
    st.caption(
        "Each projection gets its own sparsity; their parameter-weighted mean is exactly the target. "
        "The left heatmap is the budget from the settings, the right one uniform at the same target (same colour scale)."
    )
    live = st.container()
    # Outside the fragment: an upload is rare and reruns the page; slider moves then skip the uploader.
    with st.container(border=True):
        uploaded = _uploaded_budget(ctx)
    with st.container(border=True):
        _calibration_control(ctx)
    with live:
        allocation_fragment(ctx, uploaded)
