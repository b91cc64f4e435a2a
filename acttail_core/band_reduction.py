"""Reduce a batch of symmetric matrices to banded form by orthogonal similarity (the first stage of a
two-stage eigenvalue solver), in batched matrix products that run on a GPU or a CPU.

Why: a dense symmetric eigensolver first reduces the matrix to tridiagonal form one column at a
time; every column costs a matrix-vector product over the whole trailing matrix, so the reduction is
bound by memory bandwidth and by one kernel launch per column (cuSOLVER's ``syevd`` spends about
80 ms on a 4096 x 4096 matrix however the calls are arranged). Reducing to a band of half-width
``b`` instead takes ``b`` columns per step and applies them as matrix products (BLAS3); what remains,
band -> tridiagonal -> eigenvalues, is cheap O(n^2 b) work (``lapack_band``, ``triton_sturm``).

Algorithm (blocked Householder band reduction, as LAPACK's ``sytrd_sy2sb``). For each panel of
``b`` columns ``c0 .. c0+b-1``, the rows ``c0+b ..`` of those columns are QR-factorised with
Householder reflectors, ``P = Q [R; 0]``, ``Q = I - V T V^T`` (compact WY form, ``V`` unit lower
trapezoidal). ``T`` follows from ``V`` and the reflectors' ``tau`` in one triangular inversion:
``T^-1 = diag(1/tau) + strict_upper(V^T V)`` (true for any product of ``I - tau_j v_j v_j^T``, by
induction on the LAPACK ``larft`` recurrence). The trailing matrix becomes ``Q^T A Q``, which for
symmetric ``A`` is the rank-2b update

    Q^T A Q = A - V W^T - W V^T,   Z = A V T,   W = Z - 1/2 V (T^T V^T Z)

(expand ``(I - V T^T V^T) A (I - V T V^T)``; ``T^T V^T Z = T^T V^T A V T`` is symmetric). Entries the
panel's QR left below the band are exactly zero, so eigenvalues are preserved up to rounding:
backward stable, like any Householder reduction, in the working precision (float64 here).

Updates are delayed over a group of panels (``group`` columns, a multiple of ``b``), as LAPACK's
``latrd`` does for the tridiagonal case: inside a group the current trailing matrix is the original
one minus the accumulated ``V W^T + W V^T``, applied on the fly to the few columns a panel reads, and
the whole trailing matrix is rewritten once per group. Each panel then reads the trailing matrix
once (for ``A V``) instead of three times, which is what bounds the reduction on a GPU.

Panels with fewer than ``b`` rows to annihilate (the last one) pad ``V`` with zero columns and
``tau = 1``: those factors ``I - tau v v^T`` are the identity and ``T`` stays invertible.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PanelQR = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

__all__ = ["reduce_to_band", "householder_panel", "band_to_dense"]


def householder_panel(panel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QR of a batch of panels ``[B, m, b]`` (``m >= 2``) by Householder reflectors, in place.

    Returns ``(R, V, tau)``: ``R`` the ``[B, b, b]`` upper triangle (rows past ``m`` zero), ``V`` the
    reflectors ``[B, m, b]`` (unit diagonal), ``tau`` ``[B, b]``. Column ``x = (alpha, rest)`` maps to
    ``beta e_1`` with ``beta = -sign(alpha) |x|``, ``v = (1, rest / (alpha - beta))``,
    ``tau = 1 + |alpha| / |x|`` (LAPACK's ``dlarfg``; ``alpha - beta`` never cancels). A zero column
    gets ``v = e_1, tau = 2``, the orthogonal reflection of one row, which leaves it zero.
    """
    batch, m, b = panel.shape
    vectors = torch.zeros_like(panel)
    taus = torch.full((batch, b), 1.0, dtype=panel.dtype, device=panel.device)
    for j in range(min(b, m - 1)):
        x = panel[:, j:, j]
        alpha = x[:, 0]
        norm = torch.linalg.vector_norm(x, dim=1)
        signed = torch.copysign(norm, alpha)  # -beta
        v = torch.nan_to_num(x / (alpha + signed)[:, None], nan=0.0)  # 0/0 only for a zero column
        v[:, 0] = 1.0
        taus[:, j] = torch.nan_to_num(alpha.abs() / norm, nan=1.0) + 1.0
        vectors[:, j:, j] = v
        if j + 1 < b:
            trailing = panel[:, j:, j + 1 :]
            # H = I - tau v v^T applied from the left: trailing -= (tau v) (v^T trailing)
            proj = torch.bmm(v[:, None, :], trailing)
            trailing.baddbmm_((taus[:, j, None] * v)[:, :, None], proj, alpha=-1)
        x[:, 0] = -signed
        x[:, 1:] = 0
    rows = min(b, m)
    r = torch.zeros(batch, b, b, dtype=panel.dtype, device=panel.device)
    r[:, :rows] = torch.triu(panel[:, :rows])
    return r, vectors, taus


def _wy_factor(vectors: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """The upper triangular ``T`` with ``H_0 H_1 ... H_{b-1} = I - V T V^T``."""
    gram = torch.bmm(vectors.mT, vectors)
    t_inverse = torch.triu(gram, diagonal=1) + torch.diag_embed(1.0 / taus)
    eye = torch.eye(taus.shape[1], dtype=taus.dtype, device=taus.device).expand_as(t_inverse)
    return torch.linalg.solve_triangular(t_inverse, eye, upper=True)


def reduce_to_band(
    matrices: torch.Tensor, bandwidth: int, group: Optional[int] = None, panel_qr: Optional[PanelQR] = None
) -> torch.Tensor:
    """Lower band storage ``[B, bandwidth + 1, n]`` of matrices orthogonally similar to ``matrices``.

    ``matrices`` is a batch ``[B, n, n]`` of symmetric matrices (only the lower triangle matters,
    the upper one must mirror it); it is overwritten. Entry ``[k, i, j]`` of the result is element
    ``(j + i, j)`` of the banded matrix (LAPACK's ``uplo='L'`` band layout); entries past the end are
    zero. ``group`` (a multiple of ``bandwidth``, default ``8 * bandwidth``) sets how many columns
    share one update of the trailing matrix; the result does not depend on it beyond rounding.
    ``panel_qr`` replaces the panel factorisation (``triton_spectra.panel_qr`` fuses it into one
    kernel); it gets and returns what ``householder_panel`` does.
    """
    if matrices.dim() != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"expected a batch of square matrices [B, n, n], got {tuple(matrices.shape)}")
    if bandwidth < 1:
        raise ValueError(f"bandwidth must be at least 1, got {bandwidth}")
    group = group or 8 * bandwidth
    if group % bandwidth:
        raise ValueError(f"group ({group}) must be a multiple of the bandwidth ({bandwidth})")
    a = matrices
    batch, n, _ = a.shape
    b = bandwidth
    panels_per_group = group // b
    c0 = 0
    while c0 + b + 2 <= n:  # panels whose QR has rows to annihilate (m >= 2)
        s = c0 + b  # the group's frame: rows and columns s .. n-1
        frame = n - s
        v_acc = torch.zeros(batch, frame, group, dtype=a.dtype, device=a.device)
        w_acc = torch.zeros_like(v_acc)
        p = 0
        while p < panels_per_group and c0 + b + 2 <= n:
            rows_from = c0 + b  # this panel's Householder rows; frame row offset rows_from - s
            current = a[:, c0:, c0 : c0 + b]
            if p > 0:
                f0 = c0 - s
                used = slice(0, p * b)
                current = (
                    current
                    - torch.bmm(v_acc[:, f0:, used], w_acc[:, f0 : f0 + b, used].mT)
                    - torch.bmm(w_acc[:, f0:, used], v_acc[:, f0 : f0 + b, used].mT)
                )
            else:
                current = current.clone()
            a[:, c0 : c0 + b, c0 : c0 + b] = current[:, :b]
            r, v, tau = (panel_qr or householder_panel)(current[:, b:])
            m = n - rows_from
            a[:, rows_from:, c0 : c0 + b] = 0
            rows = min(b, m)
            a[:, rows_from : rows_from + rows, c0 : c0 + b] = r[:, :rows]
            t = _wy_factor(v, tau)
            # Y = A_current V over the rows this panel transforms (earlier rows hold finished columns)
            y = torch.bmm(a[:, rows_from:, rows_from:], v)
            if p > 0:
                f1 = rows_from - s
                used = slice(0, p * b)
                vk, wk = v_acc[:, f1:, used], w_acc[:, f1:, used]
                y = y - torch.bmm(vk, torch.bmm(wk.mT, v)) - torch.bmm(wk, torch.bmm(vk.mT, v))
            z = torch.bmm(y, t)
            w = z - 0.5 * torch.bmm(v, torch.bmm(t.mT, torch.bmm(v.mT, z)))
            f1 = rows_from - s
            v_acc[:, f1:, p * b : (p + 1) * b] = v
            w_acc[:, f1:, p * b : (p + 1) * b] = w
            p += 1
            c0 += b
        # one symmetric rank-2pb update of the part later panels read: rows and columns >= c0
        e = c0 - s
        used = slice(0, p * b)
        left = torch.cat([v_acc[:, e:, used], w_acc[:, e:, used]], dim=2)
        right = torch.cat([w_acc[:, e:, used], v_acc[:, e:, used]], dim=2)
        a[:, c0:, c0:].baddbmm_(left, right.mT, alpha=-1)
    band = torch.zeros(batch, b + 1, n, dtype=a.dtype, device=a.device)
    for i in range(min(b, n - 1) + 1):
        band[:, i, : n - i] = torch.diagonal(a, offset=-i, dim1=1, dim2=2)
    return band


def band_to_dense(band: torch.Tensor) -> torch.Tensor:
    """The symmetric matrices ``[B, n, n]`` that lower band storage ``[B, b + 1, n]`` describes (tests)."""
    batch, width, n = band.shape
    dense = torch.zeros(batch, n, n, dtype=band.dtype, device=band.device)
    for i in range(width):
        if i >= n:
            break
        diagonal = band[:, i, : n - i]
        dense.diagonal(offset=-i, dim1=1, dim2=2).copy_(diagonal)
        if i:
            dense.diagonal(offset=i, dim1=1, dim2=2).copy_(diagonal)
    return dense
