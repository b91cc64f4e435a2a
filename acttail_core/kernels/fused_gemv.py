"""One kernel per projection group and token: prologue, TopK cuts, compaction and the sparse GEMV.

The two-kernel step (``select`` then ``gather_gemv``) pays, per group, a one-program select kernel
that compacts the kept inputs into a global list, a kernel boundary, and a GEMV whose programs first
wait for that list's length and then its indices: on an H200 about a third of a 7B decode step at
50% sparsity went to this. Here every program of the GEMV does the select itself, redundantly: the
input is one row of 4-22 KB, so each program reads it from L2, runs the prologue (residual add +
RMSNorm, or act(gate) * up) and the radix select of ``select._cuts`` in registers, and no program
waits for another. The bet was that what one program does alone costs latency, not bandwidth (the
redundant reads are a few MB per step against 13 GB of weights); the measurement below lost it.

Load balance without a global list: program ``(c, r)`` of a ``(PC, PR)`` grid takes row share ``r``
of every projection's kept list, i.e. the kept inputs whose rank (one prefix sum over the row, the
same in every program) falls in ``[r * share, (r + 1) * share)``. It writes just those indices and
values to its own scratch rows (in L2; a barrier makes them visible to the whole program), then
multiplies them into its column tiles ``c, c + PC, ...``, each tile belonging to one projection of
the group, and adds its partial sums to the float32 output with atomics. Every program reads the
same number of weight rows per tile (within one) whatever the input looks like.

Two buffers the step must arrange (``decode.Decoder`` does):

* the residual: programs read ``h_in`` while program 0 writes the updated row to ``h_out``, so the
  two must differ (a ping-pong pair);
* the output accumulator must be zero before the kernel starts, and no program of this kernel may
  zero it; so each kernel zeroes the accumulator of the *next* group (``zero``).

Batch 1 only: several sequences would each need their own select in every program.

Measured (bench/bench_decode.py, H200, random Llama-2-7B shapes, bf16): it LOSES to the two-kernel
path, 0.72x against 0.89x of dense at 50% and 1.02x against 1.15x at 80%, and it gets worse with
more programs (1 per SM: 150 tok/s at 50%; 4 per SM: 74). The select is not free when every program
repeats it: its radix passes and prefix sum are block-wide reductions, and 132-528 copies of them
hold the SMs for longer than one copy plus a kernel boundary costs; with one program per SM the
weight stream then has too few warps in flight. ``Decoder`` therefore gathers by default; this path
stays selectable (``kernel="fused"``) and measured next to it, as the base for a select that is
split across programs instead of repeated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gather_gemv import ColumnLayout, GemvConfig, _gather_rows, _tile_columns, sm_count
from .select import ACTIVATIONS, NORM_STYLES, RADIX_PASSES, _cuts, _prologue

_FIELD = tl.constexpr(21)  # bits per projection in the packed prefix sum (ranks up to 2M inputs)


@triton.jit
def _fused_kernel(
    a_ptr, b_ptr, h_ptr, h_out_ptr, w_ptr, pw_ptr, eps, inv_n, n_cols,
    param_ptr, wt_ptr, stride_wk, y_ptr, zero_ptr, n_zero,
    scratch_idx_ptr, scratch_val_ptr, share_cap,
    end0, end1, end2, tile1, tile2, total_tiles,
    MODE: tl.constexpr, G: tl.constexpr, PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr,
    POST_NORM: tl.constexpr, STYLE: tl.constexpr, ACT: tl.constexpr, PASSES: tl.constexpr,
    BLOCK: tl.constexpr, PC: tl.constexpr, PR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    pid = r * PC + c
    DT: tl.constexpr = scratch_val_ptr.dtype.element_ty

    # this program's slice of the next group's accumulator
    zero_share = tl.cdiv(n_zero, PC * PR)
    for start in range(pid * zero_share, tl.minimum((pid + 1) * zero_share, n_zero), ZERO_BLOCK):
        offs = start + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + offs, tl.zeros([ZERO_BLOCK], tl.float32),
                 mask=(offs < (pid + 1) * zero_share) & (offs < n_zero))

    cols_in = tl.arange(0, BLOCK)
    inside = cols_in < n_cols
    x = _prologue(0, cols_in, inside, a_ptr, 0, b_ptr, 0, h_ptr, 0, w_ptr, pw_ptr, eps, inv_n,
                  h_out_ptr, pid == 0, PROLOGUE, HAS_DELTA, POST_NORM, STYLE, ACT, DT)
    bits = tl.where(inside, tl.abs(x).to(tl.int32, bitcast=True), -1)
    c0, c1, c2 = _cuts(bits, param_ptr, param_ptr, param_ptr, G, MODE, PASSES, 0, 0)  # no hints

    # every projection's rank of each kept input, from one prefix sum: int32 for one projection, else
    # int64 with a 21-bit field each (registers are what the row costs: keep the one-projection case narrow)
    if G == 1:
        packed = (bits >= c0).to(tl.int32)
    else:
        packed = (bits >= c0).to(tl.int64) + ((bits >= c1).to(tl.int64) << _FIELD)
        if G > 2:
            packed += (bits >= c2).to(tl.int64) << (2 * _FIELD)
    ranks = tl.cumsum(packed, axis=0)
    totals = tl.sum(packed, axis=0)
    count0 = tl.full((), 0, tl.int32)
    count1 = tl.full((), 0, tl.int32)
    count2 = tl.full((), 0, tl.int32)
    for proj in tl.static_range(G):
        field = ((packed >> (proj * _FIELD)) & 0x1FFFFF) > 0
        rank = ((ranks >> (proj * _FIELD)) & 0x1FFFFF).to(tl.int32) - 1
        kept_total = ((totals >> (proj * _FIELD)) & 0x1FFFFF).to(tl.int32)
        share = tl.cdiv(kept_total, PR)
        lo = r * share
        hi = tl.minimum(lo + share, kept_total)
        mine = field & (rank >= lo) & (rank < hi)
        row_base = (pid * 3 + proj) * share_cap
        tl.store(scratch_idx_ptr + row_base + rank - lo, cols_in, mask=mine)
        tl.store(scratch_val_ptr + row_base + rank - lo, x.to(DT), mask=mine)
        mine_count = tl.maximum(hi - lo, 0)
        if proj == 0:
            count0 = mine_count
        elif proj == 1:
            count1 = mine_count
        else:
            count2 = mine_count
    tl.debug_barrier()  # the scratch rows written above are read below by other threads of this program

    for tile in range(c, total_tiles, PC):
        which, cols, col_in = _tile_columns(tile, end0, end1, end2, tile1, tile2, BLOCK_N)
        n_rows = tl.where(which == 0, count0, tl.where(which == 1, count1, count2))
        list_base = (pid * 3 + which) * share_cap
        partial = _gather_rows(wt_ptr, stride_wk, scratch_idx_ptr + list_base, scratch_val_ptr + list_base, 0, n_rows,
                               cols, col_in, BLOCK_K, BLOCK_N, False)
        tl.atomic_add(y_ptr + cols, partial, mask=col_in, sem="relaxed")


@dataclass(frozen=True)
class FusedPrologue:
    """How one group's input is made (the arguments of ``select.select_group``'s prologue)."""

    prologue: int
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    post_norm_weight: torch.Tensor | None = None
    has_delta: bool = False

    def __post_init__(self) -> None:
        if self.h is not None and self.h_out is not None and self.h.data_ptr() == self.h_out.data_ptr():
            raise ValueError("the residual must be written to another buffer than the one every program reads")


class FusedGemv:
    """One group's fused select + sparse GEMV for one sequence, launch geometry fixed up front.

    ``wt`` [in, out] input-major weights of the group (columns of its 1-3 projections concatenated, as
    in ``gather_gemv``), ``widths`` their output widths, ``params`` [G] int32 each projection's k or
    threshold bits (see ``select``), ``scratch`` a ``FusedScratch`` large enough for this group.
    """

    def __init__(self, wt: torch.Tensor, widths: list[int], params: torch.Tensor, *, mode: int, eps: float,
                 style: str, activation: str, config: GemvConfig, scratch: "FusedScratch") -> None:
        if wt.stride(1) != 1:
            raise ValueError("the fused GEMV needs input-major weights with contiguous rows")
        if not 1 <= len(widths) <= 3 or sum(widths) != wt.shape[1]:
            raise ValueError(f"widths {widths} do not split the weight's {wt.shape[1]} output columns into 1-3 parts")
        self.wt, self.params, self.mode, self.eps = wt, params, mode, float(eps)
        self.style, self.activation, self.config = style, activation, config
        self.n_in = wt.shape[0]
        self.layout = ColumnLayout.of(widths, config.block_n)
        self.groups = len(widths)
        programs = config.programs_per_sm * sm_count(wt.device)
        self.pc = max(1, min(self.layout.total_tiles, programs))
        rows = max(1, programs // self.pc)
        self.pr = triton.next_power_of_2(rows) if rows > 1 else 1
        while self.pr > 1 and self.pr * config.block_k > self.n_in:  # shares shorter than a block only add atomics
            self.pr //= 2
        # the whole input row lives in registers during the select: wide rows need more threads to hold it
        self.block = triton.next_power_of_2(self.n_in)
        self.warps = max(config.num_warps, min(16, self.block // 1024))
        self.scratch = scratch
        scratch.require(self.pc * self.pr, triton.cdiv(self.n_in, self.pr))

    def __call__(self, inputs: FusedPrologue, y: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """y [1, out] float32, zero on entry, += W x over each projection's kept inputs; ``zero`` [1, m] is zeroed."""
        c = self.config
        dummy = self.wt
        n_zero = zero.shape[1] if zero is not None else 0
        _fused_kernel[(self.pc, self.pr)](
            inputs.a if inputs.a is not None else dummy, inputs.b if inputs.b is not None else dummy,
            inputs.h if inputs.h is not None else dummy, inputs.h_out if inputs.h_out is not None else dummy,
            inputs.norm_weight if inputs.norm_weight is not None else dummy,
            inputs.post_norm_weight if inputs.post_norm_weight is not None else dummy,
            self.eps, 1.0 / self.n_in, self.n_in,
            self.params, self.wt, self.wt.stride(0), y,
            zero if zero is not None else y, n_zero,
            self.scratch.idx, self.scratch.val, self.scratch.share_cap,
            *self.layout.ends, *self.layout.tile_starts, self.layout.total_tiles,
            MODE=self.mode, G=self.groups, PROLOGUE=inputs.prologue, HAS_DELTA=inputs.has_delta,
            POST_NORM=inputs.post_norm_weight is not None, STYLE=NORM_STYLES[self.style],
            ACT=ACTIVATIONS[self.activation], PASSES=RADIX_PASSES[self.wt.dtype], BLOCK=self.block,
            PC=self.pc, PR=self.pr, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            ZERO_BLOCK=min(1024, triton.next_power_of_2(max(16, triton.cdiv(max(n_zero, 1), self.pc * self.pr)))),
            num_warps=self.warps, num_stages=c.num_stages,
        )


class FusedScratch:
    """Per program, three rows of (index, value) for its shares of the kept lists; shared by every group.

    Sized by ``require`` before any launch (a CUDA graph must not see it reallocated).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.share_cap = 0
        self.programs = 0
        self.idx = torch.zeros(0, dtype=torch.int32, device=device)
        self.val = torch.zeros(0, dtype=dtype, device=device)

    def require(self, programs: int, share: int) -> None:
        if programs <= self.programs and share <= self.share_cap:
            return
        self.programs = max(self.programs, programs)
        self.share_cap = max(self.share_cap, share)
        size = self.programs * 3 * self.share_cap
        self.idx = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.val = torch.zeros(size, dtype=self.dtype, device=self.device)
