"""Find the linear projections whose inputs ActTail sparsifies.

For the Llama, Mistral, Qwen2/3 and Gemma families these are the seven
projections of every decoder layer (q, k, v, o, gate, up, down). For any other
decoder model, every ``nn.Linear`` inside the decoder layers is taken, typed by
its attribute name. The LM head and embeddings are never included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ActTailError

PROJECTION_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
_KNOWN_SUFFIXES = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
KNOWN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class Projection:
    """One linear layer: where it is and how big it is."""

    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    layer: int
    type: str  # q, k, v, o, gate, up, down (or the attribute name for other families)
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers and its qualified name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ActTailError(f"{type(model).__name__} has no decoder layers (no ModuleList named '*layers')")
    return best


def find_projections(model: nn.Module) -> list[Projection]:
    """Every sparsifiable projection, ordered by layer then by type."""
    prefix, layers = decoder_layers(model)
    found: list[Projection] = []
    for index, layer in enumerate(layers):
        known = []
        others = []
        for sub_name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{index}.{sub_name}"
            proj_type = _KNOWN_SUFFIXES.get(sub_name)
            entry = Projection(full, index, proj_type or sub_name.split(".")[-1], module.in_features, module.out_features)
            (known if proj_type else others).append(entry)
        if known:
            known.sort(key=lambda p: PROJECTION_TYPES.index(p.type))
            found.extend(known)
        else:
            found.extend(others)
    if not found:
        raise ActTailError(f"{type(model).__name__} has no nn.Linear projections inside its decoder layers")
    return found


def get_module(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ActTailError(f"{name} is not an nn.Linear")
    return module


def weight_of(model: nn.Module, projection: Projection) -> torch.Tensor:
    return get_module(model, projection.name).weight
