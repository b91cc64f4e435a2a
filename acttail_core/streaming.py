"""Spectra of a local model directory read one decoder layer at a time, for models larger than memory.

``stream_spectra(folder)`` never builds the model's weights: the architecture comes from
``config.json`` (a model on PyTorch's ``meta`` device, which has shapes but no storage), each
decoder layer's projection weights are read from the safetensors shards (``checkpoint``), turned
into eigenvalues and freed before the next layer is read. Host memory holds about one layer
(plus one float64 weight and its Gram matrix on the CPU path); each GPU holds one layer and its
batch of Gram matrices. The peak host and GPU memory are measured and returned.

The spectra equal those of the model loaded whole: the weights are cast to the dtype ``load_model``
would give them before anything else, the CPU path runs the same float64 LAPACK call per matrix, and
the fingerprint (the cache key) is computed from the checkpoint with the same hash
(``checkpoint.fingerprint``), so both routes share the spectra cache.

Nothing here needs a flag: ``should_stream`` says whether a directory's weights fit in the memory
of the device they would be loaded on, and ``spectra_of`` streams a loaded model whose weights a
device map left offloaded (on ``meta``).
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import Checkpoint, fingerprint
from .eigensolver import SolverPlan, Unit, solve, visible_devices
from .errors import ActTailError, ModelLoadError, setting
from .models import LoadedModel, resolve_dtype
from .progress import ProgressFn, report
from .projections import Coverage, Projection, find_projections, projection_coverage
from .spectra import (
    BACKENDS,
    DEFAULT_RULE,
    XMIN_RULES,
    Spectra,
    compute_spectra,
    few_threads_for_small,
    gram_eigenvalues,
    spectra_from_eigenvalues,
)
from .spectra_io import cache_path, cached_eigenvalues, cached_spectra, save_spectra

FIT_SHARE = 0.6  # stream when the weights need more than this share of the target's free memory


@dataclass
class StreamLayout:
    """What streaming needs to know about a model directory, without its weights."""

    folder: Path
    checkpoint: Checkpoint
    projections: list[Projection]
    params: list[tuple[str, tuple[int, ...], torch.dtype]]  # named_parameters of the loaded model
    dtype: torch.dtype  # the dtype load_model would load the weights in
    prefix: str = ""  # the base model's prefix ("transformer."), which hub checkpoints of some families leave out
    coverage: Optional[Coverage] = None  # which linear layers became projections (for the CLI)
    unreadable: Optional[str] = None  # why the projections' weights cannot be read by name (then: load it whole)

    @property
    def layers(self) -> list[int]:
        return sorted({p.layer for p in self.projections})

    def weight_bytes(self) -> int:
        """Bytes of the parameters at the load dtype."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype in self.params)

    def fingerprint(self) -> str:
        samples = ((name, shape, dtype, self.checkpoint.sample(self.key(name)).to(dtype))
                   for name, shape, dtype in self.params)
        return fingerprint(samples)

    def key(self, name: str) -> str:
        """The checkpoint's name for the model's tensor ``name`` (with or without the base model's prefix)."""
        if name not in self.checkpoint and self.prefix and name.removeprefix(self.prefix) in self.checkpoint:
            return name.removeprefix(self.prefix)
        return name

    def read_weight(self, projection: Projection) -> torch.Tensor:
        """A projection's [out, in] weight as ``load_model`` would hold it (CPU, load dtype)."""
        stored = self.checkpoint.read(self.key(f"{projection.module_name}.{projection.param}"))
        return projection.matrix(stored).to(self.dtype)


def model_layout(
    folder: str | Path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False
) -> StreamLayout:
    """Projections and parameters of a local safetensors model directory, from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config in {folder}: {str(exc).strip().splitlines()[0]}") from exc
    checkpoint = Checkpoint(folder)
    params = [(name, tuple(p.shape), p.dtype) for name, p in skeleton.named_parameters()]
    projections = find_projections(skeleton)
    base = getattr(skeleton, "base_model_prefix", "")
    layout = StreamLayout(folder, checkpoint, projections, params, torch_dtype, f"{base}." if base else "",
                          projection_coverage(skeleton))
    reshaped = next((name for name, shape, _ in params
                     if layout.key(name) in checkpoint and checkpoint.entries[layout.key(name)].shape != shape), None)
    if reshaped is not None:  # as load_model refuses it: its spectra would be of another matrix than the model's
        raise ModelLoadError(f"{folder} does not match its config.json: tensor {reshaped} has another shape in the "
                             "checkpoint than config.json says")
    # Where transformers renames or fuses tensors at load time (MoE experts, GPT-NeoX's embed_out -> lm_head), the
    # model's tensors have no name in the checkpoint: such a model is loaded whole, not streamed.
    missing = next((name for name, _, _ in params if layout.key(name) not in checkpoint), None)
    if missing is not None:
        layout.unreadable = f"the checkpoint has no tensor {missing} (names differ from the model's)"
    return layout


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MMAP_THRESHOLD = 1 << 20


def _return_large_blocks_to_os() -> None:
    """Make glibc give every freed block over 1 MiB back to the OS at once (process-wide).

    Weights of different sizes are allocated and freed one after another. glibc's default raises
    its mmap threshold to the largest block freed and then keeps later blocks in its heap, whose
    freed pages it does not return, so the resident set creeps up to several layers. A fixed
    threshold serves large blocks by mmap and unmaps them on free. No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


# --------------------------------------------------------------------------- choosing the route


def available_bytes(device: str) -> int:
    """Free memory where ``load_model`` would put the weights: host RAM, one GPU, or all GPUs (auto)."""
    if device == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if device == "auto":
        return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return torch.cuda.mem_get_info(torch.device(device))[0]


def should_stream(layout: StreamLayout, device: str) -> bool:
    """Whether the weights would take more than ``FIT_SHARE`` of the free memory of ``device``."""
    return layout.weight_bytes() > FIT_SHARE * available_bytes(device)


# --------------------------------------------------------------------------- memory measurement


class HostPeak:
    """Peak resident memory above the level at entry.

    Linux keeps the high-water mark of the resident set (VmHWM) and resets it on a write of "5" to
    /proc/self/clear_refs; where that is not allowed, a thread samples VmRSS every 5 ms.
    """

    def __enter__(self) -> "HostPeak":
        self.base = _status_kb("VmRSS")
        self._stop = threading.Event()
        self._sampled = self.base
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = self._sampled if self._thread is not None else _status_kb("VmHWM")
        self.peak_bytes = max(0, peak - self.base) * 1024


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- streamed spectra


@dataclass
class StreamResult:
    spectra: Spectra
    layers: int
    largest_layer_bytes: int  # one layer's projection weights at the load dtype
    peak_host_bytes: int  # resident memory above the level before streaming
    peak_gpu_bytes: dict[str, int] = field(default_factory=dict)  # torch allocator peak per GPU
    seconds: float = 0.0
    from_cache: bool = False

    def memory_line(self) -> str:
        gpus = ", ".join(f"{d} {_size(b)}" for d, b in self.peak_gpu_bytes.items())
        return (
            f"streamed {self.layers} layers in {self.seconds:.1f} s: peak host memory {_size(self.peak_host_bytes)}"
            + (f", peak GPU memory {gpus}" if gpus else "")
            + f" (largest layer {_size(self.largest_layer_bytes)})"
        )


def _size(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.1f} MiB"


def _layer_bytes(layout: StreamLayout, layer: int) -> int:
    return sum(p.params * layout.dtype.itemsize for p in layout.projections if p.layer == layer)


def _stream_eigenvalues(
    layout: StreamLayout, devices: list[torch.device], progress: Optional[ProgressFn], plan: Optional[SolverPlan]
) -> list[np.ndarray]:
    projections = layout.projections
    layers = layout.layers
    total = len(projections)
    if devices[0].type == "cpu":
        out: list[np.ndarray] = []
        with few_threads_for_small(projections, devices[0]):
            for number, layer in enumerate(layers, start=1):
                for proj in (p for p in projections if p.layer == layer):
                    out.append(gram_eigenvalues(layout.read_weight(proj)).numpy())  # the weight is freed here
                report(progress, len(out), total, f"layer {number}/{len(layers)}: eigenvalues {len(out)}/{total}")
        return out
    index = {p.name: i for i, p in enumerate(projections)}
    units = []
    for number, layer in enumerate(layers, start=1):
        members = [p for p in projections if p.layer == layer]
        units.append(Unit(lambda _device, members=members: [(index[p.name], layout.read_weight(p)) for p in members],
                          label=f"layer {number}/{len(layers)}"))
    results = solve(units, total, devices, plan, progress)
    return [results[i] for i in range(total)]


def stream_spectra(
    folder: str | Path,
    name: Optional[str] = None,
    rule: str = DEFAULT_RULE,
    device: str = "cpu",
    dtype: str = "auto",
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
    trust_remote_code: bool = False,
    layout: Optional[StreamLayout] = None,
    plan: Optional[SolverPlan] = None,
) -> StreamResult:
    """Spectra of a model directory read one decoder layer at a time (``device``: where to compute:
    ``cpu``, ``cuda``/``auto`` = every visible GPU, or ``cuda:N``; ``plan`` tunes the GPU solver)."""
    if rule not in XMIN_RULES:
        raise ActTailError(f"unknown xmin rule {rule!r}; choose one of {', '.join(XMIN_RULES)}")
    layout = layout or model_layout(folder, dtype, device, trust_remote_code)
    if layout.unreadable:
        raise ModelLoadError(f"{folder} cannot be read one decoder layer at a time: {layout.unreadable}")
    name = name or str(folder)
    projections = layout.projections
    layers = len(layout.layers)
    largest = max(_layer_bytes(layout, layer) for layer in layout.layers)
    key = layout.fingerprint()
    if use_cache:
        hit = cached_spectra(key, rule, "acttail", projections)
        if hit is not None:
            hit.model_name = name  # the cache file names whichever model computed it first (compute_spectra)
            report(progress, len(projections), len(projections), "spectra from cache")
            return StreamResult(hit, layers, largest, 0, from_cache=True)
    target = torch.device("cuda" if device == "auto" else device)
    devices = visible_devices(target) if target.type == "cuda" else [target]
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    _return_large_blocks_to_os()
    start = time.perf_counter()
    with HostPeak() as host:
        eigenvalues = cached_eigenvalues(key, projections) if use_cache else None
        if eigenvalues is None:
            eigenvalues = _stream_eigenvalues(layout, devices, progress, plan)
        fit_device = str(devices[0])  # a GPU fits a 70B model's 560 tails in seconds, one CPU core in minutes
        with few_threads_for_small(projections, devices[0]):
            spectra = spectra_from_eigenvalues(projections, eigenvalues, rule, name, key, fit_device, progress)
    seconds = time.perf_counter() - start
    if use_cache:
        try:
            save_spectra(spectra, cache_path(key, rule, "acttail"))
        except OSError:  # a read-only cache must not stop the analysis
            pass
    gpu = {str(d): torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"}
    return StreamResult(spectra, layers, largest, host.peak_bytes, gpu, seconds)


def is_offloaded(loaded: LoadedModel) -> bool:
    """Whether a device map left some weights on ``meta`` (offloaded to CPU or disk by accelerate)."""
    return any(p.device.type == "meta" for p in loaded.model.parameters())


def spectra_of(
    loaded: LoadedModel,
    rule: str = DEFAULT_RULE,
    backend: str = "acttail",
    use_cache: bool = True,
    progress: Optional[ProgressFn] = None,
    device: Optional[str] = None,
) -> Spectra:
    """``compute_spectra`` for a loaded model, streamed from its directory when weights are offloaded."""
    if not is_offloaded(loaded):
        return compute_spectra(loaded, rule, backend, use_cache, progress, device)
    if backend not in BACKENDS:
        raise ActTailError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "weightwatcher":
        raise ActTailError(
            f"{setting('backend')} weightwatcher needs every weight in memory; this model is partly offloaded"
        )
    if not Path(loaded.source).is_dir():
        raise ActTailError(f"{loaded.name} is partly offloaded and not a local directory, so it cannot be streamed")
    dtype = str(loaded.dtype).replace("torch.", "")
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return stream_spectra(loaded.source, loaded.name, rule, target, dtype, use_cache, progress).spectra


__all__ = [
    "HostPeak",
    "StreamLayout",
    "StreamResult",
    "model_layout",
    "available_bytes",
    "should_stream",
    "stream_spectra",
    "is_offloaded",
    "spectra_of",
]
