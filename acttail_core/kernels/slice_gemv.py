"""y += W x for one decode token, each program compacting the kept inputs of its own slice of rows.

``gather_gemv`` reads one list of kept inputs that the select kernel compacted for the whole group:
a prefix sum over up to 16384 inputs and a scatter of the kept ones, done by ONE program while
every other SM waits (on the H200 2 us of a 4096-wide select and 9 us of the 11008-wide one,
x 128 selects a token). Here the select only finds each projection's cut (``select_group(...,
compact=False)``) and the compaction moves into the GEMV, where it is split: a program owns
``BLOCK_N`` output columns and one of ``split`` contiguous slices of the input rows; it reads the
slice's inputs (a few hundred values, from L2), keeps those at or above its projection's cut, ranks
them with a prefix sum in registers, writes their indices and values to its own scratch rows, and
gathers the kept weight rows from that short list as ``gather_gemv`` does (``_gather_rows``).

The scratch round trip (written and read back by the same program, after a barrier) is needed
because a program cannot index its registers by a computed position. Every column tile re-ranks the
same slices: that work is parallel and small (one prefix sum over a slice); the weights it saves
reading are not. Batch 1 only (a batch needs the union of its sequences' inputs: ``gather_gemv``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gather_gemv import GemvConfig, _gather_rows, _tile_columns, check_group, split_k
from .select import CompactLists, _pdl_enter, use_pdl


@triton.jit
def _slice_gemv_kernel(
    wt_ptr, stride_wk, x_ptr, cut_ptr, scratch_idx_ptr, scratch_val_ptr, y_ptr, n_in,
    end0, end1, end2, tile1, tile2,
    SPLIT: tl.constexpr, SLICE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PIPELINE: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    tile = tl.program_id(0)
    part = tl.program_id(1)
    g, cols, col_in = _tile_columns(tile, end0, end1, end2, tile1, tile2, BLOCK_N)
    cut = tl.load(cut_ptr + g * 64)  # this projection's cut for the (only) sequence; >= 1, so zeros stay out
    share = tl.cdiv(n_in, SPLIT)
    rows = part * share + tl.arange(0, SLICE)
    inside = (rows < part * share + share) & (rows < n_in)
    x = tl.load(x_ptr + rows, mask=inside, other=0.0)
    kept = inside & (tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True) >= cut)
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    base = (tile * SPLIT + part) * SLICE
    tl.store(scratch_idx_ptr + base + slot, rows, mask=kept)
    tl.store(scratch_val_ptr + base + slot, x, mask=kept)
    tl.debug_barrier()  # the list written above is read below by other threads of this program
    partial = _gather_rows(wt_ptr, stride_wk, scratch_idx_ptr + base, scratch_val_ptr + base, 0,
                           tl.sum(kept.to(tl.int32), axis=0), cols, col_in, BLOCK_K, BLOCK_N, PIPELINE)
    tl.atomic_add(y_ptr + cols, partial, mask=col_in, sem="relaxed")


class SliceScratch:
    """The programs' private lists, shared by every group of a decoder (the groups run one at a time)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.idx = torch.zeros(0, dtype=torch.int32, device=device)
        self.val = torch.zeros(0, dtype=dtype, device=device)

    def reserve(self, entries: int) -> None:
        """Grow to at least ``entries`` (before capture: a CUDA graph keeps the addresses it saw)."""
        if entries > self.idx.numel():
            self.idx = torch.zeros(entries, dtype=torch.int32, device=self.device)
            self.val = torch.zeros(entries, dtype=self.dtype, device=self.device)


class SliceGemv:
    """One group's batch-1 sparse GEMV over row slices, its launch geometry fixed up front (CUDA graphs).

    ``widths`` are the output widths of the group's projections in the order of their columns in
    ``wt`` ([in, out], rows contiguous). The select must have written each projection's cut to
    ``lists.cuts`` and the input row to ``x``.
    """

    def __init__(self, wt: torch.Tensor, widths: list[int], scratch: SliceScratch,
                 config: GemvConfig = GemvConfig()) -> None:
        self.layout = check_group(wt, widths, config)
        self.wt, self.config, self.scratch = wt, config, scratch
        tiles = self.layout.total_tiles
        n_in = wt.shape[0]
        # split-K as gather_gemv aims it, over all rows: a slice is short enough to rank in registers
        self.split = split_k(config, tiles, n_in, wt.device)
        self.slice = triton.next_power_of_2(triton.cdiv(n_in, self.split))
        self.grid = (tiles, self.split)
        scratch.reserve(tiles * self.split * self.slice)
        self.pdl = use_pdl(wt.device)

    def __call__(self, x: torch.Tensor, lists: CompactLists, y: torch.Tensor) -> None:
        """y [1, out] (float32, zeroed or holding what to add to) += W x over the inputs each cut keeps."""
        c = self.config
        extra = {"launch_pdl": True} if self.pdl else {}
        _slice_gemv_kernel[self.grid](
            self.wt, self.wt.stride(0), x, lists.cuts, self.scratch.idx, self.scratch.val, y, self.wt.shape[0],
            *self.layout.ends, *self.layout.tile_starts,
            SPLIT=self.split, SLICE=self.slice, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PIPELINE=c.pipeline,
            PDL=self.pdl, num_warps=c.num_warps, num_stages=c.num_stages, **extra,
        )
