"""Unit tests of the dashboard's figure builders and the engine's plotting helpers they use."""
from __future__ import annotations

import numpy as np
import pytest

from acttail_core.allocation import AllocationSettings, allocate, uniform_budget
from acttail_core.spectra import compute_spectra, esd_density, tail_density
from app import charts


@pytest.fixture
def tiny_spectra(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    return compute_spectra(tiny_loaded)


def test_alpha_heatmap_layout_colours_and_hover(tiny_spectra):
    fig = charts.alpha_heatmap(tiny_spectra, highlight=(1, "up"))
    heatmap, cells = fig.data
    assert list(heatmap.x) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert list(heatmap.y) == ["0", "1"]
    z = np.asarray(heatmap.z)
    assert z.shape == (2, 7)
    entry = tiny_spectra.by_name()["model.layers.1.mlp.up_proj"]
    assert z[1, 5] == pytest.approx(entry.alpha)
    assert heatmap.colorscale[0][1] == charts.alpha_heatmap(tiny_spectra).data[0].colorscale[0][1]  # Viridis, always
    assert (heatmap.zmin, heatmap.zmax) == pytest.approx(charts.alpha_color_range(tiny_spectra))
    assert heatmap.colorbar.title.text == "alpha"
    # the invisible markers carry hover text for every cell and make cells clickable
    assert len(cells.x) == 14 and "xmin" in cells.hovertemplate and "KS distance" in cells.hovertemplate
    assert fig.layout.clickmode == "event+select"
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == pytest.approx(4.5)


def test_alpha_color_range_ignores_outliers(tiny_spectra):
    low, high = charts.alpha_color_range(tiny_spectra)
    alphas = tiny_spectra.alphas()
    assert low >= alphas.min() and high <= alphas.max() and low < high


def test_sparsity_heatmaps_share_one_fixed_scale(tiny_spectra):
    budget = allocate(tiny_spectra, 0.6, AllocationSettings())
    uniform = uniform_budget(tiny_spectra.projections(), 0.6, "tiny", tiny_spectra.fingerprint)
    for b in (budget, uniform):
        heatmap = charts.sparsity_heatmap(b, "t").data[0]
        assert (heatmap.zmin, heatmap.zmax) == (0.0, 1.0) and heatmap.colorbar.title.text == "sparsity"
    z = np.asarray(charts.sparsity_heatmap(budget, "t").data[0].z)
    assert z[0, 0] == pytest.approx(budget.projections[0].sparsity)
    bars = charts.mean_sparsity_by_type({"acttail": budget, "uniform": uniform})
    assert [trace.name for trace in bars.data] == ["acttail", "uniform"]
    assert np.allclose(bars.data[1].y, 0.6)


def test_esd_figure_draws_histogram_fit_and_xmin(tiny_spectra):
    entry = tiny_spectra.entries[0]
    fig = charts.esd_figure(entry)
    names = [trace.name for trace in fig.data]
    assert names[0] == "ESD (density)"
    if np.isfinite(entry.alpha):
        assert any(name.startswith("power-law fit") for name in names)
        assert any(name.startswith("xmin") for name in names)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


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


def test_results_charts_build():
    import pandas as pd

    ppl = pd.DataFrame({"label": ["dense", "uniform @ 0.50"], "method": ["dense", "uniform"], "ppl": [20.0, 30.0]})
    assert charts.perplexity_chart(ppl).data[0].y.tolist() == [20.0, 30.0]
    tps = pd.DataFrame({"label": ["dense"], "prefill_tokens_per_s": [100.0], "decode_tokens_per_s": [10.0]})
    assert len(charts.throughput_chart(tps).data) == 2
    history = pd.DataFrame(
        {"run": [1, 1, 2], "kind": ["perplexity"] * 3, "label": ["dense", "x", "dense"], "method": ["dense", "acttail", "dense"],
         "ppl": [20.0, 25.0, 20.0], "target_sparsity": [0.5] * 3, "corpus": ["demo"] * 3, "tokens": [1024] * 3}
    )
    assert [trace.name for trace in charts.history_chart(history).data] == ["dense", "acttail"]


def test_experts_share_a_cell_that_shows_their_mean(tmp_path, monkeypatch):
    from acttail_core.models import from_module
    from tests.conftest import byte_tokenizer, make_tiny_family

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    spectra = compute_spectra(from_module(make_tiny_family("mixtral"), byte_tokenizer()))
    heatmap, cells = charts.alpha_heatmap(spectra).data
    assert list(heatmap.x) == ["q", "k", "v", "o", "gate", "up", "down"] and np.asarray(heatmap.z).shape == (2, 7)
    experts = [e.alpha for e in spectra.entries if e.layer == 1 and e.type == "up"]
    assert len(experts) == 4 and np.asarray(heatmap.z)[1, 5] == pytest.approx(np.mean(experts))
    hover = [tuple(c) for c in cells.customdata if c[-1] == "model.layers.1.mlp.experts (4 experts)"]
    assert len(hover) == 3 and any(c[0] == f"mean {np.mean(experts):.3f} of 4 experts" for c in hover)
    budget = allocate(spectra, 0.6, AllocationSettings())
    z = np.asarray(charts.sparsity_heatmap(budget, "t").data[0].z)
    downs = [e.sparsity for e in budget.projections if e.layer == 0 and e.type == "down"]
    assert z[0, 6] == pytest.approx(np.mean(downs))
