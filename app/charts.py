"""Plotly figure builders: pure functions from engine objects to figures.

No Streamlit here, so every figure can be unit-tested and reused (e.g. in a
notebook). The colour scales are fixed across the app: one for alpha, one for
sparsity, each with a colour bar, so two heatmaps can be compared by eye.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import plotly.colors as plotly_colors
import plotly.graph_objects as go

from acttail_core.budget import Budget
from acttail_core.projections import PROJECTION_TYPES
from acttail_core.spectra import ProjectionSpectrum, Spectra, esd_density, tail_density

ALPHA_COLORSCALE = "Viridis"
# Pale = dense (nothing zeroed), dark red = almost everything zeroed. An explicit list, so no template
# or version can reverse it (Magma's near-black end rendered washed out in Streamlit's theme).
SPARSITY_COLORSCALE = plotly_colors.make_colorscale(plotly_colors.sequential.YlOrRd)
SPARSITY_RANGE = (0.0, 1.0)
# One colour per compared method, the same on every chart.
METHOD_COLORS = {
    "dense": "#7f7f7f",
    "uniform": "#1f77b4",
    "acttail": "#d62728",
    "linear": "#ff7f0e",
    "greedy": "#2ca02c",
    "budget": "#d62728",
}
TYPE_COLOR = "#4c78a8"

# What the modebar's camera button saves: a 2x PNG named after the chart.
def plotly_config(filename: str) -> dict:
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2},
    }


def ordered_types(types: Iterable[str]) -> list[str]:
    """Projection types in canonical order (q, k, v, o, gate, up, down), unknown types after."""
    present = list(dict.fromkeys(types))
    known = [t for t in PROJECTION_TYPES if t in present]
    return known + [t for t in present if t not in PROJECTION_TYPES]


def alpha_color_range(spectra: Spectra) -> tuple[float, float]:
    """2nd to 98th percentile of the finite alphas: a few spurious fits (alpha > 10) must not wash out the rest."""
    alphas = spectra.alphas()
    finite = alphas[np.isfinite(alphas)]
    if finite.size == 0:
        return (0.0, 1.0)
    low, high = np.percentile(finite, [2, 98])
    if high - low < 1e-9:
        high = low + 1.0
    return float(low), float(high)


def one_per_cell(frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """One row per (layer, type): a mixture of experts has one projection per expert in each cell.

    Such cells hold the mean of each column in ``values`` over the cell's members (``members`` counts
    them; ``name`` becomes the experts module's name, other columns are the first member's). Frames
    without shared cells come back with ``members`` = 1 and nothing else changed.
    """
    if not frame.duplicated(["layer", "type"]).any():
        return frame.assign(members=1)
    frame = frame.assign(**{v: pd.to_numeric(frame[v], errors="coerce") for v in values})
    grouped = frame.groupby(["layer", "type"], sort=False)
    cells = grouped.first().reset_index()
    means = grouped[list(values)].mean().reset_index(drop=True)
    for v in values:
        cells[v] = means[v].to_numpy()
    cells["members"] = grouped.size().to_numpy()
    shared = cells["members"] > 1
    # "model.layers.0.mlp.experts.3.gate" -> "model.layers.0.mlp.experts (8 experts)"
    cells.loc[shared, "name"] = [f"{n.rsplit('.', 2)[0]} ({m} experts)" for n, m in
                                 zip(cells.loc[shared, "name"], cells.loc[shared, "members"])]
    return cells


def _mean_text(frame: pd.DataFrame, text: pd.Series) -> pd.Series:
    """Hover text of a cell's value, as "mean ... of N experts" where the cell holds several (the other hover
    fields of such a cell are means too)."""
    return pd.Series([t if m == 1 else f"mean {t} of {m} experts" for t, m in zip(text, frame["members"])],
                     index=frame.index)


def _grid(frame: pd.DataFrame, value: str) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, types, values as a layers x types array, NaN where a layer lacks a type)."""
    layers = sorted(frame["layer"].unique().tolist())
    types = ordered_types(frame["type"])
    row_of = {layer: i for i, layer in enumerate(layers)}
    column_of = {proj_type: j for j, proj_type in enumerate(types)}
    grid = np.full((len(layers), len(types)), np.nan)
    # Direct indexing rather than pivot_table: this runs on every slider move and pandas' pivot costs ~20 ms.
    rows = frame["layer"].map(row_of).to_numpy()
    columns = frame["type"].map(column_of).to_numpy()
    grid[rows, columns] = frame[value].to_numpy(dtype=np.float64)
    return layers, types, grid


def _custom(frame: pd.DataFrame, layers: list[int], types: list[str], columns: Sequence[str]) -> np.ndarray:
    """Per-cell hover data (layers x types x columns); missing cells stay blank."""
    row_of = {layer: i for i, layer in enumerate(layers)}
    column_of = {proj_type: j for j, proj_type in enumerate(types)}
    out = np.full((len(layers), len(types), len(columns)), "", dtype=object)
    rows = frame["layer"].map(row_of).to_numpy()
    cols = frame["type"].map(column_of).to_numpy()
    for k, column in enumerate(columns):
        out[rows, cols, k] = frame[column].to_numpy(dtype=object)
    return out


def _heatmap_layout(title: str, layers: list[int], height: Optional[int] = None, **extra) -> dict:
    """Layout shared by every heatmap, built as one dict: one validation pass instead of several updates."""
    return dict(
        title=dict(text=title, x=0.0, xanchor="left"),
        height=height or max(360, 16 * len(layers) + 140),
        margin=dict(l=10, r=10, t=80, b=10),
        xaxis=dict(side="top", type="category"),
        yaxis=dict(title=dict(text="layer"), autorange="reversed", type="category", dtick=1 if len(layers) <= 40 else None),
        **extra,
    )


def alpha_heatmap(spectra: Spectra, highlight: Optional[tuple[int, str]] = None) -> go.Figure:
    """alpha per projection: layers as rows, projection types as columns.

    Plotly heatmaps cannot be selected, so an invisible marker sits on every cell:
    clicking a cell selects its marker, which Streamlit reports as a selection event.
    ``highlight`` = (layer, type) outlines that cell.
    """
    frame = one_per_cell(spectra.to_frame(), ["alpha", "xmin", "ks_distance", "tail_size"])
    frame["shape"] = frame["out_features"].astype(str) + " x " + frame["in_features"].astype(str)
    frame["alpha_text"] = _mean_text(frame, frame["alpha"].map(lambda a: f"{a:.3f}" if np.isfinite(a) else "no fit"))
    frame["xmin_text"] = frame["xmin"].map(lambda v: f"{v:.4g}")
    frame["ks_text"] = frame["ks_distance"].map(lambda v: f"{v:.4f}")
    frame["tail_size"] = frame["tail_size"].map(lambda v: f"{v:.0f}")
    layers, types, alpha = _grid(frame, "alpha")
    custom = _custom(frame, layers, types, ["alpha_text", "xmin_text", "ks_text", "shape", "tail_size", "name"])
    zmin, zmax = alpha_color_range(spectra)
    hover = (
        "layer %{y} · %{x}<br>alpha = %{customdata[0]}<br>xmin = %{customdata[1]}"
        "<br>KS distance D = %{customdata[2]}<br>shape %{customdata[3]} · tail %{customdata[4]} eigenvalues"
        "<extra>%{customdata[5]}</extra>"
    )
    traces = [
        go.Heatmap(
            z=alpha,
            x=types,
            y=[str(layer) for layer in layers],
            colorscale=ALPHA_COLORSCALE,
            zmin=zmin,
            zmax=zmax,
            colorbar=dict(title=dict(text="alpha"), thickness=14),
            hoverinfo="skip",  # the invisible cell markers carry the hover text (and the clicks)
            xgap=1,
            ygap=1,
        ),
        go.Scatter(
            x=[t for _ in layers for t in types],
            y=[str(layer) for layer in layers for _ in types],
            mode="markers",
            marker=dict(symbol="square", size=16, opacity=0.0, color="white"),
            selected=dict(marker=dict(opacity=0.0)),
            unselected=dict(marker=dict(opacity=0.0)),
            customdata=custom.reshape(len(layers) * len(types), -1),
            hovertemplate=hover,
            showlegend=False,
            name="cells",
        ),
    ]
    shapes = []
    if highlight is not None and highlight[0] in layers and highlight[1] in types:
        row, column = layers.index(highlight[0]), types.index(highlight[1])
        shapes.append(
            dict(
                type="rect", xref="x", yref="y", x0=column - 0.5, x1=column + 0.5, y0=row - 0.5, y1=row + 0.5,
                line=dict(color="#ff2b2b", width=3),
            )
        )
    # Cells form a regular grid, so "nearest marker" is exactly "the cell under the pointer".
    layout = _heatmap_layout(
        f"alpha per projection ({spectra.rule} rule)", layers,
        shapes=shapes, clickmode="event+select", dragmode=False, hovermode="closest", hoverdistance=-1,
    )
    return go.Figure(data=traces, layout=layout)


def sparsity_heatmap(budget: Budget, title: str, height: Optional[int] = None) -> go.Figure:
    """Per-projection sparsity on the fixed 0..1 sparsity scale."""
    frame = one_per_cell(budget.to_frame(), ["sparsity", "keep", "alpha"])
    frame["alpha_text"] = frame["alpha"].map(lambda a: "-" if a is None or not np.isfinite(a) else f"{a:.3f}")
    frame["sparsity_text"] = _mean_text(frame, frame["sparsity"].map(lambda s: f"{s:.3f}"))
    frame["keep"] = frame["keep"].map(lambda k: f"{k:.0f}")
    layers, types, sparsity = _grid(frame, "sparsity")
    custom = _custom(frame, layers, types, ["sparsity_text", "keep", "in_features", "alpha_text", "name"])
    heatmap = go.Heatmap(
        z=sparsity,
        x=types,
        y=[str(layer) for layer in layers],
        customdata=custom,
        colorscale=SPARSITY_COLORSCALE,
        zmin=SPARSITY_RANGE[0],
        zmax=SPARSITY_RANGE[1],
        colorbar=dict(title=dict(text="sparsity"), thickness=14),
        hovertemplate=(
            "layer %{y} · %{x}<br>sparsity = %{customdata[0]}<br>keeps %{customdata[1]} of %{customdata[2]} inputs"
            "<br>alpha = %{customdata[3]}<extra>%{customdata[4]}</extra>"
        ),
        xgap=1,
        ygap=1,
    )
    return go.Figure(data=[heatmap], layout=_heatmap_layout(title, layers, height))


def esd_figure(spectrum: ProjectionSpectrum) -> go.Figure:
    """Log-log histogram of one projection's eigenvalues with the fitted power-law tail and xmin."""
    edges, density = esd_density(spectrum)
    positive = density > 0
    # Step outline of the histogram; empty bins are left out (log axis).
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=np.sqrt(edges[:-1] * edges[1:])[positive],
            y=density[positive],
            width=np.diff(edges)[positive],
            name="ESD (density)",
            marker=dict(color="#9ecae1", line=dict(color="#3182bd", width=0.5)),
            hovertemplate="lambda ~ %{x:.4g}<br>density %{y:.3g}<extra></extra>",
        )
    )
    lambdas, fitted = tail_density(spectrum)
    if lambdas.size:
        fig.add_trace(
            go.Scatter(
                x=lambdas,
                y=fitted,
                mode="lines",
                name=f"power-law fit, alpha = {spectrum.alpha:.2f}",
                line=dict(color="#d62728", width=2.5),
                hovertemplate="lambda %{x:.4g}<br>fit %{y:.3g}<extra></extra>",
            )
        )
        low = float(density[positive].min()) if positive.any() else 1e-6
        high = float(max(density.max(), fitted.max()))
        fig.add_trace(
            go.Scatter(
                x=[spectrum.xmin, spectrum.xmin],
                y=[low, high],
                mode="lines",
                name=f"xmin = {spectrum.xmin:.4g}",
                line=dict(color="#2ca02c", width=2, dash="dash"),
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=dict(
            text=f"ESD of {spectrum.name}<br><sup>{spectrum.out_features} x {spectrum.in_features}, "
            f"{spectrum.num_eigs} eigenvalues, tail {spectrum.tail_size}, KS distance D = {spectrum.ks_distance:.4f}</sup>",
            x=0.0,
            xanchor="left",
        ),
        barmode="overlay",
        bargap=0,
        height=420,
        margin=dict(l=10, r=10, t=70, b=10),
        # inside the empty top-right corner (the bulk sits left, the tail low): below the plot it hid the axis title
        legend=dict(yanchor="top", y=0.99, xanchor="right", x=0.99, bgcolor="rgba(255,255,255,0.8)"),
    )
    fig.update_xaxes(type="log", title_text="eigenvalue lambda of W^T W", exponentformat="power")
    fig.update_yaxes(type="log", title_text="density", exponentformat="power")
    return fig


def alpha_by_type(spectra: Spectra) -> go.Figure:
    """Box plot with every projection as a point: how alpha differs between types and layers."""
    frame = spectra.to_frame()
    frame = frame[np.isfinite(frame["alpha"])]
    fig = go.Figure()
    for proj_type in ordered_types(frame["type"]):
        part = frame[frame["type"] == proj_type]
        fig.add_trace(
            go.Box(
                y=part["alpha"],
                name=proj_type,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker=dict(color=TYPE_COLOR, size=5, opacity=0.7),
                line=dict(color="#333333", width=1),
                fillcolor="rgba(76,120,168,0.15)",
                customdata=part[["layer"]].to_numpy(),
                hovertemplate=f"{proj_type}, layer %{{customdata[0]}}<br>alpha %{{y:.3f}}<extra></extra>",
                showlegend=False,
            )
        )
    fig.update_layout(title=dict(text="alpha per projection type (one point per layer)", x=0.0), height=380, margin=dict(l=10, r=10, t=50, b=10))
    ticks = [1, 1.5, 2, 3, 4, 6, 8, 10, 15, 20, 30, 50, 100]
    fig.update_yaxes(type="log", title_text="alpha (log scale)", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_xaxes(title_text="projection type")
    return fig


def mean_sparsity_by_type(budgets: dict[str, Budget]) -> go.Figure:
    """Grouped bars: mean sparsity per projection type for each named budget."""
    traces = []
    for label, budget in budgets.items():
        frame = budget.to_frame()
        types = ordered_types(frame["type"])
        means = frame.groupby("type")["sparsity"].mean().reindex(types)
        traces.append(
            go.Bar(
                x=types,
                y=means.to_numpy(),
                name=label,
                marker_color=METHOD_COLORS.get(label.split(" ")[0], None),
                hovertemplate=f"{label}<br>%{{x}}: mean sparsity %{{y:.3f}}<extra></extra>",
            )
        )
    layout = dict(
        title=dict(text="Mean sparsity per projection type", x=0.0),
        barmode="group",
        height=340,
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"),
        yaxis=dict(range=list(SPARSITY_RANGE), title=dict(text="sparsity")),
        xaxis=dict(title=dict(text="projection type")),
    )
    return go.Figure(data=traces, layout=layout)


def _label_color(label: str) -> Optional[str]:
    return METHOD_COLORS.get(str(label).split(" ")[0])


def perplexity_chart(rows: pd.DataFrame) -> go.Figure:
    """Perplexity of each method of one evaluation run (lower is better)."""
    fig = go.Figure(
        go.Bar(
            x=rows["short_label"] if "short_label" in rows else rows["label"],
            y=rows["ppl"],
            customdata=rows[["label"]].to_numpy(),
            marker_color=[_label_color(m) or TYPE_COLOR for m in rows["method"]],
            text=[f"{p:.2f}" for p in rows["ppl"]],
            textposition="outside",
            hovertemplate="%{customdata[0]}<br>perplexity %{y:.3f}<extra></extra>",
        )
    )
    fig.update_layout(title=dict(text="Perplexity (lower is better)", x=0.0), height=340, margin=dict(l=10, r=10, t=50, b=10))
    fig.update_yaxes(title_text="perplexity", rangemode="tozero")
    return fig


def with_decode_spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Adds decode_min / decode_max (tokens/s over the repeats) from decode_runs, when the rows have it."""
    rows = rows.copy()
    if "decode_runs" in rows:
        runs = rows["decode_runs"].apply(lambda r: list(r) if isinstance(r, (list, tuple)) and len(r) else [np.nan])
        rows["decode_min"] = runs.apply(min)
        rows["decode_max"] = runs.apply(max)
    return rows


def throughput_chart(rows: pd.DataFrame) -> go.Figure:
    """Prefill and decode tokens/s for each method of one throughput run; decode with its spread over the
    repeats and its speed-up over dense."""
    rows = with_decode_spread(rows)
    labels = rows["short_label"] if "short_label" in rows else rows["label"]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=rows["prefill_tokens_per_s"], name="prefill", marker_color="#6baed6",
                         hovertemplate="%{x}<br>prefill %{y:.1f} tokens/s<extra></extra>"))
    decode = rows["decode_tokens_per_s"]
    error = None
    if "decode_min" in rows:
        error = dict(type="data", symmetric=False, array=(rows["decode_max"] - decode).tolist(),
                     arrayminus=(decode - rows["decode_min"]).tolist(), color="#333333")
    speedup = rows["decode_speedup"] if "decode_speedup" in rows else pd.Series([np.nan] * len(rows))
    text = [f"{v:.2f}x" if np.isfinite(v) else "" for v in speedup]
    fig.add_trace(go.Bar(x=labels, y=decode, name="decode", marker_color="#08519c", error_y=error, text=text,
                         textposition="outside", hovertemplate="%{x}<br>decode %{y:.1f} tokens/s<extra></extra>"))
    fig.update_layout(
        title=dict(text="Throughput (tokens/s, higher is better; decode: x dense, bars = min..max)", x=0.0),
        barmode="group",
        height=340,
        margin=dict(l=10, r=10, t=50, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"),
    )
    fig.update_yaxes(title_text="tokens/s", type="log")
    return fig


def _log_ticks(values: Sequence[float]) -> list[float]:
    """1-2-5 ticks spanning the values, for readable log axes."""
    finite = [v for v in values if v and np.isfinite(v) and v > 0]
    if not finite:
        return [1, 10]
    low, high = np.floor(np.log10(min(finite))), np.ceil(np.log10(max(finite)))
    return [m * 10**e for e in range(int(low), int(high) + 1) for m in (1, 2, 5)]


def history_chart(history: pd.DataFrame) -> go.Figure:
    """Perplexity of every method across the session's runs, to compare allocations."""
    ppl = history[history["kind"] == "perplexity"]
    traces = []
    for method, part in ppl.groupby("method", sort=False):
        traces.append(
            go.Scatter(
                x=part["run"],
                y=part["ppl"],
                mode="markers+lines",
                name=str(method),
                marker=dict(size=10, color=_label_color(str(method))),
                line=dict(color=_label_color(str(method))),
                customdata=part[["label", "corpus", "tokens"]].to_numpy(),
                hovertemplate="run %{x}: %{customdata[0]}<br>perplexity %{y:.3f}<br>%{customdata[1]}, %{customdata[2]} tokens<extra></extra>",
            )
        )
    ticks = _log_ticks(ppl["ppl"].tolist())
    layout = dict(
        title=dict(text="Run history: perplexity of each method per run (hover for the settings)", x=0.0),
        height=340,
        margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(title=dict(text="run"), dtick=1),
        yaxis=dict(title=dict(text="perplexity (log)"), type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks]),
    )
    return go.Figure(data=traces, layout=layout)
