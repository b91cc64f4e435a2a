"""Stage 2: the empirical spectral density (ESD) of each projection and its tail exponent alpha.

For a weight ``W`` (out x in) the ESD is the set of eigenvalues of the smaller
Gram matrix (``W^T W`` or ``W W^T``), i.e. the squared singular values of W.
The tail ``p(lambda) ~ lambda^-alpha`` for ``lambda >= xmin`` is fitted with the
continuous maximum-likelihood (Hill) estimator

    alpha = 1 + n / sum_{lambda_j >= xmin} ln(lambda_j / xmin),   n = tail size,

and ``xmin`` is chosen by one of three rules (as weightwatcher and AlphaPruning define them):

* ``ks``   - every eigenvalue but the largest is tried as xmin; the one with the
  smallest Kolmogorov-Smirnov distance
  ``D = max |1 - (lambda/xmin)^(1-alpha) - (j - i)/n|`` wins. This is exactly
  weightwatcher 0.7's default fit (its ``WWFit``), so the two agree.
* ``peak`` - as ``ks`` but xmin is searched only in [0.95, 1.5] x the peak of a
  100-bin histogram of log10(lambda) (AlphaPruning's ``xmin_peak``, with the
  range taken in linear units as weightwatcher intends).
* ``mid``  - xmin is the median eigenvalue (AlphaPruning's ``PL_Alpha_Hill``).

Eigenvalues at or below ``EVALS_THRESH`` (1e-5, weightwatcher's cut) are dropped
before fitting. Eigenvalues are computed in float64: on the CPU by LAPACK one matrix
at a time (the reference path); on GPUs by the two-stage solver of ``eigensolver``
(band reduction on every visible GPU, band -> tridiagonal on the CPU cores,
bisection to float32 precision), whose alphas agree with the reference within 0.5%
for every rule (``tests/test_eigensolver.py``, ``bench/bench_spectra.py``). A model
directory too large to load is read one decoder layer at a time (``streaming``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch

from .eigensolver import SolverPlan, Unit, batch_size_for, default_plan, gram_dim, solve, visible_devices
from .errors import ActTailError, SpectraError, setting
from .esd import BACKENDS, DEFAULT_RULE, XMIN_RULES, PowerLawFit, ProjectionSpectrum, Spectra
from .models import LoadedModel
from .progress import ProgressFn, report
from .projections import Projection, find_projections, weight_of
from .spectra_io import cache_path, cached_eigenvalues, cached_spectra, save_spectra

log = logging.getLogger(__name__)

EVALS_THRESH = 1e-5
_SINGLE_THREAD_MAX_DIM = 1024  # CPU Gram matrices up to this size are decomposed on one thread
_KS_CHUNK_ELEMENTS = 1 << 22  # candidates x eigenvalues evaluated at once (32 MiB in float64)


# --------------------------------------------------------------------------- fitting


def _ks_candidates(log_eigs: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hill alpha and KS distance for each candidate xmin index (eigenvalues ascending)."""
    n_total = log_eigs.numel()
    suffix = torch.flip(torch.cumsum(torch.flip(log_eigs, [0]), 0), [0])  # sum_{j>=i} log lambda_j
    tail = (n_total - candidates).to(log_eigs.dtype)
    denom = suffix[candidates] - tail * log_eigs[candidates]
    alphas = torch.where(denom > 0, 1 + tail / denom.clamp_min(1e-300), torch.full_like(denom, float("inf")))
    distances = torch.ones_like(alphas)
    j = torch.arange(n_total, device=log_eigs.device)
    chunk = max(1, _KS_CHUNK_ELEMENTS // max(1, n_total))
    for start in range(0, candidates.numel(), chunk):
        idx = candidates[start : start + chunk]
        a = alphas[start : start + chunk, None]
        n = tail[start : start + chunk, None]
        offset = (j[None, :] - idx[:, None]).to(log_eigs.dtype)
        valid = offset >= 0
        rel = (log_eigs[None, :] - log_eigs[idx][:, None]).clamp_min(0)
        theory = 1 - torch.exp((1 - a) * rel)
        gap = torch.where(valid, (theory - offset / n).abs(), torch.zeros_like(theory))
        d = gap.max(dim=1).values
        ok = torch.isfinite(a[:, 0]) & (a[:, 0] > 1)
        distances[start : start + chunk] = torch.where(ok, d, torch.ones_like(d))
    return alphas, distances


def fit_power_law(eigenvalues: torch.Tensor | np.ndarray, rule: str = "ks") -> PowerLawFit:
    """Fit the ESD tail. ``eigenvalues`` need not be sorted; any device; float64 is used."""
    if rule not in XMIN_RULES:
        raise ActTailError(f"unknown xmin rule {rule!r}; choose one of {', '.join(XMIN_RULES)}")
    eigs = torch.as_tensor(eigenvalues).to(torch.float64).reshape(-1)
    eigs = torch.sort(eigs[eigs > EVALS_THRESH]).values
    n_total = eigs.numel()
    if n_total < 3:
        return PowerLawFit(float("nan"), float("nan"), int(n_total), float("nan"))
    log_eigs = torch.log(eigs)
    if rule == "mid":
        i = n_total // 2
        candidates = torch.tensor([i], device=eigs.device)
    elif rule == "ks":
        candidates = torch.arange(n_total - 1, device=eigs.device)
    else:  # peak
        log10 = torch.log10(eigs)
        counts = torch.histc(log10, bins=100, min=float(log10.min()), max=float(log10.max()))
        edges = torch.linspace(float(log10.min()), float(log10.max()), 101, dtype=torch.float64)
        peak = 10 ** float(edges[int(torch.argmax(counts))])
        in_range = (eigs[:-1] >= 0.95 * peak) & (eigs[:-1] <= 1.5 * peak)
        candidates = torch.nonzero(in_range).reshape(-1)
        if candidates.numel() == 0:  # degenerate histogram: nearest eigenvalue to the peak
            candidates = torch.argmin((eigs[:-1] - peak).abs()).reshape(1)
    alphas, distances = _ks_candidates(log_eigs, candidates)
    best = int(torch.argmin(distances))
    i = int(candidates[best])
    return PowerLawFit(float(alphas[best]), float(eigs[i]), int(n_total - i), float(distances[best]))


# --------------------------------------------------------------------------- eigenvalues


def gram_eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of the smaller Gram matrix of one weight or a batch of them."""
    w = weight.detach().to(torch.float64)
    gram = w.mT @ w if w.shape[-2] >= w.shape[-1] else w @ w.mT
    return torch.linalg.eigvalsh(gram)


def spectra_devices(
    model: torch.nn.Module, projections: Sequence[Projection], device: Optional[str]
) -> list[torch.device]:
    """Where the eigenvalues are computed: ``device`` if given (plain ``cuda``: every visible GPU),
    else where the weights are (CPU, or every visible GPU when they are on a GPU or spread by a device map)."""
    if device:
        return visible_devices(torch.device(device))
    placed = {weight_of(model, p).device for p in projections}
    if all(d.type == "cpu" for d in placed):
        return [torch.device("cpu")]
    return visible_devices(torch.device("cuda"))


def compute_eigenvalues(
    model: torch.nn.Module,
    projections: Sequence[Projection],
    device: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    plan: Optional[SolverPlan] = None,
) -> list[np.ndarray]:
    """Eigenvalues of every projection's Gram matrix, each ascending float64.

    ``device=None`` computes where the weights live. On the CPU each matrix goes to LAPACK in
    float64 (the reference path); on GPUs the two-stage solver of ``eigensolver`` shares the work
    between every visible GPU and the CPU cores (``plan``: an ``eigensolver.SolverPlan``).
    """
    devices = spectra_devices(model, projections, device)
    if devices[0].type == "cpu":
        return _cpu_eigenvalues(model, projections, progress)
    plan = plan or default_plan(devices[0])
    by_dim: dict[int, list[int]] = {}
    for i, p in enumerate(projections):
        by_dim.setdefault(gram_dim(p.shape), []).append(i)
    units = []
    for dim, indices in by_dim.items():
        size = batch_size_for(dim, len(indices), devices[0], plan)
        for start in range(0, len(indices), size):
            batch = indices[start : start + size]
            layers = sorted({projections[i].layer for i in batch})
            label = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            load = lambda _device, batch=batch: [(i, weight_of(model, projections[i])) for i in batch]  # noqa: E731
            units.append(Unit(load, label))
    results = solve(units, len(projections), devices, plan, progress)
    return [results[i] for i in range(len(projections))]


def _cpu_eigenvalues(
    model: torch.nn.Module, projections: Sequence[Projection], progress: Optional[ProgressFn]
) -> list[np.ndarray]:
    out = []
    with few_threads_for_small(projections, torch.device("cpu")):
        for i, proj in enumerate(projections):
            out.append(gram_eigenvalues(weight_of(model, proj).detach().cpu()).numpy())
            report(progress, i + 1, len(projections), f"layer {proj.layer}: eigenvalues {i + 1}/{len(projections)}")
    return out


@contextmanager
def few_threads_for_small(projections: Sequence[Projection], device: torch.device):
    """One CPU thread while working on small matrices.

    Multithreaded LAPACK and elementwise kernels gain little on Gram matrices this small and collapse
    when the cores are busy (SmolLM2's 210 eigendecompositions: 6 s on one thread, 100 s on two
    while another process ran).
    """
    small = max(min(p.shape) for p in projections) <= _SINGLE_THREAD_MAX_DIM
    threads = torch.get_num_threads()
    if device.type == "cpu" and small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spectra_from_eigenvalues(
    projections: Sequence[Projection],
    eigenvalues: Sequence[np.ndarray],
    rule: str,
    model_name: str,
    fingerprint: str,
    fit_device: str = "cpu",
    progress: Optional[ProgressFn] = None,
) -> Spectra:
    entries = []
    for index, (proj, eigs) in enumerate(zip(projections, eigenvalues)):
        fit = fit_power_law(torch.as_tensor(eigs, device=fit_device), rule)
        entries.append(
            ProjectionSpectrum(
                name=proj.name,
                layer=proj.layer,
                type=proj.type,
                in_features=proj.in_features,
                out_features=proj.out_features,
                alpha=fit.alpha,
                xmin=fit.xmin,
                tail_size=fit.tail_size,
                ks_distance=fit.ks_distance,
                lambda_max=float(np.max(eigs)),
                num_eigs=int(len(eigs)),
                eigenvalues=np.asarray(eigs, dtype=np.float32),
            )
        )
        report(progress, index + 1, len(projections), f"fit {index + 1}/{len(projections)}")
    return Spectra(model_name, fingerprint, rule, "acttail", entries)


# --------------------------------------------------------------------------- weightwatcher reference


def weightwatcher_fits(model: torch.nn.Module, projections: Sequence[Projection]) -> list[PowerLawFit]:
    """Run weightwatcher (0.7.x, default fit) on exactly our projections, in our order."""
    try:
        import weightwatcher as ww
    except ImportError as exc:
        raise ActTailError(
            f"{setting('backend')} weightwatcher needs the weightwatcher package: pip install weightwatcher"
        ) from exc
    holder = torch.nn.Module()
    for i, proj in enumerate(projections):
        lin = weight_of(model, proj)
        clone = torch.nn.Linear(proj.in_features, proj.out_features, bias=False)
        clone.weight.data = lin.detach().to("cpu", torch.float32)
        holder.add_module(f"p{i:05d}", clone)
    ww_logger = logging.getLogger("weightwatcher")
    previous = ww_logger.level
    ww_logger.setLevel(logging.ERROR)
    try:
        frame = ww.WeightWatcher(model=holder).analyze(min_evals=1, plot=False)
    finally:
        ww_logger.setLevel(previous)
    if len(frame) != len(projections):
        raise ActTailError(f"weightwatcher analysed {len(frame)} layers, expected {len(projections)}")
    frame = frame.sort_values("layer_id") if "layer_id" in frame else frame
    return [
        PowerLawFit(float(r.alpha), float(r.xmin), int(getattr(r, "num_pl_spikes", 0) or 0), float(r.D))
        for r in frame.itertuples()
    ]


def compute_spectra(
    loaded: LoadedModel,
    rule: str = DEFAULT_RULE,
    backend: str = "acttail",
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
    device: Optional[str] = None,
    plan: Optional[SolverPlan] = None,
) -> Spectra:
    """Spectra of every projection of a loaded model, from the disk cache when possible.

    ``plan`` (an ``eigensolver.SolverPlan``) tunes the GPU solver; benchmarks compare plans with it.
    """
    if rule not in XMIN_RULES:
        raise ActTailError(f"unknown xmin rule {rule!r}; choose one of {', '.join(XMIN_RULES)}")
    if backend not in BACKENDS:
        raise ActTailError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    projections = find_projections(loaded.model)
    fingerprint = loaded.fingerprint
    if use_cache:
        hit = cached_spectra(fingerprint, rule, backend, projections)
        if hit is not None:
            # The cache is keyed by the weights, so its file names whichever model computed it first (another path,
            # a deleted folder): the spectra, and budgets allocated from them, name the model asked for.
            hit.model_name = loaded.name
            report(progress, len(projections), len(projections), "spectra from cache")
            return hit
    eigenvalues = cached_eigenvalues(fingerprint, projections) if use_cache else None
    if eigenvalues is None:
        eigenvalues = compute_eigenvalues(loaded.model, projections, device, progress, plan)
    fit_device = "cpu"
    first = weight_of(loaded.model, projections[0])
    if (device or str(first.device)).startswith("cuda"):
        fit_device = device or str(first.device)
    with few_threads_for_small(projections, torch.device(fit_device)):
        spectra = spectra_from_eigenvalues(
            projections, eigenvalues, rule, loaded.name, fingerprint, fit_device, progress
        )
    if backend == "weightwatcher":
        for entry, fit in zip(spectra.entries, weightwatcher_fits(loaded.model, projections)):
            entry.alpha, entry.xmin, entry.tail_size, entry.ks_distance = (
                fit.alpha, fit.xmin, fit.tail_size, fit.ks_distance
            )
        spectra.backend = "weightwatcher"
    if use_cache:
        try:
            save_spectra(spectra, cache_path(fingerprint, rule, backend))
        except OSError as exc:  # a read-only cache must not stop the analysis
            log.warning("could not write spectra cache: %s", exc)
    return spectra


def check_spectra_match(spectra: Spectra, loaded: LoadedModel) -> None:
    """Raise if a spectra file was computed for another model."""
    if spectra.fingerprint != loaded.fingerprint:
        raise SpectraError(
            f"spectra were computed for model fingerprint {spectra.fingerprint}, "
            f"but the loaded model is {loaded.fingerprint}"
        )


def finite_alpha(values: np.ndarray) -> np.ndarray:
    """Replace NaN/inf alphas (degenerate fits) by the median of the finite ones."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros_like(values)
    return np.where(finite, values, float(np.median(values[finite])))



# --------------------------------------------------------------------------- plotting support


def esd_density(spectrum: ProjectionSpectrum, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of one ESD as a probability density on log-spaced bins: ``(bin_edges, density)``.

    Only eigenvalues above ``EVALS_THRESH`` count (the ones the fit saw), so the
    density integrates to 1 over them and ``tail_density`` can be drawn over it.
    """
    eigs = np.asarray(spectrum.eigenvalues, dtype=np.float64)
    eigs = eigs[eigs > EVALS_THRESH]
    if eigs.size == 0:
        return np.array([EVALS_THRESH, 1.0]), np.zeros(1)
    low, high = float(eigs.min()), float(eigs.max())
    if high <= low:
        high = low * 1.01
    edges = np.logspace(np.log10(low), np.log10(high), bins + 1)
    edges[0], edges[-1] = low, high  # exact ends: rounding in logspace could leave the extreme eigenvalues out
    counts, edges = np.histogram(eigs, bins=edges)
    density = counts / (eigs.size * np.diff(edges))
    return edges, density


def tail_density(spectrum: ProjectionSpectrum, points: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The fitted power-law tail as a density over the whole ESD: ``(lambda, p(lambda))``.

    ``p(lambda) = (n_tail / n) * (alpha - 1) / xmin * (lambda / xmin) ** -alpha`` for
    ``xmin <= lambda <= lambda_max``: the tail's share of the eigenvalues times the
    normalised power law, so it sits on the same scale as ``esd_density``.
    Empty arrays when the fit is degenerate (alpha or xmin not finite).
    """
    alpha, xmin = spectrum.alpha, spectrum.xmin
    if not (np.isfinite(alpha) and np.isfinite(xmin) and xmin > 0 and alpha > 1):
        return np.array([]), np.array([])
    eigs = np.asarray(spectrum.eigenvalues, dtype=np.float64)
    fitted = int(np.count_nonzero(eigs > EVALS_THRESH))
    share = spectrum.tail_size / fitted if fitted else 0.0
    lambdas = np.logspace(np.log10(xmin), np.log10(max(spectrum.lambda_max, xmin * 1.0001)), points)
    return lambdas, share * (alpha - 1) / xmin * (lambdas / xmin) ** (-alpha)


__all__ = [
    "XMIN_RULES",
    "BACKENDS",
    "PowerLawFit",
    "ProjectionSpectrum",
    "Spectra",
    "fit_power_law",
    "gram_eigenvalues",
    "compute_eigenvalues",
    "compute_spectra",
    "check_spectra_match",
    "finite_alpha",
    "esd_density",
    "tail_density",
]
