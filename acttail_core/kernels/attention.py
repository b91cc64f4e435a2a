"""One decode step of attention: q/k norms, RoPE, the KV-cache write and single-query attention.

One program per (sequence, KV head) handles that head's group of query heads (GQA): it finishes k
and v for the new position (bias, optional RMSNorm per head, rotary embedding), writes them into the
static cache, then attends over positions [max(0, pos - window + 1), pos] with an online softmax in
blocks of ``BLOCK_T`` (flash-decoding without the split over the sequence, enough for the short
contexts a decode benchmark uses). The position is read from device memory, so a captured CUDA graph
replays every step unchanged.

Rounding follows transformers' eager code in the model dtype: the projections' outputs, the norms,
``q * cos`` and ``rotate_half(q) * sin`` and their sum are rounded like the reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import _pdl_enter, use_pdl


@triton.jit
def _finish_heads(src_ptr, bias_ptr, norm_ptr, cos, sin, heads, head_in, d, d_rot, sign, eps,
                  HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, STYLE: tl.constexpr,
                  ROPE: tl.constexpr, DT: tl.constexpr):
    """[H, D] rows of ``src`` (heads x head_dim) with bias, per-head norm and RoPE applied, exact in DT."""
    at = heads[:, None] * HEAD_DIM + d[None, :]
    at_rot = heads[:, None] * HEAD_DIM + d_rot[None, :]
    x = tl.load(src_ptr + at, mask=head_in[:, None], other=0.0).to(tl.float32)
    xr = tl.load(src_ptr + at_rot, mask=head_in[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + at, mask=head_in[:, None], other=0.0).to(tl.float32)
        xr += tl.load(bias_ptr + at_rot, mask=head_in[:, None], other=0.0).to(tl.float32)
    x = x.to(DT).to(tl.float32)
    xr = xr.to(DT).to(tl.float32)
    if HAS_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        w = tl.load(norm_ptr + d).to(tl.float32)
        wr = tl.load(norm_ptr + d_rot).to(tl.float32)
        if STYLE == 0:
            x = (x * r[:, None]).to(DT).to(tl.float32) * w[None, :]
            xr = (xr * r[:, None]).to(DT).to(tl.float32) * wr[None, :]
        else:
            x = x * r[:, None] * (1.0 + w[None, :])
            xr = xr * r[:, None] * (1.0 + wr[None, :])
        x = x.to(DT).to(tl.float32)
        xr = xr.to(DT).to(tl.float32)
    if ROPE:
        first = (x * cos[None, :]).to(DT).to(tl.float32)
        second = (sign[None, :] * xr * sin[None, :]).to(DT).to(tl.float32)
        x = (first + second).to(DT).to(tl.float32)
    return x


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, q_stride, k_stride, v_stride, qb_ptr, kb_ptr, vb_ptr, qn_ptr, kn_ptr, eps,
    cos_ptr, sin_ptr, kc_ptr, vc_ptr, out_ptr, out_stride, pos_ptr, scale, window, n_kv_heads, n_rep, t_max,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr, STYLE: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    d = tl.arange(0, HEAD_DIM)
    half: tl.constexpr = HEAD_DIM // 2
    d_rot = (d + half) % HEAD_DIM
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * HEAD_DIM + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HEAD_DIM + d).to(tl.float32)

    one = tl.arange(0, 1)
    kv_head = kvh + one
    every = one == 0
    k = _finish_heads(k_ptr + seq * k_stride, kb_ptr, kn_ptr, cos, sin, kv_head, every, d, d_rot, sign, eps,
                      HEAD_DIM, HAS_BIAS, HAS_NORM, STYLE, True, DT)
    v = _finish_heads(v_ptr + seq * v_stride, vb_ptr, kn_ptr, cos, sin, kv_head, every, d, d_rot, sign, eps,
                      HEAD_DIM, HAS_BIAS, False, STYLE, False, DT)
    cache_row = ((seq * n_kv_heads + kvh) * t_max).to(tl.int64) * HEAD_DIM
    tl.store(kc_ptr + cache_row + pos * HEAD_DIM + d[None, :], k.to(DT))
    tl.store(vc_ptr + cache_row + pos * HEAD_DIM + d[None, :], v.to(DT))
    tl.debug_barrier()  # the new position is read back below by other threads of this program

    heads = kvh * n_rep + tl.arange(0, BLOCK_H)
    head_in = tl.arange(0, BLOCK_H) < n_rep
    q = _finish_heads(q_ptr + seq * q_stride, qb_ptr, qn_ptr, cos, sin, heads, head_in, d, d_rot, sign, eps,
                      HEAD_DIM, HAS_BIAS, HAS_NORM, STYLE, True, DT)
    q = q.to(DT)
    start = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for t0 in range(start - start % BLOCK_T, pos + 1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_in = (t >= start) & (t <= pos)
        kt = tl.load(kc_ptr + cache_row + t[:, None] * HEAD_DIM + d[None, :], mask=t_in[:, None], other=0.0)
        vt = tl.load(vc_ptr + cache_row + t[:, None] * HEAD_DIM + d[None, :], mask=t_in[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        s = tl.where(t_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vt, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * out_stride + heads[:, None] * HEAD_DIM + d[None, :], out.to(DT), mask=head_in[:, None])


def decode_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    n_heads: int,
    window: int = 0,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    style: str = "llama",
) -> None:
    """Attention output [B, n_heads * head_dim] for the token at ``pos`` (a 1-element device tensor).

    ``q``/``k``/``v`` are row views [B, heads * head_dim] (float32 accumulators or model dtype);
    ``k_cache``/``v_cache`` [B, kv_heads, t_max, head_dim]; ``cos``/``sin`` [t_max, head_dim].
    """
    batch, n_kv, t_max, head_dim = k_cache.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} is not a power of two")
    n_rep = n_heads // n_kv
    dummy = out
    pdl = use_pdl(out.device)
    _decode_attention_kernel[(batch, n_kv)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0),
        q_bias if q_bias is not None else dummy, k_bias if k_bias is not None else dummy,
        v_bias if v_bias is not None else dummy,
        q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy, float(eps),
        cos, sin, k_cache, v_cache, out, out.stride(0), pos, float(scale), int(window), n_kv, n_rep, t_max,
        HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(n_rep)), BLOCK_T=32,
        HAS_BIAS=q_bias is not None, HAS_NORM=q_norm is not None, STYLE=0 if style == "llama" else 1,
        PDL=pdl, num_warps=4 if head_dim <= 128 else 8, **({"launch_pdl": True} if pdl else {}),
    )
