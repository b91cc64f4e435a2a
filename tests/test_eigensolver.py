"""The two-stage eigensolver run on the CPU: band reduction, LAPACK band stage, Triton kernels (interpreted),
the multi-device scheduler, and alpha agreement with the float64 reference on the default model."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_core.band_reduction import band_to_dense, householder_panel, reduce_to_band
from acttail_core.eigensolver import SolverPlan, Unit, gram_matrix, solve
from acttail_core.lapack_band import band_eigenvalues, tridiagonal_eigenvalues, tridiagonalize
from acttail_core.projections import find_projections, weight_of
from acttail_core.spectra import XMIN_RULES, compute_eigenvalues, fit_power_law

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def symmetric(n: int, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(max(rank, 1), n, generator=gen, dtype=torch.float64)
    return w.T @ w if rank else torch.zeros(n, n, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 48),
    bandwidth=st.integers(1, 9),
    panels_per_group=st.integers(1, 4),
    rank=st.integers(0, 60),
    seed=st.integers(0, 10_000),
)
def test_band_reduction_preserves_eigenvalues(
    n: int, bandwidth: int, panels_per_group: int, rank: int, seed: int
) -> None:
    a = symmetric(n, rank, seed)
    expected = torch.linalg.eigvalsh(a)
    band = reduce_to_band(a.clone()[None].repeat(2, 1, 1), bandwidth, bandwidth * panels_per_group)
    assert band.shape == (2, bandwidth + 1, n)
    scale = max(1.0, float(expected.abs().max()))
    for dense in band_to_dense(band):
        assert float((torch.linalg.eigvalsh(dense) - expected).abs().max()) <= 1e-12 * scale * n


@pytest.mark.parametrize("make", [
    lambda n: torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(1))],
    lambda n: torch.diag(torch.arange(n, dtype=torch.float64)),
    lambda n: torch.ones(n, n, dtype=torch.float64),
])
def test_band_reduction_structured_matrices(make) -> None:
    """Permutations (zero diagonal blocks), diagonal matrices (nothing to annihilate) and rank one."""
    a = make(40)
    a = a + a.T
    band = reduce_to_band(a.clone()[None], 4, 8)
    np.testing.assert_allclose(torch.linalg.eigvalsh(band_to_dense(band)[0]), torch.linalg.eigvalsh(a), atol=1e-12)


def test_householder_panel_is_an_orthogonal_qr() -> None:
    panel = torch.randn(3, 30, 6, dtype=torch.float64)
    panel[1, :, 2] = 0  # a zero column
    r, v, tau = householder_panel(panel.clone())
    for k in range(3):
        q = torch.eye(30, dtype=torch.float64)
        for j in range(6):
            q = q @ (torch.eye(30, dtype=torch.float64) - tau[k, j] * torch.outer(v[k, :, j], v[k, :, j]))
        torch.testing.assert_close(q.T @ q, torch.eye(30, dtype=torch.float64))
        torch.testing.assert_close((q.T @ panel[k])[:6], r[k])
        assert float((q.T @ panel[k])[6:].abs().max()) < 1e-13


def test_lapack_band_stage_matches_scipy() -> None:
    from scipy.linalg import eig_banded, eigvalsh_tridiagonal

    rng = np.random.default_rng(0)
    band = rng.standard_normal((6, 200))
    np.testing.assert_allclose(band_eigenvalues(band), eig_banded(band, lower=True, eigvals_only=True), atol=1e-11)
    d, e = tridiagonalize(band)
    np.testing.assert_allclose(tridiagonal_eigenvalues(d, e), eigvalsh_tridiagonal(d, e), atol=1e-11)
    d1, e1 = tridiagonalize(band[:1])  # already diagonal
    np.testing.assert_array_equal(d1, band[0])
    assert not e1.any()


def test_lapack_band_stage_runs_in_threads() -> None:
    """The ctypes calls release the GIL; results from several threads at once are the same as serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    bands = [rng.standard_normal((9, 300)) for _ in range(6)]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(band_eigenvalues, bands))
    for band, values in zip(bands, parallel):
        np.testing.assert_array_equal(values, band_eigenvalues(band))


TRITON_CHECK = textwrap.dedent(
    """
    import numpy as np, torch
    from acttail_core.band_reduction import householder_panel, reduce_to_band
    from acttail_core.lapack_band import tridiagonal_eigenvalues, tridiagonalize
    from acttail_core import triton_spectra

    torch.manual_seed(0)
    for shape in [(2, 40, 8), (2, 5, 8), (1, 70, 16)]:
        panel = torch.randn(*shape, dtype=torch.float64)
        panel[0, :, 1] = 0
        r1, v1, t1 = householder_panel(panel.clone())
        r2, v2, t2 = triton_spectra.panel_qr(panel.clone())
        assert torch.allclose(r1.abs(), r2.abs(), atol=1e-12), shape  # R is unique up to row signs
        assert torch.allclose(r2.mT @ r2, panel.mT @ panel, atol=1e-11), shape
    w = torch.randn(2, 70, 50, dtype=torch.float64) * 0.02
    grams = w.mT @ w
    grams[1, :, 7] = grams[1, 7, :] = 0  # a zero eigenvalue
    expected = torch.linalg.eigvalsh(grams).clamp_min(0).numpy()
    band = reduce_to_band(grams.clone(), 4, 8, panel_qr=triton_spectra.panel_qr).numpy()
    tri = [tridiagonalize(b) for b in band]
    d = torch.tensor(np.stack([t[0] for t in tri])); e = torch.tensor(np.stack([t[1] for t in tri]))
    got = triton_spectra.tridiagonal_eigenvalues(d, e).numpy().astype(np.float64)
    # float32 rounding down of each eigenvalue: within one float32 ulp (plus float64 noise near zero)
    assert np.all(np.abs(got - expected) <= 2.0 ** -23 * expected + 1e-14), np.abs(got - expected).max()
    assert np.all(got <= expected * (1 + 1e-12) + 1e-14)
    print("ok")
    """
)


@pytest.mark.slow  # Triton kernels in a subprocess, under the interpreter
def test_triton_kernels_in_the_interpreter() -> None:
    """The Triton panel QR and bisection kernels, run on the CPU by Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def _units(weights: list[torch.Tensor], per_unit: int, seen: list) -> list[Unit]:
    def loader(indices):
        def load(device):
            seen.append((threading.current_thread().name, device))
            time.sleep(0.05)  # like reading a layer from disk: the other device thread takes the next unit
            return [(i, weights[i]) for i in indices]
        return load

    groups = [list(range(i, min(i + per_unit, len(weights)))) for i in range(0, len(weights), per_unit)]
    return [Unit(loader(g), label=f"unit {k}") for k, g in enumerate(groups)]


def test_solver_on_two_devices_matches_float64() -> None:
    """Two device threads (both CPU here) share the units; every eigenvalue matches LAPACK's float64 ones."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(70, 40, generator=gen) for _ in range(5)]
    weights += [torch.randn(30, 55, generator=gen) for _ in range(4)]
    seen: list = []
    messages: list = []
    plan = SolverPlan(bandwidth=4, group=8, tridiagonal="cpu", panel="torch", min_dim=16)
    progress = lambda done, total, message: messages.append((done, total, message))  # noqa: E731
    results = solve(_units(weights, 2, seen), len(weights), [CPU, CPU], plan, progress)
    assert sorted(results) == list(range(len(weights)))
    for i, w in enumerate(weights):
        expected = torch.linalg.eigvalsh(gram_matrix(w)).numpy()
        np.testing.assert_allclose(results[i], expected, rtol=0, atol=1e-10 * expected.max())
    assert len({name for name, _ in seen}) == 2, "both device threads took work"
    assert messages[-1][:2] == (len(weights), len(weights)) and "eigenvalues" in messages[-1][2]


def test_solver_raises_a_worker_error() -> None:
    def broken(device):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        solve([Unit(broken)], 1, [CPU, CPU], SolverPlan(tridiagonal="cpu", panel="torch"))


def test_small_matrices_use_batched_eigvalsh() -> None:
    weights = [torch.randn(12, 7) for _ in range(3)]
    results = solve(_units(weights, 3, []), 3, [CPU], SolverPlan(tridiagonal="cpu", panel="torch"))
    for i, w in enumerate(weights):
        np.testing.assert_allclose(results[i], torch.linalg.eigvalsh(gram_matrix(w)).numpy(), atol=1e-12)


@pytest.fixture(scope="module")
def default_reference(default_loaded) -> list[np.ndarray]:
    """The default model's eigenvalues by the float64 CPU path (LAPACK, one matrix at a time)."""
    return compute_eigenvalues(default_loaded.model, find_projections(default_loaded.model))


def test_default_model_alphas_match_float64_path(default_loaded, default_reference) -> None:
    """The two-stage solver on the default model (a sample of layers across depth): every alpha within
    0.5% of the float64 CPU path for every xmin rule. Eigenvalues are rounded down to float32 as the
    GPU bisection returns them."""
    chosen = [i for i, p in enumerate(find_projections(default_loaded.model)) if p.layer in (0, 15, 29)]
    projections = [find_projections(default_loaded.model)[i] for i in chosen]
    reference = [default_reference[i] for i in chosen]
    seen: list = []
    weights = [weight_of(default_loaded.model, p) for p in projections]
    plan = SolverPlan(bandwidth=8, group=64, tridiagonal="cpu", panel="torch", min_dim=2)
    results = solve(_units(weights, 7, seen), len(weights), [CPU], plan)
    worst = 0.0
    for i, expected in enumerate(reference):
        got = results[i]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * expected.max())
        as_float32 = np.nextafter(got.astype(np.float32), np.float32(0))  # one ulp below: the worst rounding
        for rule in XMIN_RULES:
            alpha = fit_power_law(expected, rule).alpha
            for values in (got, as_float32.astype(np.float64)):
                worst = max(worst, abs(fit_power_law(values, rule).alpha - alpha) / alpha)
    assert worst < 0.005, worst


def test_default_model_float32_eigenvalues_keep_alpha(default_reference) -> None:
    """All 210 projections: eigenvalues rounded down to float32 (the bisection's precision) move no alpha
    by 0.5% under any rule."""
    assert len(default_reference) == 210
    worst = 0.0
    for expected in default_reference:
        rounded = np.nextafter(expected.astype(np.float32), np.float32(0)).astype(np.float64)
        for rule in XMIN_RULES:
            alpha = fit_power_law(expected, rule).alpha
            worst = max(worst, abs(fit_power_law(rounded, rule).alpha - alpha) / alpha)
    assert worst < 0.005, worst


def test_solver_falls_back_when_triton_kernels_cannot_run(caplog, monkeypatch) -> None:
    """A Triton kernel that fails to build or launch on some GPU: the solver says so and finishes with PyTorch
    panels and LAPACK dsterf, with the same eigenvalues."""
    from acttail_core import triton_spectra

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(triton_spectra, "panel_qr", broken)
    monkeypatch.setattr(triton_spectra, "tridiagonal_eigenvalues", broken)
    weights = [torch.randn(50, 30, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with caplog.at_level("WARNING", logger="acttail_core.eigensolver"):
        results = solve(_units(weights, 3, []), 3, [CPU], SolverPlan(bandwidth=4, group=8, min_dim=2))
    assert "Triton panel QR failed" in caplog.text and "Triton bisection failed" in caplog.text
    for i, w in enumerate(weights):
        np.testing.assert_allclose(results[i], torch.linalg.eigvalsh(gram_matrix(w)).numpy(), atol=1e-10)
