"""Which linear inputs of a decoder layer ActTail sparsifies, per model family (keyed by ``config.model_type``).

A family's map lists, for every module of a decoder layer that holds a projection weight, what it holds:

* ``Whole(type)``: one ``nn.Linear`` (or GPT-2's ``Conv1D``) is one projection;
* ``Fused(split)``: one module's output rows are several projections (Phi-3 ``qkv_proj`` = q | k | v,
  ``gate_up_proj`` = gate | up; GPT-NeoX and Falcon ``query_key_value``, interleaved per head or per
  group); ``split(config, out_features)`` gives each projection's rows;
* ``Experts()``: transformers' fused mixture-of-experts module (3-D ``gate_up_proj`` / ``down_proj``
  parameters): gate, up and down of every expert.

A family may have several layouts (Qwen2-MoE and Qwen3-MoE mix MoE and dense MLP layers); every decoder
layer must match one exactly. Modules that are linear but deliberately not sparsified (routers; Mamba's
``dt_proj``, whose weight the mixer multiplies without calling the module) are in ``skip`` with the reason.
Pure data: ``projections`` walks a model with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

# Rows of a module's [out, in] weight: (start, stop, step) blocks, concatenated in order.
Block = tuple[int, int, int]
Split = Callable[[Any, int], dict[str, tuple[Block, ...]]]


@dataclass(frozen=True)
class Whole:
    type: str


@dataclass(frozen=True)
class Fused:
    split: Split
    types: tuple[str, ...]  # the projections it holds, in output order (for the coverage report)


@dataclass(frozen=True)
class Experts:
    """gate, up (row halves of ``gate_up_proj``, or ``up_proj`` alone when ungated) and down of every expert."""


Entry = Union[Whole, Fused, Experts]


@dataclass(frozen=True)
class FamilyMap:
    layouts: tuple[dict[str, Entry], ...]  # module name inside the layer -> what it holds; one must match
    skip: dict[str, str] = field(default_factory=dict)  # module name inside the layer -> why it is not sparsified
    note: str = ""  # how the family is mapped, in words (README, CLI)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _contiguous(sizes: dict[str, int]) -> dict[str, tuple[Block, ...]]:
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = ((start, start + size, 1),)
        start += size
    return out


def split_qkv(config: Any, out_features: int) -> dict[str, tuple[Block, ...]]:
    """q | k | v one after the other (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, Falcon multi-query)."""
    q = config.num_attention_heads * _head_dim(config)
    kv = (out_features - q) // 2
    return _contiguous({"q": q, "k": kv, "v": kv})


def split_qkv_per_head(config: Any, out_features: int) -> dict[str, tuple[Block, ...]]:
    """[q_h | k_h | v_h] for every head h (GPT-NeoX; Falcon without multi-query)."""
    heads = config.num_attention_heads
    width = out_features // (3 * heads)
    return {
        name: tuple((h * 3 * width + i * width, h * 3 * width + (i + 1) * width, 1) for h in range(heads))
        for i, name in enumerate(("q", "k", "v"))
    }


def split_falcon_qkv(config: Any, out_features: int) -> dict[str, tuple[Block, ...]]:
    """Falcon's three layouts, as ``FalconAttention._split_heads`` reads them."""
    if getattr(config, "new_decoder_architecture", False):  # per kv group: its q heads, then one k, one v
        kv_heads = config.num_kv_heads
        per_group = config.num_attention_heads // kv_heads
        hd = _head_dim(config)
        stride = (per_group + 2) * hd
        return {
            "q": tuple((g * stride, g * stride + per_group * hd, 1) for g in range(kv_heads)),
            "k": tuple((g * stride + per_group * hd, g * stride + (per_group + 1) * hd, 1) for g in range(kv_heads)),
            "v": tuple((g * stride + (per_group + 1) * hd, (g + 1) * stride, 1) for g in range(kv_heads)),
        }
    if not getattr(config, "multi_query", True):
        return split_qkv_per_head(config, out_features)
    return split_qkv(config, out_features)


def split_gate_up(config: Any, out_features: int) -> dict[str, tuple[Block, ...]]:
    """gate | up halves (Phi-3 ``gate_up_proj``: ``gate, up = out.chunk(2)``)."""
    return _contiguous({"gate": out_features // 2, "up": out_features // 2})


_SEPARATE_QKV = {"self_attn.q_proj": Whole("q"), "self_attn.k_proj": Whole("k"), "self_attn.v_proj": Whole("v")}
_ATTENTION = _SEPARATE_QKV | {"self_attn.o_proj": Whole("o")}
_GATED_MLP = {"mlp.gate_proj": Whole("gate"), "mlp.up_proj": Whole("up"), "mlp.down_proj": Whole("down")}
_LLAMA = FamilyMap((_ATTENTION | _GATED_MLP,), note="q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
_QKV = Fused(split_qkv, ("q", "k", "v"))
_ROUTER = {"mlp.gate": "router"}
_GATE_UP = {"mlp.gate_up_proj": Fused(split_gate_up, ("gate", "up")), "mlp.down_proj": Whole("down")}
_SHARED_EXPERTS = {"mlp.shared_experts.gate_proj": Whole("shared_gate"),
                   "mlp.shared_experts.up_proj": Whole("shared_up"),
                   "mlp.shared_experts.down_proj": Whole("shared_down")}
_MOE_WITH_SHARED = {"mlp.experts": Experts()} | _SHARED_EXPERTS
# DeepSeek's multi-head latent attention: q through a low-rank pair (q_a, q_b) or whole (q_lora_rank None, V2-Lite);
# k and v come out of one down-projection (kv_a, with the rope key) and one up-projection (kv_b)
_MLA_TAIL = {"self_attn.kv_a_proj_with_mqa": Whole("kv_a"), "self_attn.kv_b_proj": Whole("kv_b"),
             "self_attn.o_proj": Whole("o")}
_MLA = ({"self_attn.q_a_proj": Whole("q_a"), "self_attn.q_b_proj": Whole("q_b")} | _MLA_TAIL,
        {"self_attn.q_proj": Whole("q")} | _MLA_TAIL)
_DEEPSEEK = FamilyMap(
    tuple(attention | mlp for mlp in (_MOE_WITH_SHARED, _GATED_MLP) for attention in _MLA), skip=_ROUTER,
    note="q_a_proj, q_b_proj (or q_proj) as q_a, q_b (q); kv_a_proj_with_mqa as kv_a, kv_b_proj as kv_b; o_proj; "
    "every expert's gate, up and down; shared experts as shared_gate, shared_up, shared_down; dense MLP layers "
    "(first_k_dense_replace) as gate, up, down; router skipped",
)
# A Mamba mixer in eval mode calls in_proj, x_proj and out_proj, but multiplies dt_proj's weight itself
# (``self.dt_proj.weight @ time_step``): the module is never called, so a mask on its input would never apply and the
# projection would stay dense while counted as sparsified. (Only the fused training path reads the others' weights.)
_DT_PROJ = "its weight is multiplied inside the mixer's forward, the module is never called: a mask would not apply"


def _mamba_mixer(prefix: str) -> dict[str, Entry]:
    return {f"{prefix}.in_proj": Whole("in_proj"), f"{prefix}.x_proj": Whole("x_proj"),
            f"{prefix}.out_proj": Whole("out_proj")}


_MAMBA = FamilyMap((_mamba_mixer("mixer"),), skip={"mixer.dt_proj": _DT_PROJ},
                   note="in_proj, x_proj, out_proj of the mixer; dt_proj skipped (its weight is used without "
                   "calling it)")
_JAMBA_MLP = {"feed_forward.gate_proj": Whole("gate"), "feed_forward.up_proj": Whole("up"),
              "feed_forward.down_proj": Whole("down")}

FAMILY_MAPS: dict[str, FamilyMap] = {
    **{family: _LLAMA for family in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2", "olmo3",
        "granite", "cohere", "stablelm",
    )},
    **{family: FamilyMap((_ATTENTION | _GATE_UP,), note="q_proj, k_proj, v_proj, o_proj; gate_up_proj split into "
                         "gate, up; down_proj") for family in ("glm", "glm4")},
    "phi3": FamilyMap(
        ({"self_attn.qkv_proj": _QKV, "self_attn.o_proj": Whole("o")} | _GATE_UP,),
        note="qkv_proj split into q, k, v (row slices); o_proj; gate_up_proj split into gate, up; down_proj",
    ),
    "phi": FamilyMap(
        (_SEPARATE_QKV | {"self_attn.dense": Whole("o"), "mlp.fc1": Whole("up"), "mlp.fc2": Whole("down")},),
        note="q_proj, k_proj, v_proj; dense as o; fc1 as up, fc2 as down",
    ),
    "opt": FamilyMap(
        (_SEPARATE_QKV | {"self_attn.out_proj": Whole("o"), "fc1": Whole("up"), "fc2": Whole("down")},),
        note="q_proj, k_proj, v_proj; out_proj as o; fc1 as up, fc2 as down",
    ),
    "gpt2": FamilyMap(
        ({"attn.c_attn": _QKV, "attn.c_proj": Whole("o"), "mlp.c_fc": Whole("up"), "mlp.c_proj": Whole("down")},),
        note="Conv1D (transposed weights): c_attn split into q, k, v (column slices); attn.c_proj as o; "
        "c_fc as up, mlp.c_proj as down",
    ),
    "gpt_neox": FamilyMap(
        ({"attention.query_key_value": Fused(split_qkv_per_head, ("q", "k", "v")), "attention.dense": Whole("o"),
          "mlp.dense_h_to_4h": Whole("up"), "mlp.dense_4h_to_h": Whole("down")},),
        note="query_key_value split into q, k, v (interleaved per head); dense as o; dense_h_to_4h as up, "
        "dense_4h_to_h as down",
    ),
    "falcon": FamilyMap(
        ({"self_attention.query_key_value": Fused(split_falcon_qkv, ("q", "k", "v")),
          "self_attention.dense": Whole("o"), "mlp.dense_h_to_4h": Whole("up"), "mlp.dense_4h_to_h": Whole("down")},),
        note="query_key_value split into q, k, v (multi-query, per-head or per-group layout, as the config says); "
        "dense as o; dense_h_to_4h as up, dense_4h_to_h as down",
    ),
    "mixtral": FamilyMap(
        (_ATTENTION | {"mlp.experts": Experts()},), skip=_ROUTER,
        note="q, k, v, o; every expert's gate, up (row halves of gate_up_proj) and down; router skipped",
    ),
    "gpt_oss": FamilyMap(
        (_ATTENTION | {"mlp.experts": Experts()},), skip={"mlp.router": "router"},
        note="q, k, v, o; every expert's gate, up (interleaved rows of gate_up_proj) and down; router skipped",
    ),
    "olmoe": FamilyMap(
        (_ATTENTION | {"mlp.experts": Experts()},), skip=_ROUTER,
        note="q, k, v, o; every expert's gate, up and down; router skipped",
    ),
    "qwen2_moe": FamilyMap(
        (
            _ATTENTION | {"mlp.experts": Experts(), "mlp.shared_expert.gate_proj": Whole("shared_gate"),
                          "mlp.shared_expert.up_proj": Whole("shared_up"),
                          "mlp.shared_expert.down_proj": Whole("shared_down")},
            _ATTENTION | _GATED_MLP,
        ),
        skip={**_ROUTER, "mlp.shared_expert_gate": "shared-expert gate (a router)"},
        note="q, k, v, o; every expert's gate, up and down; the shared expert as shared_gate, shared_up, "
        "shared_down; dense MLP layers as gate, up, down; router and shared-expert gate skipped",
    ),
    "qwen3_moe": FamilyMap(
        (_ATTENTION | {"mlp.experts": Experts()}, _ATTENTION | _GATED_MLP), skip=_ROUTER,
        note="q, k, v, o; every expert's gate, up and down; dense MLP layers as gate, up, down; router skipped",
    ),
    "glm4_moe": FamilyMap(
        (_ATTENTION | _MOE_WITH_SHARED, _ATTENTION | _GATED_MLP), skip=_ROUTER,
        note="q, k, v, o; every expert's gate, up and down; shared experts as shared_gate, shared_up, shared_down; "
        "dense MLP layers (first_k_dense_replace) as gate, up, down; router skipped",
    ),
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "mamba": _MAMBA,
    "falcon_mamba": _MAMBA,
    "jamba": FamilyMap(
        tuple(mixer | ffn for mixer in (_ATTENTION, _mamba_mixer("mamba"))
              for ffn in (_JAMBA_MLP, {"feed_forward.experts": Experts()})),
        skip={"mamba.dt_proj": _DT_PROJ, "feed_forward.router": "router"},
        note="attention layers: q, k, v, o; Mamba layers: in_proj, x_proj, out_proj (dt_proj skipped, its weight is "
        "used without calling it); dense MLP layers as gate, up, down; every expert's gate, up and down; router "
        "skipped",
    ),
}
