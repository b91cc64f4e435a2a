"""Prepare one decode step's input of a projection group and pick the inputs each projection keeps.

A *group* is the projections that read the same tensor: q/k/v (the normed hidden state), o (the
attention output), gate/up (the normed hidden state), down (act(gate) * up). ``select_group`` runs
one program per sequence of the batch and does, in registers:

1. the prologue that makes the input: ``plain`` (read it), ``residual_norm`` (h += [post-norm] of the
   previous sublayer's output, write h back, x = RMSNorm(h)) or ``act_mul`` (x = act(gate) * up).
   Rounding follows transformers' eager code in the model dtype step by step (Llama-style norms
   round before the weight multiply, Gemma-style after), so a bf16 run tracks the reference model.
2. for every projection of the group, its cut: TopK keeps the ``k`` largest magnitudes, found by a
   radix search over the float's bit pattern (for non-negative IEEE floats the integer order is the
   value order, so the k-th largest magnitude is the largest pattern T with ``count(bits >= T) >= k``,
   settled one bit at a time from the top: 15 steps for bf16). Entries tied with the k-th value are
   all kept, as ``|x| >= kth`` masking does. Threshold mode (TEAL) keeps ``|x| > tau``.
3. compaction: a prefix sum over the keep mask gives every kept input its slot, so the GEMV reads a
   dense list of (index, value) pairs and touches only those weight rows. Exact zeros are never kept:
   they add nothing to y, and skipping them keeps the work proportional to what matters.

Batch > 1 sequences keep different inputs; the GEMV then reads the union of the rows any sequence
keeps (``union_compact``), with each sequence's own zeros in its value list, so every sequence gets
exactly its own TopK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN, RESIDUAL_NORM, ACT_MUL = 0, 1, 2
NORM_STYLES = {"llama": 0, "gemma": 1}  # llama: round(x * r) * w ; gemma: round(x * r * (1 + w))
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
MODE_DENSE, MODE_TOPK, MODE_THRESHOLD = 0, 1, 2
# Lowest mantissa bit that can be set after an exact up-cast to float32: the radix search skips the rest.
LOW_BIT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}
NO_THRESHOLD = 2**31 - 1  # threshold bits that keep nothing (k = 0)


@triton.jit
def _norm(x, w, inside, inv_n, eps, STYLE: tl.constexpr, DT: tl.constexpr):
    var = tl.sum(tl.where(inside, x * x, 0.0), axis=0) * inv_n
    xn = x * tl.rsqrt(var + eps)
    if STYLE == 0:
        out = xn.to(DT).to(tl.float32) * w
    else:
        out = xn * (1.0 + w)
    return out.to(DT).to(tl.float32)


@triton.jit
def _prologue(row, cols, inside, a_ptr, a_stride, b_ptr, b_stride, h_ptr, h_stride, w_ptr, pw_ptr, eps, inv_n,
              PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, STYLE: tl.constexpr,
              ACT: tl.constexpr, DT: tl.constexpr):
    """The group's input row as float32 values that are exact in the model dtype ``DT``."""
    if PROLOGUE == 0:
        x = tl.load(a_ptr + row * a_stride + cols, mask=inside, other=0.0).to(tl.float32).to(DT).to(tl.float32)
    elif PROLOGUE == 1:
        h = tl.load(h_ptr + row * h_stride + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(a_ptr + row * a_stride + cols, mask=inside, other=0.0).to(tl.float32).to(DT).to(tl.float32)
            if POST_NORM:
                pw = tl.load(pw_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                d = _norm(d, pw, inside, inv_n, eps, STYLE, DT)
            h = (h + d).to(DT).to(tl.float32)
            tl.store(h_ptr + row * h_stride + cols, h.to(h_ptr.dtype.element_ty), mask=inside)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        x = _norm(h, w, inside, inv_n, eps, STYLE, DT)
    else:
        g = tl.load(a_ptr + row * a_stride + cols, mask=inside, other=0.0).to(tl.float32).to(DT).to(tl.float32)
        u = tl.load(b_ptr + row * b_stride + cols, mask=inside, other=0.0).to(tl.float32).to(DT).to(tl.float32)
        if ACT == 0:
            act = g / (1.0 + tl.exp(-g))
        else:  # tanh-approximated GELU, with tanh(y) = 1 - 2 / (exp(2y) + 1)
            y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            act = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
        x = (act.to(DT).to(tl.float32) * u).to(DT).to(tl.float32)
    return x


@triton.jit
def _kth_largest_bits(bits, k, LOW: tl.constexpr):
    """Largest bit pattern T with count(bits >= T) >= k (bits of padding are -1 and never count)."""
    threshold = tl.full((), 0, tl.int32)
    for step in tl.static_range(31 - LOW):
        candidate = threshold | (1 << (30 - step))
        count = tl.sum((bits >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    return threshold


@triton.jit
def _cut_bits(bits, param, MODE: tl.constexpr, LOW: tl.constexpr):
    """Bit pattern from which an input is kept: TopK's k-th magnitude, or the threshold's (already + 1)."""
    if MODE == 1:
        cut = _kth_largest_bits(bits, param, LOW)
        cut = tl.where(param > 0, cut, 2147483647)
    else:
        cut = param
    return tl.maximum(cut, 1)  # exact zeros are never kept


@triton.jit
def _select_kernel(
    a_ptr, a_stride, b_ptr, b_stride, h_ptr, h_stride, w_ptr, pw_ptr, eps, inv_n,
    x_ptr, x_stride, param_ptr, cut_ptr,
    idx_ptr, val_ptr, count_ptr, idx_stride_g, val_stride_g,
    zero_ptr, zero_stride, n_zero, n_cols,
    MODE: tl.constexpr, G: tl.constexpr, COMPACT: tl.constexpr, WRITE_X: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, STYLE: tl.constexpr,
    ACT: tl.constexpr, LOW: tl.constexpr, BLOCK: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x = _prologue(row, cols, inside, a_ptr, a_stride, b_ptr, b_stride, h_ptr, h_stride, w_ptr, pw_ptr, eps, inv_n,
                  PROLOGUE, HAS_DELTA, POST_NORM, STYLE, ACT, DT)
    if WRITE_X:
        tl.store(x_ptr + row * x_stride + cols, x.to(DT), mask=inside)
    if n_zero > 0:  # the downstream GEMV accumulates into this buffer
        for start in range(0, n_zero, ZERO_BLOCK):
            offs = start + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + row * zero_stride + offs, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs < n_zero)
    if MODE != 0:
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        bits = tl.where(inside, bits, -1)
        for g in tl.static_range(G):
            cut = _cut_bits(bits, tl.load(param_ptr + g), MODE, LOW)
            if COMPACT:  # one sequence: write its (index, value) list directly
                keep = bits >= cut
                keep_i = keep.to(tl.int32)
                slot = tl.cumsum(keep_i, axis=0) - 1
                tl.store(idx_ptr + g * idx_stride_g + slot, cols, mask=keep)
                tl.store(val_ptr + g * val_stride_g + slot, x.to(DT), mask=keep)
                tl.store(count_ptr + g, tl.sum(keep_i, axis=0))
            else:  # several sequences: union_compact merges their cuts
                tl.store(cut_ptr + g * 64 + row, cut)


@triton.jit
def _union_compact_kernel(
    x_ptr, x_stride, cut_ptr, idx_ptr, val_ptr, count_ptr, idx_stride_g, val_stride_g, val_stride_b,
    n_rows, n_cols, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
):
    g = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    row_in = rows < n_rows
    cut = tl.load(cut_ptr + g * 64 + rows, mask=row_in, other=2147483647)
    filled = tl.full((), 0, tl.int32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        inside = row_in[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=0.0)
        bits = tl.where(inside, tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), -1)
        keep = bits >= cut[:, None]
        union = tl.max(keep.to(tl.int32), axis=0)
        slot = filled + tl.cumsum(union, axis=0) - 1
        tl.store(idx_ptr + g * idx_stride_g + slot, cols, mask=union > 0)
        tl.store(val_ptr + g * val_stride_g + rows[:, None] * val_stride_b + slot[None, :], tl.where(keep, x, 0.0),
                 mask=row_in[:, None] & (union > 0)[None, :])
        filled += tl.sum(union, axis=0)
    tl.store(count_ptr + g, filled)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def select_group(
    *,
    prologue: int,
    x_out: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    post_norm_weight: torch.Tensor | None = None,
    has_delta: bool = False,
    eps: float = 1e-6,
    style: str = "llama",
    activation: str = "silu",
    mode: int = MODE_DENSE,
    params: torch.Tensor | None = None,
    lists: "CompactLists | None" = None,
    zero: torch.Tensor | None = None,
) -> None:
    """Run the prologue for every sequence of the batch and, unless ``mode`` is dense, fill ``lists``.

    ``x_out`` [B, n] receives the prepared input in the model dtype (always, it is the dense GEMV's
    input and the union pass's source). ``params`` [G] int32 holds each projection's k (TopK) or its
    threshold's float32 bit pattern + 1 (threshold mode). ``zero`` [B, m] float32 is zeroed for the
    GEMV that accumulates into it.
    """
    n_rows, n_cols = x_out.shape
    block = triton.next_power_of_2(n_cols)
    dummy = x_out
    a_t = a if a is not None else dummy
    b_t = b if b is not None else dummy
    h_t = h if h is not None else dummy
    groups = lists.groups if lists is not None else 1
    compact = lists is not None and n_rows == 1
    _select_kernel[(n_rows,)](
        a_t, a_t.stride(0), b_t, b_t.stride(0), h_t, h_t.stride(0),
        norm_weight if norm_weight is not None else dummy,
        post_norm_weight if post_norm_weight is not None else dummy,
        float(eps), 1.0 / n_cols,
        x_out, x_out.stride(0),
        params if params is not None else dummy,
        lists.cuts if lists is not None else dummy,
        lists.idx if lists is not None else dummy,
        lists.val if lists is not None else dummy,
        lists.count if lists is not None else dummy,
        lists.idx.stride(0) if lists is not None else 0,
        lists.val.stride(0) if lists is not None else 0,
        zero if zero is not None else dummy, zero.stride(0) if zero is not None else 0,
        zero.shape[1] if zero is not None else 0, n_cols,
        MODE=mode, G=groups, COMPACT=compact, WRITE_X=True,
        PROLOGUE=prologue, HAS_DELTA=has_delta, POST_NORM=post_norm_weight is not None,
        STYLE=NORM_STYLES[style], ACT=ACTIVATIONS[activation], LOW=LOW_BIT[x_out.dtype], BLOCK=block,
        ZERO_BLOCK=min(4096, triton.next_power_of_2(max(zero.shape[1], 16))) if zero is not None else 16,
        num_warps=_warps(block),
    )
    if lists is not None and not compact:
        _union_compact_kernel[(groups,)](
            x_out, x_out.stride(0), lists.cuts, lists.idx, lists.val, lists.count,
            lists.idx.stride(0), lists.val.stride(0), lists.val.stride(1), n_rows, n_cols,
            BLOCK_B=triton.next_power_of_2(n_rows), CHUNK=min(1024, block), num_warps=4,
        )


class CompactLists:
    """Where ``select_group`` writes the kept inputs of G projections for a batch of B sequences.

    ``idx`` [G, n] int32 (kept input indices, ascending), ``val`` [G, B, n] (their values per
    sequence, zero where that sequence does not keep the index), ``count`` [G] int32 (list length,
    read by the GEMV on the device: no host sync), ``cuts`` [G, 64] int32 (per-sequence cut bits).
    """

    MAX_BATCH = 64

    def __init__(self, groups: int, batch: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> None:
        if batch > self.MAX_BATCH:
            raise ValueError(f"batch {batch} exceeds {self.MAX_BATCH}")
        self.groups = groups
        self.idx = torch.zeros(groups, n_cols, dtype=torch.int32, device=device)
        self.val = torch.zeros(groups, batch, n_cols, dtype=dtype, device=device)
        self.count = torch.zeros(groups, dtype=torch.int32, device=device)
        self.cuts = torch.zeros(groups, self.MAX_BATCH, dtype=torch.int32, device=device)


def threshold_param(tau: float, dtype: torch.dtype) -> int:
    """The int32 kernel parameter for threshold mode: keep |x| > tau, tau rounded to the model dtype first.

    (``F.hardshrink`` on a bf16 tensor compares against the threshold in bf16, so rounding it first
    keeps the same entries as the masked path.)
    """
    rounded = torch.tensor([tau], dtype=dtype).float()
    return int(rounded.view(torch.int32).item()) + 1
