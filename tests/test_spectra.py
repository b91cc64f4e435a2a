"""Spectra: Hill/KS fits on known power laws, the model path, weightwatcher agreement, the cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from acttail_core import spectra as spectra_mod
from acttail_core.errors import ActTailError, SpectraError
from acttail_core.spectra import compute_spectra, fit_power_law, gram_eigenvalues
from acttail_core.spectra_io import load_spectra, save_spectra


def pareto_sample(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """n draws from p(x) ~ x^-alpha on [xmin, inf) by inverse CDF."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def matrix_with_spectrum(eigenvalues: np.ndarray, out_features: int, seed: int) -> torch.Tensor:
    """A random-basis matrix W whose W^T W has exactly the given eigenvalues."""
    n = len(eigenvalues)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.as_tensor(np.sqrt(eigenvalues))) @ v.T


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
@pytest.mark.parametrize("rule", ["ks", "mid"])
def test_recovers_known_power_law_alpha(alpha: float, rule: str) -> None:
    eigs = pareto_sample(alpha, 3000, seed=int(alpha * 10))
    fit = fit_power_law(eigs, rule)
    assert abs(fit.alpha - alpha) / alpha < 0.05, fit


def test_recovers_alpha_through_a_matrix() -> None:
    """The full path: weight matrix -> Gram eigenvalues -> fit (eigenvalues below the Pareto floor sit in the bulk)."""
    tail = pareto_sample(3.0, 400, seed=7, xmin=10.0)
    bulk = np.random.default_rng(8).uniform(0.5, 9.0, 112)
    w = matrix_with_spectrum(np.concatenate([bulk, tail]), out_features=700, seed=9)
    eigs = gram_eigenvalues(w)
    assert eigs.shape == (512,)
    np.testing.assert_allclose(np.sort(eigs.numpy()), np.sort(np.concatenate([bulk, tail])), rtol=1e-8)
    fit = fit_power_law(eigs, "ks")
    assert abs(fit.alpha - 3.0) / 3.0 < 0.05
    assert fit.xmin >= 9.0  # the tail start is found above the bulk


def test_peak_rule_searches_near_histogram_peak() -> None:
    eigs = pareto_sample(3.0, 3000, seed=3)
    fit = fit_power_law(eigs, "peak")
    assert np.isfinite(fit.alpha) and fit.alpha > 1
    assert fit.xmin <= 1.5 * np.quantile(eigs, 0.5)


def test_gram_uses_smaller_side() -> None:
    w = torch.randn(30, 80, dtype=torch.float64)
    eigs = gram_eigenvalues(w)
    assert eigs.shape == (30,)
    np.testing.assert_allclose(eigs.numpy(), np.sort(torch.linalg.svdvals(w).numpy() ** 2), rtol=1e-9)


def test_unknown_rule_is_a_clear_error() -> None:
    with pytest.raises(ActTailError, match="xmin rule"):
        fit_power_law(np.arange(1, 10.0), "bogus")


def test_tiny_model_end_to_end(tiny_loaded, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    result = compute_spectra(tiny_loaded, "ks")
    assert len(result.entries) == 2 * 7
    assert [e.type for e in result.entries[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    for entry in result.entries:
        assert np.isfinite(entry.alpha) and entry.alpha > 1
        assert entry.num_eigs == min(entry.in_features, entry.out_features) == len(entry.eigenvalues)
        assert entry.lambda_max == pytest.approx(float(entry.eigenvalues.max()), rel=1e-6)
        assert 0 < entry.tail_size <= entry.num_eigs
    frame = result.to_frame()
    assert set(["name", "layer", "type", "alpha", "xmin", "ks_distance", "params"]) <= set(frame.columns)


def test_cache_second_run_does_no_eigendecomposition(tiny_loaded, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    calls = {"n": 0}
    real = spectra_mod.gram_eigenvalues

    def counting(weight):
        calls["n"] += 1
        return real(weight)

    monkeypatch.setattr(spectra_mod, "gram_eigenvalues", counting)
    first = compute_spectra(tiny_loaded, "ks")
    assert calls["n"] == 14
    second = compute_spectra(tiny_loaded, "ks")
    assert calls["n"] == 14, "second run recomputed eigenvalues"
    np.testing.assert_array_equal(first.alphas(), second.alphas())
    # another xmin rule reuses the cached eigenvalues too
    compute_spectra(tiny_loaded, "mid")
    assert calls["n"] == 14


def test_corrupt_or_mismatched_cache_is_recomputed(tiny_loaded, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    first = compute_spectra(tiny_loaded, "ks")
    cache_file = next((tmp_path / "spectra").glob("*.json"))
    cache_file.write_text(cache_file.read_text()[:100])  # truncated: corrupt
    again = compute_spectra(tiny_loaded, "ks")
    np.testing.assert_allclose(first.alphas(), again.alphas())
    data = json.loads(cache_file.read_text())
    data["entries"][0]["name"] = "model.layers.0.other"  # valid file, wrong model
    cache_file.write_text(json.dumps(data))
    third = compute_spectra(tiny_loaded, "ks")
    assert third.entries[0].name == first.entries[0].name


def test_save_load_roundtrip_and_corruption(tiny_loaded, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    original = compute_spectra(tiny_loaded, "mid")
    path = save_spectra(original, tmp_path / "s.json")
    loaded = load_spectra(path)
    assert loaded.projections() == original.projections()
    np.testing.assert_array_equal(loaded.alphas(), original.alphas())
    np.testing.assert_array_equal(loaded.entries[3].eigenvalues, original.entries[3].eigenvalues)
    path.write_text("{not json")
    with pytest.raises(SpectraError, match="corrupt"):
        load_spectra(path)
    path.write_text(json.dumps({"kind": "acttail-spectra", "schema_version": 1, "entries": [{"name": "x"}]}))
    with pytest.raises(SpectraError, match="corrupt"):
        load_spectra(path)


def test_default_model_matches_weightwatcher(default_loaded) -> None:
    """Our `ks` rule is weightwatcher 0.7's default fit: alphas agree (median relative difference < 2%)."""
    ours = compute_spectra(default_loaded, "ks")
    assert len(ours.entries) == 210
    reference = spectra_mod.weightwatcher_fits(default_loaded.model, ours.projections())
    theirs = np.array([fit.alpha for fit in reference])
    relative = np.abs(ours.alphas() - theirs) / np.abs(theirs)
    assert np.median(relative) < 0.02
