"""Two Triton kernels of the two-stage eigensolver (``eigensolver``): the small sequential parts that
would otherwise cost thousands of tiny PyTorch launches per matrix.

``panel_qr(panel)`` - Householder QR of a batch of tall, narrow panels ``[B, m, b]``, one program
per matrix. Each column needs its norm before its reflector exists, and the next column needs the
updated panel, so in PyTorch one panel is ~17 launches per column; here it is one launch. Per column
the program makes two passes over its panel (which stays in L2): the first forms the reflector
``v`` (LAPACK's ``dlarfg``: ``beta = -sign(alpha) |x|``, ``v = (1, rest / (alpha - beta))``,
``tau = 1 + |alpha| / |x|``) and ``w = v^T P``; the second applies ``P -= tau v w^T`` and, while
the data is in registers, accumulates the next column's norm. A zero column gets ``v = e_1``,
``tau = 2`` (an orthogonal reflection of one row that leaves it zero). ``debug_barrier`` orders the
passes: every thread of the program reads what the others wrote.

``tridiagonal_eigenvalues(d, e)`` - every eigenvalue of a batch of symmetric tridiagonal matrices
by bisection, eigenvalue ``k`` of matrix ``m`` in its own lane, where LAPACK's ``dsterf`` takes
~0.2 s per 4096 x 4096 matrix on one CPU core. For a symmetric tridiagonal ``T`` the number of
eigenvalues below ``x`` is the number of negative pivots of ``T - x I = L D L^T`` (Sylvester's law of
inertia), and the pivots follow

    q_0 = d_0 - x,   q_i = d_i - x - e_{i-1}^2 / q_{i-1},

which is backward stable in float64 (Kahan): the count is exact for a matrix within a few ulps of
``T``. Eigenvalues of a Gram matrix are non-negative, and for non-negative IEEE floats the bit
pattern orders like the value, so eigenvalue ``k`` rounded down to float32 is the largest pattern
``t`` with ``count(t) <= k``; it is found one bit at a time from the top, 31 steps, as in
``triton_topk``. The result is within one float32 ulp (1.2e-7 relative) for every eigenvalue,
large or small; negative eigenvalues (rounding) come out as 0. A pivot that is exactly zero is
replaced by ``-pivmin`` as LAPACK's ``dlaebz`` does.

Import this module only where Triton and a GPU exist (``eigensolver`` does so lazily); tests run it
on the CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import threading
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

_BISECT_BLOCK = 128  # eigenvalues per program
# One launch at a time: a launch costs microseconds, and the first one per device compiles, which
# threads driving different GPUs must not do twice at once (nor may they share the CPU interpreter).
_LAUNCH = threading.Lock()


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU: Triton uses the current device, which may be another one."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


@triton.jit
def _panel_qr_kernel(p_ptr, v_ptr, tau_ptr, m, stride_pb, stride_pm, stride_vb, stride_vm,
                     COLS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    mat = tl.program_id(0)
    p_base = p_ptr + mat * stride_pb
    v_base = v_ptr + mat * stride_vb
    cols = tl.arange(0, BLOCK_B)
    offs = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    for r0 in range(0, m, BLOCK_M):
        rows = r0 + offs
        x = tl.load(p_base + rows * stride_pm, mask=rows < m, other=0.0)
        acc += x * x
    squares = tl.sum(acc, axis=0)
    alpha = tl.load(p_base)
    for j in tl.static_range(COLS):
        norm = tl.sqrt(squares)
        nonzero = norm > 0
        signed = tl.where(alpha < 0, -norm, norm)  # -beta
        scale = tl.where(nonzero, 1.0 / tl.where(nonzero, alpha + signed, 1.0), 0.0)
        tau = tl.where(nonzero, 1.0 + tl.abs(alpha) / tl.where(nonzero, norm, 1.0), 2.0)
        tl.store(tau_ptr + mat * COLS + j, tau)
        w = tl.zeros([BLOCK_B], dtype=tl.float64)
        for r0 in range(j, m, BLOCK_M):
            rows = r0 + offs
            inside = (rows < m)[:, None] & (cols < COLS)[None, :]
            tile = tl.load(p_base + rows[:, None] * stride_pm + cols[None, :], mask=inside, other=0.0)
            xj = tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)
            v = tl.where(rows == j, 1.0, xj * scale)
            tl.store(v_base + rows * stride_vm + j, v, mask=rows < m)
            w += tl.sum(v[:, None] * tile, axis=0)
        tl.debug_barrier()
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
        alpha_acc = tl.zeros([BLOCK_M], dtype=tl.float64)
        for r0 in range(j, m, BLOCK_M):
            rows = r0 + offs
            inside = (rows < m)[:, None] & (cols < COLS)[None, :]
            tile = tl.load(p_base + rows[:, None] * stride_pm + cols[None, :], mask=inside, other=0.0)
            xj = tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)
            v = tl.where(rows == j, 1.0, xj * scale)
            updated = tile - tau * v[:, None] * w[None, :]
            reduced = tl.where(rows[:, None] == j, -signed, 0.0)
            new = tl.where(cols[None, :] > j, updated, tl.where(cols[None, :] == j, reduced, tile))
            tl.store(p_base + rows[:, None] * stride_pm + cols[None, :], new, mask=inside)
            following = tl.sum(tl.where(cols[None, :] == j + 1, new, 0.0), axis=1)
            acc += tl.where(rows > j, following * following, 0.0)
            alpha_acc += tl.where(rows == j + 1, following, 0.0)
        tl.debug_barrier()
        squares = tl.sum(acc, axis=0)
        alpha = tl.sum(alpha_acc, axis=0)


def panel_qr(panel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of panels ``[B, m, b]`` (float64, rows contiguous), in place: ``(R, V, tau)`` as
    ``band_reduction``'s PyTorch version returns them."""
    batch, m, b = panel.shape
    if panel.stride(2) != 1:
        raise ValueError("panel rows must be contiguous")
    vectors = torch.zeros_like(panel, memory_format=torch.contiguous_format)
    taus = torch.ones(batch, b, dtype=panel.dtype, device=panel.device)
    block_b = triton.next_power_of_2(b)
    block_m = max(32, 2048 // block_b)
    with _LAUNCH, _on_device(panel):
        _panel_qr_kernel[(batch,)](
            panel, vectors, taus, m, panel.stride(0), panel.stride(1), vectors.stride(0), vectors.stride(1),
            COLS=b, BLOCK_B=block_b, BLOCK_M=block_m, num_warps=4,
        )
    rows = min(b, m)
    r = torch.zeros(batch, b, b, dtype=panel.dtype, device=panel.device)
    r[:, :rows] = torch.triu(panel[:, :rows])
    return r, vectors, taus


@triton.jit
def _bisect_kernel(d_ptr, e2_ptr, pivmin_ptr, out_ptr, n, BLOCK: tl.constexpr):
    matrix = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # eigenvalue index, ascending
    d_row = d_ptr + matrix * n
    e2_row = e2_ptr + matrix * n  # e2[i] = e_{i-1}^2, e2[0] unused
    pivmin = tl.load(pivmin_ptr + matrix)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(31):
        candidate = found | (1 << (30 - step))
        x = candidate.to(tl.float32, bitcast=True).to(tl.float64)
        q = tl.load(d_row) - x
        q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
        below = (q < 0).to(tl.int32)
        for i in range(1, n):
            q = tl.load(d_row + i) - x - tl.load(e2_row + i) / q
            q = tl.where(tl.abs(q) < pivmin, -pivmin, q)
            below += (q < 0).to(tl.int32)
        found = tl.where(below <= k, candidate, found)
    tl.store(out_ptr + matrix * n + k, found.to(tl.float32, bitcast=True), mask=k < n)


def tridiagonal_eigenvalues(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[B, n]`` (ascending, float32, negatives as 0) of tridiagonal matrices ``d [B, n]``,
    ``e [B, n - 1]``, on the tensors' device."""
    batch, n = d.shape
    d = d.to(torch.float64).contiguous()
    e2 = torch.zeros(batch, n, dtype=torch.float64, device=d.device)
    e2[:, 1:] = e.to(torch.float64) ** 2
    # dlaebz's pivot floor: the smallest normal number scaled by the largest squared off-diagonal
    pivmin = torch.finfo(torch.float64).tiny * e2.amax(dim=1).clamp_min(1.0)
    out = torch.empty(batch, n, dtype=torch.float32, device=d.device)
    with _LAUNCH, _on_device(d):
        grid = (batch, triton.cdiv(n, _BISECT_BLOCK))
        _bisect_kernel[grid](d, e2, pivmin.contiguous(), out, n, BLOCK=_BISECT_BLOCK, num_warps=4)
    return out
