"""The Spectra tab: the alpha heatmap, one projection's ESD with its power-law fit, and per-type summaries."""
from __future__ import annotations

from typing import Any, Optional

import streamlit as st

from app import charts, layout, state
from app.state import AppContext, guarded

EXPERT_HELP = "Experts of this cell; the heatmap shows their mean alpha."


def _selected_cell(event: Any) -> Optional[tuple[int, str]]:
    """(layer, type) of the heatmap cell the user clicked, if any (the chart's ``cell`` selection)."""
    if event is None:
        return None
    selection = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    points = (selection.get("cell") if isinstance(selection, dict) else getattr(selection, "cell", None)) or []
    if not points:
        return None
    point = points[0]
    try:
        return int(point["layer"]), str(point["type"])
    except (KeyError, TypeError, ValueError):
        return None


def _pickers(layers: list[int], types: list[str]) -> tuple[int, str]:
    """The ESD's layer and type, bound to the URL (``esd_layer``, ``esd_type``)."""
    with layout.control_row("esd"):
        layer = st.selectbox("Layer", layers, key="esd_layer", bind="query-params", width=110,
                             help="Or click a cell of the heatmap.")
        proj_type = st.selectbox("Projection type", types, key="esd_type", bind="query-params", width=150,
                                 help="Or click a cell of the heatmap.")
    return layer, proj_type


@st.fragment
@guarded
def _heatmap_and_esd(ctx: AppContext, active: bool) -> None:
    """A fragment: clicking a cell or changing the pickers reruns only this part."""
    spectra = ctx.spectra
    by_cell: dict[tuple[int, str], list] = {}  # a mixture of experts has one entry per expert in a cell
    for e in spectra.entries:
        by_cell.setdefault((e.layer, e.type), []).append(e)
    layers = sorted({e.layer for e in spectra.entries})
    types = charts.ordered_types(e.type for e in spectra.entries)

    # Apply a click before drawing, so the pickers and the highlighted cell follow it in this same run;
    # only once per click, so the pickers stay usable afterwards.
    clicked = _selected_cell(state.widget("alpha_heatmap"))
    if clicked is not None and clicked != state.session.applied_click and clicked in by_cell:
        state.set_widget("esd_layer", clicked[0])
        state.set_widget("esd_type", clicked[1])
        state.session.applied_click = clicked
    if state.widget("esd_layer") not in layers:
        state.set_widget("esd_layer", layers[0])
    if state.widget("esd_type") not in types:
        state.set_widget("esd_type", types[0])
    if not active:  # keep the pickers (and so the URL's choice) alive; draw nothing costly
        layout.pick_expert(by_cell.get(_pickers(layers, types), []), "esd_expert", EXPERT_HELP)
        return
    highlight = (state.widget("esd_layer"), state.widget("esd_type"))
    with layout.chart_row("spectra"):
        layout.show_chart(
            charts.alpha_heatmap(spectra, highlight),
            key="alpha_heatmap",
            on_select="rerun",
            selection_mode="cell",
        )
        with st.container():
            layer, proj_type = _pickers(layers, types)
            entry = layout.pick_expert(by_cell.get((layer, proj_type), []), "esd_expert", EXPERT_HELP)
            if entry is None:
                st.info(f"Layer {layer} has no {proj_type} projection.")
            else:
                layout.show_chart(charts.esd_figure(entry), key="esd_plot")
                st.caption(
                    f"alpha = **{entry.alpha:.3f}**, xmin = {entry.xmin:.4g}, KS distance D = "
                    f"{entry.ks_distance:.4f}, lambda_max = {entry.lambda_max:.4g}. The red line is the fitted tail "
                    "p(lambda) ~ lambda^-alpha above xmin (green), scaled to the tail's share of eigenvalues."
                )


def render(ctx: AppContext, active: bool = True) -> None:
    spectra = ctx.spectra
    if active:
        st.subheader("Spectra: how heavy-tailed is each weight matrix?")
        st.caption(
            "For each projection W, the eigenvalues of W^T W (its empirical spectral density, ESD) have a power-law "
            "tail p(lambda) ~ lambda^-alpha. Lower alpha = heavier tail (HT-SR reads it as better trained). "
            f"The xmin rule (**{spectra.rule}**, top of the page) decides where the tail starts. Click a cell to see "
            "its ESD."
        )
    _heatmap_and_esd(ctx, active)
    if not active:
        return
    with layout.chart_row("spectra-summary"):
        layout.show_chart(charts.alpha_by_type(spectra), key="alpha_by_type")
        layout.show_chart(charts.lines_by_layer(charts.spectra_frame(spectra), "alpha", "alpha per layer", "alpha",
                                                "one line per projection type"), key="alpha_by_layer")
    count = len(spectra.entries)
    # A toggle, not an expander: an expander's table is drawn (and its grid loaded) even while folded.
    if st.toggle(f"Show the table of all {count} projections and alpha per type", key="spectra_table",
                 bind="query-params"):
        st.dataframe(spectra.type_summary().round(3), width="content")
        st.dataframe(spectra.to_frame(), hide_index=True, width="stretch", height=320)
    st.download_button(
        "Download the spectra table (CSV)",
        # Deferred: the table is built only when clicked.
        lambda: spectra.to_frame().to_csv(index=False).encode(),
        file_name=f"acttail-spectra-{ctx.loaded.fingerprint}-{spectra.rule}.csv",
        mime="text/csv",
        on_click="ignore",
        key="download_spectra_csv",
        help="One row per projection: alpha, xmin, KS distance, tail size, lambda_max, shape.",
        icon=":material/download:",
    )
