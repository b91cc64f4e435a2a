"""Stage 5: perplexity and throughput of dense, uniform and budgeted models.

Perplexity follows the SparseGPT/Wanda convention: the
text is tokenized once (special tokens only where the tokenizer adds them by
itself, e.g. Llama-2's BOS), cut into non-overlapping chunks of ``seqlen``
tokens (the tail that does not fill a chunk is dropped), every chunk is scored
on its own, and ``ppl = exp(mean NLL over the scored tokens)`` - the same as
exp of the mean of transformers' ``labels=`` loss over the chunks. Dense,
uniform and budget runs share the same chunks.

Throughput is measured at batch 1: prefill = one forward over ``prompt_len``
tokens, decode = greedy steps with the KV cache. A warm-up run is excluded,
CUDA is synchronised before every clock read, and the median of the repeats is
reported. See ``THROUGHPUT_NOTE`` for what these numbers can and cannot show.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import MutableMapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .allocation import uniform_budget
from .budget import Budget, budget_key, check_budget_matches
from .corpora import (
    default_calibration_corpus,
    load_text,
    model_max_length,
    prefix_chars,
    same_text,
    tokenize_corpus,
)
from .errors import ActTailError, setting
from .models import LoadedModel
from .progress import ProgressFn, part, report
from .projections import find_projections
from .sparsify import _check_mode, sparsify
from .thresholds import ThresholdTable, calibrate_thresholds, check_calibration_text

log = logging.getLogger(__name__)

MAX_CUDA_BATCH = 16
THROUGHPUT_NOTE = (
    "Masked path: masking zeroes activations but the dense matmul still reads every weight, so it shows the cost "
    "of masking and cannot be faster than dense; the sparse decode kernels need a CUDA GPU and a Llama, Mistral, "
    "Qwen2/3 or Gemma 3 model on one device."
)
FUSED_NOTE = (
    "Decode: one CUDA graph per step; dense rows use cuBLAS, sparse rows the sparse kernels (slice, one "
    "sequence, and gather, a batch: only the weight rows of kept inputs are read; masked: each projection's "
    "masked input through cuBLAS, for batches whose kept inputs cover nearly every row). Prefill: "
    "transformers' forward with the same masks."
)


@dataclass(frozen=True)
class EvalSettings:
    """How perplexity and throughput are measured: one object for the CLI, the dashboard, the sweep and the study.

    Perplexity reads ``corpus`` (``max_tokens`` of it, in chunks of ``seqlen``; None = the whole text in
    chunks of ``default_seqlen``); threshold mode calibrates on ``calib_corpus`` (None = the corpus's own
    calibration text) over ``calib_tokens``. Throughput runs ``repeats`` rounds of a ``prompt_len`` prefill
    and ``new_tokens`` decode steps at ``batch`` sequences. ``batch_size`` is perplexity's chunks per
    forward (None = 1 on the CPU, as many as fit on CUDA).
    """

    corpus: str = "demo"
    seqlen: Optional[int] = None
    max_tokens: Optional[int] = None
    mode: str = "topk"
    calib_corpus: Optional[str] = None
    calib_tokens: Optional[int] = None
    batch_size: Optional[int] = None
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    batch: int = 1


@dataclass
class PerplexityResult:
    method: str
    sparsity: float
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int  # tokens scored
    realized_sparsity: float
    seconds: float
    # realized sparsity of every projection (not part of as_dict, whose keys are the results JSON schema)
    per_projection: Optional[dict] = field(default=None, repr=False, compare=False)
    targets: Optional[dict] = field(default=None, repr=False, compare=False)
    cached: bool = field(default=False, repr=False, compare=False)  # taken from a cache, not measured by this call

    def as_dict(self) -> dict:
        data = asdict(self)
        for runtime_only in ("per_projection", "targets", "cached"):
            data.pop(runtime_only)
        return data

    def worst_projection(self) -> tuple[str, float]:
        """The projection whose realized sparsity is furthest from its budget, and that distance."""
        if not self.per_projection:
            return ("", 0.0)
        targets = self.targets or {}
        name = max(self.per_projection, key=lambda n: abs(self.per_projection[n] - targets.get(n, 0.0)))
        return name, self.per_projection[name] - targets.get(name, 0.0)


@dataclass
class ThroughputResult:
    method: str
    sparsity: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # median over the repeats
    prompt_len: int
    new_tokens: int
    decode_path: str = "masked"  # dense-graph, sparse-gather/-slice/-masked (graphed step) or masked
    decode_runs: list = field(default_factory=list)  # decode tokens/s of every repeat: the spread
    decode_speedup: float = float("nan")  # decode tokens/s over the dense row of the same call
    prefill_runs: list = field(default_factory=list)  # prefill tokens/s of every repeat
    # Whether the difference from dense is within the spread of the repeats (None for dense itself); see noise_note.
    prefill_within_noise: Optional[bool] = None
    decode_within_noise: Optional[bool] = None

    def as_dict(self) -> dict:
        return asdict(self)


def within_noise(runs: Sequence[float], reference: Sequence[float], masked: bool = False) -> bool:
    """Whether two sets of repeats do not tell their speeds apart: their min..max ranges overlap.

    On the masked path (``masked``) a method measured faster than dense is noise by construction: masking adds
    work and skips none.
    """
    if not runs or not reference:
        return True
    if masked and statistics.median(runs) > statistics.median(reference):
        return True
    return min(runs) <= max(reference) and min(reference) <= max(runs)


def relative_spread(runs: Sequence[float]) -> float:
    """(max - min) / median of the repeats: 0 for perfectly steady numbers (NaN without repeats)."""
    return (max(runs) - min(runs)) / statistics.median(runs) if runs else float("nan")


def noise_note(results: Sequence[ThroughputResult]) -> Optional[str]:
    """One sentence when the repeats do not separate the methods from dense (None when every difference is resolved)."""
    noisy = [f"{r.method} {phase}" for r in results for phase, flag in
             (("prefill", r.prefill_within_noise), ("decode", r.decode_within_noise)) if flag]
    if not noisy:
        return None
    spread = max((relative_spread(runs) for r in results for runs in (r.prefill_runs, r.decode_runs) if runs),
                 default=float("nan"))
    return (f"Within noise: {', '.join(noisy)} differ from dense by less than the spread of the repeats (up to "
            f"{spread:.0%} of the median here), so those differences are not measured; more repeats or a quieter "
            "machine may resolve them.")


def throughput_note(results: Sequence[ThroughputResult]) -> str:
    """What the throughput numbers can and cannot show, for the paths that ran."""
    paths = {r.decode_path for r in results}
    notes = [FUSED_NOTE] if paths - {"masked"} else []
    return " ".join(notes + ([THROUGHPUT_NOTE] if "masked" in paths else []))


def _synchronize(model: torch.nn.Module) -> None:
    if torch.cuda.is_available():
        for device in {p.device for p in model.parameters() if p.device.type == "cuda"}:
            torch.cuda.synchronize(device)


def _chunk_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL of every next-token prediction in each row of ``batch`` (float64, on CPU)."""
    logits = model(input_ids=batch, use_cache=False).logits
    sums = []
    for row in range(batch.shape[0]):  # one row at a time bounds the float32 copy of the logits
        sums.append(
            F.cross_entropy(logits[row, :-1].float(), batch[row, 1:].to(logits.device), reduction="sum").double()
        )
    return torch.stack(sums).cpu()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _nll_batches(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    device: torch.device,
    batch_size: int,
    retry_oom: bool,
    progress: Optional[ProgressFn] = None,
    label: str = "",
) -> float:
    """Summed NLL over all chunks; on CUDA out-of-memory the batch is halved and retried."""
    n_chunks, seqlen = int(chunks.shape[0]), int(chunks.shape[1])
    total = torch.zeros((), dtype=torch.float64)
    done = 0
    report(progress, 0, n_chunks, label)
    while done < n_chunks:
        batch = chunks[done : done + batch_size]
        try:
            total += _chunk_nll(model, batch.to(device)).sum()
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not (retry_oom and _is_oom(exc)):
                raise
            del exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size == 1:
                raise ActTailError(
                    f"CUDA out of memory even at batch size 1 with {seqlen}-token chunks; "
                    f"lower {setting('seqlen')} or use {setting('dtype')} bfloat16"
                ) from None
            batch_size //= 2
            log.info("CUDA out of memory; retrying with batch size %d", batch_size)
            continue
        done += int(batch.shape[0])
        report(progress, done, n_chunks, label)
    return float(total)


def perplexity(
    loaded: LoadedModel,
    chunks: torch.Tensor,
    budget: Optional[Budget] = None,
    mode: str = "topk",
    thresholds: Optional[dict[str, float]] = None,
    method: Optional[str] = None,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
) -> PerplexityResult:
    """Perplexity of the model on ``chunks`` under a budget (None = dense).

    ``batch_size=None`` chooses: 1 on the CPU; on CUDA it starts large and
    halves on out-of-memory, ending with a clear error if even one chunk does
    not fit.
    """
    _check_mode(mode)
    model = loaded.model
    device = loaded.input_device
    n_chunks, seqlen = int(chunks.shape[0]), int(chunks.shape[1])
    if batch_size is None:
        batch_size = 1 if device.type != "cuda" else min(MAX_CUDA_BATCH, n_chunks)
    if batch_size < 1:
        raise ActTailError(f"batch size must be at least 1, got {batch_size}")
    label = method or ("dense" if budget is None else budget.method)
    start = time.perf_counter()
    with torch.no_grad(), sparsify(model, budget, mode, thresholds) as stats:
        total = _nll_batches(model, chunks, device, batch_size, device.type == "cuda", progress, label)
        _synchronize(model)
        realized = stats.overall()
        per_projection = stats.per_projection()
    seconds = time.perf_counter() - start
    scored = n_chunks * (seqlen - 1)
    nll = total / scored
    return PerplexityResult(
        method=label,
        sparsity=0.0 if budget is None else float(budget.effective_sparsity),
        ppl=math.exp(nll) if nll < 700 else float("inf"),
        nll=nll,
        tokens=scored,
        realized_sparsity=realized,
        seconds=seconds,
        per_projection=per_projection,
        targets=dict(stats.targets),
    )


def uniform_for(loaded: LoadedModel, budget: Budget) -> Budget:

    return uniform_budget(find_projections(loaded.model), budget.effective_sparsity, loaded.name, loaded.fingerprint)


def compare(
    loaded: LoadedModel,
    budget: Budget,
    settings: EvalSettings = EvalSettings(),
    include_dense: bool = True,
    include_uniform: bool = True,
    progress: Optional[ProgressFn] = None,
    *,
    calibration: Optional[ThresholdTable] = None,
    cache: Optional[MutableMapping] = None,
) -> list[PerplexityResult]:
    """Dense, uniform at the budget's effective sparsity, then the budget, on the same chunks.

    In threshold mode the thresholds come from ``calibration`` or are calibrated
    on ``settings.calib_corpus`` (default: the corpus's own calibration text, never
    the evaluation text).
    """
    runs: list[tuple[str, Optional[Budget]]] = []
    if include_dense:
        runs.append(("dense", None))
    if include_uniform and budget.method != "uniform":
        runs.append(("uniform", uniform_for(loaded, budget)))
    runs.append((budget.method, budget))
    return evaluate_budgets(loaded, runs, settings, progress, calibration=calibration, cache=cache)


def evaluate_budgets(
    loaded: LoadedModel,
    runs: Sequence[tuple[str, Optional[Budget]]],
    settings: EvalSettings = EvalSettings(),
    progress: Optional[ProgressFn] = None,
    *,
    calibration: Optional[ThresholdTable] = None,
    cache: Optional[MutableMapping] = None,
) -> list[PerplexityResult]:
    """Perplexity of every ``(label, budget)`` run (None = dense) on the same chunks of ``settings.corpus``.

    ``progress`` advances through every chunk of every run (one bar for the whole call). With ``cache`` (any
    dict-like the caller keeps, e.g. for a server's lifetime) a run already measured on the same weights,
    tokens, mode, calibration and per-projection sparsities is taken from it (``cached=True``), not measured
    again.
    """
    corpus, seqlen, max_tokens, mode = settings.corpus, settings.seqlen, settings.max_tokens, settings.mode
    calib_corpus, calib_tokens = settings.calib_corpus, settings.calib_tokens
    _check_mode(mode)
    projections = find_projections(loaded.model)
    for _, budget in runs:
        if budget is not None:
            check_budget_matches(budget, projections)
    text = load_text(corpus, "eval", max_chars=prefix_chars(max_tokens))
    chunks = tokenize_corpus(loaded, text, seqlen, max_tokens)
    table = calibration
    calib_kwargs = {} if calib_tokens is None else {"max_tokens": calib_tokens}
    if mode == "threshold" and table is None:
        calib_corpus = calib_corpus or default_calibration_corpus(corpus)
        if same_text(corpus, calib_corpus):
            raise ActTailError(
                f"calibration text {calib_corpus} is the evaluation text; choose another {setting('calib_corpus')}"
            )
        if any(budget is not None for _, budget in runs):  # calibrated below after the dense run, so checked now
            check_calibration_text(loaded, calib_corpus, seqlen=int(chunks.shape[1]), **calib_kwargs)
    text_key = hashlib.sha256(chunks.numpy().tobytes()).hexdigest()[:16]
    calib_key = ""  # threshold mode: which calibration made the thresholds
    if mode == "threshold":
        calib_key = f"table:{id(table)}" if table is not None else f"{calib_corpus}:{calib_tokens}"
    results = []
    for i, (label, budget) in enumerate(runs):
        step = part(progress, i, len(runs))
        what = "dense" if budget is None else budget_key(budget)
        key = (loaded.fingerprint, str(loaded.dtype), mode, calib_key, text_key, what)
        if cache is not None and key in cache:
            results.append(replace(cache[key], method=label, cached=True))
            report(step, 1, 1, f"{label}: from an earlier run")
            continue
        if mode == "threshold" and table is None and budget is not None:
            table = calibrate_thresholds(loaded, calib_corpus, seqlen=int(chunks.shape[1]), progress=progress,
                                         **calib_kwargs)
        thresholds = table.thresholds_for(budget) if (table is not None and budget is not None) else None
        result = perplexity(loaded, chunks, budget, mode, thresholds, method=label, batch_size=settings.batch_size,
                            progress=step)
        if cache is not None:
            cache[key] = result
        results.append(result)
    return results


def estimate_seconds(past: Sequence[dict], tokens: int, runs: int) -> Optional[float]:
    """Seconds ``runs`` perplexity runs of ``tokens`` tokens should take, from earlier measured runs of the same
    model and device (rows with ``seconds`` and ``tokens``, e.g. ``PerplexityResult.as_dict()``); None without any.
    """
    rates = [row["seconds"] / row["tokens"] for row in past
             if row.get("seconds") and row.get("tokens") and not row.get("cached")]
    if not rates:
        return None
    return statistics.median(rates[-12:]) * tokens * runs


def _timings(loaded: LoadedModel, prompt: torch.Tensor, new_tokens: int, repeats: int,
             warm_up: bool = True) -> tuple[list, list]:
    """Prefill seconds and decode seconds (for ``new_tokens`` steps) of every repeat, after a warm-up run
    unless ``warm_up`` is False."""
    model = loaded.model
    # transformers 5.x renamed past_key_values to cache; accept both
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill, decode = [], []
    for rep in range(0 if warm_up else 1, repeats + 1):  # rep 0 is the warm-up
        _synchronize(model)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _synchronize(model)
        t1 = time.perf_counter()
        past = getattr(out, cache_name)
        token = out.logits[:, -1:].argmax(dim=-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_name: past})
            past = getattr(out, cache_name)
            token = out.logits[:, -1:].argmax(dim=-1)
        _synchronize(model)
        t2 = time.perf_counter()
        del out, past
        if rep > 0:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    return prefill, decode


def _median_timings(loaded: LoadedModel, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median prefill seconds and median decode seconds (for ``new_tokens`` steps) over the repeats."""
    prefill, decode = _timings(loaded, prompt, new_tokens, repeats)
    return statistics.median(prefill), statistics.median(decode)


def fused_decode_unavailable(loaded: LoadedModel, mode: str) -> Optional[str]:
    """Why the fused decode step cannot run here (None when it can)."""
    if loaded.input_device.type != "cuda":
        return "no CUDA GPU"
    try:
        from . import decode  # optional: needs the triton package, which CUDA builds of torch bring
    except ImportError as exc:
        return f"the sparse kernels need triton ({exc})"
    ok, why = decode.support(loaded.model)
    return None if ok else why


def throughput(
    loaded: LoadedModel,
    budgets: Sequence[Optional[Budget]],
    settings: EvalSettings = EvalSettings(),
    progress: Optional[ProgressFn] = None,
    *,
    calibration: Optional[ThresholdTable] = None,
    topk_impl: str = "auto",
) -> list[ThroughputResult]:
    """Prefill and decode tokens/s for each budget (None = dense), with the decode speed-up over dense.

    On a CUDA GPU with a supported model, decode runs the fused CUDA-graphed step of
    ``acttail_core.decode`` (sparse kernels for budgets); elsewhere the masked path of ``sparsify()``
    (see ``THROUGHPUT_NOTE``). Prefill is always transformers' forward with the budget's masks. The
    prompt is random token ids (a fixed seed): speed does not depend on the text. Threshold mode
    calibrates on ``settings.calib_corpus`` (the demo text by default) unless given a table. The repeats
    are taken in rounds (every budget once per round, after a warm-up round), so a change in the
    machine's load hits every budget alike; each result says whether its difference from dense is
    within the spread of the repeats.
    """
    prompt_len, new_tokens, repeats, batch = settings.prompt_len, settings.new_tokens, settings.repeats, settings.batch
    mode = settings.mode
    _check_mode(mode)
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or batch < 1:
        raise ActTailError(
            f"{setting('prompt_len')}, {setting('new_tokens')}, {setting('repeats')} and the batch must be at least 1"
        )
    limit = model_max_length(loaded)
    if limit and prompt_len + new_tokens + 1 > limit:
        raise ActTailError(
            f"{setting('prompt_len')} + {setting('new_tokens')} exceeds the model's context length {limit}"
        )
    if mode == "threshold" and calibration is None and any(b is not None for b in budgets):
        kwargs = {} if settings.calib_tokens is None else {"max_tokens": settings.calib_tokens}
        calibration = calibrate_thresholds(loaded, settings.calib_corpus or "demo", progress=progress, **kwargs)
    why_not = fused_decode_unavailable(loaded, mode)
    if why_not is not None:
        log.info("decode on the masked path: %s", why_not)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(loaded.input_device)
    thresholds = [None if calibration is None or b is None else calibration.thresholds_for(b) for b in budgets]
    labels = ["dense" if b is None else b.method for b in budgets]
    masked_steps = new_tokens if why_not is not None else 0
    steps = (repeats + 1) * len(budgets) + (len(budgets) if why_not is None else 0)
    prefill: list[list[float]] = [[] for _ in budgets]
    decode: list[list[float]] = [[] for _ in budgets]
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for i, budget in enumerate(budgets):
            what = "warm-up" if round_ == 0 else f"repeat {round_}/{repeats}"
            report(progress, round_ * len(budgets) + i, steps, f"{labels[i]}: {what}")
            masks = sparsify(loaded.model, budget, mode, thresholds[i], measure=False, topk_impl=topk_impl)
            with torch.no_grad(), masks:
                try:
                    seconds = _one_repeat(loaded, prompt, masked_steps)
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                    raise ActTailError(
                        f"CUDA out of memory at batch {batch} with a {prompt_len}-token prompt; "
                        f"lower {setting('prompt_len')}"
                    ) from None
            if round_ > 0:
                prefill[i].append(batch * prompt_len / seconds[0])
                if masked_steps:
                    decode[i].append(batch * masked_steps / seconds[1])
    results = [
        ThroughputResult(
            method=labels[i],
            sparsity=0.0 if budget is None else float(budget.effective_sparsity),
            prefill_tokens_per_s=statistics.median(prefill[i]),
            decode_tokens_per_s=statistics.median(decode[i]) if decode[i] else float("nan"),
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            decode_runs=decode[i],
            prefill_runs=prefill[i],
        )
        for i, budget in enumerate(budgets)
    ]
    if why_not is None:
        _fused_decode_speeds(loaded, budgets, results, prompt_len, new_tokens, repeats, mode, calibration, batch,
                             part(progress, steps - len(budgets), steps) if progress else None)
    dense = next((r for r, b in zip(results, budgets) if b is None), None)
    if dense is not None:
        for result, budget in zip(results, budgets):
            result.decode_speedup = result.decode_tokens_per_s / dense.decode_tokens_per_s
            if budget is not None:
                masked = result.decode_path == "masked"
                result.prefill_within_noise = within_noise(result.prefill_runs, dense.prefill_runs, masked=True)
                result.decode_within_noise = within_noise(result.decode_runs, dense.decode_runs, masked=masked)
    report(progress, steps, steps, "done")
    return results


def _one_repeat(loaded: LoadedModel, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill of ``prompt`` and of ``new_tokens`` greedy decode steps after it."""
    prefill, decode = _timings(loaded, prompt, new_tokens, 1, warm_up=False)
    return prefill[0], decode[0]


def _fused_decode_speeds(loaded, budgets, results, prompt_len, new_tokens, repeats, mode, calibration, batch,
                         progress) -> None:
    """Decode tokens/s of every budget through the fused step; the weights are input-major only meanwhile."""
    from . import decode  # optional dependency (triton), checked by fused_decode_unavailable

    kwargs = dict(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, mode=mode, batch=batch)
    for i, (budget, result) in enumerate(zip(budgets, results)):
        if budget is None:
            report(progress, i, len(budgets), "dense: decode")
            _store(result, decode.measure_decode(loaded, None, **kwargs))
    sparse = [(b, r) for b, r in zip(budgets, results) if b is not None]
    if not sparse:
        return
    with decode.input_major(loaded.model) as weights:
        for i, (budget, result) in enumerate(sparse):
            report(progress, len(budgets) - len(sparse) + i, len(budgets), f"{budget.method}: decode")
            thresholds = calibration.thresholds_for(budget) if calibration is not None else None
            _store(result, decode.measure_decode(loaded, budget, weights=weights, thresholds=thresholds, **kwargs))


def _store(result: ThroughputResult, speed) -> None:
    result.decode_tokens_per_s = speed.tokens_per_s
    result.decode_runs = list(speed.runs)
    result.decode_path = speed.path
