"""Hand every projection's input to a transform, whatever module holds the projection's weight.

``intercept(model, projections, transform)`` is a context manager. Inside it, each forward pass calls
``transform(name, x)`` with the input ``x`` ([..., in_features]) of every listed projection and feeds
the projection what it returns instead (``None``: ``x`` unchanged). The sparsifier masks with it;
threshold calibration and the greedy baseline only look. Three ways in, by what holds the weight:

* a whole ``nn.Linear`` or ``Conv1D``: a forward pre-hook replaces the module's input.
* a fused module (q, k and v are row slices of Phi-3's ``qkv_proj``; gate and up of ``gate_up_proj``;
  GPT-NeoX's and Falcon's ``query_key_value``): a forward hook. The module runs as usual on its input;
  then each slice whose transform returned a new input gets its output rows recomputed from that input
  (``F.linear`` with the slice's rows of the weight and bias), so each slice sees its own mask of the
  shared input, as separate q, k and v would. When every transform returns ``None`` the output is the
  module's own, bit for bit. The module's full matmul is wasted work when slices are masked: this is
  the measuring path (the speed path is ``decode``).
* transformers' fused experts (``@use_experts_implementation``: 3-D ``gate_up_proj`` / ``down_proj``):
  an expert's gate/up input is the hidden states of the tokens routed to it and its down input exists
  only inside the experts' computation, so no hook on a module boundary can reach them. transformers
  5 dispatches the experts' forward through ``ExpertsInterface`` by ``config._experts_implementation``:
  this module registers one more implementation there, ``acttail``, and switches the model to it with
  ``set_experts_implementation`` for the duration of the block (restoring the previous one on exit, from
  ``get_experts_implementation``), the documented way to replace the experts' computation without
  touching any model class. ``acttail`` is transformers' ``grouped_mm`` implementation step for step,
  with each expert's input (its rows of the expert-sorted tokens) passed through the transform before
  the up and down matmuls. A stage where no transform returns anything runs transformers' own grouped
  matmul, so with nothing masked the output equals ``grouped_mm`` (transformers' default) bit for bit;
  a masked stage runs one ``F.linear`` per expert on its masked rows.
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ActTailError
from .projections import Projection, get_module

Transform = Callable[[str, torch.Tensor], Optional[torch.Tensor]]
EXPERTS_IMPLEMENTATION = "acttail"


class _ExpertsTap:
    """The projections of one experts module, by expert, and the transform they go through."""

    def __init__(self, projections: Sequence[Projection], num_experts: int, transform: Transform) -> None:
        self.transform = transform
        self.first: list[list[Projection]] = [[] for _ in range(num_experts)]  # gate, up (row slices of one matmul)
        self.down: list[list[Projection]] = [[] for _ in range(num_experts)]
        for p in projections:
            (self.down if p.param == "down_proj" else self.first)[p.expert].append(p)


_EXPERT_TAPS: "weakref.WeakKeyDictionary[nn.Module, _ExpertsTap]" = weakref.WeakKeyDictionary()


def _slice_rows(out: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                parts: Sequence[tuple[Projection, Optional[torch.Tensor]]]) -> None:
    """Recompute ``out``'s rows of each part from its replaced input (``weight``: the module's [out, in] matrix)."""
    for proj, replaced in parts:
        if replaced is None:
            continue
        for start, stop, step in proj.rows or ((0, weight.shape[0], 1),):
            rows = slice(start, stop, step)
            out[..., rows] = F.linear(replaced, weight[rows], None if bias is None else bias[rows])


def _fused_hook(parts: Sequence[Projection], transform: Transform):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        x = args[0]
        replaced = [(p, transform(p.name, x)) for p in parts]
        if all(r is None for _, r in replaced):
            return None
        weight = module.weight.T if parts[0].transposed else module.weight
        out = output.clone()
        _slice_rows(out, weight, getattr(module, "bias", None), replaced)
        return out

    return hook


def _pre_hook(name: str, transform: Transform):
    def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
        out = transform(name, args[0])
        return None if out is None else (out,) + tuple(args[1:])

    return hook


@contextmanager
def intercept(model: nn.Module, projections: Sequence[Projection], transform: Transform) -> Iterator[None]:
    """Route every listed projection's input through ``transform`` inside the block (see the module docstring)."""
    by_module: dict[str, list[Projection]] = {}
    for p in projections:
        by_module.setdefault(p.module_name, []).append(p)
    with ExitStack() as stack:
        experts: list[tuple[nn.Module, list[Projection]]] = []
        for name, parts in by_module.items():
            module = get_module(model, name)
            if parts[0].expert is not None:
                experts.append((module, parts))
            elif len(parts) == 1 and not parts[0].rows:
                stack.callback(module.register_forward_pre_hook(_pre_hook(parts[0].name, transform)).remove)
            else:
                stack.callback(module.register_forward_hook(_fused_hook(parts, transform)).remove)
        if experts:
            stack.enter_context(_experts_routed(model, experts, transform))
        yield


@contextmanager
def _experts_routed(model: nn.Module, experts: list[tuple[nn.Module, list[Projection]]],
                    transform: Transform) -> Iterator[None]:
    if not (hasattr(model, "get_experts_implementation") and hasattr(model, "set_experts_implementation")):
        raise ActTailError(f"{type(model).__name__} holds fused experts but is not a transformers model that can "
                           "switch its experts implementation")
    if any(module in _EXPERT_TAPS for module, _ in experts):
        raise ActTailError("these experts are already intercepted (one intercept() per model at a time)")
    _register()
    previous = model.get_experts_implementation()
    try:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        for module, parts in experts:
            if module.config._experts_implementation != EXPERTS_IMPLEMENTATION:
                raise ActTailError(f"{type(module).__name__}: transformers did not let ActTail route these experts "
                                   "through its masked implementation")
            _EXPERT_TAPS[module] = _ExpertsTap(parts, module.num_experts, transform)
        yield
    finally:
        for module, _ in experts:
            _EXPERT_TAPS.pop(module, None)
        model.set_experts_implementation(previous)


def _register() -> None:
    # transformers.integrations is imported here, not at the top: only models with fused experts need it, and
    # they come from transformers, so it is loaded already.
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)


def _grouped_linear():
    # Private, on purpose: with nothing masked the experts must run the very kernels of transformers' grouped_mm
    # implementation, or a zero budget would not be bit-identical to dense.
    from transformers.integrations.moe import _grouped_linear as grouped_linear

    return grouped_linear


def _expert_groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that received tokens (one device sync)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def _stage(experts: nn.Module, x: torch.Tensor, param: str, offsets: torch.Tensor, expert_ids: torch.Tensor,
           tap: Optional[_ExpertsTap], parts_by_expert: Optional[list[list[Projection]]]) -> torch.Tensor:
    """One grouped matmul of the experts (``param``: gate_up_proj, up_proj or down_proj) on expert-sorted rows."""
    stored = getattr(experts, param)
    bias = getattr(experts, f"{param}_bias") if experts.has_bias else None
    replaced: dict[int, list[tuple[Projection, Optional[torch.Tensor]]]] = {}
    groups = _expert_groups(offsets) if tap is not None else []
    for expert, start, end in groups:
        rows = x[start:end]  # one tensor for gate and up: the sparsifier selects once per distinct input
        parts = [(p, tap.transform(p.name, rows)) for p in parts_by_expert[expert]]
        if any(r is not None for _, r in parts):
            replaced[expert] = parts
    if not replaced:
        return _grouped_linear()(x, stored, offsets, bias=None if bias is None else bias[expert_ids],
                                 is_transposed=experts.is_transposed)
    width = stored.shape[2] if experts.is_transposed else stored.shape[1]
    out = x.new_empty(x.shape[0], width, dtype=stored.dtype)
    for expert, start, end in groups:
        weight = stored[expert].T if experts.is_transposed else stored[expert]
        expert_bias = None if bias is None else bias[expert]
        rows = x[start:end].to(stored.dtype)
        inputs = [(p, rows if r is None else r.to(stored.dtype)) for p, r in replaced.get(expert, [])]
        covered = sum(p.out_features for p, _ in inputs) == width
        if covered and len({id(r) for _, r in inputs}) == 1:  # gate and up share one input: one matmul
            out[start:end] = F.linear(inputs[0][1], weight, expert_bias)
            continue
        if not covered:  # nothing replaced for this expert, or some of its rows belong to no listed projection
            out[start:end] = F.linear(rows, weight, expert_bias)
        _slice_rows(out[start:end], weight, expert_bias, inputs)
    return out


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``acttail`` experts implementation: transformers' ``grouped_mm_experts_forward`` with each expert's
    inputs passed through the intercepting transform (see the module docstring)."""
    if getattr(self, "_is_expert_parallel", False):
        raise ActTailError("expert-parallel experts cannot be sparsified by ActTail")
    tap = _EXPERT_TAPS.get(self)
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    rows = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    # histc, as transformers: CPU and MPS histc take floats only
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    first = "gate_up_proj" if self.has_gate else "up_proj"
    out = _stage(self, rows, first, offsets, expert_ids_g, tap, tap.first if tap else None)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    out = _stage(self, out, "down_proj", offsets, expert_ids_g, tap, tap.down if tap else None)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    weighted = out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
