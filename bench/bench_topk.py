"""Per-row TopK masking on a GPU: which implementation keeps the overhead small?

    python bench/bench_topk.py            # needs CUDA (and Triton for the fused kernel)

Part 1 times the mask alone on Llama-2-7B activation shapes (2048-token prefill and
1-token decode rows, widths 4096 and 11008, bf16), and checks every variant keeps
exactly the top-k set (ties at the k-th value may be kept too).
Part 2 times one Llama-2-7B decoder layer's forward (2048 tokens) with each variant
as a forward pre-hook on all seven projections, as a ratio to the dense layer.
Medians of CUDA-event timings after warm-up (triton.testing.do_bench).
"""
from __future__ import annotations

import torch


def topk_scatter(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def topk_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    kth = x.abs().topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return x * (x.abs() >= kth)


def kthvalue_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.abs()
    kth = a.float().kthvalue(x.shape[-1] - k + 1, dim=-1, keepdim=True).values.to(x.dtype)
    return x * (a >= kth)


def sort_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.abs()
    kth = a.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return x * (a >= kth)


def fixed_threshold(x: torch.Tensor, thr: float) -> torch.Tensor:
    return x * (x.abs() >= thr)


def check(out: torch.Tensor, x: torch.Tensor, k: int) -> str:
    kth = x.abs().float().topk(k, dim=-1).values[..., -1:]
    kept = out != 0
    ok_kept = bool(((x.abs().float() >= kth) | ~kept).all())  # nothing below the k-th value kept
    ok_top = bool((kept | (x.abs().float() <= kth) | (x == 0)).all())  # everything above it kept (ties: either)
    counts = kept.sum(-1)
    ok_values = bool((out[kept] == x[kept]).all())
    return "ok" if ok_kept and ok_top and ok_values and bool((counts >= k).all()) else "WRONG"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_topk needs a CUDA GPU")
    from triton.testing import do_bench

    from acttail_core.triton_topk import topk_mask

    variants = {
        "topk+scatter": topk_scatter,
        "topk values -> threshold": topk_threshold,
        "kthvalue -> threshold": kthvalue_threshold,
        "sort -> threshold": sort_threshold,
        "triton fused radix select": topk_mask,
    }
    torch.manual_seed(0)
    print("\nPart 1: mask alone, bf16, keep 50% (median ms; ratio to one x*(|x|>=t) pass)")
    print(f"{'shape':>14} | {'variant':<26} | {'ms':>8} | {'vs threshold':>12} | check")
    for rows in (2048, 1):
        for cols in (4096, 11008):
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            k = cols // 2
            base = do_bench(lambda: fixed_threshold(x, 0.67), warmup=25, rep=100, return_mode="median")
            for name, fn in variants.items():
                ms = do_bench(lambda: fn(x, k), warmup=25, rep=100, return_mode="median")
                print(f"{str((rows, cols)):>14} | {name:<26} | {ms:8.4f} | {ms / base:11.2f}x | "
                      f"{check(fn(x, k), x, k)}")
            print(f"{str((rows, cols)):>14} | {'fixed threshold (TEAL)':<26} | {base:8.4f} | {1.0:11.2f}x |")

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16).eval()
        rotary = LlamaRotaryEmbedding(config)
    hidden = torch.randn(1, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(2048, device="cuda")[None]
    cos_sin = rotary(hidden, positions)
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]

    def forward() -> None:
        with torch.no_grad():
            layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)

    dense = do_bench(forward, warmup=10, rep=100, return_mode="median")
    print("\nPart 2: one Llama-2-7B decoder layer, 2048-token prefill, bf16, 50% of every projection's input kept")
    print(f"{'variant':<26} | {'ms':>8} | {'vs dense':>8}")
    print(f"{'dense':<26} | {dense:8.3f} | {1.0:7.2f}x")
    hook_variants = dict(variants)
    hook_variants["fixed threshold (TEAL)"] = None
    for name, fn in hook_variants.items():
        handles = []
        for lin in linears:
            k = lin.in_features // 2
            if fn is None:
                hook = lambda mod, args: (fixed_threshold(args[0], 0.67),)  # noqa: E731
            else:
                hook = lambda mod, args, fn=fn, k=k: (fn(args[0], k),)  # noqa: E731
            handles.append(lin.register_forward_pre_hook(hook))
        ms = do_bench(forward, warmup=10, rep=100, return_mode="median")
        for handle in handles:
            handle.remove()
        print(f"{name:<26} | {ms:8.3f} | {ms / dense:7.2f}x")


if __name__ == "__main__":
    main()
