"""Greedy tokens of the fused sparse decode step against transformers + sparsify()'s masked path.

    TRITON_INTERPRET=1 python bench/decode_equivalence.py --models default,gemma3-270m --steps 32
    python bench/decode_equivalence.py --device cuda --dtype float32      # on a GPU, compiled kernels

For each model: the engine's acttail budget and a uniform budget at ``--sparsity``, ``--steps``
greedy tokens after a fixed prompt. Columns: the first step at which the fused step's own greedy
token differs from the masked path's (none = identical), the largest relative logit difference
between the two over all steps (teacher-forced on the masked path's tokens, so every step compares
like with like), and, as the yardstick, how far the masked path's OWN logits move when its input
embeddings are perturbed by one part in a million. TopK is discontinuous: where an input sits at a
projection's cut, any change in the last bits (another summation order, another kernel) can flip it
in or out, and on some tokens that moves the logits by tens of percent in float32. A fused-vs-masked
difference no larger than that yardstick is the reference's own instability, not an error. On a
CPU the kernels run under Triton's interpreter (slow: minutes per model), which executes the same
kernel code as the GPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from acttail_core.allocation import allocate, uniform_budget
from acttail_core.decode import Decoder, input_major
from acttail_core.models import load_model
from acttail_core.projections import find_projections
from acttail_core.sparsify import sparsify
from acttail_core.spectra import compute_spectra

PROMPT = "The history of the printing press begins"


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def compare(loaded, budget, steps: int) -> tuple[str, float, float]:
    """(first differing step or "none", max fused-vs-masked logit difference, masked path's own sensitivity)."""
    model = loaded.model
    prompt = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(loaded.input_device)
    ids = prompt
    with torch.no_grad(), sparsify(model, budget, measure=False):
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        start = prompt.shape[1] - 1
        reference = model(input_ids=ids[:, :-1]).logits[0, start:].float()
        embeds = model.get_input_embeddings()(ids[:, :-1])
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0)).to(embeds)
        perturbed = model(inputs_embeds=embeds * (1 + 1e-6 * noise)).logits[0, start:].float()
    sensitivity = float(relative(perturbed, reference).max())
    expected = ids[0, prompt.shape[1]:]
    first_difference = "none"
    worst = 0.0
    with input_major(model) as weights:
        decoder = Decoder(loaded, max_len=prompt.shape[1] + steps + 1, budget=budget, weights=weights)
        decoder.prefill(prompt)
        for step in range(steps):
            worst = max(worst, float(relative(decoder.logits[0].float(), reference[step])))
            if first_difference == "none" and int(decoder.tokens[0]) != int(expected[step]):
                first_difference = str(step)
            decoder.tokens.fill_(int(expected[step]))  # teacher-forced on the masked path's tokens
            decoder.step()
    return first_difference, worst, sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(f"{'model':<14} | {'budget':<8} | {'steps':>5} | first differing token | max rel. logit diff | "
          f"masked path's own sensitivity | seconds")
    for name in args.models.split(","):
        loaded = load_model(name, dtype=args.dtype, device=args.device)
        budgets = {
            "acttail": allocate(compute_spectra(loaded), args.sparsity),
            "uniform": uniform_budget(find_projections(loaded.model), args.sparsity, loaded.name, loaded.fingerprint),
        }
        for label, budget in budgets.items():
            start = time.perf_counter()
            first, worst, sensitivity = compare(loaded, budget, args.steps)
            print(f"{name:<14} | {label:<8} | {args.steps:5d} | {first:<21} | {worst:19.2e} | {sensitivity:29.2e} | "
                  f"{time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main()
