"""The Compare tab: any number of pinned budgets side by side, and evaluated together.

Pin budgets here or in the Allocation tab (the current settings, uploaded files, greedy at the current target);
each is drawn as its difference from uniform at its own target (one shared diverging colour scale), and all of
them as per-type and per-layer lines. "Evaluate pinned budgets" measures them on the same tokens as dense and
uniform (the Evaluate tab's corpus, token count and mode); the rows join the run history.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from acttail_core.allocation import AllocationSettings
from acttail_core.budget import MAX_BUDGET_BYTES, load_budget
from acttail_core.errors import ActTailError
from app import charts, evaluate_tab, layout, pins, state
from app.state import AppContext, guarded, show_error

ALL_TYPES = "all (param-weighted)"


def _type_picker(ctx: AppContext) -> str | None:
    types = [ALL_TYPES, *charts.ordered_types(p.type for p in ctx.projections)]
    choice = st.selectbox("Per-layer lines of", types, key="cmp_type", bind="query-params", width=220,
                          help="The parameter-weighted mean sparsity of each layer, or one projection type's.")
    return None if choice == ALL_TYPES else choice


def _pin_controls(ctx: AppContext) -> None:
    current = state.active_budget(ctx)
    target = current.budget.target_sparsity
    with layout.control_row("compare-actions"):
        if st.button("Pin the current budget", key="cmp_pin_current", icon=":material/push_pin:",
                     help=f"{current.label} at {target:.2f} (the Allocation tab's settings, or its uploaded file)."):
            upload = state.active_upload(ctx)
            pins.add(ctx, current.budget, upload["name"] if upload else None)
        if st.button(f"Pin greedy at {target:.2f}", key="cmp_pin_greedy", icon=":material/push_pin:",
                     help="The greedy baseline (measured output error) at the current target; measures error curves "
                     "once per model (cached)."):
            greedy = state.budget_for(ctx, target, AllocationSettings(method="greedy"),
                                      state.StreamlitProgress(st, "greedy error curves"))
            pins.add(ctx, greedy)
    files = st.file_uploader(
        "Pin budget files", type=["json"], accept_multiple_files=True, key="cmp_files",
        max_upload_size=MAX_BUDGET_BYTES >> 20,
        help="Budgets written by this tool for this model; each valid file is pinned (a bad one is refused with one "
        "line, and nothing else changes). Files cannot travel in a link.",
    )
    seen = state.session.compare_files_seen
    for file in files or []:
        if file.file_id in seen:
            continue
        seen.add(file.file_id)
        try:
            budget = load_budget(file.getvalue(), projections=ctx.projections, fingerprint=ctx.loaded.fingerprint,
                                 allow_other_weights=state.widget("allow_other_weights", False))
        except ActTailError as error:
            show_error(error, f"Not pinned: {file.name}")
            continue
        pins.add(ctx, budget, file.name)


def _pin_list(ctx: AppContext) -> list[pins.Pin]:
    pinned = pins.pins_for(ctx)
    for i, pin in enumerate(pinned):
        with layout.control_row(f"pin-{i}"):
            link = "in the link" if pin.token else "a file: not in the link"
            st.markdown(f"**{pin.label}** · effective sparsity {pin.budget.effective_sparsity:.4f} · {link}")
            if st.button("Unpin", key=f"unpin_{i}", type="tertiary", icon=":material/close:"):
                pins.keep_only(ctx, [p.label for p in pinned if p is not pin])
                st.rerun()
    return pinned


@guarded
def _evaluate_pins(ctx: AppContext, pinned: list[pins.Pin]) -> None:
    if st.button("Evaluate pinned budgets", key="cmp_evaluate", type="primary", icon=":material/play_arrow:",
                 help="Perplexity of dense, uniform at each pinned target and every pinned budget, on the same "
                 "tokens (corpus, tokens and mode as set in the Evaluate tab)."):
        runs = [("dense", None)]
        for target in sorted({pin.budget.target_sparsity for pin in pinned}):
            runs.append((f"uniform @ {target:.2f}", state.uniform_for(ctx, target)))
        runs += [(pin.label, pin.budget) for pin in pinned]
        rows = evaluate_tab.run_budgets(ctx, runs, kind="compare")
        if rows:
            state.session.compare_rows = rows
    rows = state.session.compare_rows
    if rows and rows[0].get("model") == ctx.loaded.name:
        frame = pd.DataFrame(rows)
        with layout.chart_row("compare-results"):
            layout.show_chart(charts.perplexity_vs_sparsity(frame, "Pinned budgets: perplexity against sparsity",
                                                          f"{frame['corpus'].iloc[0]}, {frame['tokens'].iloc[0]} "
                                                          "tokens scored"),
                            key="compare_ppl")
            shown = [c for c in ("label", "ppl", "sparsity", "realized_sparsity", "tokens", "seconds", "cached")
                     if c in frame]
            st.dataframe(frame[shown], hide_index=True, width="stretch")


def render(ctx: AppContext, active: bool = True) -> None:
    problem = pins.restore_from_url(ctx)
    if not active:
        _type_picker(ctx)  # keeps the URL's choice alive while another tab is open
        return
    st.subheader("Compare budgets")
    st.caption("Pin any number of budgets (here or with **Pin for comparison** in the Allocation tab) and see them "
               "side by side: each one's difference from uniform at its own target, and all of them per type and per "
               "layer.")
    if problem:
        st.error(f"Some pinned budgets in the link could not be rebuilt: {problem}", icon=":material/error:")
    _pin_controls(ctx)
    pinned = _pin_list(ctx)
    if not pinned:
        st.info("Nothing pinned yet: pin the current budget, greedy at the current target, or budget files above.")
        _type_picker(ctx)
        return
    limit = charts.difference_limit([pin.budget for pin in pinned], lambda b: state.uniform_for(ctx, b.target_sparsity))
    height = charts.heatmap_height(len({p.layer for p in ctx.projections}))
    with layout.chart_row("compare-maps"):
        for i, pin in enumerate(pinned):
            uniform = state.uniform_for(ctx, pin.budget.target_sparsity)
            layout.show_chart(charts.difference_heatmap(pin.budget, uniform, pin.label, height, limit=limit,
                                                      subtitle="minus uniform at the same target; shared scale"),
                            key=f"compare_map_{i}")
    by_label = {pin.label: pin.budget for pin in pinned}
    proj_type = _type_picker(ctx)
    with layout.chart_row("compare-lines"):
        layout.show_chart(charts.sparsity_by_type(by_label), key="compare_by_type")
        layout.show_chart(charts.sparsity_by_layer(by_label, proj_type), key="compare_by_layer")
    _evaluate_pins(ctx, pinned)
