"""The activations themselves: what one projection's input magnitudes look like, and where a budget cuts them.

``capture_input`` runs the dense model over calibration text (``demo`` -> asyoulik.txt, never the evaluation
text) and keeps one projection's input; the forward stops right after that projection, so an early layer
costs only the layers before it. ``magnitude_histogram`` turns it into a log-binned histogram of ``|x|`` with
both cuts a budget implies at that projection's sparsity:

* TopK (ActTail) keeps the ``keep`` largest magnitudes *of every token*, so its cut is a different k-th value
  per token: the histogram carries their median and 5-95% range.
* The threshold mode (TEAL) cuts every token at one magnitude: here the quantile of this sample's ``|x|`` at
  the sparsity (TEAL's calibration on the dense model's inputs).

Exact zeros cannot sit on a log axis: their share is reported separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .budget import keep_count
from .corpora import load_text, tokenize_corpus
from .errors import ActTailError
from .intercept import intercept
from .models import LoadedModel
from .progress import ProgressFn, report
from .projections import find_projections

DEFAULT_TOKENS = 256
MAX_QUANTILE_SAMPLE = 1 << 22  # torch.quantile refuses inputs above 2**24 elements; a sample this size is plenty


@dataclass(frozen=True)
class InputSample:
    """One projection's input on calibration text: ``magnitudes`` is ``|x|``, [tokens, in_features], float32."""

    name: str
    corpus: str
    magnitudes: torch.Tensor


@dataclass(frozen=True)
class MagnitudeHistogram:
    edges: np.ndarray  # log-spaced bin edges over the non-zero magnitudes
    share: np.ndarray  # fraction of all entries in each bin
    zero_share: float  # fraction of entries exactly zero (not on the log axis)
    sparsity: float
    keep: int  # entries TopK keeps per token
    kth_median: float  # TopK's cut: the keep-th largest |x| of each token, median over tokens
    kth_low: float  # 5th percentile over tokens
    kth_high: float  # 95th percentile over tokens
    topk_kept: float  # fraction of entries TopK keeps (|x| >= the token's cut; ties keep a few extra)
    threshold: float  # the threshold mode's cut: |x| <= threshold is zeroed
    threshold_kept: float  # fraction of entries above it


class _Captured(Exception):
    """Raised by the hook to stop the forward once the projection's input is in hand."""


def capture_input(
    loaded: LoadedModel,
    name: str,
    corpus: str = "demo",
    tokens: int = DEFAULT_TOKENS,
    progress: Optional[ProgressFn] = None,
) -> InputSample:
    """The dense model's input to projection ``name`` over ``tokens`` tokens of the corpus's calibration text."""
    projection = next((p for p in find_projections(loaded.model) if p.name == name), None)
    if projection is None:
        raise ActTailError(f"{name!r} is not a projection of this model")
    ids = tokenize_corpus(loaded, load_text(corpus, role="calibration"), seqlen=tokens, max_tokens=tokens)[:1]
    captured: list[torch.Tensor] = []

    def record(_name: str, x: torch.Tensor) -> None:
        if not x.numel():  # an expert's call with no token routed to it: wait for one that has some
            return
        captured.append(x.detach().reshape(-1, x.shape[-1]).abs().float().cpu())
        raise _Captured

    report(progress, 0, 1, f"running the model up to {name}")
    # intercept() reaches every kind of projection: a whole linear layer, a slice of a fused one, one expert.
    try:
        with torch.no_grad(), intercept(loaded.model, [projection], record):
            loaded.model(ids.to(loaded.input_device), use_cache=False)
    except _Captured:
        pass
    if not captured:
        raise ActTailError(f"no token of the calibration text reached {name}")
    report(progress, 1, 1, f"captured {name}")
    return InputSample(name=name, corpus=corpus, magnitudes=captured[0])


def magnitude_histogram(sample: InputSample, sparsity: float, bins: int = 80) -> MagnitudeHistogram:
    """Histogram of ``|x|`` with the cuts of TopK and of the threshold mode at ``sparsity``."""
    if not 0 <= sparsity < 1:
        raise ActTailError(f"sparsity must be in [0, 1), got {sparsity}")
    magnitudes = sample.magnitudes
    features = int(magnitudes.shape[-1])
    keep = keep_count(sparsity, features)
    flat = magnitudes.reshape(-1)
    nonzero = flat[flat > 0].double().numpy()
    total = flat.numel()
    if nonzero.size:
        low, high = float(nonzero.min()), float(nonzero.max())
        edges = np.logspace(np.log10(low), np.log10(max(high, low * 1.0001)), bins + 1)
        edges[0], edges[-1] = low, max(high, low * 1.0001)  # exact ends, so no entry falls outside
        counts, _ = np.histogram(nonzero, bins=edges)
    else:
        edges, counts = np.array([1e-6, 1.0]), np.zeros(1)
    kth = magnitudes.topk(keep, dim=-1).values[:, -1:]  # [tokens, 1]: each token's cut
    topk_kept = float((magnitudes >= kth).float().mean())
    quantile_sample = flat
    if flat.numel() > MAX_QUANTILE_SAMPLE:
        generator = torch.Generator().manual_seed(0)
        quantile_sample = flat[torch.randint(0, flat.numel(), (MAX_QUANTILE_SAMPLE,), generator=generator)]
    threshold = float(torch.quantile(quantile_sample, sparsity)) if sparsity > 0 else 0.0
    kth_values = kth.squeeze(-1).double().numpy()
    return MagnitudeHistogram(
        edges=edges,
        share=counts / total,
        zero_share=float((flat == 0).float().mean()),
        sparsity=float(sparsity),
        keep=keep,
        kth_median=float(np.median(kth_values)),
        kth_low=float(np.percentile(kth_values, 5)),
        kth_high=float(np.percentile(kth_values, 95)),
        topk_kept=topk_kept,
        threshold=threshold,
        threshold_kept=float((flat > threshold).float().mean()),
    )
