"""Find the projections whose inputs ActTail sparsifies: every linear input of every decoder layer.

A *projection* is logical: one weight matrix [out, in] and the input it multiplies. Usually that is one
``nn.Linear``; it can also be a row slice of a fused module (Phi-3's ``qkv_proj`` holds q, k and v),
a ``Conv1D`` (GPT-2; its weight is stored [in, out]) or one expert's gate, up or down inside
transformers' fused experts module (a slice of a 3-D parameter). ``Projection`` records where its
weight lives (``module``, ``param``, ``expert``, ``transposed``, ``rows``) so that spectra, streaming and
the sparsifier read the same matrix.

Families in ``projection_map.FAMILY_MAPS`` (keyed by ``config.model_type``) are walked with their map:
every linear module of a decoder layer must be named by one of the family's layouts (or skipped on
purpose, like a router), otherwise the walk stops with an error naming the module; nothing is dropped
silently. Any other decoder model gets every linear module of its layers (``nn.Linear``, ``Conv1D``,
fused experts), typed by attribute name, and ``projection_coverage`` says so. The LM head, embeddings
and anything outside the decoder layers are never included.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .errors import ActTailError
from .projection_map import FAMILY_MAPS, Block, Entry, Experts, FamilyMap, Fused, Whole

PROJECTION_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_LIST_NAMES = ("layers", "h", "blocks")  # the decoder layers' ModuleList: model.layers, transformer.h, ...


@dataclass(frozen=True)
class Projection:
    """One logical projection: where it is, how big it is, and where its weight lives."""

    name: str  # unique; the module name, or module.part for a slice ("...qkv_proj.q", "...experts.3.gate")
    layer: int
    type: str  # q, k, v, o, gate, up, down (shared_* for Qwen2-MoE's shared expert; the attribute name elsewhere)
    in_features: int
    out_features: int
    # Where the weight lives: derived from the model, so not part of equality (spectra files and budgets
    # record the five fields above, and a projection read back from them equals the model's).
    module: str = field(default="", compare=False)  # the module holding the weight ("" = ``name``)
    param: str = field(default="weight", compare=False)  # its parameter
    expert: Optional[int] = field(default=None, compare=False)  # index along a 3-D experts parameter
    transposed: bool = field(default=False, compare=False)  # the parameter is stored [in, out] (Conv1D, experts)
    rows: tuple[Block, ...] = field(default=(), compare=False)  # (start, stop, step) blocks of [out, in]; () = all

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def module_name(self) -> str:
        return self.module or self.name

    def matrix(self, stored: torch.Tensor) -> torch.Tensor:
        """The [out, in] weight from the module's stored parameter (a view unless rows are several blocks)."""
        weight = stored if self.expert is None else stored[self.expert]
        if self.transposed:
            weight = weight.T
        if not self.rows:
            return weight
        blocks = [weight[start:stop:step] for start, stop, step in self.rows]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


@dataclass(frozen=True)
class Coverage:
    """What the walk took and skipped, for the CLI and the dashboard."""

    family: str
    mapped: bool  # the family is in the projection map (False: every linear layer was taken)
    layers: int
    projections: int
    taken: tuple[str, ...]  # module name inside a layer -> what it gives, e.g. "self_attn.qkv_proj -> q, k, v"
    skipped: tuple[str, ...]  # linear modules not sparsified and why

    def lines(self) -> list[str]:
        how = (f"the {self.family} projection map" if self.mapped else
               f"model family {self.family!r} is not in the projection map: every linear layer of the decoder "
               "layers was taken")
        lines = [f"projections: {self.projections} in {self.layers} decoder layers ({how})",
                 "taken: " + "; ".join(self.taken)]
        if self.skipped:
            lines.append("skipped: " + "; ".join(self.skipped))
        return lines


def text_config(model: nn.Module) -> Any:
    """The language model's config (multimodal models keep it as a sub-config); None for a bare module."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def family_of(model: nn.Module) -> str:
    return str(getattr(text_config(model), "model_type", "") or "")


def _language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The decoder (language model) part of ``model`` and its qualified name ("" = the whole model).

    A multimodal model's vision tower has its own ``layers`` list, which may be as long as the text's; transformers'
    ``get_decoder`` names the language model, so the decoder layers are looked for inside it."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if isinstance(decoder, nn.Module):
        for name, module in model.named_modules():
            if module is decoder:
                return name, module
    return "", model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers and its qualified name.

    Candidates are lists named ``layers``, ``h`` or ``blocks`` inside the language model (``get_decoder``); one as
    long as the config's ``num_hidden_layers`` wins (a vision tower's encoder layers are another list), then the
    longest.
    """
    expected = getattr(text_config(model), "num_hidden_layers", None)
    root, decoder = _language_model(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in LAYER_LIST_NAMES and len(module) > 0:
            rank = (len(module) == expected, len(module))
            if best is None or rank > (len(best[1]) == expected, len(best[1])):
                best = (f"{root}.{name}" if root else name, module)
    if best is None:
        raise ActTailError(
            f"{type(model).__name__} has no decoder layers (no ModuleList named '*.layers', '*.h' or '*.blocks')"
        )
    return best


def _conv1d_type() -> type:
    # Imported here, not at the top: budget and allocation import this module for ``Projection`` alone,
    # and a model that holds a Conv1D has imported transformers already.
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _is_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D ``down_proj`` and ``gate_up_proj`` (or ``up_proj``) parameters, dispatched
    through its experts interface (``@use_experts_implementation`` sets ``is_transposed``), the only way in for the
    masks and the only record of how the parameters are laid out."""
    down = getattr(module, "down_proj", None)
    first = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, nn.Parameter) and isinstance(first, nn.Parameter) and down.dim() == 3
            and first.dim() == 3 and hasattr(module, "is_transposed") and hasattr(module, "has_gate"))


def _is_router(name: str, module: nn.Module, layer: nn.Module) -> bool:
    """A mixture of experts' router: it picks experts, its output is no projection's input (never sparsified)."""
    parts = name.split(".")
    if "router" in type(module).__name__.lower() or "router" in parts:
        return True
    parent = layer.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else layer
    return parts[-1] == "gate" and hasattr(parent, "experts")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_type())) or _is_experts(module)


def _linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in layer.named_modules() if name and _is_linear(module)}


def _other_weights(where: str, layer: nn.Module, linear: dict[str, nn.Module]) -> dict[str, str]:
    """Modules of a decoder layer that hold a matrix but are not linear layers ActTail masks -> why they are skipped.

    Per-expert weights outside transformers' experts interface (Llama 4's ``Llama4TextExperts``, JetMoE, DBRX) are
    an error: they are most of the model, and their inputs exist only inside the module's own forward."""
    out = {}
    for name, module in layer.named_modules():
        if not name or name in linear or any(name.startswith(f"{taken}.") for taken in linear):
            continue
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() >= 2}
        if not params:
            continue
        kind = type(module).__name__
        if _is_router(name, module, layer):
            out[name] = "router"
        elif "expert" in kind.lower() or (
                any(p.dim() >= 3 for p in params.values()) and not isinstance(module, (nn.Conv1d, nn.Conv2d))):
            shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items())
            raise ActTailError(
                f"{where}.{name}: {kind} holds expert weights ({shapes}) outside transformers' experts interface, so "
                "ActTail cannot mask their inputs; this model family is not supported"
            )
        else:
            out[name] = f"{kind}, not a linear layer"
    return out


def _whole(full: str, layer: int, proj_type: str, module: nn.Module) -> Projection:
    if isinstance(module, nn.Linear):
        return Projection(full, layer, proj_type, module.in_features, module.out_features)
    rows, cols = module.weight.shape  # Conv1D: [in, out]
    return Projection(full, layer, proj_type, rows, cols, transposed=True)


def _fused(full: str, layer: int, entry: Fused, module: nn.Module, config: Any) -> list[Projection]:
    whole = _whole(full, layer, "", module)
    parts = entry.split(config, whole.out_features)
    covered = torch.zeros(whole.out_features, dtype=torch.int64)
    out = []
    for proj_type, blocks in parts.items():
        for start, stop, step in blocks:
            covered[start:stop:step] += 1
        width = sum(len(range(start, stop, step)) for start, stop, step in blocks)
        out.append(Projection(f"{full}.{proj_type}", layer, proj_type, whole.in_features, width, module=full,
                              transposed=whole.transposed, rows=blocks))
    if not bool((covered == 1).all()) or set(parts) != set(entry.types):
        raise ActTailError(
            f"{full}: its {whole.out_features} output rows do not split into {', '.join(entry.types)} as the "
            "projection map expects (the config's head counts do not match the weight)"
        )
    return out


def _experts(full: str, layer: int, module: nn.Module) -> list[Projection]:
    transposed = bool(getattr(module, "is_transposed", False))
    gated = hasattr(module, "gate_up_proj")
    first = module.gate_up_proj if gated else module.up_proj

    def shape(stored: torch.Tensor) -> tuple[int, int]:  # (out, in) of one expert
        return (stored.shape[2], stored.shape[1]) if transposed else (stored.shape[1], stored.shape[2])

    first_out, hidden = shape(first)
    down_out, down_in = shape(module.down_proj)
    if gated and getattr(module, "is_concatenated", True):  # [gate; up]
        halves = {"gate": ((0, first_out // 2, 1),), "up": ((first_out // 2, first_out, 1),)}
    elif gated:  # [gate0, up0, gate1, up1, ...]
        halves = {"gate": ((0, first_out, 2),), "up": ((1, first_out, 2),)}
    else:
        halves = {"up": ()}
    out = []
    for expert in range(first.shape[0]):
        for proj_type, rows in halves.items():
            width = first_out if not rows else first_out // 2
            out.append(Projection(f"{full}.{expert}.{proj_type}", layer, proj_type, hidden, width, module=full,
                                  param="gate_up_proj" if gated else "up_proj", expert=expert,
                                  transposed=transposed, rows=rows))
        out.append(Projection(f"{full}.{expert}.down", layer, "down", down_in, down_out, module=full,
                              param="down_proj", expert=expert, transposed=transposed))
    return out


def _from_entry(full: str, layer: int, entry: Entry, module: nn.Module, config: Any) -> list[Projection]:
    if isinstance(entry, Experts) != _is_experts(module):
        expected = "fused experts" if isinstance(entry, Experts) else "a linear layer"
        raise ActTailError(f"{full}: the projection map expects {expected} here, found {type(module).__name__}")
    if isinstance(entry, Experts):
        return _experts(full, layer, module)
    if isinstance(entry, Fused):
        return _fused(full, layer, entry, module, config)
    return [_whole(full, layer, entry.type, module)]


def _match_layout(family: str, fmap: FamilyMap, where: str, linear: dict[str, nn.Module]) -> dict[str, Entry]:
    """The layout whose modules are exactly the layer's linear modules, or an error naming the first difference."""
    present = set(linear) - set(fmap.skip)
    for layout in fmap.layouts:
        if set(layout) == present:
            return layout
    closest = max(fmap.layouts, key=lambda layout: len(set(layout) & present))
    extra = sorted(present - set(closest))
    if extra:
        raise ActTailError(
            f"{where}.{extra[0]}: a linear layer that the {family} projection map does not name "
            f"({len(present)} linear layers in {where}, the map names {len(closest)}); it would be silently left dense"
        )
    missing = [name for name in closest if name not in present]
    raise ActTailError(
        f"{where}.{missing[0]}: the {family} projection map expects a linear layer here and {where} has none "
        f"({len(present)} linear layers, the map names {len(closest)})"
    )


def _generic_types(linear: dict[str, nn.Module]) -> dict[str, str]:
    """Unknown families: type = attribute name, or the path inside the layer where two share one."""
    short = {name: name.split(".")[-1] for name in linear}
    counts: dict[str, int] = {}
    for value in short.values():
        counts[value] = counts.get(value, 0) + 1
    return {name: short[name] if counts[short[name]] == 1 else name for name in linear}


def _walk(model: nn.Module) -> tuple[list[Projection], Coverage]:
    prefix, layers = decoder_layers(model)
    family = family_of(model)
    fmap = FAMILY_MAPS.get(family)
    config = text_config(model)
    found: list[Projection] = []
    taken: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for index, layer in enumerate(layers):
        where = f"{prefix}.{index}"
        linear = _linear_modules(layer)
        if fmap is not None:
            layout = _match_layout(family, fmap, where, linear)
            entries = list(layout.items())
            for name, why in fmap.skip.items():
                if _has_submodule(layer, name):
                    skipped.setdefault(f"{prefix}.*.{name}", why)
        else:
            routers = {name for name, module in linear.items() if _is_router(name, module, layer)}
            linear = {name: module for name, module in linear.items() if name not in routers}
            skipped.update({f"{prefix}.*.{name}": "router" for name in routers})
            entries = [(name, Experts() if _is_experts(linear[name]) else Whole(proj_type))
                       for name, proj_type in _generic_types(linear).items()]
        for name, why in _other_weights(where, layer, linear).items():
            skipped.setdefault(f"{prefix}.*.{name}", why)
        for name, entry in entries:
            parts = _from_entry(f"{where}.{name}", index, entry, linear[name], config)
            found.extend(parts)
            types = list(dict.fromkeys(p.type for p in parts))
            experts = len({p.expert for p in parts if p.expert is not None})
            taken.setdefault(name, f"{', '.join(types)} of {experts} experts" if experts else ", ".join(types))
    if not found:
        raise ActTailError(f"{type(model).__name__} has no linear layers inside its decoder layers")
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") and _is_linear(module):
            skipped.setdefault(re.sub(r"\.\d+\.", ".*.", name), "outside the decoder layers")
    coverage = Coverage(
        family=family or type(model).__name__,
        mapped=fmap is not None,
        layers=len(layers),
        projections=len(found),
        taken=tuple(f"{name} -> {what}" for name, what in taken.items()),
        skipped=tuple(f"{name} ({why})" for name, why in skipped.items()),
    )
    return found, coverage


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def find_projections(model: nn.Module) -> list[Projection]:
    """Every projection of the decoder layers, ordered by layer, then as the family map lists them."""
    return _walk(model)[0]


def projection_coverage(model: nn.Module) -> Coverage:
    """Which modules gave projections and which linear modules were skipped (and why)."""
    return _walk(model)[1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The linear module (``nn.Linear``, ``Conv1D`` or fused experts) named ``name``."""
    module = model.get_submodule(name)
    if not _is_linear(module):
        raise ActTailError(f"{name} is not a linear layer")
    return module


def weight_of(model: nn.Module, projection: Projection) -> torch.Tensor:
    """The projection's [out, in] weight, read from the model (a view unless its rows are several blocks)."""
    module = model.get_submodule(projection.module_name)
    return projection.matrix(getattr(module, projection.param))
