"""Unit tests of the dashboard's chart builders (Altair / Vega-Lite specs) and the engine helpers they use."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from acttail_core.activations import InputSample, magnitude_histogram
from acttail_core.allocation import AllocationSettings, allocate, allocation_curves, uniform_budget
from acttail_core.models import from_module
from acttail_core.spectra import compute_spectra, esd_density, tail_density
from app import charts
from tests.conftest import byte_tokenizer, make_tiny_family


@pytest.fixture
def tiny_spectra(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    return compute_spectra(tiny_loaded)


def spec(chart) -> dict:
    return chart.to_dict()


def data(chart, column: str) -> pd.DataFrame:
    """The chart's dataset that has ``column``."""
    for rows in spec(chart).get("datasets", {}).values():
        frame = pd.DataFrame(rows)
        if column in frame:
            return frame
    raise AssertionError(f"no dataset with {column!r}")


def layers(chart) -> list[dict]:
    d = spec(chart)
    return d.get("layer", [d])


def test_every_chart_renders_as_svg_with_a_title(tiny_spectra):
    budget = allocate(tiny_spectra, 0.6, AllocationSettings(temperature=1.0))
    for chart in (charts.alpha_heatmap(tiny_spectra), charts.sparsity_heatmap(budget, "t"),
                  charts.esd_figure(tiny_spectra.entries[0]), charts.alpha_by_type(tiny_spectra)):
        d = spec(chart)
        assert d["usermeta"] == charts.SVG and d["title"]["text"]


def test_alpha_heatmap_cells_hover_click_and_highlight(tiny_spectra):
    chart = charts.alpha_heatmap(tiny_spectra, highlight=(1, "up"))
    cells, marks, highlight = layers(chart)
    assert cells["encoding"]["x"]["sort"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert cells["encoding"]["x"]["axis"]["orient"] == "top"
    frame = data(chart, "alpha")
    entry = tiny_spectra.by_name()["model.layers.1.mlp.up_proj"]
    assert frame.set_index("name").loc[entry.name, "alpha"] == pytest.approx(entry.alpha)
    scale = cells["encoding"]["color"]["scale"]
    assert scale["scheme"] == "viridis"
    assert scale["domain"] == pytest.approx(list(charts.alpha_color_range(tiny_spectra)))
    tooltip = {t["field"] for t in cells["encoding"]["tooltip"]}
    assert {"xmin", "ks_distance", "alpha_text", "shape"} <= tooltip
    # a click selects a cell by its layer and type (Streamlit reports the "cell" selection)
    assert spec(chart)["params"][0]["name"] == "cell"
    assert spec(chart)["params"][0]["select"]["fields"] == ["layer", "type"]
    outlined = [rows for rows in spec(chart)["datasets"].values() if len(rows) == 1]
    assert outlined == [[{"layer": 1, "type": "up"}]] and highlight["mark"]["stroke"] == "#ff2b2b"


def test_alpha_colour_scale_marks_what_it_clips(default_loaded):
    spectra = compute_spectra(default_loaded)
    low, high = charts.alpha_color_range(spectra)
    alphas = spectra.alphas()
    above, below = int((alphas > high).sum()), int((alphas < low).sum())
    assert above + below == 10  # the count on the default model (mid rule)
    chart = charts.alpha_heatmap(spectra)
    marks = data(chart, "mark")["mark"]
    assert (marks == charts.ABOVE).sum() == above and (marks == charts.BELOW).sum() == below
    legend = layers(chart)[0]["encoding"]["color"]["legend"]
    assert "'≤'" in legend["labelExpr"] and "'≥'" in legend["labelExpr"]
    note = charts.alpha_range_note(spectra)
    assert "10 of 210 cells" in note and f"{alphas.min():.3f}-{alphas.max():.3f}" in note
    assert f"{low:.3f}-{high:.3f}" in note and spec(chart)["title"]["subtitle"] == note


def test_alpha_colour_range_ignores_outliers_and_says_nothing_when_nothing_is_clipped(tiny_spectra):
    low, high = charts.alpha_color_range(tiny_spectra)
    alphas = tiny_spectra.alphas()
    assert low >= alphas.min() and high <= alphas.max() and low < high
    for entry in tiny_spectra.entries:
        entry.alpha = 3.0
    assert charts.alpha_range_note(tiny_spectra) == ""
    assert "labelExpr" not in layers(charts.alpha_heatmap(tiny_spectra))[0]["encoding"]["color"]["legend"]


def test_budget_heatmap_spans_its_values_and_the_difference_map_is_centred(tiny_spectra):
    budget = allocate(tiny_spectra, 0.6, AllocationSettings(temperature=1.0))
    uniform = uniform_budget(tiny_spectra.projections(), 0.6, "tiny", tiny_spectra.fingerprint)
    scale = spec(charts.sparsity_heatmap(budget, "t"))["encoding"]["color"]["scale"]
    assert "domain" not in scale and scale["zero"] is False  # the data's own extent, not a washed-out 0..1
    flat = spec(charts.sparsity_heatmap(uniform, "t"))["encoding"]["color"]["scale"]["domain"]
    assert flat[0] < 0.6 < flat[1]  # a uniform budget still gets a readable range
    chart = charts.difference_heatmap(budget, uniform, "d")
    frame = data(chart, "difference").set_index("name")
    first = budget.projections[0]
    assert frame.loc[first.name, "difference"] == pytest.approx(first.sparsity - 0.6)
    scale = spec(chart)["encoding"]["color"]["scale"]
    assert scale["domainMid"] == 0 and "domain" not in scale  # centred on 0, spanning the data
    assert scale["scheme"] == "redblue" and scale["reverse"] is True  # diverging: blue keeps more, red sparser
    assert spec(charts.difference_heatmap(budget, uniform, "d", limit=0.5))["encoding"]["color"]["scale"]["domain"] \
        == [-0.5, 0.5]
    assert spec(charts.difference_heatmap(uniform, uniform, "d"))["encoding"]["color"]["scale"]["domain"] \
        == [-0.01, 0.01]


def test_a_slider_move_changes_the_data_not_the_spec(tiny_spectra):
    """Stable specs let the page update a chart's data in place instead of rebuilding it."""
    specs = []
    for target in (0.5, 0.51):
        budget = allocate(tiny_spectra, target, AllocationSettings(temperature=1.0))
        uniform = uniform_budget(tiny_spectra.projections(), target, "tiny", tiny_spectra.fingerprint)
        made = [charts.to_spec(chart) for chart in (
            charts.sparsity_heatmap(budget, "t", subtitle="s"), charts.difference_heatmap(budget, uniform, "d"),
            charts.lines_by_layer(budget.to_frame(), "sparsity", "t", "s"),
            charts.sparsity_by_type({"a": budget, "uniform": uniform}, target))]
        specs.append(made)
    for before, after in zip(*specs):
        assert any(not b.equals(a) for b, a in zip(before["datasets"].values(), after["datasets"].values()))
        assert {k: v for k, v in before.items() if k != "datasets"} == \
            {k: v for k, v in after.items() if k != "datasets"}
        assert list(before["datasets"]) == [f"data{i}" for i in range(len(before["datasets"]))]
        assert all(isinstance(frame, pd.DataFrame) for frame in before["datasets"].values())  # straight to Arrow
        assert "config" not in before


def test_budgets_per_type_and_per_layer(tiny_spectra):
    budget = allocate(tiny_spectra, 0.6, AllocationSettings(temperature=1.0, group="type"))
    uniform = uniform_budget(tiny_spectra.projections(), 0.6, "tiny", tiny_spectra.fingerprint)
    chart = charts.sparsity_by_type({"acttail": budget, "uniform": uniform}, target=0.6)
    frame = data(chart, "label")
    assert list(dict.fromkeys(frame["label"])) == ["acttail", "uniform"]
    assert np.allclose(frame[frame["label"] == "uniform"]["sparsity"], 0.6)
    assert layers(chart)[0]["encoding"]["y"]["scale"]["zero"] is False  # zoomed to the values, not 0..1
    assert layers(chart)[1]["mark"]["type"] == "rule"  # the target
    by_layer = data(charts.sparsity_by_layer({"acttail": budget}, "v"), "layer")
    v = [e.sparsity for e in budget.projections if e.type == "v"]
    assert by_layer["sparsity"].tolist() == pytest.approx(v)
    lines = charts.lines_by_layer(budget.to_frame(), "sparsity", "t", "sparsity")
    assert spec(lines)["encoding"]["color"]["scale"]["domain"] == ["q", "k", "v", "o", "gate", "up", "down"]


def test_alpha_vs_sparsity_draws_points_on_their_curve(tiny_spectra):
    projections = tiny_spectra.projections()
    curves = allocation_curves(tiny_spectra.alphas(), projections, 0.5, AllocationSettings(temperature=2.0))
    chart = charts.alpha_vs_sparsity(curves, projections, "t")
    line, points = layers(chart)
    assert line["mark"]["type"] == "line" and points["mark"]["type"] == "circle"
    assert points["encoding"]["x"]["title"] == "alpha"
    assert sorted(data(chart, "name")["sparsity"]) == pytest.approx(sorted(curves.sparsity))
    assert data(chart, "curve")["curve"].unique().tolist() == ["all projections"]


def test_esd_figure_draws_histogram_fit_and_xmin(tiny_spectra):
    entry = next(e for e in tiny_spectra.entries if np.isfinite(e.alpha))
    chart = charts.esd_figure(entry)
    domain = layers(chart)[0]["encoding"]["color"]["scale"]["domain"]
    assert domain[0] == "ESD (density)" and domain[1].startswith("power-law fit") and domain[2].startswith("xmin")
    assert [layer["mark"]["type"] for layer in layers(chart)] == ["rect", "line", "rule"]
    assert layers(chart)[0]["encoding"]["x"]["scale"]["type"] == "log"
    assert layers(chart)[0]["encoding"]["y"]["scale"]["type"] == "log"


def test_esd_density_integrates_to_one_and_tail_matches_its_share(default_loaded):
    spectra = compute_spectra(default_loaded)
    entry = spectra.by_name()["model.layers.5.mlp.gate_proj"]
    edges, density = esd_density(entry)
    assert (density * np.diff(edges)).sum() == pytest.approx(1.0)
    lambdas, fitted = tail_density(entry, points=4000)
    # The fitted density integrates to the tail's share of the eigenvalues.
    integral = np.trapezoid(fitted, lambdas) if hasattr(np, "trapezoid") else np.trapz(fitted, lambdas)
    share = entry.tail_size / np.count_nonzero(entry.eigenvalues > 1e-5)
    upper_mass = 1 - (entry.lambda_max / entry.xmin) ** (1 - entry.alpha)  # the tail is cut at lambda_max
    assert integral == pytest.approx(share * upper_mass, rel=1e-3)


def test_ordered_types_puts_known_types_first():
    assert charts.ordered_types(["down", "x", "q", "up"]) == ["q", "up", "down", "x"]


def test_activation_histogram_marks_both_cuts():
    rng = np.random.default_rng(0)
    sample = InputSample("p", "demo", torch.from_numpy(np.abs(rng.standard_normal((64, 100))).astype(np.float32)))
    hist = magnitude_histogram(sample, 0.6)
    chart = charts.activation_histogram(hist, "p")
    bars, band, topk, threshold = layers(chart)
    assert [layer["mark"]["type"] for layer in (band, bars, topk, threshold)] == ["rect", "rect", "rule", "rule"]
    rules = [frame for frame in (pd.DataFrame(rows) for rows in spec(chart)["datasets"].values()) if len(frame) == 1]
    cuts = sorted(float(frame["lo"].iloc[0]) for frame in rules if "series" in frame)
    assert cuts == pytest.approx(sorted([hist.kth_median, hist.threshold]))
    band_data = next(frame for frame in rules if "series" not in frame)
    assert (band_data["lo"].iloc[0], band_data["hi"].iloc[0]) == pytest.approx((hist.kth_low, hist.kth_high))


def test_throughput_chart_shows_the_spread_and_marks_noise():
    rows = pd.DataFrame({
        "label": ["dense", "acttail"], "method": ["dense", "acttail"],
        "prefill_tokens_per_s": [100.0, 90.0], "prefill_runs": [[80.0, 100.0, 120.0], [85.0, 90.0, 95.0]],
        "decode_tokens_per_s": [10.0, 18.0], "decode_runs": [[9.0, 10.0, 11.0], [5.0, 18.0, 30.0]],
        "decode_speedup": [1.0, 1.8], "decode_within_noise": [None, True],
    })
    frame = charts.throughput_frame(rows).set_index(["label", "phase"])
    assert (frame.loc[("dense", "prefill"), "low"], frame.loc[("dense", "prefill"), "high"]) == (80.0, 120.0)
    assert (frame.loc[("acttail", "decode"), "low"], frame.loc[("acttail", "decode"), "high"]) == (5.0, 30.0)
    assert frame.loc[("acttail", "decode"), "text"] == "1.80x (noise)"  # a masked-path "speed-up" is noise
    assert frame.loc[("dense", "decode"), "text"] == "1.00x"
    chart = spec(charts.throughput_chart(rows))
    assert [panel["title"] for panel in chart["hconcat"]] == ["prefill", "decode"]
    assert [layer["mark"]["type"] for layer in chart["hconcat"][1]["layer"]] == ["bar", "rule", "text"]


def test_perplexity_against_sparsity_one_line_per_budget_and_dense_level():
    rows = pd.DataFrame({
        "label": ["dense", "uniform", "uniform", "acttail (T=0.15)", "acttail (T=0.15)"],
        "method": ["dense", "uniform", "uniform", "acttail", "acttail"],
        "sparsity": [0.0, 0.7, 0.3, 0.3, 0.7], "ppl": [20.0, 90.0, 25.0, 24.0, 60.0], "tokens": [127] * 5,
    })
    chart = charts.perplexity_vs_sparsity(rows)
    lines, rule, _ = layers(chart)
    assert lines["encoding"]["y"]["scale"]["type"] == "log" and lines["encoding"]["x"]["title"] == "effective sparsity"
    assert lines["encoding"]["color"]["scale"]["domain"] == ["uniform", "acttail (T=0.15)"]
    assert lines["encoding"]["color"]["scale"]["range"][0] == charts.METHOD_COLORS["uniform"]
    assert rule["mark"]["type"] == "rule" and data(chart, "text")["ppl"].tolist() == [20.0]
    # A run repeated from the cache (same label, sparsity and perplexity) draws one point, not two.
    repeated = charts.perplexity_vs_sparsity(pd.concat([rows, rows.iloc[[1]]]))
    assert len(data(repeated, "label").query("label == 'uniform'")) == 2


def test_results_charts_build():
    ppl = pd.DataFrame({"label": ["dense", "uniform @ 0.50"], "method": ["dense", "uniform"], "ppl": [20.0, 30.0]})
    assert data(charts.perplexity_chart(ppl), "ppl")["ppl"].tolist() == [20.0, 30.0]
    tps = pd.DataFrame({"label": ["dense"], "prefill_tokens_per_s": [100.0], "decode_tokens_per_s": [10.0]})
    assert len(spec(charts.throughput_chart(tps))["hconcat"]) == 2


def test_params_by_type(tiny_spectra):
    frame = data(charts.params_by_type(tiny_spectra.projections()), "millions")
    assert frame["type"].tolist() == ["q", "k", "v", "o", "gate", "up", "down"]
    total = sum(p.params for p in tiny_spectra.projections())
    q = sum(p.params for p in tiny_spectra.projections() if p.type == "q")
    assert frame["share"].iloc[0] == f"{q / total:.0%}"


def test_experts_share_a_cell_that_shows_their_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    spectra = compute_spectra(from_module(make_tiny_family("mixtral"), byte_tokenizer()))
    cells = data(charts.alpha_heatmap(spectra), "alpha_text")
    assert len(cells) == 2 * 7 and set(cells["type"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    experts = [e.alpha for e in spectra.entries if e.layer == 1 and e.type == "up"]
    up = cells[(cells["layer"] == 1) & (cells["type"] == "up")].iloc[0]
    assert len(experts) == 4 and up["alpha"] == pytest.approx(np.mean(experts))
    assert up["name"] == "model.layers.1.mlp.experts (4 experts)"
    assert up["alpha_text"] == f"mean {np.mean(experts):.3f} of 4 experts"
    budget = allocate(spectra, 0.6, AllocationSettings())
    downs = [e.sparsity for e in budget.projections if e.layer == 0 and e.type == "down"]
    for chart in (charts.sparsity_heatmap(budget, "t"), charts.difference_heatmap(budget, budget, "t")):
        frame = data(chart, "sparsity_text")
        down = frame[(frame["layer"] == 0) & (frame["type"] == "down")]
        assert len(down) == 1 and down["sparsity"].iloc[0] == pytest.approx(np.mean(downs))
    lines = data(charts.lines_by_layer(charts.spectra_frame(spectra), "alpha", "t", "alpha"), "value")
    assert len(lines) == 2 * 7  # one point per layer and type: the experts' mean
