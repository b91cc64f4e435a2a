"""The Allocation tab: turn alpha into a per-projection sparsity budget, live, and see what the map does.

Everything that follows the sliders runs inside one ``st.fragment``: moving a
slider reruns only the allocation (the engine's ``allocate`` /
``allocation_curves``) and its charts, not the model loading, spectra or other
tabs. An uploaded budget file replaces the sliders everywhere (every tab, the
URL and the share link) until it is removed.
"""
from __future__ import annotations

import math
import time

import streamlit as st

from acttail_core import calibration
from acttail_core.allocation import DIRECTIONS, GROUPS, MAX_TARGET, allocation_curves, settings_of
from acttail_core.budget import MAX_BUDGET_BYTES, Budget, describe, load_budget, sparsity_difference
from acttail_core.errors import ActTailError
from acttail_core.methods import KNOBS, METHOD_NAMES, METHODS, is_measured, methods_help
from app import charts, layout, pins, state
from app.state import DEFAULT_SPARSITY, DEFAULTS, AppContext, StreamlitProgress, get_spectra, guarded, show_error


def _controls(disabled: bool) -> None:
    method_now = state.widget("method", DEFAULTS.method)
    with layout.control_row("allocation"):
        st.slider(
            "Global sparsity", 0.0, MAX_TARGET, DEFAULT_SPARSITY, 0.01, key="sparsity", bind="query-params",
            disabled=disabled, width=260,
            help="Target fraction of projection inputs zeroed, as the parameter-weighted mean over all projections.",
        )
        for knob in KNOBS:  # one slider per knob of any method, live for the methods that read it
            st.slider(
                knob.label, knob.low, knob.slider_high, float(getattr(DEFAULTS, knob.name)), knob.step, key=knob.name,
                bind="query-params", disabled=disabled or knob not in METHODS[method_now].knobs, width=220,
                help=f"{knob.help}.",
            )
        st.selectbox(
            "Method", METHOD_NAMES, index=METHOD_NAMES.index(DEFAULTS.method), key="method", bind="query-params",
            disabled=disabled, width=130,
            help=methods_help() + " The measured methods run one calibration pass the first time, then cached.",
        )
        st.selectbox(
            "Direction", DIRECTIONS, index=DIRECTIONS.index(DEFAULTS.direction), key="direction",
            bind="query-params", disabled=disabled, width=140,
            help="keep-heavy: lower alpha keeps more inputs (the HT-SR reading). keep-light: the reverse, "
            "which measured better on the default model (see the README's study).",
        )
        st.selectbox(
            "Grouping", GROUPS, index=GROUPS.index(DEFAULTS.group), key="group", bind="query-params",
            disabled=disabled, width=140,
            help="projection: compare alpha across all projections. type: within each projection type only. "
            "layer: one score per layer (mean alpha), as AlphaPruning.",
        )


def _upload_box(ctx: AppContext) -> None:
    """The budget file uploader. A new valid file becomes the budget in effect: its recorded settings are written
    into the sliders and the model bar's rule (on the next run, before those widgets exist), so every view, the
    URL and the share link show it."""
    uploaded = st.file_uploader(
        "Upload a budget JSON",
        type=["json"],
        key="budget_upload",
        max_upload_size=MAX_BUDGET_BYTES >> 20,  # refused in the browser, before any upload
        help="A budget written by this tool (this page or `python -m acttail_core allocate`) for this model. "
        "While a valid file is loaded it replaces the sliders everywhere; remove it to go back.",
    )
    allow_other = st.checkbox(
        "Allow a budget made for other weights",
        key="allow_other_weights",
        help="A budget records the fingerprint of the weights it was made for. One made for other weights of the "
        "same architecture (e.g. a fine-tune) is refused unless this is ticked: its alphas were measured elsewhere.",
    )
    active = state.session.active_upload
    if uploaded is None:
        if active is not None:  # the file was removed: back to the sliders
            del state.session.active_upload
            st.rerun()
        return
    identity = (uploaded.file_id, allow_other, ctx.loaded.fingerprint)
    if active is not None and active.get("identity") == identity:
        return
    try:
        budget = load_budget(uploaded.getvalue(), projections=ctx.projections, fingerprint=ctx.loaded.fingerprint,
                             allow_other_weights=allow_other)
    except ActTailError as error:
        show_error(error, f"Rejected {uploaded.name}")
        st.caption("Nothing changed: the budget shown still follows the sliders."
                   if active is None else f"Nothing changed: still using {active['name']}.")
        return
    target, settings = settings_of(budget)
    pending = {"sparsity": target, "method": settings.method, "direction": settings.direction, "group": settings.group,
               **{knob.name: getattr(settings, knob.name) for knob in KNOBS}}
    if budget.xmin_rule:
        pending["rule"] = budget.xmin_rule
    state.session.active_upload = {"name": uploaded.name, "budget": budget, "model": ctx.loaded.fingerprint,
                                         "identity": identity}
    state.set_pending(pending)
    st.rerun()


def _upload_notes(ctx: AppContext, upload: dict) -> None:
    budget: Budget = upload["budget"]
    st.success(f"Using the uploaded budget **{upload['name']}** ({describe(budget)} at target "
               f"{budget.target_sparsity:g}) on every tab; the sliders show its settings. Remove the file to go back.",
               icon=":material/upload_file:")
    if budget.model_fingerprint != ctx.loaded.fingerprint:
        st.warning(
            f"It was made for weights {budget.model_fingerprint}, not the loaded {ctx.loaded.fingerprint} "
            "(same architecture): its alphas were measured on the other weights."
        )


def _link_note(ctx: AppContext, upload: dict) -> str:
    """Whether the share link (the file's recorded settings) rebuilds the uploaded budget exactly."""
    budget: Budget = upload["budget"]
    target, settings = settings_of(budget)
    if is_measured(settings.method):
        return (f"The link asks for {settings.method} at the same target; it is measured again, not read from the "
                "file.")
    spectra = state.get_spectra(ctx.loaded, budget.xmin_rule) if budget.xmin_rule else ctx.spectra
    rebuilt = state.budget_for(ctx, target, settings, spectra=spectra)
    gap = max(abs(d) for d in sparsity_difference(budget, rebuilt).values())
    if gap < 1e-9:
        return "The link rebuilds exactly this budget from the settings recorded in the file."
    return (f"The link carries the settings recorded in the file, but they do not rebuild it (sparsities differ by up "
            f"to {gap:.3f}: edited, or made for other weights): share the file itself.")


@st.fragment
@guarded
def allocation_fragment(ctx: AppContext, active: bool) -> None:
    """Sliders -> engine -> charts. An uploaded file (validated outside, since an upload is rare) overrides them."""
    started = time.perf_counter()
    upload = state.active_upload(ctx)
    _controls(disabled=upload is not None)
    if not active:
        return
    try:
        current = state.active_budget(ctx, state.StreamlitProgress(st, "greedy error curves"))
    except ActTailError as error:
        show_error(error, "Allocation")
        return
    budget = current.budget
    target = budget.target_sparsity
    uniform = state.uniform_for(ctx, target)
    sparsities = [entry.sparsity for entry in budget.projections]
    with layout.control_row("allocation-metrics"):
        st.metric("Target sparsity", f"{target:.4f}", width=140)
        st.metric("Effective sparsity (param-weighted)", f"{budget.effective_sparsity:.4f}", width=240,
                  help="sum(params x sparsity) / sum(params) over all projections: the share of weight reads a "
                  "sparse kernel skips. The engine makes it equal the target.")
        st.metric("Per-projection range", f"{min(sparsities):.3f} - {max(sparsities):.3f}", width=210)
        st.metric("Method", budget.method, help=f"This budget: {current.label}", width=120)
    height = charts.heatmap_height(len({e.layer for e in budget.projections}))
    with layout.chart_row("allocation-maps"):
        layout.show_chart(
            # Titles without the target: a slider move then changes only the charts' data (see charts.to_spec).
            charts.sparsity_heatmap(budget, "Sparsity per projection", height, subtitle=current.label),
            key="budget_heatmap",
        )
        layout.show_chart(
            charts.difference_heatmap(budget, uniform, "Budget minus uniform", height,
                                      subtitle="at the same target; red: sparser than uniform, blue: keeps more"),
            key="difference_heatmap",
        )
    frame = budget.to_frame()
    with layout.chart_row("allocation-lines"):
        layout.show_chart(charts.lines_by_layer(frame, "sparsity", "Sparsity per layer", "sparsity",
                                              "one line per projection type"),
                        key="sparsity_by_layer")
        if is_measured(budget.method):
            st.info(f"{budget.method} does not use alpha: it allocates from measured output error, so there is no "
                    "alpha -> sparsity map to draw.")
        else:
            _, settings = settings_of(budget)
            spectra = state.get_spectra(ctx.loaded, budget.xmin_rule) if budget.xmin_rule else ctx.spectra
            curves = allocation_curves(spectra.alphas(), ctx.projections, target, settings)
            layout.show_chart(
                charts.alpha_vs_sparsity(curves, ctx.projections, "alpha against sparsity",
                                         "the curve is the map at this temperature and direction; points are "
                                         "projections"),
                key="alpha_vs_sparsity")
    with layout.chart_row("allocation-types"):
        layout.show_chart(charts.sparsity_by_type({current.label: budget, "uniform": uniform}, target),
                        key="sparsity_by_type")
        layout.show_chart(charts.lines_by_layer(charts.spectra_frame(ctx.spectra), "alpha", "alpha per layer", "alpha",
                                              "one line per projection type"),
                        key="alpha_by_layer_allocation")
    with layout.control_row("allocation-actions"):
        st.download_button(
            "Download budget JSON",
            # Deferred: the JSON is built only when clicked, not on every slider move.
            lambda chosen=budget: chosen.to_json(),
            file_name=f"acttail-budget-{budget.method}-{target:.2f}.json",
            mime="application/json", on_click="ignore", key="download_budget", icon=":material/download:",
            help="The budget in the engine's versioned schema; `python -m acttail_core eval --budget FILE` reads it.",
        )
        if st.button("Pin for comparison", key="pin_budget", icon=":material/push_pin:",
                     help="Keep this budget in the Compare tab, next to others (settings, files, greedy)."):
            pin = pins.add(ctx, budget, upload["name"] if upload else None)
            st.toast(f"Pinned {pin.label}" if pin else "Already pinned", icon=":material/push_pin:")
    st.code(state.share_link("Allocation"), language=None, wrap_lines=True)
    elapsed_ms = (time.perf_counter() - started) * 1000
    state.session.allocation_render_ms = elapsed_ms
    note = _link_note(ctx, upload) + " " if upload else ""
    st.caption(f"{note}Link to this view above. Allocation and charts took {elapsed_ms:.0f} ms (server side).")


# --------------------------------------------------------------------------- per-model calibration


def _apply_calibration(found: calibration.Calibration) -> None:
    """Button callback: it runs before the page is drawn again, so it may set the widgets (sidebar rule too)."""
    choice = found.choice
    for key, value in dict(method="acttail", sparsity=found.sparsity, temperature=choice.temperature,
                           direction=choice.direction, group=choice.group, rule=choice.rule).items():
        state.set_widget(key, value)


def _calibration_control(ctx: AppContext) -> None:
    """Run ``calibration.calibrate`` at the current target, show its choice, and apply it on request."""
    target = float(state.widget("sparsity", DEFAULT_SPARSITY))
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
            state.session.calibration_result = (ctx.loaded.fingerprint, found)
    found = state.stored_calibration(ctx)
    if found is not None:
        search = found.search
        st.markdown(f"At sparsity {found.sparsity:g}: **{found.choice.label}**, perplexity "
                    f"{math.exp(search.nll):.2f} against uniform's {math.exp(search.uniform_nll):.2f} on the "
                    f"calibration text ({search.runs} runs, {found.seconds:.0f} s).")
        st.button("Apply these settings", key="apply_calibration", on_click=_apply_calibration, args=(found,),
                  help="Sets the sliders and the sidebar's xmin rule; the downloaded budget then records "
                  "the calibration.")


def render(ctx: AppContext, active: bool = True) -> None:
    if active:
        st.subheader("Allocation: from alpha to a sparsity budget")
        st.caption(
            "Each projection gets its own sparsity; their parameter-weighted mean is exactly the target. The first "
            "map is the budget (its colours span its own range), the second its difference from uniform at the "
            "same target. Then per-layer profiles, and the alpha -> sparsity map the settings define."
        )
    live = st.container()
    # Outside the fragment: an upload is rare and reruns the page; slider moves then skip the uploader.
    with st.container(border=True):
        _upload_box(ctx)
        upload = state.active_upload(ctx)
        if upload is not None and active:
            _upload_notes(ctx, upload)
    with st.container(border=True):
        _calibration_control(ctx)
    with live:
        allocation_fragment(ctx, active)
