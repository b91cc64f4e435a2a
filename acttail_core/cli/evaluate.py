"""``acttail eval``, ``acttail bench`` and ``acttail prepare``: perplexity, tokens/s, and the one-time set-up.

    python -m acttail_core eval --model default --sparsity 0.7 --corpus demo --max-tokens 8192
    python -m acttail_core eval --model default --budget budget.json --uniform --corpus wikitext2
    python -m acttail_core bench --model default --sparsity 0.5 --device cuda
    python -m acttail_core prepare

Arguments are checked before the model is loaded so that a bad number fails in
a second; results are written only after every run finished (atomically).
"""
from __future__ import annotations

import argparse

import pandas as pd

from .. import __version__
from ..allocation import check_target
from ..budget import Budget, load_budget
from ..corpora import (
    default_calibration_corpus,
    default_seqlen,
    ensure_demo_corpus,
    load_calibration_text,
    load_text,
    same_text,
)
from ..errors import ActTailError
from ..evaluate import EvalSettings, compare, noise_note, throughput, throughput_note, uniform_for
from ..models import LoadedModel, cache_root, check_device, load_model
from ..progress import TqdmProgress
from ..projections import find_projections
from ..safe_io import check_output, write_json
from ..sparsify import SPARSITY_MODES
from ..spectra import compute_spectra
from . import common

PPL_CONVENTION = "SparseGPT/Wanda: non-overlapping chunks, ppl = exp(mean token NLL)"


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    common.add_allocation_arguments(parser)
    parser.add_argument("--budget", default=None,
                        help="budget JSON (from `allocate` or the dashboard) instead of --sparsity")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="use a --budget made for other weights of the same architecture (refused by default)")
    parser.add_argument("--spectra", default=None, help="spectra JSON to allocate from instead of computing it")
    parser.add_argument("--mode", default="topk", choices=SPARSITY_MODES,
                        help="topk (ActTail) or threshold (TEAL-style, calibrated)")
    parser.add_argument("--calib-corpus", default=None,
                        help="threshold mode: calibration text (default: the corpus's own calibration file)")
    parser.add_argument("--calib-tokens", type=int, default=None,
                        help="threshold mode: calibration tokens (default 4096)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="include the dense model")
    parser.add_argument("--uniform", action=argparse.BooleanOptionalAction, default=True,
                        help="include uniform at the budget's effective sparsity")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")


def _check_common(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading the model."""
    check_device(args.device)
    if (args.sparsity is None) == (args.budget is None):
        raise ActTailError("give exactly one of --sparsity S or --budget FILE")
    common.check_allocation_options(args)
    if args.mode != "threshold" and (args.calib_corpus is not None or args.calib_tokens is not None):
        raise ActTailError("--calib-corpus and --calib-tokens would be ignored: they are for --mode threshold")
    if getattr(args, "calib_tokens", None) is not None and args.calib_tokens < 2:
        raise ActTailError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    if args.sparsity is not None:
        check_target(args.sparsity, common.settings_from_args(args))
    else:
        load_budget(args.budget)  # a malformed budget fails now; the model check follows the load
    if args.out is not None:  # a bad --out (even an empty one) must not cost a whole run
        inputs = [args.budget, args.spectra, getattr(args, "corpus", None), args.calib_corpus, common.model_input(args)]
        args.out = check_output(args.out, inputs)


def _budget(args: argparse.Namespace, loaded: LoadedModel) -> Budget:
    if args.budget:
        return load_budget(args.budget, find_projections(loaded.model), loaded.fingerprint, args.allow_other_weights)
    return common.build_budget(args, loaded, args.sparsity)


def _config(args: argparse.Namespace, loaded: LoadedModel, budget: Budget, **extra) -> dict:
    return {
        "model": args.model,
        "fingerprint": loaded.fingerprint,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": loaded.device,
        "mode": args.mode,
        "budget_file": args.budget,
        "method": budget.method,
        "target_sparsity": budget.target_sparsity,
        "effective_sparsity": budget.effective_sparsity,
        "tool_version": __version__,
        **extra,
    }


# --------------------------------------------------------------------------- eval


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--corpus", default="demo", help="demo | demo:NAME | wikitext2 | path to a text file")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per chunk (default: min(2048, model context))")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (quick checks)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="chunks per forward (default: 1 on CPU, as many as fit on CUDA)")


def _eval_run(args: argparse.Namespace) -> int:
    _check_common(args)
    if args.seqlen is not None and args.seqlen < 2:
        raise ActTailError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.max_tokens is not None and args.seqlen is not None and args.max_tokens < args.seqlen:
        raise ActTailError(f"--max-tokens {args.max_tokens} is smaller than one chunk of --seqlen {args.seqlen} tokens")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ActTailError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ActTailError(f"--batch-size must be at least 1, got {args.batch_size}")
    load_text(args.corpus, "eval", max_chars=1 << 16)  # fails fast on a missing or empty corpus, reading only its start
    calib = None
    if args.mode == "threshold":
        calib = args.calib_corpus or default_calibration_corpus(args.corpus)
        if same_text(args.corpus, calib):
            raise ActTailError(f"--calib-corpus {calib} is the evaluation text; calibrate on a different text")
        load_calibration_text(calib)
    loaded = common.load_from_args(args)
    budget = _budget(args, loaded)
    settings = EvalSettings(corpus=args.corpus, seqlen=args.seqlen, max_tokens=args.max_tokens, mode=args.mode,
                            calib_corpus=calib, calib_tokens=args.calib_tokens, batch_size=args.batch_size)
    results = compare(loaded, budget, settings, include_dense=args.dense, include_uniform=args.uniform,
                      progress=TqdmProgress("eval"))
    frame = pd.DataFrame([r.as_dict() for r in results]).set_index("method")
    seqlen = args.seqlen
    if seqlen is None:
        seqlen = default_seqlen(loaded)
    common.print_table(
        frame.round({"sparsity": 4, "ppl": 3, "nll": 4, "realized_sparsity": 4, "seconds": 2}),
        f"{loaded.name} on {args.corpus}: {args.mode} sparsity, {results[-1].tokens} tokens scored "
        f"in {seqlen}-token chunks "
        f"({PPL_CONVENTION})",
    )
    for result in results:
        if result.method != "dense":
            name, gap = result.worst_projection()
            print(
                f"{result.method}: realized sparsity of every projection measured; "
                f"furthest from its budget: {name} ({gap:+.4f})"
            )
    if args.out:
        config = _config(
            args, loaded, budget, corpus=args.corpus, calib_corpus=calib, seqlen=seqlen, max_tokens=args.max_tokens
        )
        config["ppl_convention"] = PPL_CONVENTION
        path = write_json(args.out, {"config": config, "runs": [r.as_dict() for r in results]})
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=128, help="prefill length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps (batch 1, KV cache)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median), after one warm-up")


def _bench_run(args: argparse.Namespace) -> int:
    _check_common(args)
    if min(args.prompt_len, args.new_tokens, args.repeats) < 1:
        raise ActTailError("--prompt-len, --new-tokens and --repeats must be at least 1")
    loaded = common.load_from_args(args)
    budget = _budget(args, loaded)
    budgets = [None] if args.dense else []
    if args.uniform and budget.method != "uniform":
        budgets.append(uniform_for(loaded, budget))
    budgets.append(budget)
    settings = EvalSettings(mode=args.mode, calib_corpus=args.calib_corpus, calib_tokens=args.calib_tokens,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    results = throughput(loaded, budgets, settings, progress=TqdmProgress("bench"))
    frame = pd.DataFrame([r.as_dict() for r in results]).set_index("method")
    frame["decode_min"] = [min(r.decode_runs, default=float("nan")) for r in results]
    frame["decode_max"] = [max(r.decode_runs, default=float("nan")) for r in results]
    shown = ["sparsity", "decode_path", "decode_tokens_per_s", "decode_min", "decode_max", "decode_speedup",
             "prefill_tokens_per_s"]
    common.print_table(
        frame[shown].round(3),
        f"{loaded.name} on {loaded.device} ({str(loaded.dtype).replace('torch.', '')}), batch 1, {args.mode} "
        f"sparsity, tokens/s: median (min, max) of {args.repeats} after a warm-up",
    )
    note = " ".join(filter(None, [throughput_note(results), noise_note(results)]))
    print(f"note: {note}")
    if args.out:
        config = _config(
            args, loaded, budget, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats
        )
        config["note"] = note
        path = write_json(args.out, {"config": config, "runs": [r.as_dict() for r in results]})
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- prepare


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="model to convert and analyse once (default: the packaged SmolLM2)")


def _prepare_run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, progress=TqdmProgress("model"))
    print(f"model {loaded.name}: {loaded.source} (fingerprint {loaded.fingerprint})")
    folder = ensure_demo_corpus(progress=TqdmProgress("demo corpus"))
    print(f"demo corpus: {folder}")
    spectra = compute_spectra(loaded, progress=TqdmProgress("spectra"))
    print(f"spectra: {len(spectra.entries)} projections ({spectra.rule} rule) cached under {cache_root()}")
    return 0


COMMANDS = (
    common.Command("eval", "perplexity of dense, uniform and budgeted sparsity", _eval_arguments, _eval_run),
    common.Command("bench", "prefill and decode tokens/s of dense, uniform and budgeted sparsity", _bench_arguments,
                   _bench_run),
    common.Command("prepare", "convert the default model, fetch the demo corpus, cache its spectra (setup)",
                   _prepare_arguments, _prepare_run),
)
