"""The Spectra tab: the alpha heatmap, one projection's ESD with its power-law fit, and per-type summaries."""
from __future__ import annotations

from typing import Any, Optional

import streamlit as st

from app import charts
from app.state import AppContext, guarded


def _selected_cell(event: Any) -> Optional[tuple[int, str]]:
    """(layer, type) of the heatmap cell the user clicked, if any (from the chart's selection state)."""
    if event is None:
        return None
    selection = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    points = (selection.get("points") if isinstance(selection, dict) else getattr(selection, "points", None)) or []
    if not points:
        return None
    point = points[0]
    try:
        return int(point["y"]), str(point["x"])
    except (KeyError, TypeError, ValueError):
        return None


@st.fragment
@guarded
def _heatmap_and_esd(ctx: AppContext) -> None:
    """A fragment: clicking a cell or changing the pickers reruns only this part."""
    spectra = ctx.spectra
    by_cell: dict[tuple[int, str], list] = {}  # a mixture of experts has one entry per expert in a cell
    for e in spectra.entries:
        by_cell.setdefault((e.layer, e.type), []).append(e)
    layers = sorted({e.layer for e in spectra.entries})
    types = charts.ordered_types(e.type for e in spectra.entries)

    # Apply a click before drawing, so the pickers and the highlighted cell follow it in this same run;
    # only once per click, so the pickers stay usable afterwards.
    clicked = _selected_cell(st.session_state.get("alpha_heatmap"))
    if clicked is not None and clicked != st.session_state.get("_applied_click") and clicked in by_cell:
        st.session_state["esd_layer"], st.session_state["esd_type"] = clicked
        st.session_state["_applied_click"] = clicked
    if st.session_state.get("esd_layer") not in layers:
        st.session_state["esd_layer"] = layers[0]
    if st.session_state.get("esd_type") not in types:
        st.session_state["esd_type"] = types[0]
    highlight = (st.session_state["esd_layer"], st.session_state["esd_type"])

    left, right = st.columns([1.05, 1])
    with left:
        st.plotly_chart(
            charts.alpha_heatmap(spectra, highlight),
            key="alpha_heatmap",
            on_select="rerun",
            selection_mode="points",
            config=charts.plotly_config("acttail-alpha-heatmap"),
        )
    with right:
        pick_layer, pick_type = st.columns(2)
        layer = pick_layer.selectbox("Layer", layers, key="esd_layer", help="Or click a cell of the heatmap.")
        proj_type = pick_type.selectbox("Projection type", types, key="esd_type", help="Or click a cell of the heatmap.")
        members = by_cell.get((layer, proj_type), [])
        entry = members[0] if members else None
        if len(members) > 1:  # the heatmap shows the experts' mean; pick one expert's ESD
            labels = [f"expert {m.name.rsplit('.', 2)[-2]}" for m in members]  # "...experts.3.gate" -> expert 3
            if st.session_state.get("esd_expert") not in range(len(members)):
                st.session_state["esd_expert"] = 0
            picked = st.selectbox(f"Expert ({len(members)} in this cell; the heatmap shows their mean alpha)",
                                  range(len(members)), format_func=labels.__getitem__, key="esd_expert")
            entry = members[picked]
        if entry is None:
            st.info(f"Layer {layer} has no {proj_type} projection.")
        else:
            st.plotly_chart(charts.esd_figure(entry), key="esd_plot", config=charts.plotly_config(f"acttail-esd-{entry.name}"))
            st.caption(
                f"alpha = **{entry.alpha:.3f}**, xmin = {entry.xmin:.4g}, KS distance D = {entry.ks_distance:.4f}, "
                f"lambda_max = {entry.lambda_max:.4g}. The red line is the fitted tail p(lambda) ~ lambda^-alpha "
                "above xmin (green), scaled to the tail's share of eigenvalues."
            )


def render(ctx: AppContext) -> None:
    spectra = ctx.spectra
    st.subheader("Spectra: how heavy-tailed is each weight matrix?")
    st.caption(
        "For each projection W, the eigenvalues of W^T W (its empirical spectral density, ESD) have a power-law "
        "tail p(lambda) ~ lambda^-alpha. Lower alpha = heavier tail (HT-SR reads it as better trained). "
        f"The xmin rule (**{spectra.rule}**, sidebar) decides where the tail starts. Click a cell to see its ESD."
    )
    _heatmap_and_esd(ctx)

    summary_col, table_col = st.columns([1, 1])
    with summary_col:
        st.plotly_chart(charts.alpha_by_type(spectra), key="alpha_by_type", config=charts.plotly_config("acttail-alpha-by-type"))
    with table_col:
        st.markdown("**alpha per projection type**")
        st.dataframe(spectra.type_summary().round(3), width="stretch")
    frame = spectra.to_frame()
    with st.expander(f"All {len(frame)} projections (table)"):
        st.dataframe(frame, hide_index=True, width="stretch", height=320)
    st.download_button(
        "Download the spectra table (CSV)",
        frame.to_csv(index=False).encode(),
        file_name=f"acttail-spectra-{ctx.loaded.fingerprint}-{spectra.rule}.csv",
        mime="text/csv",
        on_click="ignore",
        key="download_spectra_csv",
        help="One row per projection: alpha, xmin, KS distance, tail size, lambda_max, shape.",
        icon=":material/download:",
    )
