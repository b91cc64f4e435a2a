"""How often the decode select finds a projection's TopK cut near the previous token's (``CutHints``).

    python bench/hint_hit_rate.py --models default,gemma3-270m --sparsity 0.5,0.8 \
        --json bench/results/hint_hit_rate.json

The sparse decode step starts every TopK search at the cut the same projection had one token
earlier: one histogram of W bins, whose middle W - 2 bins are consecutive bf16 units (1/128 of a
binade) around it, settles the cut when it lies inside, and the full four-pass radix select runs
when it does not. The result is exact either way;
what the hint decides is speed. Random-weight benchmarks say little about this: their inputs are
stationary. This script measures the hit rate on real models: it runs the masked path of ``sparsify()``
over ``--tokens`` tokens of calibration text (``demo``, never an evaluation text), takes every
projection's input as the kernel would see it (rounded to bf16), and checks, token by token, whether the
k-th largest magnitude falls in the window around the one before, for each window size asked for.
Where q, k and v share one k the kernel searches once for all three; here each counts (same rate).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from acttail_core.allocation import allocate, uniform_budget
from acttail_core.budget import Budget
from acttail_core.corpora import load_text, tokenize_corpus
from acttail_core.models import load_model
from acttail_core.projections import find_projections
from acttail_core.safe_io import write_json
from acttail_core.sparsify import sparsify
from acttail_core.spectra import compute_spectra


def cut_units(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Per token, the 16-bit unit (bf16 bit pattern) of the keep-th largest |x|: [tokens] int64."""
    magnitudes = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).float().abs()
    kth = magnitudes.topk(keep, dim=-1).values[:, -1]
    return (kth.view(torch.int32) >> 16).long()


def hits(units: torch.Tensor, window: int) -> tuple[int, int]:
    """(hits, searches) over consecutive tokens: the cut among the window's units, as select._window_cut
    places them: from the previous cut's unit - (window / 2 - 1), window - 2 of them."""
    previous, current = units[:-1], units[1:]
    low = (previous - (window // 2 - 1)).clamp(min=0)
    inside = (current >= low) & (current <= low + window - 3)
    return int(inside.sum()), int(inside.numel())


def measure(loaded, budget: Budget, ids: torch.Tensor, windows: list[int]) -> dict[int, dict[str, list[int]]]:
    """Per window, per projection type: [hits, searches]."""
    keep = budget.keep_by_name()
    modules = dict(loaded.model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for projection in find_projections(loaded.model):
        if projection.name not in keep or keep[projection.name] >= projection.in_features:
            continue
        module = modules[projection.module or projection.name]

        def grab(_module, args, name=projection.name):
            seen[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(grab))
    try:
        with torch.no_grad(), sparsify(loaded.model, budget, measure=False):
            loaded.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    counts: dict[int, dict[str, list[int]]] = {w: defaultdict(lambda: [0, 0]) for w in windows}
    for projection in find_projections(loaded.model):
        if projection.name not in seen:
            continue
        units = cut_units(seen[projection.name], keep[projection.name])
        for window in windows:
            hit, total = hits(units, window)
            counts[window][projection.type][0] += hit
            counts[window][projection.type][1] += total
    return {w: dict(by_type) for w, by_type in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default")
    parser.add_argument("--sparsity", default="0.5,0.8")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--windows", default="64,128,256", help="histogram bins of the hinted search")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    types = ("q", "k", "v", "o", "gate", "up", "down")
    rows = []
    print(f"{'model':<14} | {'budget':<8} | {'sparsity':>8} | {'bins':>4} | "
          + " | ".join(f"{t:>5}" for t in types) + " |   all")
    for name in args.models.split(","):
        loaded = load_model(name, dtype="float32", device="cpu")
        ids = tokenize_corpus(loaded, load_text("demo", role="calibration"), seqlen=args.tokens, max_tokens=args.tokens)
        ids = ids[:1].to(loaded.input_device)
        spectra = compute_spectra(loaded)
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            budgets = {
                "acttail": allocate(spectra, sparsity),
                "uniform": uniform_budget(find_projections(loaded.model), sparsity, loaded.name, loaded.fingerprint),
            }
            for label, budget in budgets.items():
                for window, by_type in measure(loaded, budget, ids, windows).items():
                    hit = sum(h for h, _ in by_type.values())
                    total = sum(t for _, t in by_type.values())
                    rates = {t: h / n for t, (h, n) in by_type.items()}
                    rows.append({"model": name, "budget": label, "sparsity": sparsity, "window": window,
                                 "tokens": int(ids.shape[1]), "hit_rate": hit / total, "hit_rate_by_type": rates})
                    print(f"{name:<14} | {label:<8} | {sparsity:8.2f} | {window:4d} | " + " | ".join(
                        f"{rates.get(t, float('nan')):5.3f}" for t in types) + f" | {hit / total:5.3f}", flush=True)
    if args.json:
        write_json(args.json, {"text": "demo (calibration role)", "rows": rows})
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
