"""The sparse decode kernels against plain torch references.

On a machine without CUDA these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which executes the same kernel code with NumPy; bfloat16 is checked only on
CUDA because the interpreter's bf16 ``tl.dot`` is not faithful. Fresh random inputs in every test,
outputs poisoned before the kernel runs so unwritten entries show.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the sparse decode kernels need the triton package")

from acttail_core.kernels.attention import decode_attention  # noqa: E402
from acttail_core.kernels.gather_gemv import GatherGemv, GemvConfig  # noqa: E402
from acttail_core.kernels.select import (  # noqa: E402
    ACT_MUL,
    MODE_THRESHOLD,
    MODE_TOPK,
    PLAIN,
    RESIDUAL_NORM,
    CompactLists,
    select_group,
    threshold_param,
)

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


def run_select(x: torch.Tensor, params: list[int], mode: int = MODE_TOPK) -> CompactLists:
    lists = CompactLists(len(params), x.shape[0], x.shape[1], x.dtype, DEVICE)
    lists.idx.fill_(-7)
    lists.val.fill_(float("nan"))
    x_out = torch.full_like(x, float("nan"))
    select_group(prologue=PLAIN, a=x, x_out=x_out, mode=mode,
                 params=torch.tensor(params, dtype=torch.int32, device=DEVICE), lists=lists)
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
def test_gather_gemv_equals_dense_matmul_of_the_masked_input(dtype, batch, widths):
    n_in = 257
    x = torch.randn(batch, n_in, device=DEVICE).to(dtype)
    ks = [0, 64, n_in][: len(widths)] if len(widths) > 1 else [40]
    lists = run_select(x, ks)
    weight = torch.randn(sum(widths), n_in, device=DEVICE).to(dtype)  # [out, in] as nn.Linear stores it
    wt = weight.t().contiguous()
    config = GemvConfig(block_n=32, block_k=16, num_warps=4, num_stages=2)
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


def test_gather_gemv_adds_to_what_is_there_and_splits_k():
    x = torch.randn(1, 1000, device=DEVICE)
    lists = run_select(x, [900])
    weight = torch.randn(64, 1000, device=DEVICE)
    base = torch.randn(1, 64, device=DEVICE)
    y = base.clone()
    gemv = GatherGemv(weight.t().contiguous(), [64], [900], 1, GemvConfig(block_n=32, block_k=16, programs_per_sm=8))
    assert gemv.split > 1
    gemv(lists, y)
    masked = torch.where(reference_keep(x, 900), x, torch.zeros_like(x))
    torch.testing.assert_close(y, base + masked @ weight.t(), atol=1e-4, rtol=1e-4)


def test_gather_gemv_refuses_row_major_weights_and_bad_widths():
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError):
        GatherGemv(weight.t(), [8], [4], 1)
    with pytest.raises(ValueError):
        GatherGemv(weight.t().contiguous(), [5], [4], 1)


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
