"""The Activations tab: one projection's input magnitudes, and where the budget in effect cuts them.

The engine (``acttail_core.activations``) runs the dense model over calibration text up to the chosen
projection and returns the histogram with both cuts at that projection's sparsity; captured inputs are kept
per server, so changing the budget redraws at once.
"""
from __future__ import annotations

from typing import Optional

import streamlit as st

from acttail_core.activations import DEFAULT_TOKENS, capture_input, magnitude_histogram
from acttail_core.projections import Projection
from app import charts, layout, state
from app.state import AppContext, StreamlitProgress, guarded


def _pickers(ctx: AppContext) -> Optional[Projection]:
    """The projection picked by layer and type and, in a cell of experts (a mixture of experts), by expert; every
    choice bound to the URL. None when the layer lacks that type."""
    layers = sorted({p.layer for p in ctx.projections})
    types = charts.ordered_types(p.type for p in ctx.projections)
    with layout.control_row("activations"):
        layer = st.selectbox("Layer", layers, key="act_layer", bind="query-params", width=110)
        proj_type = st.selectbox("Projection type", types, key="act_type", bind="query-params", width=150)
        members = [p for p in ctx.projections if p.layer == layer and p.type == proj_type]
        return layout.pick_expert(members, "act_expert", "Experts that share this layer and type.")


@guarded
def render(ctx: AppContext, active: bool = True) -> None:
    if active:
        st.subheader("Activations: what TopK and the threshold cut")
        st.caption(
            f"The dense model's input to one projection over {DEFAULT_TOKENS} tokens of calibration text (the demo's "
            "asyoulik.txt, never the evaluation text), as a histogram of |x|. The budget in effect gives this "
            "projection a sparsity: TopK keeps each token's largest entries, so its cut moves from token to token "
            "(red: median, band: 5-95% of tokens); the threshold mode (TEAL) cuts every token at one magnitude "
            "(green)."
        )
    projection = _pickers(ctx)
    if not active:
        return
    if projection is None:
        st.info(f"Layer {state.widget('act_layer')} has no {state.widget('act_type')} projection.")
        return
    current = state.active_budget(ctx)
    sparsity = current.budget.sparsity_by_name()[projection.name]
    key = (ctx.loaded.fingerprint, ctx.loaded.device, str(ctx.loaded.dtype), projection.name, DEFAULT_TOKENS)
    sample = state.activation_store().peek(key)
    if sample is None:
        slot = st.empty()
        with slot.container():
            sample = state.activation_store().get_or_create(
                key, lambda: capture_input(ctx.loaded, projection.name, progress=StreamlitProgress(st, "capturing")))
        slot.empty()
    hist = magnitude_histogram(sample, sparsity)
    with layout.control_row("activation-metrics"):
        st.metric("Sparsity here", f"{sparsity:.3f}", width=140, help=f"From the budget in effect: {current.label}.")
        st.metric("TopK keeps per token", f"{hist.keep} of {projection.in_features}", width=190)
        st.metric("TopK cut (median |x|)", f"{hist.kth_median:.3g}", width=190,
                  help=f"5-95% of tokens: {hist.kth_low:.3g} to {hist.kth_high:.3g}")
        st.metric("Threshold", f"{hist.threshold:.3g}", width=140,
                  help="|x| at or below it is zeroed in threshold mode: the quantile of these magnitudes at the "
                  "sparsity (TEAL's dense calibration on this sample).")
        st.metric("TopK keeps", f"{hist.topk_kept:.1%}", width=130, help="of all entries (ties keep a few extra)")
        st.metric("Threshold keeps", f"{hist.threshold_kept:.1%}", width=150, help="of all entries")
    layout.show_chart(charts.activation_histogram(hist, projection.name), key="activation_histogram")
