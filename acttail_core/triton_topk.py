"""A fused per-row TopK magnitude mask for CUDA, written in Triton.

``topk_mask(x, k)`` keeps, in every row of ``x`` (last dimension), the ``k``
entries of largest magnitude and zeroes the rest, in one kernel: read the row
once into registers, find the k-th largest magnitude by a radix (bitwise binary)
search on the float's bit pattern, write the masked row. ``torch.topk`` followed
by a scatter launches several kernels and sorts, which for the prefill shapes of a
7B model costs more than the layer itself (bench/bench_topk.py measures both; the
README has the figures).

Why a bit search works: for non-negative IEEE floats the integer bit pattern is
ordered like the value, so the k-th largest magnitude is the largest bit
pattern T with ``count(bits >= T) >= k``; it is found one bit at a time from the
top (15 steps for bf16, 18 for fp16, 31 for fp32). Entries tied with the k-th
value are all kept, exactly as a ``>=`` threshold would; with real activations
ties are rare and the realized sparsity is measured anyway.

Import this module only where Triton and a GPU exist (the sparsifier does so
lazily); on the CPU the sparsifier uses torch.topk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Lowest mantissa bit that can be set after an exact up-cast to float32.
_LOW_BIT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


@triton.jit
def _topk_mask_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, k, LOW_BIT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
    bits = tl.where(inside, bits, -1)  # padding never counts
    threshold = tl.zeros((), dtype=tl.int32)
    for step in tl.static_range(31 - LOW_BIT):
        candidate = threshold | (1 << (30 - step))
        count = tl.sum((bits >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    keep = (bits >= threshold) & (k > 0)
    out = tl.where(keep, x, tl.zeros_like(x))
    tl.store(out_ptr + row * stride_out + cols, out, mask=inside)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of each row (last dim) of a CUDA tensor."""
    n_cols = x.shape[-1]
    if k >= n_cols:
        return x
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    block = triton.next_power_of_2(n_cols)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    # Triton launches on the current device and its stream. With a device map, layers on cuda:1 get
    # their inputs there while cuda:0 stays current: the kernel would run on cuda:0, unordered with
    # cuda:1's stream, and the matmul would read the mask before it is written.
    with torch.cuda.device(x.device):
        _topk_mask_kernel[(rows.shape[0],)](
            rows, out, n_cols, rows.stride(0), out.stride(0), int(k),
            LOW_BIT=_LOW_BIT.get(x.dtype, 0), BLOCK=block, num_warps=warps,
        )
    return out.reshape(x.shape)
