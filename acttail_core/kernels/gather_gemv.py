"""y += W x for decode, reading only the weight rows of the inputs that were kept.

The weight is stored input-channel-major, ``wt = W.T`` ([in, out], rows contiguous), so the weights
of one input channel are one contiguous row. ``select_group`` has already compacted the kept inputs
of every projection into a list of indices and values whose length lives on the device. A program
owns ``BLOCK_N`` output columns and one of ``split`` slices of the kept list; it gathers
``BLOCK_K`` kept rows at a time (each a contiguous ``2 * BLOCK_N``-byte segment), multiplies by their
values, and adds its partial sum into a float32 accumulator with atomics (split-K).

Why this reads in proportion to what is kept: the loop runs over the compacted list, not over all
input rows, so a projection at 80% sparsity issues a fifth of the loads. A kernel that walks every
row and predicates the loads of zeroed inputs still pays for the walk, and on an H200 saturates
well below the ideal speed-up.

One launch serves a whole group: the output columns of q, k and v (or gate and up) are concatenated
in ``wt``; every tile belongs to exactly one projection and reads that projection's prefix of the
group's list (the kept sets are nested, see ``select``), so three budgets cost one launch.

The slice of the list a program reads is computed from the list's length on the device. (A variant
that read a fixed slice predicted by the budget, so the list loads need not wait for the length,
was 20% slower on the H200: projections of a group with fewer kept inputs than the longest then
iterate over masked blocks.)

Batch 1 accumulates ``w * x`` elementwise and reduces once at the end; batch > 1 uses ``tl.dot``
with the batch padded to 16 rows, so the extra sequences cost almost nothing once a row is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .select import CompactLists, _pdl_enter, use_pdl


@triton.jit
def _tile_columns(tile, end0, end1, end2, tile1, tile2, BLOCK_N: tl.constexpr):
    """The projection (0-2) a column tile belongs to, its output columns and which of them exist."""
    which = (tile >= tile1).to(tl.int32) + (tile >= tile2).to(tl.int32)
    col_start = tl.where(which == 0, 0, tl.where(which == 1, end0, end1))
    col_end = tl.where(which == 0, end0, tl.where(which == 1, end1, end2))
    first_tile = tl.where(which == 0, 0, tl.where(which == 1, tile1, tile2))
    cols = col_start + (tile - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
    return which, cols, cols < col_end


@triton.jit
def _gather_block(idx_ptr, val_ptr, start, hi, BLOCK_K: tl.constexpr):
    """The list entries start..start+BLOCK_K (those before ``hi``): their row indices, values and mask."""
    ks = start + tl.arange(0, BLOCK_K)
    k_in = ks < hi
    rows = tl.load(idx_ptr + ks, mask=k_in, other=0).to(tl.int64)
    x = tl.load(val_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
    return rows, x, k_in


@triton.jit
def _gather_weights(wt_ptr, stride_wk, rows, k_in, cols, col_in):
    """The weight rows ``rows`` (those in ``k_in``) at columns ``cols``: [BLOCK_K, BLOCK_N]."""
    return tl.load(wt_ptr + rows[:, None] * stride_wk + cols[None, :], mask=k_in[:, None] & col_in[None, :],
                   other=0.0)


@triton.jit
def _gather_rows(wt_ptr, stride_wk, idx_ptr, val_ptr, lo, hi, cols, col_in,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr):
    """sum over list entries lo..hi of val * wt[idx, cols], for one sequence: [BLOCK_N] float32.

    Accumulates ``w * x`` elementwise and reduces once at the end (a batch of one gains nothing from
    ``tl.dot``'s 16-row minimum). A weight load's address depends on an index load, so a plain loop
    waits for two memory round trips per block. ``PIPELINE`` staggers them by hand (Triton's
    pipeliner does not take these indirect loads): the indices run two blocks ahead and the weights
    one, so a block's weights are already in flight while the previous block is multiplied.
    """
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    if PIPELINE:
        rows, x, k_in = _gather_block(idx_ptr, val_ptr, lo, hi, BLOCK_K)
        rows_next, x_next, k_in_next = _gather_block(idx_ptr, val_ptr, lo + BLOCK_K, hi, BLOCK_K)
        w = _gather_weights(wt_ptr, stride_wk, rows, k_in, cols, col_in)
        for start in range(lo + 2 * BLOCK_K, hi + 2 * BLOCK_K, BLOCK_K):
            rows_after, x_after, k_in_after = _gather_block(idx_ptr, val_ptr, start, hi, BLOCK_K)
            w_next = _gather_weights(wt_ptr, stride_wk, rows_next, k_in_next, cols, col_in)
            acc += w.to(tl.float32) * x[:, None]
            w, x = w_next, x_next
            rows_next, x_next, k_in_next = rows_after, x_after, k_in_after
    else:
        for start in range(lo, hi, BLOCK_K):
            rows, x, k_in = _gather_block(idx_ptr, val_ptr, start, hi, BLOCK_K)
            acc += _gather_weights(wt_ptr, stride_wk, rows, k_in, cols, col_in).to(tl.float32) * x[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _gather_gemv_kernel(
    wt_ptr, stride_wk, idx_ptr, val_ptr, count_ptr, cut_ptr, val_stride_b,
    y_ptr, stride_yb, n_rows, end0, end1, end2, tile1, tile2,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    USE_DOT: tl.constexpr, PIPELINE: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    tile = tl.program_id(0)
    part = tl.program_id(1)
    g, cols, col_in = _tile_columns(tile, end0, end1, end2, tile1, tile2, BLOCK_N)
    count = tl.load(count_ptr + g)  # this projection's prefix of the group's list
    share = tl.cdiv(tl.cdiv(count, SPLIT), BLOCK_K) * BLOCK_K
    lo = part * share
    hi = tl.minimum(lo + share, count)
    if USE_DOT:
        seqs = tl.arange(0, BLOCK_B)
        seq_in = seqs < n_rows
        cut = tl.load(cut_ptr + g * 64 + seqs, mask=seq_in, other=2147483647)
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for start in range(lo, hi, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_in = ks < hi
            rows = tl.load(idx_ptr + ks, mask=k_in, other=0).to(tl.int64)
            w = tl.load(wt_ptr + rows[:, None] * stride_wk + cols[None, :], mask=k_in[:, None] & col_in[None, :],
                        other=0.0)
            x = tl.load(val_ptr + seqs[:, None] * val_stride_b + ks[None, :], mask=seq_in[:, None] & k_in[None, :],
                        other=0.0)
            # the list is the union over sequences: each keeps only what passes its own cut
            mine = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True) >= cut[:, None]
            x = tl.where(mine, x, 0.0)
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision="ieee")
        tl.atomic_add(y_ptr + seqs[:, None] * stride_yb + cols[None, :], acc, mask=seq_in[:, None] & col_in[None, :],
                      sem="relaxed")
    else:
        partial = _gather_rows(wt_ptr, stride_wk, idx_ptr, val_ptr, lo, hi, cols, col_in, BLOCK_K, BLOCK_N, PIPELINE)
        tl.atomic_add(y_ptr + cols, partial, mask=col_in, sem="relaxed")


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape and launch options; the defaults won bench/bench_decode.py --sweep on the H200."""

    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    programs_per_sm: int = 4  # split-K is chosen so that tiles x split ~ this many programs per SM
    pipeline: bool = False  # batch 1: stagger index and weight loads by hand (``_gather_rows``)
    pow2_split: bool = True  # round split-K up to a power of two (fewer compiled variants, more programs)


@dataclass(frozen=True)
class ColumnLayout:
    """Where a group's 1-3 projections sit among its concatenated output columns, in tiles of ``block_n``.

    ``ends`` are the projections' end columns and ``tile_starts`` the first tiles of the second and
    third (both padded to the kernels' three projections; a missing one starts past the last tile).
    """

    ends: tuple[int, int, int]
    tile_starts: tuple[int, int]
    total_tiles: int

    @classmethod
    def of(cls, widths: list[int], block_n: int) -> "ColumnLayout":
        ends = [sum(widths[: i + 1]) for i in range(len(widths))]
        tiles = [triton.cdiv(w, block_n) for w in widths]
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        never = sum(tiles) + 1
        return cls(tuple((ends + [ends[-1]] * 3)[:3]), tuple((starts[1:] + [never, never])[:2]), sum(tiles))


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewer, larger programs are faster


def check_group(wt: torch.Tensor, widths: list[int], config: GemvConfig) -> ColumnLayout:
    """The column layout of a group's input-major weight, or ValueError when it cannot be one."""
    if wt.stride(1) != 1:
        raise ValueError("the sparse GEMVs need input-major weights with contiguous rows")
    if not 1 <= len(widths) <= 3 or sum(widths) != wt.shape[1]:
        raise ValueError(f"widths {widths} do not split the weight's {wt.shape[1]} output columns into 1-3 parts")
    return ColumnLayout.of(widths, config.block_n)


def split_k(config: GemvConfig, tiles: int, rows: int, device: torch.device) -> int:
    """Slices of the rows per column tile: enough programs to keep every SM streaming
    (``programs_per_sm``), but never slices shorter than one block of ``rows``."""
    programs = config.programs_per_sm * sm_count(device)
    split = max(1, min(programs // max(tiles, 1), triton.cdiv(max(rows, 1), config.block_k)))
    return triton.next_power_of_2(split) if split > 1 and config.pow2_split else split


def default_config(device: torch.device) -> GemvConfig:
    """Tiles for the device: the GPU default, or wide tiles and no split for the CPU interpreter (tests)."""
    if device.type == "cuda":
        return GemvConfig()
    return GemvConfig(block_n=256, block_k=64, programs_per_sm=1)


class GatherGemv:
    """One group's sparse GEMV with its launch geometry fixed up front (what a CUDA graph needs).

    ``widths`` are the output widths of the group's projections (e.g. q, k, v) in the order of
    their columns in ``wt``; ``expected_rows`` the kept inputs per projection the budget implies,
    used only to size split-K.
    """

    def __init__(self, wt: torch.Tensor, widths: list[int], expected_rows: list[int], batch: int,
                 config: GemvConfig = GemvConfig()) -> None:
        self.layout = check_group(wt, widths, config)
        self.wt = wt
        self.config = config
        self.batch = batch
        self.split = split_k(config, self.layout.total_tiles, max(expected_rows) if expected_rows else wt.shape[0],
                             wt.device)
        self.grid = (self.layout.total_tiles, self.split)
        self.pdl = use_pdl(wt.device)

    def __call__(self, lists: CompactLists, y: torch.Tensor) -> None:
        """y [B, out] (float32, zeroed or holding what to add to) += W x over the kept inputs."""
        c = self.config
        extra = {"launch_pdl": True} if self.pdl else {}
        _gather_gemv_kernel[self.grid](
            self.wt, self.wt.stride(0), lists.idx, lists.val, lists.count, lists.cuts, lists.val.stride(0),
            y, y.stride(0), self.batch, *self.layout.ends, *self.layout.tile_starts,
            SPLIT=self.split, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            BLOCK_B=max(16, triton.next_power_of_2(self.batch)), USE_DOT=self.batch > 1, PIPELINE=c.pipeline,
            PDL=self.pdl,
            num_warps=c.num_warps, num_stages=c.num_stages, **extra,
        )
