"""The sparse decode kernels against plain torch references.

On a machine without CUDA these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which executes the same kernel code with NumPy; bfloat16 is checked only on
CUDA because the interpreter's bf16 ``tl.dot`` is not faithful. Fresh random inputs in every test,
outputs poisoned before the kernel runs so unwritten entries show.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the sparse decode kernels need the triton package")

import triton  # noqa: E402

from acttail_core.kernels import gather_gemv  # noqa: E402
from acttail_core.kernels.attention import decode_attention  # noqa: E402
from acttail_core.kernels.fused_gemv import FusedGemv, FusedPrologue, FusedScratch  # noqa: E402
from acttail_core.kernels.gather_gemv import GatherGemv, GemvConfig, sm_count  # noqa: E402
from acttail_core.kernels.select import (  # noqa: E402
    ACT_MUL,
    MODE_THRESHOLD,
    MODE_TOPK,
    PLAIN,
    RESIDUAL_NORM,
    CompactLists,
    CutHints,
    select_group,
    threshold_param,
)
from acttail_core.kernels.slice_gemv import SliceGemv, SliceScratch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def reference_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """TopK as the masked path does it: |x| >= the k-th largest magnitude (ties kept), exact zeros dropped."""
    a = x.float().abs()
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k >= a.shape[-1]:
        return a > 0
    kth = a.topk(k, dim=-1).values[..., -1:]
    return (a >= kth) & (a > 0)


def run_select(x: torch.Tensor, params: list[int], mode: int = MODE_TOPK,
               hints: CutHints | None = None) -> CompactLists:
    lists = CompactLists(len(params), x.shape[0], x.shape[1], x.dtype, DEVICE)
    lists.idx.fill_(-7)
    lists.val.fill_(float("nan"))
    x_out = torch.full_like(x, float("nan"))
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=mode,
                 params=torch.tensor(params, dtype=torch.int32, device=DEVICE), lists=lists, hints=hints)
    assert torch.equal(x_out, x)
    return lists


def check_lists(lists: CompactLists, x: torch.Tensor, keeps: list[torch.Tensor]) -> None:
    """The shared list holds every kept input once, with its raw values; each projection's prefix is
    exactly the inputs some sequence keeps for it (for one sequence: exactly its TopK)."""
    per_group = [keep.any(dim=0) for keep in keeps]  # [n] per projection: kept by some sequence
    union = torch.stack(per_group).any(dim=0)
    total = int(union.sum())
    listed = lists.idx[:total].long()
    assert sorted(listed.tolist()) == union.nonzero().flatten().tolist()
    assert torch.equal(lists.val[:, :total], x[:, listed])
    counts = lists.count.tolist()
    for g, members in enumerate(per_group):
        assert counts[g] == int(members.sum())
        assert sorted(listed[: counts[g]].tolist()) == members.nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 100, 576, 1000])
def test_topk_cut_and_compaction_single_sequence(dtype, n):
    x = torch.randn(1, n, device=DEVICE).to(dtype)
    x[0, ::11] = 0.0  # exact zeros are never kept, whatever k says
    ks = [0, 1, n // 3, n - 1, n, n + 5][:3]
    lists = run_select(x, ks)
    check_lists(lists, x, [reference_keep(x, k) for k in ks])
    lists = run_select(x, [n, n + 5, max(1, n // 2)])
    check_lists(lists, x, [reference_keep(x, k) for k in (n, n + 5, max(1, n // 2))])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_at_the_kth_value_are_all_kept(dtype):
    values = torch.tensor([3.0, -3.0, 1.0, 3.0, 2.0, -2.0, 2.0, 0.5, 2.0, -0.25], device=DEVICE).to(dtype)
    x = values[None, :]
    lists = run_select(x, [2, 4, 5])  # k-th value 3 (3 tied), 2 (4 tied), 2
    assert lists.count.tolist() == [3, 7, 7]
    check_lists(lists, x, [reference_keep(x, k) for k in (2, 4, 5)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_mode_keeps_magnitudes_above_tau(dtype):
    x = torch.randn(1, 300, device=DEVICE).to(dtype)
    taus = [0.0, 0.5, 1.3]
    lists = run_select(x, [threshold_param(t, dtype) for t in taus], mode=MODE_THRESHOLD)
    rounded = [torch.tensor(t, dtype=dtype).float().item() for t in taus]
    check_lists(lists, x, [x.float().abs() > t for t in rounded])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_reads_the_union_and_keeps_each_sequences_own_topk(dtype):
    x = torch.randn(3, 513, device=DEVICE).to(dtype)
    ks = [17, 200, 513]
    lists = run_select(x, ks)
    check_lists(lists, x, [reference_keep(x, k) for k in ks])


HINT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here: the interpreter is faithful


@pytest.mark.parametrize("dtype", HINT_DTYPES)
@pytest.mark.parametrize("window", [16, 128])
def test_hinted_cut_is_exact_whether_the_hint_holds_or_not(dtype, window):
    """The window around the last cut gives the same lists as the full radix select: when the hint is
    empty, when it is the exact cut, when the input moved a little (hits) and far (misses)."""
    x = torch.randn(2, 700, device=DEVICE).to(dtype)
    x[:, ::13] = 0.0
    ks = [5, 350, 690]  # 690 exceeds the nonzero inputs: every nonzero is kept
    hints = CutHints(DEVICE, window=window)
    previous_misses = 0
    for step, scale in enumerate([1.0, 1.0, 1.03, 8.0, 1 / 64]):
        inputs = (x.float() * scale).to(dtype)
        lists = run_select(inputs, ks, hints=hints)
        check_lists(lists, inputs, [reference_keep(inputs, k) for k in ks])
        cuts, misses = hints.stats.tolist()
        assert cuts == 6 * (step + 1)
        if step in (1, 2):  # the same input, then a 3% larger one: every cut is found in the window
            assert misses == previous_misses
        if step == 3:  # 8x larger: three binades (384 bf16 units) away from every hint
            assert misses == previous_misses + 4  # (the all-kept cut of k = 690 stays 0 and still hits)
        previous_misses = misses


@pytest.mark.parametrize("dtype", HINT_DTYPES)
def test_hinted_cut_keeps_ties_and_computes_equal_budgets_once(dtype):
    values = torch.tensor([3.0, -3.0, 1.0, 3.0, 2.0, -2.0, 2.0, 0.5, 2.0, -0.25], device=DEVICE).to(dtype)
    x = values[None, :]
    hints = CutHints(DEVICE)
    for _ in range(2):
        lists = run_select(x, [4, 4, 2], hints=hints)  # q and k share k = 4: one search for both
        assert lists.count.tolist() == [7, 7, 3]
        check_lists(lists, x, [reference_keep(x, k) for k in (4, 4, 2)])
    assert hints.stats.tolist()[0] == 4
    assert hints.values[:, 0].tolist() == [torch.tensor(v).float().view(torch.int32).item() for v in (2.0, 0.0, 3.0)]


def test_hint_window_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        CutHints(DEVICE, window=100)


GUARD = 512  # elements after each output that a kernel must leave alone


def guarded(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An output tensor of ``shape`` at the start of a larger poisoned buffer, and the guard region after it.

    Under the interpreter a write past an output lands in the host heap and crashes the process later
    (when the memory is freed); on a GPU it silently overwrites a neighbouring tensor. Both show here.
    """
    numel = math.prod(shape)
    buffer = torch.full((numel + GUARD,), -3.0, dtype=dtype, device=DEVICE)
    return buffer[:numel].view(shape), buffer[numel:]


@pytest.mark.slow  # 18 interpreted kernel grids
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_masked_copies_keep_each_projections_topk_and_write_nothing_else(dtype, batch, groups):
    """The masked path (batches whose union is nearly dense): every projection's own masked input, for the
    narrow inputs of small models too; nothing written outside ``x_out`` and ``masked_out``."""
    n = 32
    x = torch.randn(batch, n, device=DEVICE).to(dtype)
    ks = [5, 16, 31][:groups]
    x_out, x_guard = guarded((batch, n), dtype)
    masked, masked_guard = guarded((groups, batch, n), dtype)
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=MODE_TOPK,
                 params=torch.tensor(ks, dtype=torch.int32, device=DEVICE), masked_out=masked)
    assert torch.equal(x_out, x)
    for g, k in enumerate(ks):
        assert torch.equal(masked[g], torch.where(reference_keep(x, k), x, torch.zeros_like(x)))
    assert (x_guard == -3).all() and (masked_guard == -3).all()


@pytest.mark.parametrize("batch", [1, 2])
def test_compaction_writes_nothing_outside_its_outputs(batch):
    n = 32
    x = torch.randn(batch, n, device=DEVICE)
    x_out, x_guard = guarded((batch, n), x.dtype)
    lists = CompactLists(3, batch, n, x.dtype, DEVICE)
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=MODE_TOPK,
                 params=torch.tensor([5, 16, 31], dtype=torch.int32, device=DEVICE), lists=lists)
    assert (x_guard == -3).all()
    check_lists(lists, x, [reference_keep(x, k) for k in (5, 16, 31)])


def torch_rms(x: torch.Tensor, w: torch.Tensor, style: str, eps: float, dtype: torch.dtype) -> torch.Tensor:
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if style == "llama":
        return (w.float() * xn.to(dtype).float()).to(dtype)
    return (xn * (1.0 + w.float())).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["llama", "gemma"])
@pytest.mark.parametrize("post_norm", [False, True])
def test_residual_norm_prologue(dtype, style, post_norm):
    n, eps = 200, 1e-5
    h = torch.randn(2, n, device=DEVICE).to(dtype)
    delta = torch.randn(2, n, device=DEVICE)  # a float32 accumulator, as the sparse GEMV leaves it
    w, pw = torch.randn(n, device=DEVICE).to(dtype), torch.randn(n, device=DEVICE).to(dtype)
    d = delta.to(dtype)
    if post_norm:
        d = torch_rms(d, pw, style, eps, dtype)
    h_ref = (h.float() + d.float()).to(dtype)
    x_ref = torch_rms(h_ref, w, style, eps, dtype)
    x_out = torch.full_like(h, float("nan"))
    select_group(prologue=RESIDUAL_NORM, x_out=x_out, h=h, a=delta, has_delta=True, norm_weight=w,
                 post_norm_weight=pw if post_norm else None, eps=eps, style=style)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x_out, x_ref, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_prologue_and_zeroing(dtype, activation):
    gate, up = torch.randn(2, 300, device=DEVICE) * 3, torch.randn(2, 300, device=DEVICE)
    g, u = gate.to(dtype), up.to(dtype)
    act = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    ref = (act.to(dtype) * u).to(dtype)
    x_out = torch.full_like(g, float("nan"))
    zero = torch.full((2, 77), 5.0, device=DEVICE)
    select_group(prologue=ACT_MUL, x_out=x_out, a=gate, b=up, activation=activation, zero=zero)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.count_nonzero(zero) == 0


@pytest.mark.slow  # 12 interpreted kernel grids
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("widths", [[130], [96, 33, 33], [200, 70]])
@pytest.mark.parametrize("pipeline", [False, True])
def test_gather_gemv_equals_dense_matmul_of_the_masked_input(dtype, batch, widths, pipeline):
    n_in = 257
    x = torch.randn(batch, n_in, device=DEVICE).to(dtype)
    ks = [0, 64, n_in][: len(widths)] if len(widths) > 1 else [40]
    lists = run_select(x, ks)
    weight = torch.randn(sum(widths), n_in, device=DEVICE).to(dtype)  # [out, in] as nn.Linear stores it
    wt = weight.t().contiguous()
    config = GemvConfig(block_n=32, block_k=16, num_warps=4, num_stages=2, pipeline=pipeline)
    y = torch.full((batch, sum(widths)), 0.0, device=DEVICE)
    GatherGemv(wt, widths, ks, batch, config)(lists, y)
    start = 0
    for width, k in zip(widths, ks):
        masked = torch.where(reference_keep(x, k), x, torch.zeros_like(x)).double()
        expected = masked @ weight[start : start + width].double().t()
        got = y[:, start : start + width].double()
        err = (got - expected).norm() / max(expected.norm().item(), 1e-30)
        if k == 0:
            assert torch.count_nonzero(got) == 0
        else:
            assert err < (1e-6 if dtype == torch.float32 else 1e-3), err
        start += width


@pytest.mark.parametrize("pipeline,pow2_split", [(False, True), (True, False)])
def test_gather_gemv_adds_to_what_is_there_and_splits_k(pipeline, pow2_split):
    x = torch.randn(1, 1000, device=DEVICE)
    lists = run_select(x, [900])
    weight = torch.randn(64, 1000, device=DEVICE)
    base = torch.randn(1, 64, device=DEVICE)
    y = base.clone()
    gemv = GatherGemv(weight.t().contiguous(), [64], [900], 1,
                      GemvConfig(block_n=32, block_k=16, programs_per_sm=10, pipeline=pipeline, pow2_split=pow2_split))
    # 10 programs per SM over 2 column tiles, but no slice shorter than a block of the 900 kept rows
    split = min(10 * sm_count(DEVICE) // 2, triton.cdiv(900, 16))
    assert gemv.split == (triton.next_power_of_2(split) if pow2_split else split) and gemv.split > 1
    gemv(lists, y)
    masked = torch.where(reference_keep(x, 900), x, torch.zeros_like(x))
    torch.testing.assert_close(y, base + masked @ weight.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths,ks", [([130], [40]), ([96, 33, 33], [0, 64, 257]), ([200, 70], [1, 256])])
@pytest.mark.parametrize("block_k,pipeline", [(512, False), (16, True)])
def test_slice_gemv_equals_dense_matmul_of_each_projections_masked_input(dtype, widths, ks, block_k, pipeline):
    n_in = 257  # not a multiple of any block; 16-row blocks split the rows into slices, a 512-row block cannot
    x = torch.randn(1, n_in, device=DEVICE).to(dtype)
    x[0, ::17] = 0.0
    lists = CompactLists(len(ks), 1, 1, dtype, DEVICE)
    x_out = torch.full_like(x, float("nan"))
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=MODE_TOPK, lists=lists, compact=False,
                 params=torch.tensor(ks, dtype=torch.int32, device=DEVICE))
    weight = torch.randn(sum(widths), n_in, device=DEVICE).to(dtype)
    config = GemvConfig(block_n=32, block_k=block_k, num_warps=4, num_stages=2, programs_per_sm=32,
                        pipeline=pipeline)
    gemv = SliceGemv(weight.t().contiguous(), widths, SliceScratch(dtype, DEVICE), config)
    assert (gemv.split > 1) == (block_k < n_in)
    base = torch.randn(1, sum(widths), device=DEVICE)
    y = base.clone()
    gemv(x_out, lists, y)
    start = 0
    for width, k in zip(widths, ks):
        masked = torch.where(reference_keep(x, k), x, torch.zeros_like(x)).double()
        expected = masked @ weight[start : start + width].double().t() + base[:, start : start + width].double()
        got = y[:, start : start + width].double()
        err = (got - expected).norm() / expected.norm()
        assert err < (1e-6 if dtype == torch.float32 else 1e-3), err
        start += width


@pytest.mark.slow  # about 30 s under the interpreter
@pytest.mark.parametrize("kernel", ["slice", "gather"])
@pytest.mark.parametrize("n_in,widths,ks", [(4096, [4096, 1024, 1024], [2048, 1900, 2200]), (11008, [4096], [5504])])
def test_sparse_gemvs_at_7b_shapes_with_the_gpu_split(kernel, n_in, widths, ks, monkeypatch):
    """Llama-2-7B's q|k|v (GQA-sized k and v) and down projection, with the GPU's tiles and split-K sized for an
    H100's 132 SMs (16 slices per column tile), in float32: the toy shapes above never split this finely."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(gather_gemv, "sm_count", lambda device: 132)
    x = torch.randn(1, n_in, device=DEVICE)
    weight = torch.randn(sum(widths), n_in, device=DEVICE) / n_in**0.5
    lists = CompactLists(len(ks), 1, n_in, x.dtype, DEVICE)
    x_out = torch.empty_like(x)
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=MODE_TOPK, lists=lists, compact=kernel == "gather",
                 params=torch.tensor(ks, dtype=torch.int32, device=DEVICE))
    y = torch.zeros(1, sum(widths), device=DEVICE)
    if kernel == "slice":
        gemv = SliceGemv(weight.t().contiguous(), widths, SliceScratch(x.dtype, DEVICE), GemvConfig())
        gemv(x_out, lists, y)
    else:
        gemv = GatherGemv(weight.t().contiguous(), widths, ks, 1, GemvConfig())
        gemv(lists, y)
    assert gemv.split >= 8
    start = 0
    for width, k in zip(widths, ks):
        masked = torch.where(reference_keep(x, k), x, torch.zeros_like(x)).double()
        expected = masked @ weight[start : start + width].double().t()
        err = (y[:, start : start + width].double() - expected).norm() / expected.norm()
        assert err < 1e-6, (width, k, err)
        start += width


def test_gather_gemv_refuses_row_major_weights_and_bad_widths():
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError):
        GatherGemv(weight.t(), [8], [4], 1)
    with pytest.raises(ValueError):
        GatherGemv(weight.t().contiguous(), [5], [4], 1)


def run_fused(x, weight, widths, params, config, mode=MODE_TOPK, zero=None):
    """The fused kernel on a plain input row; returns y and the kernel object (for its grid)."""
    scratch = FusedScratch(x.dtype, DEVICE)
    fused = FusedGemv(weight.t().contiguous(), widths, torch.tensor(params, dtype=torch.int32, device=DEVICE),
                      mode=mode, eps=1e-6, style="llama", activation="silu", config=config, scratch=scratch)
    y = torch.zeros(1, sum(widths), device=DEVICE)
    fused(FusedPrologue(PLAIN, a=x), y, zero)
    return y, fused


# grids: one program; column programs only; row shares only; both (interpreted, so kept small)
FUSED_CONFIGS = [GemvConfig(block_n=32, block_k=16, num_warps=4, num_stages=2, programs_per_sm=p) for p in (1, 4, 16)]


@pytest.mark.slow  # interpreted kernel grids
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths,ks", [([130], [40]), ([96, 33, 33], [0, 64, 257]), ([200, 70], [1, 256])])
@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=["1", "4", "16"])
def test_fused_gemv_equals_dense_matmul_of_each_projections_masked_input(dtype, widths, ks, config):
    n_in = 257  # not a multiple of any block
    x = torch.randn(1, n_in, device=DEVICE).to(dtype)
    x[0, 5:9] = x[0, 100]  # ties; the k-th value lands among them for some k
    weight = torch.randn(sum(widths), n_in, device=DEVICE).to(dtype)
    zero = torch.full((1, 77), 5.0, device=DEVICE)
    y, fused = run_fused(x, weight, widths, ks, config, zero=zero)
    assert torch.count_nonzero(zero) == 0
    start = 0
    for width, k in zip(widths, ks):
        masked = torch.where(reference_keep(x, k), x, torch.zeros_like(x)).double()
        expected = masked @ weight[start : start + width].double().t()
        got = y[:, start : start + width].double()
        if k == 0:
            assert torch.count_nonzero(got) == 0
        else:
            err = (got - expected).norm() / expected.norm()
            assert err < (1e-6 if dtype == torch.float32 else 1e-3), err
        start += width


@pytest.mark.slow
def test_fused_gemv_ties_keep_every_input_equal_to_the_kth():
    x = torch.tensor([[3.0, -2.0, 2.0, 2.0, -2.0, 1.0, 0.0, 0.5]], device=DEVICE)
    weight = torch.eye(8, device=DEVICE)
    for k, kept in ((1, [0]), (2, [0, 1, 2, 3, 4]), (5, [0, 1, 2, 3, 4]), (8, [0, 1, 2, 3, 4, 5, 7])):
        y, _ = run_fused(x, weight, [8], [k], FUSED_CONFIGS[1])
        expected = torch.zeros_like(x)
        expected[0, kept] = x[0, kept]
        assert torch.equal(y, expected), (k, y)


@pytest.mark.slow
def test_fused_gemv_threshold_mode_and_row_shares():
    x = torch.randn(1, 1000, device=DEVICE)
    weight = torch.randn(48, 1000, device=DEVICE)
    config = GemvConfig(block_n=16, block_k=16, num_warps=4, num_stages=2, programs_per_sm=32)
    y, fused = run_fused(x, weight, [48], [threshold_param(0.7, torch.float32)], config, mode=MODE_THRESHOLD)
    assert fused.pr > 1 and fused.pc > 1
    masked = torch.where(x.abs() > 0.7, x, torch.zeros_like(x))
    torch.testing.assert_close(y, masked @ weight.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_fused_gemv_residual_prologue_writes_the_other_buffer(style):
    n, eps = 200, 1e-5
    h = torch.randn(1, n, device=DEVICE)
    delta = torch.randn(1, n, device=DEVICE)
    w = torch.randn(n, device=DEVICE)
    h_ref = h + delta
    x_ref = torch_rms(h_ref, w, style, eps, torch.float32)
    weight = torch.randn(40, n, device=DEVICE)
    h_before = h.clone()
    h_out = torch.full_like(h, float("nan"))
    scratch = FusedScratch(torch.float32, DEVICE)
    fused = FusedGemv(weight.t().contiguous(), [40], torch.tensor([60], dtype=torch.int32, device=DEVICE),
                      mode=MODE_TOPK, eps=eps, style=style, activation="silu", config=FUSED_CONFIGS[2],
                      scratch=scratch)
    y = torch.zeros(1, 40, device=DEVICE)
    fused(FusedPrologue(RESIDUAL_NORM, a=delta, h=h, h_out=h_out, has_delta=True, norm_weight=w), y)
    assert torch.equal(h, h_before)
    torch.testing.assert_close(h_out, h_ref)
    masked = torch.where(reference_keep(x_ref, 60), x_ref, torch.zeros_like(x_ref))
    torch.testing.assert_close(y, masked @ weight.t(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="another buffer"):
        fused(FusedPrologue(RESIDUAL_NORM, a=delta, h=h, h_out=h, has_delta=True, norm_weight=w), y)


def torch_attention(q, k_new, v_new, k_hist, v_hist, pos, cos, sin, scale, window, n_heads):
    """Reference: RoPE on q and the new k, append to the history, softmax attention over the window."""
    head_dim = cos.shape[-1]

    def rope(x):  # x [..., head_dim]
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[pos] + rotated * sin[pos]

    batch = q.shape[0]
    n_kv = k_new.shape[1] // head_dim
    qh = rope(q.view(batch, n_heads, head_dim))
    kh = rope(k_new.view(batch, n_kv, head_dim))
    keys = torch.cat([k_hist[:, :, :pos], kh[:, :, None]], dim=2)
    values = torch.cat([v_hist[:, :, :pos], v_new.view(batch, n_kv, 1, head_dim)], dim=2)
    rep = n_heads // n_kv
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", qh, keys) * scale
    start = max(0, pos - window + 1) if window else 0
    scores[:, :, :start] = float("-inf")
    out = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)
    return out.reshape(batch, -1), kh


@pytest.mark.parametrize("n_heads,n_kv,window,pos", [(4, 4, 0, 0), (4, 2, 0, 37), (8, 2, 5, 40), (4, 1, 0, 70)])
def test_decode_attention_matches_torch(n_heads, n_kv, window, pos):
    batch, head_dim, t_max = 2, 16, 80
    q = torch.randn(batch, n_heads * head_dim, device=DEVICE)
    k = torch.randn(batch, n_kv * head_dim, device=DEVICE)
    v = torch.randn(batch, n_kv * head_dim, device=DEVICE)
    k_cache = torch.randn(batch, n_kv, t_max, head_dim, device=DEVICE)
    v_cache = torch.randn(batch, n_kv, t_max, head_dim, device=DEVICE)
    k_hist, v_hist = k_cache.clone(), v_cache.clone()
    inv_freq = 1e-2 ** (torch.arange(0, head_dim, 2, device=DEVICE) / head_dim)
    freqs = torch.arange(t_max, device=DEVICE)[:, None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    out = torch.full((batch, n_heads * head_dim), float("nan"), device=DEVICE)
    scale = 1 / math.sqrt(head_dim)
    decode_attention(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, out=out,
                     pos=torch.tensor([pos], device=DEVICE), cos=cos, sin=sin, scale=scale, n_heads=n_heads,
                     window=window)
    expected, k_roped = torch_attention(q, k, v, k_hist, v_hist, pos, cos, sin, scale, window, n_heads)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache[:, :, pos], k_roped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[:, :, pos], v.view(batch, n_kv, head_dim))
    untouched = [t for t in range(t_max) if t != pos]
    assert torch.equal(k_cache[:, :, untouched], k_hist[:, :, untouched])


def test_gather_gemv_reads_past_the_expected_count():
    """More kept inputs than the budget predicted (ties, threshold mode): the overflow loop reads them too."""
    x = torch.randn(1, 700, device=DEVICE)
    lists = run_select(x, [600])
    weight = torch.randn(48, 700, device=DEVICE)
    y = torch.zeros(1, 48, device=DEVICE)
    GatherGemv(weight.t().contiguous(), [48], [37], 1, GemvConfig(block_n=32, block_k=16, programs_per_sm=8))(lists, y)
    masked = torch.where(reference_keep(x, 600), x, torch.zeros_like(x))
    torch.testing.assert_close(y, masked @ weight.t(), atol=1e-4, rtol=1e-4)



HOPPER_COMPILE = """
import sys, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from acttail_core.kernels.fused_gemv import _fused_kernel
from acttail_core.kernels.gather_gemv import _gather_gemv_kernel
from acttail_core.kernels.select import _select_kernel, _warps
from acttail_core.kernels.slice_gemv import _slice_gemv_kernel

groups, prologue, block = json.loads(sys.argv[1])
bf16 = ("h_ptr", "h_out_ptr", "w_ptr", "pw_ptr", "wt_ptr", "scratch_val_ptr", "x_ptr", "val_ptr", "xm_ptr")
ints = ("param_ptr", "scratch_idx_ptr", "idx_ptr", "count_ptr", "cut_ptr", "hint_ptr", "stats_ptr")

def build(fn, constexprs, num_warps):
    names = fn.arg_names
    def kind(n):
        if n in constexprs:
            return "constexpr"
        if n.endswith("_ptr"):
            return "*bf16" if n in bf16 else "*i32" if n in ints else "*fp32"
        return "fp32" if n in ("eps", "inv_n") else "i32"
    source = ASTSource(fn, {n: kind(n) for n in names},
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})

common = dict(MODE=1, G=groups, PROLOGUE=prologue, HAS_DELTA=True, POST_NORM=groups == 2,
              STYLE=1 if groups == 2 else 0, ACT=0, PASSES=4, BLOCK=block)
warps = _warps(block)
build(_fused_kernel, {**common, "PC": 96, "PR": 2, "BLOCK_N": 128, "BLOCK_K": 64, "ZERO_BLOCK": 128}, warps)
for window in (0, 128):
    build(_select_kernel, {**common, "LISTS": True, "COMPACT": True, "MASK_OUT": False, "ZERO_BLOCK": 1024,
                           "PDL": False, "EXTRA": 0, "WINDOW": window}, warps)
build(_gather_gemv_kernel, {"SPLIT": 4, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_B": 16, "USE_DOT": groups == 1,
                            "PIPELINE": groups == 2, "PDL": False}, 8)
build(_slice_gemv_kernel, {"SPLIT": 8, "SLICE": 512 if block == 4096 else 1024, "BLOCK_N": 128, "BLOCK_K": 64,
                           "PIPELINE": groups != 2, "PDL": False}, 8)
"""


@pytest.mark.slow
@pytest.mark.parametrize("groups,prologue,block", [(3, RESIDUAL_NORM, 4096), (2, RESIDUAL_NORM, 4096),
                                                   (1, PLAIN, 4096), (1, ACT_MUL, 16384)])
def test_kernels_compile_for_hopper(groups, prologue, block):
    """The decode kernels compile to sm_90 cubins here (Triton ships ptxas; no GPU needed).

    The interpreter runs the kernels' Python, but only the compiler enforces Triton's own rules
    (constexpr globals, loop-carried types): without this, such errors show only on a GPU. It runs
    in a subprocess because the test session has switched the kernels to the interpreter.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE, json.dumps([groups, prologue, block])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
