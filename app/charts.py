"""Chart builders: pure functions from engine objects to Altair (Vega-Lite) charts.

No Streamlit here, so every chart can be unit-tested (``chart.to_dict()``) and
reused in a notebook. Vega-Lite rather than plotly: Streamlit's plotly bundle
(4.7 MB of JavaScript) alone kept the first chart 3-4 s away on a warm server
and redrew a heatmap in 200-400 ms; Vega-Lite draws the first chart in about
1.5 s and redraws in about 100 ms on the same machine. Charts render as SVG
(``usermeta``), so what is drawn is in the page, and every chart saves as PNG
from its toolbar.

Colour scales say what they cover: alpha's is robust to a few spurious fits and
marks the cells it clips; a budget's covers its own range; a difference from
uniform is diverging and centred on 0.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from acttail_core.activations import MagnitudeHistogram
from acttail_core.allocation import AllocationCurves
from acttail_core.budget import Budget, mean_sparsity_by, sparsity_difference
from acttail_core.methods import METHODS
from acttail_core.projections import PROJECTION_TYPES, Projection
from acttail_core.spectra import ProjectionSpectrum, Spectra, esd_density, tail_density

# Top-level only (Vega-Lite refuses usermeta inside layers): vega-embed reads the renderer from here.
SVG = {"embedOptions": {"renderer": "svg"}}
ALPHA_SCHEME = "viridis"
# Pale = dense (nothing zeroed), dark red = almost everything zeroed.
SPARSITY_SCHEME = "yelloworangered"
# Budget minus uniform: blue = keeps more than uniform, red = sparser; white = the same.
DIFFERENCE_SCHEME = "redblue"
# One colour per compared method, the same on every chart.
METHOD_COLORS = {"dense": "#7f7f7f", **{name: method.colour for name, method in METHODS.items()}}
# One colour per projection type (line plots: one line per type).
TYPE_COLORS = dict(zip(PROJECTION_TYPES, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                                          "#e377c2")))
OTHER_COLOR = "#4c78a8"
SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                 "#7f7f7f")
ABOVE, BELOW = "▲", "▼"


def to_spec(chart) -> dict:
    """The chart's Vega-Lite dict as the page gets it, with its data frames as named datasets ``data0``, ...

    Streamlit turns the frames straight into Arrow (``st.altair_chart`` would first write them out as JSON
    records, then read them back). The names are stable, so a chart whose data alone changed (a slider move)
    keeps the same spec and the page updates it in place, several times faster than a rebuild. The dict is not
    validated again here: the unit tests validate every builder (``to_dict()``), and validation costs 5-25 ms a
    chart on every rerun. Altair's default theme (its ``config``) is dropped, as ``st.altair_chart`` does, so
    Streamlit's theme applies. The chart's frames are moved out of it: build a new chart for each call.
    """
    datasets: dict[str, pd.DataFrame] = {}

    def name_data(node) -> None:
        if isinstance(getattr(node, "data", None), pd.DataFrame):
            name = f"data{len(datasets)}"
            datasets[name] = node.data
            node.data = alt.NamedData(name=name)
        for part in ("layer", "hconcat", "vconcat"):
            for child in getattr(node, part, None) or []:
                name_data(child)

    name_data(chart)
    spec = chart.to_dict(validate=False)
    spec.pop("config", None)
    spec["datasets"] = datasets
    return spec


def ordered_types(types: Iterable[str]) -> list[str]:
    """Projection types in canonical order (q, k, v, o, gate, up, down), unknown types after."""
    present = list(dict.fromkeys(types))
    known = [t for t in PROJECTION_TYPES if t in present]
    return known + [t for t in present if t not in PROJECTION_TYPES]


def _title(text: str, subtitle: str = "") -> alt.TitleParams:
    return alt.TitleParams(text=text, subtitle=subtitle or alt.Undefined, anchor="start", fontSize=15,
                           subtitleFontSize=11, subtitleColor="#555555", offset=8)


def _finish(chart, title: str, subtitle: str = "", height: int = 320):
    """Top-level properties every chart shares: title, the container's width, a height, SVG rendering.

    Set as attributes: ``properties()`` would validate each against the schema on every rerun (the tests
    validate the whole spec instead).
    """
    chart.title = _title(title, subtitle)
    chart.width = "container"
    chart.height = height
    chart.usermeta = SVG
    return chart


def _type_scale(types: Sequence[str]) -> alt.Scale:
    return alt.Scale(domain=list(types), range=[TYPE_COLORS.get(t, OTHER_COLOR) for t in types])


def _series_scale(labels: Sequence[str]) -> alt.Scale:
    return alt.Scale(domain=list(labels), range=[SERIES_COLORS[i % len(SERIES_COLORS)] for i in range(len(labels))])


def _label_scale(labels: Sequence[str]) -> alt.Scale:
    """Budgets by label: each method's own colour while no method repeats (uniform is always blue), else one
    colour per label."""
    methods = [_method_of(label) for label in labels]
    if len(set(methods)) == len(methods):
        return _method_scale(labels)
    return _series_scale(labels)


def _legend_below() -> alt.Legend:
    """For long labels (budgets): below the plot, in columns."""
    return alt.Legend(orient="bottom", title=None, columns=2, labelLimit=420)


def _type_legend() -> alt.Legend:
    """For the seven projection types: a narrow column beside the plot, so the plot keeps its height."""
    return alt.Legend(orient="right", title="type")


# --------------------------------------------------------------------------- alpha


def spectra_frame(spectra: Spectra) -> pd.DataFrame:
    """One row per projection with its fit, without the eigenvalues (``Spectra.to_frame`` deep-copies them
    first: ~25 ms on the default model, on every rerun)."""
    fields = ("name", "layer", "type", "in_features", "out_features", "alpha", "xmin", "ks_distance", "tail_size",
              "lambda_max")
    return pd.DataFrame({field: [getattr(e, field) for e in spectra.entries] for field in fields})


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


def alpha_range_note(spectra: Spectra) -> str:
    """What the alpha colour scale leaves out, in words (empty when it covers every cell)."""
    low, high = alpha_color_range(spectra)
    alphas = spectra.alphas()
    finite = alphas[np.isfinite(alphas)]
    above, below = int((finite > high).sum()), int((finite < low).sum())
    if not above and not below:
        return ""
    return (f"colours cover {low:.3f}-{high:.3f} (2nd-98th percentile); {above + below} of {alphas.size} cells "
            f"outside are marked {ABOVE} above / {BELOW} below (data {finite.min():.3f}-{finite.max():.3f})")


def heatmap_height(layers: int) -> int:
    return max(300, 15 * layers)


def _cell_axes(types: Sequence[str]) -> tuple[alt.X, alt.Y]:
    """Types across the top (read first), layers down the side."""
    x = alt.X("type:N", sort=list(types), title=None, axis=alt.Axis(orient="top", labelAngle=0, labelFontSize=12))
    y = alt.Y("layer:O", title="layer", axis=alt.Axis(labelFontSize=10))
    return x, y


def _clipped_labels(low: float, high: float, clipped_low: bool, clipped_high: bool) -> Optional[str]:
    """A legend label expression that says when values beyond the ends share the end colour."""
    if not clipped_low and not clipped_high:
        return None
    low_text = "'≤' + datum.label" if clipped_low else "datum.label"
    high_text = "'≥' + datum.label" if clipped_high else "datum.label"
    return f"datum.value <= {low + 1e-9!r} ? {low_text} : datum.value >= {high - 1e-9!r} ? {high_text} : datum.label"


def alpha_heatmap(spectra: Spectra, highlight: Optional[tuple[int, str]] = None, height: Optional[int] = None):
    """alpha per projection: layers as rows, projection types as columns.

    Clicking a cell selects it (the selection parameter ``cell`` reports its layer and type); ``highlight``
    outlines one cell. Cells beyond the colour range carry a mark, and the legend's end labels say so.
    """
    frame = one_per_cell(spectra_frame(spectra), ["alpha", "xmin", "ks_distance", "tail_size"])
    frame = frame.assign(
        shape=frame["out_features"].astype(str) + " x " + frame["in_features"].astype(str),
        alpha_text=_mean_text(frame, frame["alpha"].map(lambda a: f"{a:.3f}" if np.isfinite(a) else "no fit")),
        alpha=frame["alpha"].where(np.isfinite(frame["alpha"])),
    )
    low, high = alpha_color_range(spectra)
    frame["mark"] = np.where(frame["alpha"] > high, ABOVE, np.where(frame["alpha"] < low, BELOW, ""))
    frame = frame[["name", "layer", "type", "alpha", "alpha_text", "xmin", "ks_distance", "tail_size", "shape",
                   "mark"]]
    types = ordered_types(frame["type"])
    x, y = _cell_axes(types)
    labels = _clipped_labels(low, high, (frame["mark"] == BELOW).any(), (frame["mark"] == ABOVE).any())
    legend = alt.Legend(title="alpha", gradientLength=220, labelExpr=labels) if labels else alt.Legend(title="alpha")
    cell = alt.selection_point(name="cell", fields=["layer", "type"], on="click", clear=False)
    base = alt.Chart(frame)
    cells = base.mark_rect(stroke="white", strokeWidth=1).encode(
        x=x, y=y,
        color=alt.Color("alpha:Q", scale=alt.Scale(scheme=ALPHA_SCHEME, domain=[low, high], clamp=True), legend=legend),
        tooltip=[alt.Tooltip("name:N", title="projection"), alt.Tooltip("layer:O"), alt.Tooltip("type:N"),
                 alt.Tooltip("alpha_text:N", title="alpha"), alt.Tooltip("xmin:Q", format=".4g"),
                 alt.Tooltip("ks_distance:Q", title="KS distance D", format=".4f"), alt.Tooltip("shape:N"),
                 alt.Tooltip("tail_size:Q", title="tail eigenvalues")],
    ).add_params(cell)
    layers = [cells, base.mark_text(color="white", fontSize=10).encode(x=x, y=y, text=alt.Text("mark:N"))]
    if highlight is not None:
        chosen = pd.DataFrame([{"layer": highlight[0], "type": highlight[1]}])
        layers.append(alt.Chart(chosen).mark_rect(fill=None, stroke="#ff2b2b", strokeWidth=3).encode(x=x, y=y))
    chart = alt.layer(*layers)
    return _finish(chart, f"alpha per projection ({spectra.rule} rule)", alpha_range_note(spectra),
                   height or heatmap_height(len(frame["layer"].unique())))


def esd_figure(spectrum: ProjectionSpectrum):
    """Log-log histogram of one projection's eigenvalues with the fitted power-law tail and xmin."""
    edges, density = esd_density(spectrum)
    positive = density > 0
    bars = pd.DataFrame({"lo": edges[:-1][positive], "hi": edges[1:][positive], "density": density[positive],
                         "series": "ESD (density)"})
    floor = float(bars["density"].min()) / 2 if len(bars) else 1e-6
    names = ["ESD (density)"]
    colors = ["#6baed6"]
    lambdas, fitted = tail_density(spectrum)
    if lambdas.size:
        fit_name, xmin_name = f"power-law fit, alpha = {spectrum.alpha:.2f}", f"xmin = {spectrum.xmin:.4g}"
        names += [fit_name, xmin_name]
        colors += ["#d62728", "#2ca02c"]
    color = alt.Color("series:N", scale=alt.Scale(domain=names, range=colors),
                      legend=alt.Legend(orient="top-right", title=None, fillColor="rgba(255,255,255,0.85)"))
    x_scale = alt.Scale(type="log")
    y_scale = alt.Scale(type="log")
    layers = [alt.Chart(bars).mark_rect(stroke="#3182bd", strokeWidth=0.4).encode(
        x=alt.X("lo:Q", scale=x_scale, title="eigenvalue lambda of W^T W", axis=alt.Axis(format="~g")),
        x2=alt.X2("hi:Q"), y=alt.Y("density:Q", scale=y_scale, title="density", axis=alt.Axis(format="~g")),
        y2=alt.Y2Datum(floor), color=color,
        tooltip=[alt.Tooltip("lo:Q", title="lambda from", format=".4g"), alt.Tooltip("hi:Q", title="to", format=".4g"),
                 alt.Tooltip("density:Q", format=".3g")],
    )]
    if lambdas.size:
        fit = pd.DataFrame({"lambda": lambdas, "density": fitted, "series": fit_name})
        layers.append(alt.Chart(fit).mark_line(strokeWidth=2.5).encode(
            x=alt.X("lambda:Q", scale=x_scale), y=alt.Y("density:Q", scale=y_scale), color=color))
        top = float(max(density.max(), fitted.max()))
        rule = pd.DataFrame({"lambda": [spectrum.xmin], "low": [floor], "high": [top], "series": [xmin_name]})
        layers.append(alt.Chart(rule).mark_rule(strokeWidth=2, strokeDash=[6, 4]).encode(
            x=alt.X("lambda:Q", scale=x_scale), y=alt.Y("low:Q", scale=y_scale), y2=alt.Y2("high:Q"), color=color))
    return _finish(alt.layer(*layers), f"ESD of {spectrum.name}",
                   f"{spectrum.out_features} x {spectrum.in_features}, {spectrum.num_eigs} eigenvalues, tail "
                   f"{spectrum.tail_size}, KS distance D = {spectrum.ks_distance:.4f}", 400)


def alpha_by_type(spectra: Spectra):
    """Box plot with every projection as a point: how alpha differs between types and layers."""
    frame = spectra_frame(spectra)[["name", "layer", "type", "alpha"]]
    frame = frame[np.isfinite(frame["alpha"])]
    types = ordered_types(frame["type"])
    x = alt.X("type:N", sort=types, title="projection type", axis=alt.Axis(labelAngle=0))
    y = alt.Y("alpha:Q", scale=alt.Scale(type="log", zero=False), title="alpha (log scale)")
    base = alt.Chart(frame)
    boxes = base.mark_boxplot(extent="min-max", opacity=0.35, color="#4c78a8", size=40, outliers=False).encode(x=x, y=y)
    points = base.transform_calculate(jitter="(random() - 0.5) * 0.7").mark_circle(size=28, opacity=0.8).encode(
        x=x, xOffset=alt.XOffset("jitter:Q", scale=alt.Scale(domain=[-1, 1])), y=y,
        color=alt.Color("type:N", scale=_type_scale(types), legend=None),
        tooltip=[alt.Tooltip("name:N"), alt.Tooltip("layer:O"), alt.Tooltip("alpha:Q", format=".3f")],
    )
    return _finish(alt.layer(boxes, points), "alpha per projection type", "one point per layer", 360)


def lines_by_layer(frame: pd.DataFrame, value: str, title: str, y_title: str, subtitle: str = ""):
    """One line per projection type over the layers (``frame`` has layer, type and ``value`` per projection)."""
    # A mixture of experts has several projections of a type per layer: their mean, as on the heatmaps.
    data = frame.groupby(["layer", "type"], sort=False, as_index=False)[value].mean().rename(columns={value: "value"})
    types = ordered_types(data["type"])
    chart = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18), strokeWidth=1.6).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False)),
        color=alt.Color("type:N", scale=_type_scale(types), sort=types, legend=_type_legend()),
        tooltip=[alt.Tooltip("type:N"), alt.Tooltip("layer:Q"), alt.Tooltip("value:Q", title=y_title, format=".3f")],
    )
    return _finish(chart, title, subtitle, 320)


# --------------------------------------------------------------------------- budgets


def flat_range(budget: Budget) -> Optional[tuple[float, float]]:
    """A readable colour range for a budget whose sparsities (nearly) all equal; None when they spread, so the
    scale takes the data's own extent (and a slider move changes only the data, not the spec)."""
    values = [e.sparsity for e in budget.projections]
    if max(values) - min(values) >= 0.02:
        return None
    middle = round((max(values) + min(values)) / 2, 2)
    return max(0.0, middle - 0.02), min(1.0, middle + 0.02)


def _budget_frame(budget: Budget, difference: Optional[Mapping[str, float]] = None) -> pd.DataFrame:
    """One row per heatmap cell (a cell of experts holds their means); ``difference`` by projection name is added
    as a column before the experts are averaged."""
    frame = budget.to_frame()[["name", "layer", "type", "sparsity", "keep", "in_features", "params", "alpha"]]
    frame = frame.assign(alpha=frame["alpha"].astype(float))
    values = ["sparsity", "keep", "alpha"]
    if difference is not None:
        frame["difference"] = frame["name"].map(difference)
        values.append("difference")
    frame = one_per_cell(frame, values)
    return frame.assign(sparsity_text=_mean_text(frame, frame["sparsity"].map(lambda v: f"{v:.3f}")))


def _budget_tooltip(*extra: alt.Tooltip) -> list:
    return [alt.Tooltip("name:N", title="projection"), *extra, alt.Tooltip("sparsity_text:N", title="sparsity"),
            alt.Tooltip("keep:Q", title="inputs kept", format=".0f"), alt.Tooltip("in_features:Q", title="of"),
            alt.Tooltip("alpha:Q", format=".3f")]


def sparsity_heatmap(budget: Budget, title: str, height: Optional[int] = None,
                     zrange: Optional[tuple[float, float]] = None, subtitle: str = ""):
    """Per-projection sparsity; the colour range covers the budget's own values unless ``zrange`` is given."""
    frame = _budget_frame(budget)
    x, y = _cell_axes(ordered_types(frame["type"]))
    domain = zrange or flat_range(budget)
    chart = alt.Chart(frame).mark_rect(stroke="white", strokeWidth=1).encode(
        x=x, y=y,
        color=alt.Color("sparsity:Q", scale=alt.Scale(scheme=SPARSITY_SCHEME, domain=list(domain) if domain
                                                      else alt.Undefined, zero=False),
                        legend=alt.Legend(title="sparsity", gradientLength=220, format=".3f")),
        tooltip=_budget_tooltip(),
    )
    return _finish(chart, title, subtitle, height or heatmap_height(len(frame["layer"].unique())))


def difference_limit(budgets: Iterable[Budget], reference_of) -> float:
    """The symmetric colour limit that covers every difference of the budgets from their references."""
    largest = max((abs(v) for b in budgets for v in sparsity_difference(b, reference_of(b)).values()), default=0.0)
    return max(largest, 0.01)


def difference_heatmap(budget: Budget, reference: Budget, title: str, height: Optional[int] = None,
                       limit: Optional[float] = None, subtitle: str = ""):
    """``budget`` minus ``reference`` sparsity per projection, on a diverging scale centred on 0."""
    frame = _budget_frame(budget, sparsity_difference(budget, reference))
    if limit is None and frame["difference"].abs().max() < 0.01:
        limit = 0.01  # (nearly) uniform: a fixed small range, not a degenerate one
    # Without a limit the scale spans the data, centred on 0 (so a slider move changes the data, not the spec).
    domain = [-limit, limit] if limit is not None else alt.Undefined
    x, y = _cell_axes(ordered_types(frame["type"]))
    chart = alt.Chart(frame).mark_rect(stroke="white", strokeWidth=1).encode(
        x=x, y=y,
        color=alt.Color("difference:Q",
                        scale=alt.Scale(scheme=DIFFERENCE_SCHEME, reverse=True, domain=domain, domainMid=0),
                        legend=alt.Legend(title="Δ sparsity", gradientLength=220, format="+.2f")),
        tooltip=_budget_tooltip(alt.Tooltip("difference:Q", title="minus uniform", format="+.3f")),
    )
    return _finish(chart, title, subtitle, height or heatmap_height(len(frame["layer"].unique())))


def alpha_vs_sparsity(curves: AllocationCurves, projections: Sequence[Projection], title: str, subtitle: str = ""):
    """Every projection as a point (colour = type) on the allocation's curve(s) of alpha -> sparsity."""
    points = pd.DataFrame({"x": curves.x, "sparsity": curves.sparsity, "type": [p.type for p in projections],
                           "name": [p.name for p in projections]})
    types = ordered_types(points["type"])
    maps = [f"map ({curve.label})" for curve in curves.curves if curve.label not in types]
    lines = pd.DataFrame([{"x": x, "sparsity": s, "curve": curve.label,
                           "type": curve.label if curve.label in types else f"map ({curve.label})"}
                          for curve in curves.curves for x, s in zip(curve.x, curve.sparsity)])
    domain = types + maps
    scale = alt.Scale(domain=domain, range=[TYPE_COLORS.get(t, "#333333") for t in domain])
    x = alt.X("x:Q", title=curves.x_label, scale=alt.Scale(zero=False))
    y = alt.Y("sparsity:Q", title="sparsity", scale=alt.Scale(zero=False))
    dash = [5, 3] if len(curves.curves) > 1 else [1, 0]
    curve_marks = alt.Chart(lines).mark_line(strokeWidth=2, strokeDash=dash).encode(
        x=x, y=y, color=alt.Color("type:N", scale=scale), detail=alt.Detail("curve:N"))
    point_marks = alt.Chart(points).mark_circle(size=42, opacity=0.9, stroke="white", strokeWidth=0.5).encode(
        x=x, y=y, color=alt.Color("type:N", scale=scale, legend=_type_legend()),
        tooltip=[alt.Tooltip("name:N"), alt.Tooltip("x:Q", title=curves.x_label, format=".3f"),
                 alt.Tooltip("sparsity:Q", format=".3f")],
    )
    return _finish(alt.layer(curve_marks, point_marks), title, subtitle, 320)


def sparsity_by_type(budgets: Mapping[str, Budget], target: Optional[float] = None,
                     title: str = "Mean sparsity per projection type"):
    """Parameter-weighted mean sparsity per type, one line per budget, on an axis zoomed to the values."""
    rows = [{"label": label, "type": t, "sparsity": value}
            for label, budget in budgets.items() for t, value in mean_sparsity_by(budget, "type").items()]
    frame = pd.DataFrame(rows)
    types = ordered_types(frame["type"])
    labels = list(budgets)
    layers = [alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=60), strokeWidth=2).encode(
        x=alt.X("type:N", sort=types, title="projection type", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("sparsity:Q", title="mean sparsity", scale=alt.Scale(zero=False)),
        color=alt.Color("label:N", scale=_label_scale(labels), sort=labels, legend=_legend_below()),
        tooltip=[alt.Tooltip("label:N"), alt.Tooltip("type:N"), alt.Tooltip("sparsity:Q", format=".4f")],
    )]
    if target is not None:
        layers.append(alt.Chart(pd.DataFrame({"target": [target]})).mark_rule(color="#7f7f7f", strokeDash=[4, 4])
                      .encode(y=alt.Y("target:Q")))
    return _finish(alt.layer(*layers), title, "parameter-weighted; the axis is zoomed to the values", 360)


def sparsity_by_layer(budgets: Mapping[str, Budget], proj_type: Optional[str] = None,
                      title: str = "Sparsity per layer"):
    """One line per budget over the layers: a type's sparsity, or the parameter-weighted mean of the layer."""
    rows = []
    for label, budget in budgets.items():
        if proj_type is None:
            values = mean_sparsity_by(budget, "layer").items()
        else:
            values = ((e.layer, e.sparsity) for e in budget.projections if e.type == proj_type)
        rows += [{"label": label, "layer": layer, "sparsity": value} for layer, value in values]
    # One point per layer: a type's experts (a mixture of experts) show their mean, as on the heatmaps.
    frame = pd.DataFrame(rows).groupby(["label", "layer"], sort=False, as_index=False)["sparsity"].mean()
    labels = list(budgets)
    chart = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=16), strokeWidth=1.8).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("sparsity:Q", title="sparsity", scale=alt.Scale(zero=False)),
        color=alt.Color("label:N", scale=_label_scale(labels), sort=labels, legend=_legend_below()),
        tooltip=[alt.Tooltip("label:N"), alt.Tooltip("layer:Q"), alt.Tooltip("sparsity:Q", format=".3f")],
    )
    what = "parameter-weighted mean of each layer" if proj_type is None else f"{proj_type} projection of each layer"
    return _finish(chart, title, what, 360)


def params_by_type(projections: Sequence[Projection]):
    """Weights per projection type: the weights of the parameter-weighted mean sparsity."""
    totals: dict[str, int] = {}
    for p in projections:
        totals[p.type] = totals.get(p.type, 0) + p.params
    types = ordered_types(totals)
    whole = sum(totals.values())
    frame = pd.DataFrame({"type": types, "millions": [totals[t] / 1e6 for t in types],
                          "share": [f"{totals[t] / whole:.0%}" for t in types]})
    x = alt.X("type:N", sort=types, title="projection type", axis=alt.Axis(labelAngle=0))
    y = alt.Y("millions:Q", title="million weights")
    bars = alt.Chart(frame).mark_bar().encode(
        x=x, y=y, color=alt.Color("type:N", scale=_type_scale(types), legend=None),
        tooltip=[alt.Tooltip("type:N"), alt.Tooltip("millions:Q", format=".2f"), alt.Tooltip("share:N")])
    text = alt.Chart(frame).mark_text(dy=-8).encode(x=x, y=y, text=alt.Text("share:N"))
    return _finish(alt.layer(bars, text), "Weights per projection type",
                   "the share each type has in the effective (parameter-weighted) sparsity", 320)


# --------------------------------------------------------------------------- activations


def activation_histogram(hist: MagnitudeHistogram, name: str):
    """|x| of one projection's input (log bins) with the cuts a budget implies at its sparsity."""
    bars = pd.DataFrame({"lo": hist.edges[:-1], "hi": hist.edges[1:], "share": hist.share,
                         "series": "|x| (share of entries)"})
    top = 1.05 * float(hist.share.max()) if hist.share.size else 1.0
    topk_name = f"TopK cut (keep {hist.keep}/token): median {hist.kth_median:.3g}; band: 5-95% of tokens"
    names, colors = ["|x| (share of entries)", topk_name], ["#6baed6", "#d62728"]
    threshold_name = f"threshold mode: |x| ≤ {hist.threshold:.3g} zeroed"
    if hist.threshold > 0:
        names.append(threshold_name)
        colors.append("#2ca02c")
    color = alt.Color("series:N", scale=alt.Scale(domain=names, range=colors), legend=_legend_below())
    x_scale = alt.Scale(type="log")
    x = alt.X("lo:Q", scale=x_scale, title="|x| (log scale)", axis=alt.Axis(format="~g"))
    layers = [
        alt.Chart(bars).mark_rect(stroke="#3182bd", strokeWidth=0.3).encode(
            x=x, x2=alt.X2("hi:Q"), y=alt.Y("share:Q", title="share of entries", axis=alt.Axis(format=".1%"),
                                            scale=alt.Scale(domain=[0, top])),
            y2=alt.Y2Datum(0), color=color,
            tooltip=[alt.Tooltip("lo:Q", title="|x| from", format=".3g"), alt.Tooltip("hi:Q", title="to", format=".3g"),
                     alt.Tooltip("share:Q", format=".2%")]),
        # over the bars, translucent: TopK's cut differs from token to token
        alt.Chart(pd.DataFrame({"lo": [hist.kth_low], "hi": [hist.kth_high]})).mark_rect(
            color="#d62728", opacity=0.18).encode(x=x, x2=alt.X2("hi:Q"), y=alt.YDatum(0), y2=alt.Y2Datum(top)),
        alt.Chart(pd.DataFrame({"lo": [hist.kth_median], "series": [topk_name]})).mark_rule(strokeWidth=2.5).encode(
            x=x, color=color),
    ]
    if hist.threshold > 0:
        layers.append(alt.Chart(pd.DataFrame({"lo": [hist.threshold], "series": [threshold_name]})).mark_rule(
            strokeWidth=2.5, strokeDash=[6, 4]).encode(x=x, color=color))
    return _finish(alt.layer(*layers), f"Input magnitudes of {name}",
                   f"sparsity {hist.sparsity:.3f}: TopK keeps {hist.topk_kept:.1%} of entries, the threshold "
                   f"{hist.threshold_kept:.1%}; {hist.zero_share:.1%} exact zeros (not shown)", 420)


# --------------------------------------------------------------------------- evaluation results


def _method_of(label: str) -> str:
    return str(label).split(" ")[0]


def _method_scale(labels: Sequence[str]) -> alt.Scale:
    colors = [METHOD_COLORS.get(_method_of(label), SERIES_COLORS[i % len(SERIES_COLORS)])
              for i, label in enumerate(labels)]
    return alt.Scale(domain=list(labels), range=colors)


def perplexity_chart(rows: pd.DataFrame):
    """Perplexity of each method of one evaluation run (lower is better)."""
    frame = rows[["label", "ppl"]].assign(text=rows["ppl"].map(lambda p: f"{p:.2f}"))
    labels = frame["label"].tolist()
    x = alt.X("label:N", sort=labels, title=None, axis=alt.Axis(labelAngle=0, labelLimit=200))
    y = alt.Y("ppl:Q", title="perplexity")
    bars = alt.Chart(frame).mark_bar().encode(x=x, y=y, color=alt.Color("label:N", scale=_method_scale(labels),
                                                                          legend=None),
                                               tooltip=[alt.Tooltip("label:N"), alt.Tooltip("ppl:Q", format=".3f")])
    text = alt.Chart(frame).mark_text(dy=-8).encode(x=x, y=y, text=alt.Text("text:N"))
    return _finish(alt.layer(bars, text), "Perplexity (lower is better)", "", 320)


def with_spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Adds min / max tokens/s over the repeats (``decode_min``, ``prefill_max``, ...) from the ``*_runs`` columns."""
    rows = rows.copy()
    for phase in ("prefill", "decode"):
        column = f"{phase}_runs"
        if column in rows:
            runs = rows[column].apply(lambda r: list(r) if isinstance(r, (list, tuple)) and len(r) else [np.nan])
            rows[f"{phase}_min"] = runs.apply(min)
            rows[f"{phase}_max"] = runs.apply(max)
    return rows


def _speedup_text(speedup: float, noisy) -> str:
    if speedup is None or not np.isfinite(speedup):
        return ""
    return f"{speedup:.2f}x (noise)" if noisy is True else f"{speedup:.2f}x"


def throughput_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method and phase: median tokens/s, the min..max of the repeats, the decode speed-up label."""
    rows = with_spread(rows)
    labels = rows["short_label"] if "short_label" in rows else rows["label"]
    out = []
    for i, label in enumerate(labels):
        row = rows.iloc[i]
        for phase in ("prefill", "decode"):
            value = float(row[f"{phase}_tokens_per_s"])
            text = ""
            if phase == "decode" and "decode_speedup" in rows:
                text = _speedup_text(row["decode_speedup"], row.get("decode_within_noise"))
            out.append({"label": label, "phase": phase, "tokens_per_s": value,
                        "low": float(row.get(f"{phase}_min", value)), "high": float(row.get(f"{phase}_max", value)),
                        "text": text})
    return pd.DataFrame(out)


def throughput_chart(rows: pd.DataFrame):
    """Prefill and decode tokens/s of one throughput run (one panel each: their scales differ), each bar with the
    min..max of its repeats; the decode speed-up over dense is labelled, "(noise)" when the repeats cannot tell it
    from dense."""
    frame = throughput_frame(rows)
    labels = list(dict.fromkeys(frame["label"]))
    panels = []
    for phase in ("prefill", "decode"):
        part = frame[frame["phase"] == phase]
        x = alt.X("label:N", sort=labels, title=None, axis=alt.Axis(labelAngle=0, labelLimit=160))
        y = alt.Y("tokens_per_s:Q", title=f"{phase} tokens/s")
        bars = alt.Chart(part).mark_bar(opacity=0.85).encode(
            x=x, y=y, color=alt.Color("label:N", scale=_method_scale(labels), legend=None),
            tooltip=[alt.Tooltip("label:N"), alt.Tooltip("tokens_per_s:Q", title="median", format=".1f"),
                     alt.Tooltip("low:Q", title="min", format=".1f"), alt.Tooltip("high:Q", title="max", format=".1f")])
        whiskers = alt.Chart(part).mark_rule(strokeWidth=1.5, color="#333333").encode(
            x=x, y=alt.Y("low:Q"), y2=alt.Y2("high:Q"))
        text = alt.Chart(part).mark_text(dy=-10, fontSize=11).encode(x=x, y=alt.Y("high:Q"), text=alt.Text("text:N"))
        panels.append(alt.layer(bars, whiskers, text).properties(title=phase, width=260, height=260))
    chart = alt.hconcat(*panels).properties(
        title=_title("Throughput (tokens/s, higher is better)",
                     "bars: median; whiskers: min..max of the repeats; labels: decode speed-up over dense"),
        usermeta=SVG)
    return chart


def _log_ticks(values: Sequence[float]) -> list[float]:
    """1-2-5 ticks spanning the values, for readable log axes."""
    finite = [v for v in values if v and np.isfinite(v) and v > 0]
    if not finite:
        return [1, 10]
    low, high = np.floor(np.log10(min(finite))), np.ceil(np.log10(max(finite)))
    return [m * 10**e for e in range(int(low), int(high) + 1) for m in (1, 2, 5)]


def perplexity_vs_sparsity(rows: pd.DataFrame, title: str = "Perplexity against sparsity", subtitle: str = ""):
    """Perplexity (log) against effective sparsity, one line per budget label; dense as a dashed level.

    ``rows`` are perplexity results of one text and token count (label, method, sparsity, ppl, tokens).
    """
    ppl = rows[np.isfinite(rows["ppl"].astype(float))][["label", "method", "sparsity", "ppl", "tokens"]]
    ppl = ppl.drop_duplicates(["label", "sparsity", "ppl"])  # a repeated run (from the cache) is one point
    dense = ppl[ppl["method"] == "dense"]
    curves = ppl[ppl["method"] != "dense"]
    labels = list(dict.fromkeys(curves["label"]))
    ticks = _log_ticks(ppl["ppl"].tolist())
    x = alt.X("sparsity:Q", title="effective sparsity", scale=alt.Scale(zero=False))
    y = alt.Y("ppl:Q", title="perplexity (log)", scale=alt.Scale(type="log"), axis=alt.Axis(values=ticks, format="~g"))
    layers = []
    if labels:
        layers.append(alt.Chart(curves).mark_line(point=alt.OverlayMarkDef(size=60), strokeWidth=2).encode(
            x=x, y=y, color=alt.Color("label:N", scale=_method_scale(labels), sort=labels, legend=_legend_below()),
            tooltip=[alt.Tooltip("label:N"), alt.Tooltip("sparsity:Q", format=".3f"),
                     alt.Tooltip("ppl:Q", format=".3f"), alt.Tooltip("tokens:Q")]))
    if not dense.empty:
        level = dense.tail(1).assign(text=lambda d: d["ppl"].map(lambda p: f"dense {p:.2f}"))
        layers.append(alt.Chart(level).mark_rule(color=METHOD_COLORS["dense"], strokeDash=[5, 4]).encode(y=y))
        layers.append(alt.Chart(level).mark_text(align="left", dx=4, dy=-7, color=METHOD_COLORS["dense"]).encode(
            x=alt.XDatum(float(curves["sparsity"].min()) if labels else 0.0), y=y, text=alt.Text("text:N")))
    return _finish(alt.layer(*layers), title, subtitle, 400)
