"""Stage 6: decode speed. A greedy decode loop whose whole step is one CUDA graph, dense or sparse.

transformers' eager decode spends most of a 7B step in Python and kernel launches, and masking its
activations only adds work, so it cannot show what activation sparsity buys. ``Decoder`` owns the
step instead (as gpt-fast does): static buffers, a static KV cache, the position in device memory,
and per decoder layer

    select(residual + norm) -> GEMV q|k|v -> attention (RoPE, cache write) -> select(o input)
    -> GEMV o -> select(residual + norm) -> GEMV gate|up -> select(act(gate) * up) -> GEMV down

captured once as a CUDA graph and replayed for every token. ``select`` is
``kernels.select.select_group`` (prologue fused with the TopK cut of every projection of the group,
and for a batch the compaction of the kept inputs); the sparse GEMV is ``kernels.slice_gemv`` for one
sequence (each program compacts its own slice of rows) and ``kernels.gather_gemv`` for a batch,
both reading only the kept rows of weights stored input-channel-major; the dense step uses the same
prologues with cuBLAS GEMVs on the weights as loaded. Embedding, final norm and LM head stay dense. A batch whose kept
inputs together cover nearly every weight row runs the ``masked`` kernel instead: each projection's
own masked input through cuBLAS (see ``Decoder``).

Semantics equal the masked path of ``sparsify()``: every token keeps, per projection, the inputs with
magnitude >= its k-th largest (ties kept; exact zeros dropped, which changes nothing), or |x| > tau
in threshold mode. Families: Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (the two packaged models
included); ``support()`` says why any other model falls back to the masked path.

Weights: ``input_major(model)`` re-stores each layer's q|k|v, o, gate|up and down as one
[in, out] tensor per group and points the model's own parameters at views of it, so the model keeps
working (perplexity runs unchanged) with no second copy; on exit the row-major parameters come back
bit-identical. Extra memory while converting: one group of one layer.
"""
from __future__ import annotations

import gc
import inspect
import math
import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .budget import Budget
from .errors import ActTailError
from .kernels.attention import decode_attention
from .kernels.fused_gemv import FusedGemv, FusedPrologue, FusedScratch
from .kernels.gather_gemv import GatherGemv, GemvConfig, default_config
from .kernels.select import (
    ACT_MUL,
    MODE_DENSE,
    MODE_THRESHOLD,
    MODE_TOPK,
    PLAIN,
    RESIDUAL_NORM,
    CompactLists,
    CutHints,
    select_group,
    threshold_param,
)
from .kernels.slice_gemv import SliceGemv, SliceScratch
from .models import LoadedModel
from .projections import decoder_layers

GROUPS = (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",)))
SPARSE_GEMV_KINDS = ("gather", "fused", "slice")  # our GEMVs on input-major weights, float32 sums with atomics
MASKED_NOTE = (
    "masked path: activations are zeroed but every weight is still read, so it cannot be faster than dense"
)


@dataclass(frozen=True)
class _Family:
    norm_style: str  # "llama": round(x * r) * w ; "gemma": round(x * r * (1 + w))
    mlp_norm: str  # attribute of the decoder layer that norms the MLP input
    post_attention_norm: Optional[str] = None  # Gemma: norm applied to the attention output before the residual add
    post_mlp_norm: Optional[str] = None


_LLAMA = _Family("llama", "post_attention_layernorm")
_GEMMA3 = _Family("gemma", "pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")
FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma3_text": _GEMMA3,
            "gemma3": _GEMMA3}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def support(model: nn.Module) -> tuple[bool, str]:
    """Whether ``Decoder`` can run this model, and if not, why (one line for the user)."""
    config = _text_config(model)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return False, f"no fused decode step for model family {family!r} (supported: {', '.join(sorted(FAMILIES))})"
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        return False, f"activation {act!r} has no fused kernel"
    if getattr(config, "attn_logit_softcapping", None):
        return False, "attention logit soft-capping is not implemented in the fused attention kernel"
    try:
        _, layers = decoder_layers(model)
    except ActTailError as exc:
        return False, str(exc)
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return False, "the model is spread over several devices; the fused step runs on one"
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
        return False, "decoder layers do not have the Llama-style self_attn / mlp projections"
    if any(getattr(mlp, n, None) is None for n in ("gate_proj", "up_proj", "down_proj")):
        return False, "the MLP is not gated (gate_proj / up_proj / down_proj)"
    if attn.o_proj.bias is not None or any(
        getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
    ):
        return False, "o_proj or the MLP has a bias, which the fused step does not add"
    head_dim = attn.head_dim
    if head_dim & (head_dim - 1):
        return False, f"head_dim {head_dim} is not a power of two"
    return True, "supported"


def _projection_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}


# --------------------------------------------------------------------------- weights, input-channel-major
@dataclass
class InputMajorWeights:
    """Per layer and group, the [in, out] weight the sparse GEMV reads (the model's parameters view it)."""

    groups: list[dict[str, torch.Tensor]]
    bytes: int  # size of all converted weights (no copy is kept: this is also the memory they replaced)
    peak_extra_bytes: int  # the most memory the conversion held on top of the model


_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, InputMajorWeights]" = weakref.WeakKeyDictionary()


@contextmanager
def input_major(model: nn.Module) -> Iterator[InputMajorWeights]:
    """Store every projection input-channel-major inside the block (see the module docstring)."""
    if model in _CONVERTED:
        yield _CONVERTED[model]  # already converted by an enclosing block: share it
        return
    ok, why = support(model)
    if not ok:
        raise ActTailError(f"cannot use the sparse decode kernels: {why}")
    _, layers = decoder_layers(model)
    groups: list[dict[str, torch.Tensor]] = []
    converted: list[nn.Linear] = []
    total = peak = 0
    try:
        with torch.no_grad():
            for layer in layers:
                modules = _projection_modules(layer)
                per_layer = {}
                for group, types in GROUPS:
                    parts = [modules[t] for t in types]
                    first = parts[0].weight
                    widths = [m.out_features for m in parts]
                    wt = torch.empty(parts[0].in_features, sum(widths), dtype=first.dtype, device=first.device)
                    peak = max(peak, wt.numel() * wt.element_size())
                    start = 0
                    for module, width in zip(parts, widths):
                        wt[:, start : start + width].copy_(module.weight.t())
                        module.weight = nn.Parameter(wt[:, start : start + width].t(), requires_grad=False)
                        converted.append(module)
                        start += width
                    per_layer[group] = wt
                    total += wt.numel() * wt.element_size()
                groups.append(per_layer)
        gc.collect()  # a decoder still in a reference cycle would keep the row-major weights alive
        weights = InputMajorWeights(groups, total, peak)
        _CONVERTED[model] = weights
        yield weights
    finally:
        _CONVERTED.pop(model, None)
        groups = []
        with torch.no_grad():
            for module in converted:  # a fresh row-major copy of the same values, one projection at a time
                module.weight = nn.Parameter(module.weight.contiguous(), requires_grad=False)


# --------------------------------------------------------------------------- the decode step
def _cos_sin(base: nn.Module, layer_type: Optional[str], t_max: int, dtype: torch.dtype, device: torch.device):
    rotary = base.rotary_emb
    x = torch.zeros(1, dtype=dtype, device=device)
    positions = torch.arange(t_max, device=device)[None]
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(x, positions, layer_type)
    else:
        cos, sin = rotary(x, positions)
    return cos[0].contiguous(), sin[0].contiguous()


def budget_params(loaded: LoadedModel, budget: Optional[Budget], mode: str,
                  thresholds: Optional[dict[str, float]]) -> Optional[torch.Tensor]:
    """Per layer, group and projection the kernel parameter: k (TopK) or the threshold's bits; None = dense."""
    if budget is None:
        return None
    prefix, layers = decoder_layers(loaded.model)
    keep = budget.keep_by_name()
    dtype = next(loaded.model.parameters()).dtype
    rows = []
    for index, layer in enumerate(layers):
        modules = _projection_modules(layer)
        per_group = []
        for _, types in GROUPS:
            values = []
            for proj_type in types:
                name = next(n for n, m in layer.named_modules() if m is modules[proj_type])
                full = f"{prefix}.{index}.{name}"
                if mode == "threshold":
                    tau = (thresholds or {}).get(full, 0.0) if full in keep else 0.0
                    values.append(threshold_param(float(tau), dtype))
                else:
                    values.append(int(keep.get(full, modules[proj_type].in_features)))
            per_group.append(values + [0] * (3 - len(values)))
        rows.append(per_group)
    return torch.tensor(rows, dtype=torch.int32)


class Decoder:
    """Greedy decoding for ``batch`` sequences of at most ``max_len`` tokens, dense or under a budget.

    ``budget=None`` is the dense step (cuBLAS GEMVs). With a budget, ``kernel`` picks how the kept
    inputs are multiplied: ``gather`` (a select kernel finds the cuts and compacts the kept inputs into
    one list, then the sparse GEMV reads only kept weight rows), ``slice`` (batch 1: the select only
    finds the cuts and every GEMV program compacts the kept inputs of its own slice of rows,
    ``kernels.slice_gemv``), ``fused`` (batch 1: one kernel per group does both,
    ``kernels.fused_gemv``; slower than gather on the H200, kept to be measured next to it) or
    ``masked`` (each projection's masked input through a dense cuBLAS GEMM); all but masked need
    ``weights`` from ``input_major(model)``. ``auto`` is ``slice`` for one sequence (1.10x dense at
    0.5 and 1.56x at 0.8 against gather's 0.98x and 1.30x, on an H100 with 7B shapes,
    bench/bench_decode.py) and, for a batch, gathers unless the union of kept inputs is expected to
    be nearly dense (1 - s^batch > 0.7 for effective sparsity s: batch 4 at 0.5 keeps 94% of the
    rows), where reading every row once beats the gather's overheads. On CUDA the step is captured as
    a CUDA graph (``use_graph``); elsewhere (the Triton interpreter in tests) it runs eagerly.
    ``hint_window`` > 0 starts every TopK search in a histogram of that many bins around the last
    token's cut (``select.CutHints``: the same result, one pass instead of four when it holds; 0 =
    always the full search). Off by default: with 128 bins it gained 3% at 0.5 on random weights,
    where it hits 99.7% of the time; real models hit 85-95% (bench/hint_hit_rate.py), and a miss
    pays the window and the full search. ``hint_stats`` counts the hinted searches and the misses.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch: int = 1,
        max_len: int = 256,
        budget: Optional[Budget] = None,
        mode: str = "topk",
        thresholds: Optional[dict[str, float]] = None,
        weights: Optional[InputMajorWeights] = None,
        gemv_config: Optional[GemvConfig] = None,
        use_graph: Optional[bool] = None,
        kernel: str = "auto",
        hint_window: int = 0,
    ) -> None:
        ok, why = support(loaded.model)
        if not ok:
            raise ActTailError(f"cannot use the sparse decode kernels: {why}")
        if mode not in ("topk", "threshold"):
            raise ActTailError(f"unknown sparsity mode {mode!r}; choose topk or threshold")
        if kernel not in ("auto", "fused", "gather", "masked", "slice"):
            raise ActTailError(f"unknown kernel {kernel!r}; choose auto, fused, gather, masked or slice")
        if budget is None:
            self.kind = "dense"
        elif kernel == "auto":
            union = 1.0 - float(budget.effective_sparsity) ** batch
            self.kind = "slice" if batch == 1 else "gather" if union <= 0.7 else "masked"
        else:
            self.kind = kernel
        if self.kind in ("fused", "slice") and batch != 1:
            raise ActTailError(f"the {self.kind} kernel decodes one sequence; batch {batch} needs gather or masked")
        if self.kind in SPARSE_GEMV_KINDS and weights is None:
            raise ActTailError(f"the {self.kind} kernel needs the weights of input_major(model)")
        if batch < 1 or batch > CompactLists.MAX_BATCH:
            raise ActTailError(f"batch must be 1 to {CompactLists.MAX_BATCH}, got {batch}")
        model = loaded.model
        config = _text_config(model)
        self.family = FAMILIES[config.model_type]
        self.activation = _ACTIVATIONS[getattr(config, "hidden_activation", None) or config.hidden_act]
        prefix, layers = decoder_layers(model)
        self.base = model.get_submodule(prefix.rsplit(".", 1)[0])
        self.layers = list(layers)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.batch, self.max_len = batch, max_len
        self.eps = float(config.rms_norm_eps)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.embed = model.get_input_embeddings()
        self.embed_scale = getattr(self.embed, "embed_scale", None)
        self.head = model.get_output_embeddings()
        self.mode = MODE_DENSE if budget is None else (MODE_TOPK if mode == "topk" else MODE_THRESHOLD)
        # Mistral keeps its window in the config; Qwen2/3 and Gemma 3 on each attention module (None = full)
        self.windows = [int((attn.sliding_window if hasattr(attn, "sliding_window") else
                             getattr(config, "sliding_window", None)) or 0)
                        for attn in (layer.self_attn for layer in self.layers)]
        layer_types = getattr(config, "layer_types", None) or [None] * len(self.layers)
        tables: dict = {}
        self.rope = []
        for index in range(len(self.layers)):
            key = (
                layer_types[index]
                if "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
                else None
            )
            if key not in tables:
                tables[key] = _cos_sin(self.base, key, max_len, self.dtype, self.device)
            self.rope.append(tables[key])
        d, dev, dt = config.hidden_size, self.device, self.dtype
        mods0 = _projection_modules(self.layers[0])
        self.widths = {g: [mods0[t].out_features for t in types] for g, types in GROUPS}
        self.inter = mods0["down"].in_features
        q_width = self.n_heads * self.head_dim
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.history = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self.h = torch.zeros(batch, d, dtype=dt, device=dev)
        self.h_next = torch.zeros(batch, d, dtype=dt, device=dev) if self.kind == "fused" else self.h
        self.x_d = torch.zeros(batch, d, dtype=dt, device=dev)
        self.x_i = torch.zeros(batch, self.inter, dtype=dt, device=dev)
        self.attn_out = torch.zeros(batch, q_width, dtype=dt, device=dev)
        self.logits = torch.zeros(batch, self.head.weight.shape[0], dtype=dt, device=dev)
        cache_shape = (len(self.layers), batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dt, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=dt, device=dev)
        inputs = {"qkv": d, "o": q_width, "gate_up": d, "down": self.inter}
        if self.kind in SPARSE_GEMV_KINDS:  # one float32 accumulator per group: GEMVs add with atomics
            self.out = {g: torch.zeros(batch, sum(w), dtype=torch.float32, device=dev) for g, w in self.widths.items()}
            self.parts = {g: list(self.out[g].split(w, dim=1)) for g, w in self.widths.items()}
        else:  # one buffer per projection: cuBLAS writes each output contiguously
            self.parts = {g: [torch.zeros(batch, n, dtype=dt, device=dev) for n in w] for g, w in self.widths.items()}
        if self.kind != "dense":
            self.params = budget_params(loaded, budget, mode, thresholds).to(dev)
        if self.kind == "masked":  # every projection's own masked input
            self.masked = {
                g: torch.zeros(len(w), batch, inputs[g], dtype=dt, device=dev) for g, w in self.widths.items()
            }
        # TopK searches that start from the last token's cut (``select.CutHints``), per layer and group
        self.hint_stats = torch.zeros(2, dtype=torch.int32, device=dev)
        self.hints = {
            (index, g): CutHints(dev, self.hint_stats, hint_window)
            for index in range(len(self.layers)) for g, _ in GROUPS
        } if hint_window and self.mode == MODE_TOPK and self.kind in ("gather", "masked", "slice") else {}
        if self.kind == "slice":
            self.lists = {g: CompactLists(len(types), batch, 1, dt, dev) for g, types in GROUPS}  # cuts only
            config_ = gemv_config or default_config(dev)
            scratch = SliceScratch(dt, dev)
            self.gemvs = [{group: SliceGemv(groups[group], self.widths[group], scratch, config_) for group, _ in GROUPS}
                          for groups in weights.groups]
        if self.kind == "gather":
            keeps = budget_params(loaded, budget, "topk", None)  # the rows the budget expects each projection to read
            self.lists = {g: CompactLists(len(types), batch, inputs[g], dt, dev) for g, types in GROUPS}
            config_ = gemv_config or default_config(dev)
            self.gemvs = []
            for index, groups in enumerate(weights.groups):
                per = {}
                for g_index, (group, types) in enumerate(GROUPS):
                    expected = [int(v) for v in keeps[index, g_index, : len(types)]]
                    per[group] = GatherGemv(groups[group], self.widths[group], expected, batch, config_)
                self.gemvs.append(per)
        if self.kind == "fused":
            config_ = gemv_config or default_config(dev)
            scratch = FusedScratch(dt, dev)
            self.gemvs = [
                {group: FusedGemv(groups[group], self.widths[group], self.params[index, g_index], mode=self.mode,
                                  eps=self.eps, style=self.family.norm_style, activation=self.activation,
                                  config=config_, scratch=scratch)
                 for g_index, (group, _) in enumerate(GROUPS)}
                for index, groups in enumerate(weights.groups)
            ]
        self._host_pos = 0
        self._plan = self._build_plan()
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph:
            self._capture()

    # ------------------------------------------------------------------ one step
    def _select(self, group: str, layer: int, **kwargs) -> Callable[[], None]:
        g_index = [g for g, _ in GROUPS].index(group)
        if self.kind in ("gather", "slice"):
            kwargs.update(mode=self.mode, params=self.params[layer, g_index], lists=self.lists[group],
                          zero=self.out[group], hints=self.hints.get((layer, group)), compact=self.kind == "gather")
        elif self.kind == "masked":
            kwargs.update(mode=self.mode, params=self.params[layer, g_index], masked_out=self.masked[group],
                          hints=self.hints.get((layer, group)))
        else:
            kwargs.update(mode=MODE_DENSE)
        return partial(select_group, eps=self.eps, style=self.family.norm_style, activation=self.activation,
                       **kwargs)

    def _gemv(self, group: str, layer: int, x: torch.Tensor) -> Callable[[], None]:
        if self.kind == "gather":
            return partial(self.gemvs[layer][group], self.lists[group], self.out[group])
        if self.kind == "slice":
            return partial(self.gemvs[layer][group], x, self.lists[group], self.out[group])
        modules = _projection_modules(self.layers[layer])
        types = dict(GROUPS)[group]
        inputs = list(self.masked[group]) if self.kind == "masked" else [x] * len(types)
        quads = [
            (source, modules[t].weight, modules[t].bias, out)
            for t, source, out in zip(types, inputs, self.parts[group])
        ]

        def dense() -> None:  # the bias inside the GEMM, rounded once, as nn.Linear does
            for source, weight, bias, out in quads:
                if bias is None:
                    torch.mm(source, weight.t(), out=out)
                else:
                    torch.addmm(bias, source, weight.t(), out=out)

        return dense

    def _fused(self, group: str, layer: int, inputs: FusedPrologue) -> Callable[[], None]:
        """One group's fused kernel; it zeroes the accumulator of the group after it (see ``fused_gemv``)."""
        names = [g for g, _ in GROUPS]
        following = names[(names.index(group) + 1) % len(names)]
        return partial(self.gemvs[layer][group], inputs, self.out[group], self.out[following])

    def _embed(self) -> None:
        torch.index_select(self.embed.weight, 0, self.tokens, out=self.h)
        if self.embed_scale is not None:
            self.h.mul_(self.embed_scale.to(self.dtype))

    def _head(self) -> None:
        torch.mm(self.x_d, self.head.weight.t(), out=self.logits)
        if self.softcap:
            self.logits.div_(self.softcap).tanh_().mul_(self.softcap)
        chosen = torch.argmax(self.logits, dim=-1)
        self.tokens.copy_(chosen)
        self.history.index_copy_(1, self.pos, chosen[:, None])
        self.pos.add_(1)

    def _build_plan(self) -> list[tuple[str, Callable[[], None]]]:
        """The step as a list of (phase, launch): phases are embed, select, gemv, attention and head."""
        fam = self.family
        plan: list[tuple[str, Callable[[], None]]] = [("embed", self._embed)]
        delta: Optional[torch.Tensor] = None
        delta_norm: Optional[torch.Tensor] = None
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self.parts["qkv"]
            cos, sin = self.rope[index]
            attention = partial(
                decode_attention, q=q, k=k, v=v, k_cache=self.k_cache[index], v_cache=self.v_cache[index],
                out=self.attn_out, pos=self.pos, cos=cos, sin=sin, scale=attn.scaling, n_heads=self.n_heads,
                window=self.windows[index], **self._qkv_biases(attn),
                q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None, eps=self.eps, style=fam.norm_style,
            )
            gate, up = self.parts["gate_up"]
            if self.kind == "fused":  # the residual moves h -> h_next (attention) -> h (MLP), every layer alike
                plan += [
                    ("gemv", self._fused("qkv", index, FusedPrologue(
                        RESIDUAL_NORM, a=delta, h=self.h, h_out=self.h_next, has_delta=delta is not None,
                        norm_weight=layer.input_layernorm.weight, post_norm_weight=delta_norm))),
                    ("attention", attention),
                    ("gemv", self._fused("o", index, FusedPrologue(PLAIN, a=self.attn_out))),
                    ("gemv", self._fused("gate_up", index, FusedPrologue(
                        RESIDUAL_NORM, a=self.parts["o"][0], h=self.h_next, h_out=self.h, has_delta=True,
                        norm_weight=getattr(layer, fam.mlp_norm).weight,
                        post_norm_weight=self._norm_weight(layer, fam.post_attention_norm)))),
                    ("gemv", self._fused("down", index, FusedPrologue(ACT_MUL, a=gate, b=up))),
                ]
                delta = self.parts["down"][0]
                delta_norm = self._norm_weight(layer, fam.post_mlp_norm)
                continue
            plan += [
                ("select", self._select("qkv", index, prologue=RESIDUAL_NORM, x_out=self.x_d, h=self.h, a=delta,
                                        has_delta=delta is not None, norm_weight=layer.input_layernorm.weight,
                                        post_norm_weight=delta_norm)),
                ("gemv", self._gemv("qkv", index, self.x_d)),
                ("attention", attention),
            ]
            if self.kind != "dense":  # the dense GEMV reads the attention output as it is
                plan.append(("select", self._select("o", index, prologue=PLAIN, a=self.attn_out, x_out=self.attn_out)))
            plan += [
                ("gemv", self._gemv("o", index, self.attn_out)),
                ("select", self._select("gate_up", index, prologue=RESIDUAL_NORM, x_out=self.x_d, h=self.h,
                                        a=self.parts["o"][0], has_delta=True,
                                        norm_weight=getattr(layer, fam.mlp_norm).weight,
                                        post_norm_weight=self._norm_weight(layer, fam.post_attention_norm))),
                ("gemv", self._gemv("gate_up", index, self.x_d)),
                ("select", self._select("down", index, prologue=ACT_MUL, x_out=self.x_i, a=gate, b=up)),
                ("gemv", self._gemv("down", index, self.x_i)),
            ]
            delta = self.parts["down"][0]
            delta_norm = self._norm_weight(layer, fam.post_mlp_norm)
        final_norm = partial(select_group, prologue=RESIDUAL_NORM, mode=MODE_DENSE, x_out=self.x_d, h=self.h,
                             a=delta, has_delta=True, norm_weight=self.base.norm.weight, post_norm_weight=delta_norm,
                             eps=self.eps, style=fam.norm_style)
        plan += [("head", final_norm), ("head", self._head)]
        return plan

    def _qkv_biases(self, attn: nn.Module) -> dict:
        """The sparse GEMVs leave float32 sums, to which attention adds the biases; cuBLAS already added them."""
        if self.kind not in SPARSE_GEMV_KINDS:
            return {}
        return {"q_bias": attn.q_proj.bias, "k_bias": attn.k_proj.bias, "v_bias": attn.v_proj.bias}

    @staticmethod
    def _norm_weight(layer: nn.Module, attr: Optional[str]) -> Optional[torch.Tensor]:
        return getattr(layer, attr).weight if attr else None

    def _step(self) -> None:
        for _, launch in self._plan:
            launch()

    def phase_graph(self, phase: str) -> torch.cuda.CUDAGraph:
        """A CUDA graph of only this phase's launches for one step (profiling: time its replays)."""
        launches = [launch for name, launch in self._plan if name == phase]
        if not launches:
            raise ActTailError(f"unknown phase {phase!r}; phases: embed, select, gemv, attention, head")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            for launch in launches:
                launch()
        return graph

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # compiles the Triton kernels and creates the cuBLAS handles outside the capture
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._step()
        self.reset()

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Start a new sequence (the cache needs no clearing: attention reads only positions <= pos)."""
        self.pos.zero_()
        self._host_pos = 0

    @torch.no_grad()
    def step(self) -> None:
        """Feed ``self.tokens`` at the current position; afterwards ``tokens`` holds the argmax,
        ``logits`` the logits."""
        if self._host_pos >= self.max_len:
            raise ActTailError(f"the sequence is full: max_len {self.max_len} tokens")
        self._host_pos += 1
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Feed a prompt [batch, P] one token at a time (each token keeps its own TopK, as in the masked path)."""
        if prompt.shape[0] != self.batch or prompt.shape[1] < 1:
            raise ActTailError(f"prompt must be [{self.batch}, P >= 1], got {list(prompt.shape)}")
        if prompt.shape[1] >= self.max_len:
            raise ActTailError(f"prompt of {prompt.shape[1]} tokens does not fit max_len {self.max_len}")
        self.reset()
        prompt = prompt.to(self.device)
        for column in range(prompt.shape[1]):
            self.tokens.copy_(prompt[:, column])
            self.step()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation [batch, new_tokens] of ``prompt``."""
        length = prompt.shape[1]
        if length + new_tokens > self.max_len:
            raise ActTailError(f"prompt + new tokens ({length + new_tokens}) exceed max_len {self.max_len}")
        self.prefill(prompt)
        for _ in range(new_tokens - 1):
            self.step()
        return self.history[:, length - 1 : length - 1 + new_tokens].cpu()


# --------------------------------------------------------------------------- measuring decode speed
@dataclass
class DecodeSpeed:
    method: str
    sparsity: float
    batch: int
    path: str  # "dense-graph", "sparse-" + the kernel (CUDA-graphed step), or "masked"
    tokens_per_s: float  # median over repeats, tokens of all sequences per second
    runs: list[float] = field(default_factory=list)  # tokens/s of every repeat
    weight_bytes_per_step: int = 0  # projection rows the budget keeps + LM head, read once per step
    achieved_gbps: float = 0.0
    hint_hit_rate: Optional[float] = None  # TopK searches settled in the window around the last cut

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes_per_step(loaded: LoadedModel, budget: Optional[Budget]) -> int:
    """Bytes of weights one decode step must read: kept input rows of every projection, and the LM head."""
    model = loaded.model
    element = next(model.parameters()).element_size()
    _, layers = decoder_layers(model)
    total = model.get_output_embeddings().weight.numel() * element
    keep = budget.keep_by_name() if budget is not None else {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            rows = keep.get(name, module.in_features)
            total += rows * module.out_features * element
    return total


def time_decoder(decoder: Decoder, prompt_len: int, new_tokens: int, repeats: int) -> list[float]:
    """Tokens/s of ``new_tokens`` graph replays after a ``prompt_len`` prefill, per repeat (after one warm-up)."""
    generator = torch.Generator().manual_seed(0)
    vocab = decoder.embed.weight.shape[0]
    prompt = torch.randint(0, vocab, (decoder.batch, prompt_len), generator=generator)
    runs = []
    for repeat in range(repeats + 1):
        decoder.prefill(prompt)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            decoder.step()
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)
        if repeat > 0:
            runs.append(decoder.batch * new_tokens / (time.perf_counter() - start))
    return runs


def measure_decode(
    loaded: LoadedModel,
    budget: Optional[Budget],
    *,
    weights: Optional[InputMajorWeights] = None,
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 128,
    repeats: int = 5,
    mode: str = "topk",
    thresholds: Optional[dict[str, float]] = None,
    method: Optional[str] = None,
    gemv_config: Optional[GemvConfig] = None,
    kernel: str = "auto",
    hint_window: int = 0,
) -> DecodeSpeed:
    """Decode tokens/s of the fused step (dense when ``budget`` is None), median of ``repeats``."""
    decoder = Decoder(loaded, batch=batch, max_len=prompt_len + new_tokens + 1, budget=budget, mode=mode,
                      thresholds=thresholds, weights=weights, gemv_config=gemv_config, kernel=kernel,
                      hint_window=hint_window)
    runs = time_decoder(decoder, prompt_len, new_tokens, repeats)
    kind = decoder.kind
    searches, misses = decoder.hint_stats.tolist()
    del decoder
    gc.collect()  # the step's launches refer back to the decoder: free its graph and buffers now
    median = statistics.median(runs)
    step_bytes = weight_bytes_per_step(loaded, budget if kind in SPARSE_GEMV_KINDS else None)
    return DecodeSpeed(
        method=method or ("dense" if budget is None else budget.method),
        sparsity=0.0 if budget is None else float(budget.effective_sparsity),
        batch=batch,
        path="dense-graph" if kind == "dense" else f"sparse-{kind}",
        tokens_per_s=median,
        runs=runs,
        weight_bytes_per_step=step_bytes,
        achieved_gbps=step_bytes * median / batch / 1e9 if math.isfinite(median) else float("nan"),
        hint_hit_rate=1.0 - misses / searches if searches else None,
    )
