"""Greedy tokens of the fused sparse decode step against transformers + sparsify()'s masked path.

    TRITON_INTERPRET=1 python bench/decode_equivalence.py --models default,gemma3-270m --steps 32
    python bench/decode_equivalence.py --device cuda --dtype float32      # on a GPU, compiled kernels

For each model: the engine's acttail budget and a uniform budget at ``--sparsity``, ``--steps``
greedy tokens after a fixed prompt, from both paths; prints whether the tokens are identical and
the largest relative logit difference over the steps.
On a CPU the kernels run under Triton's interpreter (slow: minutes per model), which executes the
same kernel code as the GPU.
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


def compare(loaded, budget, steps: int) -> tuple[bool, float]:
    model = loaded.model
    prompt = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(loaded.input_device)
    ids = prompt
    with torch.no_grad(), sparsify(model, budget, measure=False):
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        reference_logits = model(input_ids=ids[:, :-1]).logits[0, prompt.shape[1] - 1:].float()
    expected = ids[:, prompt.shape[1]:]
    with input_major(model) as weights:
        decoder = Decoder(loaded, max_len=prompt.shape[1] + steps + 1, budget=budget, weights=weights)
        decoder.prefill(prompt)
        worst = 0.0
        for step in range(steps):
            ref = reference_logits[step]
            worst = max(worst, ((decoder.logits[0].float() - ref).norm() / ref.norm()).item())
            if int(decoder.tokens[0]) != int(expected[0, step]):  # the step's own greedy token
                return False, worst
            if step < steps - 1:
                decoder.step()
    return True, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(f"{'model':<14} | {'budget':<8} | {'steps':>5} | tokens identical | max rel. logit diff | seconds")
    for name in args.models.split(","):
        loaded = load_model(name, dtype=args.dtype, device=args.device)
        budgets = {
            "acttail": allocate(compute_spectra(loaded), args.sparsity),
            "uniform": uniform_budget(find_projections(loaded.model), args.sparsity, loaded.name, loaded.fingerprint),
        }
        for label, budget in budgets.items():
            start = time.perf_counter()
            same, worst = compare(loaded, budget, args.steps)
            print(f"{name:<14} | {label:<8} | {args.steps:5d} | {str(same):<16} | {worst:19.2e} | "
                  f"{time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main()
