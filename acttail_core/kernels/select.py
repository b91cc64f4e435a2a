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
   all kept, as ``|x| >= kth`` masking does. Threshold mode (TEAL) keeps ``|x| > tau``. With
   ``CutHints`` the search starts at the last token's cut: one histogram over a window around it
   settles the cut whenever it lies inside (on real models 85-95% of searches with 128 bins,
   bench/hint_hit_rate.py), and the full search runs when it does not; the result is the same.
   Projections of a group with equal k (uniform budgets) share one search.
3. compaction into ONE list shared by the group: the kept sets of one input are nested (a larger k
   keeps a superset), so the inputs are written ordered by how many projections keep them - those
   kept by every projection first - and each projection reads a prefix of the list. One prefix sum
   does it: every kept input adds ``1 << (21 * category)`` to an int64 scan, which ranks it within
   its category. Exact zeros are never kept: they add nothing to y.

The cut (2.) is a radix select on 4-bit digits: a 16-bin histogram of the top digit (shared by all
projections of the group), the bin where the count from the top reaches k, then the next digit among
the inputs in that bin: 4 passes for bf16, 5 for fp16, 8 for fp32. The step is latency-bound (one
program, serial passes), so what counts is passes x their cost: a bit-by-bit search needs 15
block-wide reductions for bf16; 256-bin digits need 2 passes, but Triton's warp-ballot histogram
costs about 8 + 8 x 8 operations per input at 256 bins and was no faster on the H200; 16 bins cost
about 4 + 6.

Batch > 1 sequences keep different inputs; the list is then the union over sequences
(``_union_compact_kernel``) with every sequence's raw values, and the GEMV zeroes, per sequence
and projection, the values below that sequence's own cut: every sequence gets exactly its own TopK.

With ``ACTTAIL_PDL=1`` every kernel of the step is launched with programmatic dependent launch on
Hopper (see ``use_pdl``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PLAIN, RESIDUAL_NORM, ACT_MUL = 0, 1, 2
NORM_STYLES = {"llama": 0, "gemma": 1}  # llama: round(x * r) * w ; gemma: round(x * r * (1 + w))
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
MODE_DENSE, MODE_TOPK, MODE_THRESHOLD = 0, 1, 2
# 4-bit digit passes that cover every bit the dtype can set after an exact up-cast to float32.
RADIX_PASSES = {torch.bfloat16: 4, torch.float16: 5, torch.float32: 8}
# 4-bit passes after the hinted window's 16-bit units: the bits of the up-cast pattern below bit 16
WINDOW_EXTRA_PASSES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 4}
KEEP_NOTHING = tl.constexpr(2**31 - 1)  # a cut no magnitude reaches (k = 0)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch, when ``ACTTAIL_PDL=1``: compiled kernels on Hopper or newer.

    Off by default: on the H200 the whole step was 1-7% slower with it (the early-launched GEMV
    programs wait on every SM while the one-program select runs); bench/bench_decode.py compares.
    """
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and os.environ.get("ACTTAIL_PDL", "0") == "1" and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()  # let the next kernel be scheduled now
        gdc_wait()  # but touch memory only once the previous kernel is done


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
              h_out_ptr, write_h,
              PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, STYLE: tl.constexpr,
              ACT: tl.constexpr, DT: tl.constexpr):
    """The group's input row as float32 values that are exact in the model dtype ``DT``.

    ``residual_norm`` writes the updated residual to ``h_out_ptr`` (same row stride as ``h_ptr``) when
    ``write_h``: in place for the one-program select, to the other buffer of a pair when many programs
    read the old residual at once (``fused_gemv``).
    """
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
        if write_h:
            tl.store(h_out_ptr + row * h_stride + cols, h.to(h_out_ptr.dtype.element_ty), mask=inside)
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
def _prefix_histogram(bits, cut, shift, width):
    """16-bin histogram of the ``width``-bit digit at ``shift`` among the inputs whose higher bits equal ``cut``'s."""
    in_prefix = ((bits >> (shift + width)) == (cut >> (shift + width))) & (bits >= 0)
    return tl.histogram((bits >> shift) & ((1 << width) - 1), 16, mask=in_prefix)


@triton.jit
def _settle_digit(hist, cut, remaining, shift):
    """One radix pass: the largest digit whose count from the top still reaches ``remaining`` goes into
    ``cut`` at ``shift``, and what lies above it leaves ``remaining``. (cut, remaining, digit; -1 = too few)."""
    bins = tl.arange(0, 16)
    from_top = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # inputs with this digit or a larger one
    digit = tl.max(tl.where(from_top >= remaining, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    return cut | (tl.maximum(digit, 0) << shift), remaining, digit


@triton.jit
def _topk_cut(bits, k, hist0, PASSES: tl.constexpr):
    """Bit pattern of the k-th largest magnitude: the largest T with count(bits >= T) >= k.

    ``bits`` are magnitude bit patterns (-1 = padding), ``hist0`` the 16-bin histogram of their top
    digit (bits 30..27). Digits of 4 bits from the top (the last fp32 one has 3); each pass keeps the
    largest digit whose count from the top still reaches k and subtracts what lies above it.
    0 when k exceeds the valid inputs.
    """
    cut = tl.full((), 0, tl.int32)
    remaining = k
    short = False
    for p in tl.static_range(PASSES):
        shift = 27 - 4 * p if p < 7 else 0
        width = 4 if p < 7 else 3
        if p == 0:
            hist = hist0
        else:
            hist = _prefix_histogram(bits, cut, shift, width)
        cut, remaining, digit = _settle_digit(hist, cut, remaining, shift)
        if p == 0:
            short = digit < 0
    return tl.where(short, 0, cut)


@triton.jit
def _window_cut(bits, k, hint, WINDOW: tl.constexpr, EXTRA: tl.constexpr):
    """The k-th largest magnitude in one pass when it lies near ``hint``: (cut, hit).

    A ``WINDOW``-bin histogram: bin 0 counts the inputs below the window, the middle bins
    WINDOW - 2 consecutive 16-bit units (bf16's whole pattern) from ``hint``'s unit - (WINDOW/2 - 1),
    the last bin those above. If fewer than k lie above and at least k at or above the window's
    bottom, the k-th lies inside and its unit is the highest bin whose count from the top reaches k;
    ``EXTRA`` 4-bit passes settle the bits below the unit (fp16: 1, fp32: 4; bf16 has none).
    Otherwise ``hit`` is false and the cut is meaningless.
    """
    bins = tl.arange(0, WINDOW)
    lo = tl.maximum((hint >> 16) - (WINDOW // 2 - 1), 0)
    hist = tl.histogram(tl.minimum(tl.maximum((bits >> 16) - lo + 1, 0), WINDOW - 1), WINDOW, mask=bits >= 0)
    from_top = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    above = tl.sum(tl.where(bins == WINDOW - 1, hist, 0), axis=0)
    from_bottom = tl.sum(tl.where(bins == 1, from_top, 0), axis=0)
    hit = (above < k) & (from_bottom >= k)
    digit = tl.max(tl.where((from_top >= k) & (bins < WINDOW - 1), bins, 0), axis=0)
    remaining = k - tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    cut = (lo + digit - 1) << 16
    for q in tl.static_range(EXTRA):
        cut, remaining, _ = _settle_digit(_prefix_histogram(bits, cut, 12 - 4 * q, 4), cut, remaining, 12 - 4 * q)
    return cut, hit


@triton.jit
def _one_cut(bits, k, hist0, hint_ptr, stats_ptr, PASSES: tl.constexpr, EXTRA: tl.constexpr,
             WINDOW: tl.constexpr):
    """TopK's cut for one projection: the hinted window when it holds, else the full radix select.

    ``hist0`` is the top digit's histogram, shared by the group's searches when there are no hints
    (with hints it is made only on a miss).
    """
    if WINDOW > 0:
        cut, hit = _window_cut(bits, k, tl.load(hint_ptr), WINDOW, EXTRA)
        if not hit:
            cut = _topk_cut(bits, k, tl.histogram(bits >> 27, 16, mask=bits >= 0), PASSES)
            tl.atomic_add(stats_ptr + 1, 1, sem="relaxed")
        tl.atomic_add(stats_ptr, 1, sem="relaxed")
        tl.store(hint_ptr, cut)
    else:
        cut = _topk_cut(bits, k, hist0, PASSES)
    return cut


@triton.jit
def _cuts(bits, param_ptr, hint_ptr, stats_ptr, G: tl.constexpr, MODE: tl.constexpr, PASSES: tl.constexpr,
          EXTRA: tl.constexpr, WINDOW: tl.constexpr):
    """Per projection of the group, the bit pattern from which an input is kept (never below 1: zeros stay out).

    A projection with the same k as the one before it reuses its cut (uniform budgets: q, k and v).
    ``hint_ptr`` points at this sequence's [3 x 64] hints (projection g at g * 64); ``WINDOW`` = 0: no hints.
    """
    if MODE == 1 and WINDOW == 0:
        hist0 = tl.histogram(bits >> 27, 16, mask=bits >= 0)
    else:
        hist0 = tl.zeros([16], tl.int32)
    c0 = tl.full((), KEEP_NOTHING, tl.int32)
    c1 = tl.full((), KEEP_NOTHING, tl.int32)
    c2 = tl.full((), KEEP_NOTHING, tl.int32)
    last_param = tl.full((), -1, tl.int32)
    last_cut = tl.full((), KEEP_NOTHING, tl.int32)
    for g in tl.static_range(G):
        param = tl.load(param_ptr + g)
        if MODE == 1:
            cut = last_cut
            if param != last_param:
                cut = tl.full((), KEEP_NOTHING, tl.int32)
                if param > 0:
                    cut = _one_cut(bits, param, hist0, hint_ptr + g * 64, stats_ptr, PASSES, EXTRA, WINDOW)
        else:  # threshold mode: the parameter already is the threshold's bit pattern + 1
            cut = param
        last_param = param
        last_cut = cut
        cut = tl.maximum(cut, 1)
        if g == 0:
            c0 = cut
        elif g == 1:
            c1 = cut
        else:
            c2 = cut
    return c0, c1, c2


@triton.jit
def _category(bits, c0, c1, c2, G: tl.constexpr):
    """G - (number of the group's projections that keep the input): 0 = kept by all, G = kept by none."""
    passed = (bits >= c0).to(tl.int32)
    if G > 1:
        passed += (bits >= c1).to(tl.int32)
    if G > 2:
        passed += (bits >= c2).to(tl.int32)
    return G - passed


@triton.jit
def _prefix_counts(param_ptr, totals, G: tl.constexpr, MODE: tl.constexpr, count_ptr):
    """Each projection's list length: the inputs of every category up to its own rank among the group.

    A projection keeps exactly the categories 0..G - #{projections at most as strict}; strictness
    is known from the parameters alone (a smaller k, or a larger threshold, is stricter).
    """
    cats = tl.arange(0, 4)
    for g in tl.static_range(G):
        mine = tl.load(param_ptr + g)
        looser = tl.full((), 0, tl.int32)
        for h in tl.static_range(G):
            other = tl.load(param_ptr + h)
            if MODE == 1:
                looser += (other >= mine).to(tl.int32)
            else:
                looser += (other <= mine).to(tl.int32)
        last = G - looser
        tl.store(count_ptr + g, tl.sum(tl.where(cats <= last, totals, 0), axis=0).to(tl.int32))


@triton.jit
def _unpack(packed, cats):
    """[4] counts per category from a packed int64 (21 bits each)."""
    return ((packed >> (21 * cats).to(tl.int64)) & 0x1FFFFF).to(tl.int32)


@triton.jit
def _select_kernel(
    a_ptr, a_stride, b_ptr, b_stride, h_ptr, h_stride, w_ptr, pw_ptr, eps, inv_n,
    x_ptr, x_stride, param_ptr, cut_ptr, idx_ptr, val_ptr, count_ptr, xm_ptr, xm_stride_g,
    zero_ptr, zero_stride, n_zero, n_cols, hint_ptr, stats_ptr,
    MODE: tl.constexpr, G: tl.constexpr, LISTS: tl.constexpr, COMPACT: tl.constexpr, MASK_OUT: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr, POST_NORM: tl.constexpr, STYLE: tl.constexpr,
    ACT: tl.constexpr, PASSES: tl.constexpr, EXTRA: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
    ZERO_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x = _prologue(row, cols, inside, a_ptr, a_stride, b_ptr, b_stride, h_ptr, h_stride, w_ptr, pw_ptr, eps, inv_n,
                  h_ptr, HAS_DELTA, PROLOGUE, HAS_DELTA, POST_NORM, STYLE, ACT, DT)
    tl.store(x_ptr + row * x_stride + cols, x.to(DT), mask=inside)
    if n_zero > 0:  # the downstream GEMV accumulates into this buffer
        for start in range(0, n_zero, ZERO_BLOCK):
            offs = start + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + row * zero_stride + offs, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs < n_zero)
    if MODE != 0:
        bits = tl.where(inside, tl.abs(x).to(tl.int32, bitcast=True), -1)
        c0, c1, c2 = _cuts(bits, param_ptr, hint_ptr + row, stats_ptr, G, MODE, PASSES, EXTRA, WINDOW)
        if LISTS:  # the union sweep reads every sequence's cuts; without lists there is no buffer for them
            tl.store(cut_ptr + row, c0)
            if G > 1:
                tl.store(cut_ptr + 64 + row, c1)
            if G > 2:
                tl.store(cut_ptr + 128 + row, c2)
        if MASK_OUT:  # each projection's own masked copy, for dense GEMMs (batches whose union is nearly dense)
            tl.store(xm_ptr + row * x_stride + cols, tl.where(bits >= c0, x, 0.0).to(DT), mask=inside)
            if G > 1:
                tl.store(xm_ptr + xm_stride_g + row * x_stride + cols, tl.where(bits >= c1, x, 0.0).to(DT), mask=inside)
            if G > 2:
                tl.store(xm_ptr + 2 * xm_stride_g + row * x_stride + cols, tl.where(bits >= c2, x, 0.0).to(DT),
                         mask=inside)
        if COMPACT and G == 1:  # one projection: a plain int32 prefix sum (the packed int64 scan costs twice)
            kept = bits >= c0
            slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
            tl.store(idx_ptr + slot, cols, mask=kept)
            tl.store(val_ptr + slot, x.to(DT), mask=kept)
            tl.store(count_ptr, tl.sum(kept.to(tl.int32), axis=0))
        elif COMPACT:  # one sequence: write the shared list directly
            cat = _category(bits, c0, c1, c2, G)
            kept = cat < G
            packed = tl.where(kept, tl.full([BLOCK], 1, tl.int64) << (21 * cat).to(tl.int64), 0)
            cats = tl.arange(0, 4)
            totals = _unpack(tl.sum(packed, axis=0), cats)
            rank = ((tl.cumsum(packed, axis=0) >> (21 * cat).to(tl.int64)) & 0x1FFFFF).to(tl.int32) - 1
            offset = tl.where(cat > 0, tl.sum(tl.where(cats == 0, totals, 0), axis=0), 0)
            offset += tl.where(cat > 1, tl.sum(tl.where(cats == 1, totals, 0), axis=0), 0)
            slot = offset + rank
            tl.store(idx_ptr + slot, cols, mask=kept)
            tl.store(val_ptr + slot, x.to(DT), mask=kept)
            _prefix_counts(param_ptr, totals, G, MODE, count_ptr)


@triton.jit
def _union_compact_kernel(
    x_ptr, x_stride, param_ptr, cut_ptr, idx_ptr, val_ptr, count_ptr, val_stride_b, n_rows, n_cols,
    G: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """Several sequences: the union of their kept inputs, in categories as above (two sweeps over the row)."""
    _pdl_enter(PDL)
    rows = tl.arange(0, BLOCK_B)
    row_in = rows < n_rows
    c0 = tl.load(cut_ptr + rows, mask=row_in, other=KEEP_NOTHING)
    c1 = tl.load(cut_ptr + 64 + rows, mask=row_in, other=KEEP_NOTHING)
    c2 = tl.load(cut_ptr + 128 + rows, mask=row_in, other=KEEP_NOTHING)
    cats = tl.arange(0, 4)
    totals_packed = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, CHUNK):  # sweep 1: how many inputs fall in each category
        cols = start + tl.arange(0, CHUNK)
        inside = row_in[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=0.0)
        bits = tl.where(inside, tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), -1)
        cat = tl.min(_category(bits, c0[:, None], c1[:, None], c2[:, None], G), axis=0)
        totals_packed += tl.sum(tl.where(cat < G, tl.full([CHUNK], 1, tl.int64) << (21 * cat).to(tl.int64), 0), axis=0)
    totals = _unpack(totals_packed, cats)
    t0 = tl.sum(tl.where(cats == 0, totals, 0), axis=0)
    t1 = tl.sum(tl.where(cats == 1, totals, 0), axis=0)
    before = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, CHUNK):  # sweep 2: write every input at its slot
        cols = start + tl.arange(0, CHUNK)
        inside = row_in[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=0.0)
        bits = tl.where(inside, tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), -1)
        cat = tl.min(_category(bits, c0[:, None], c1[:, None], c2[:, None], G), axis=0)
        kept = cat < G
        packed = tl.where(kept, tl.full([CHUNK], 1, tl.int64) << (21 * cat).to(tl.int64), 0)
        rank = (((before + tl.cumsum(packed, axis=0)) >> (21 * cat).to(tl.int64)) & 0x1FFFFF).to(tl.int32) - 1
        slot = tl.where(cat > 0, t0, 0) + tl.where(cat > 1, t1, 0) + rank
        tl.store(idx_ptr + slot, cols, mask=kept)
        tl.store(val_ptr + rows[:, None] * val_stride_b + slot[None, :], x, mask=row_in[:, None] & kept[None, :])
        before += tl.sum(packed, axis=0)
    _prefix_counts(param_ptr, totals, G, MODE, count_ptr)


def _warps(block: int) -> int:
    """Threads for one row held in registers. A 16384-wide row spills at 16 warps too (ptxas: 128
    registers, 136 bytes), but 32 warps was slower on the H200 (the 11008-wide down-projection select:
    33.6 against 26.2 us, bench/results/decode_h200_warps32.txt)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class CompactLists:
    """Where ``select_group`` writes the kept inputs of a group of G projections for B sequences.

    ``idx`` [n] int32 (kept input indices, strictest category first), ``val`` [B, n] (their values
    per sequence), ``count`` [G] int32 (each projection's prefix of the list, read by the GEMV on the
    device: no host sync), ``cuts`` [G, 64] int32 (each sequence's cut bits, for batch > 1).
    """

    MAX_BATCH = 64

    def __init__(self, groups: int, batch: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> None:
        if not 1 <= groups <= 3 or not 1 <= batch <= self.MAX_BATCH:
            raise ValueError(f"1-3 projections and 1-{self.MAX_BATCH} sequences, got {groups} and {batch}")
        self.groups = groups
        self.idx = torch.zeros(n_cols, dtype=torch.int32, device=device)
        self.val = torch.zeros(batch, n_cols, dtype=dtype, device=device)
        self.count = torch.zeros(groups, dtype=torch.int32, device=device)
        self.cuts = torch.zeros(3, self.MAX_BATCH, dtype=torch.int32, device=device)


class CutHints:
    """Where one group of one layer starts the next token's TopK search: each sequence's last cut.

    A projection's k-th largest magnitude moves little from one token to the next, so the select
    first tries a window around the last cut (``_window_cut``: one histogram pass instead of four)
    and runs the full radix select only when the cut left the window; the result is exact either
    way. ``values`` [3, 64] int32 holds the cut bits of projection g, sequence b at [g, b]; ``stats``
    [2] int32 (one per decoder, shared by its hints) counts the hinted cuts and the misses. ``window``
    is the histogram's bins (a power of two, 8 or more): its middle bins span window - 2 bf16 units
    (1/128 of a binade each) around the last cut.
    """

    def __init__(self, device: torch.device, stats: torch.Tensor | None = None, window: int = 128) -> None:
        if window < 8 or window & (window - 1):
            raise ValueError(f"the hint window must be a power of two of at least 8 bins, got {window}")
        self.window = window
        self.values = torch.zeros(3, CompactLists.MAX_BATCH, dtype=torch.int32, device=device)
        self.stats = stats if stats is not None else torch.zeros(2, dtype=torch.int32, device=device)


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
    lists: CompactLists | None = None,
    zero: torch.Tensor | None = None,
    masked_out: torch.Tensor | None = None,
    hints: CutHints | None = None,
    compact: bool = True,
) -> None:
    """Run the prologue for every sequence of the batch and, unless ``mode`` is dense, fill ``lists``.

    ``x_out`` [B, n] receives the prepared input in the model dtype (the dense GEMV's input and the
    union sweep's source). ``params`` [G] int32 holds each projection's k (TopK) or its threshold's
    float32 bit pattern + 1 (threshold mode). ``zero`` [B, m] float32 is zeroed for the GEMV that
    accumulates into it. ``masked_out`` [G, B, n] (instead of ``lists``) receives every projection's
    own masked input, for dense GEMMs. ``hints`` (TopK only) start each cut's search at the last token's.
    ``compact=False`` writes only the cuts to ``lists.cuts`` (for ``slice_gemv``, which compacts itself).
    """
    n_rows, n_cols = x_out.shape
    block = triton.next_power_of_2(n_cols)
    dummy = x_out
    groups = lists.groups if lists is not None else (masked_out.shape[0] if masked_out is not None else 1)
    union = compact and lists is not None and n_rows > 1
    one_list = compact and lists is not None and n_rows == 1
    pdl = use_pdl(x_out.device)
    extra = {"launch_pdl": True} if pdl else {}
    _select_kernel[(n_rows,)](
        a if a is not None else dummy, a.stride(0) if a is not None else 0,
        b if b is not None else dummy, b.stride(0) if b is not None else 0,
        h if h is not None else dummy, h.stride(0) if h is not None else 0,
        norm_weight if norm_weight is not None else dummy,
        post_norm_weight if post_norm_weight is not None else dummy,
        float(eps), 1.0 / n_cols,
        x_out, x_out.stride(0),
        params if params is not None else dummy,
        lists.cuts if lists is not None else dummy,
        lists.idx if lists is not None else dummy,
        lists.val if lists is not None else dummy,
        lists.count if lists is not None else dummy,
        masked_out if masked_out is not None else dummy, masked_out.stride(0) if masked_out is not None else 0,
        zero if zero is not None else dummy, zero.stride(0) if zero is not None else 0,
        zero.shape[1] if zero is not None else 0, n_cols,
        hints.values if hints is not None else dummy, hints.stats if hints is not None else dummy,
        MODE=mode, G=groups, LISTS=lists is not None, COMPACT=one_list, MASK_OUT=masked_out is not None,
        PROLOGUE=prologue, HAS_DELTA=has_delta, POST_NORM=post_norm_weight is not None,
        STYLE=NORM_STYLES[style], ACT=ACTIVATIONS[activation], PASSES=RADIX_PASSES[x_out.dtype],
        EXTRA=WINDOW_EXTRA_PASSES[x_out.dtype], WINDOW=hints.window if hints is not None and mode == MODE_TOPK else 0,
        BLOCK=block,
        ZERO_BLOCK=min(4096, triton.next_power_of_2(max(zero.shape[1], 16))) if zero is not None else 16,
        PDL=pdl, num_warps=_warps(block), **extra,
    )
    if union:
        _union_compact_kernel[(1,)](
            x_out, x_out.stride(0), params, lists.cuts, lists.idx, lists.val, lists.count, lists.val.stride(0),
            n_rows, n_cols, G=groups, MODE=mode, BLOCK_B=triton.next_power_of_2(n_rows),
            CHUNK=min(1024, block), PDL=pdl, num_warps=4, **extra,
        )


def threshold_param(tau: float, dtype: torch.dtype) -> int:
    """The int32 kernel parameter for threshold mode: keep |x| > tau, tau rounded to the model dtype first.

    (``F.hardshrink`` on a bf16 tensor compares against the threshold in bf16, so rounding it first
    keeps the same entries as the masked path.)
    """
    rounded = torch.tensor([tau], dtype=dtype).float()
    return int(rounded.view(torch.int32).item()) + 1
