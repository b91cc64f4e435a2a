"""A local safetensors checkpoint (one file or an indexed set of shards), read one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the raw little-endian data. Reading a tensor is one
``readinto`` of its bytes into a fresh CPU tensor, so memory holds only the tensors asked for, never
a mapping of the whole file; nothing is ever unpickled. A strided sample (for the fingerprint) reads
only the pages it touches, through a memory map advised for random access.

``fingerprint`` is the model's cache key (``models.model_fingerprint`` uses the same function on
loaded tensors), so a model read from its checkpoint and the same model loaded whole share their
cached spectra.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import ModelLoadError

FINGERPRINT_SAMPLE = 4096  # values hashed per tensor
_MAX_HEADER = 100 << 20  # the format's own limit
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's entry, checked against the file: a corrupt or cut-off file fails here, naming itself,
    instead of deep inside a loader (transformers' own reader raises its own exception type, not an OSError)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(handle.read(size))
            file_size = os.fstat(handle.fileno()).st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"cannot read safetensors file {path}: its header is not a JSON object")
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelLoadError(f"{path}: tensor {name} has a malformed header entry")
        if info.get("dtype") not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (_is_index_list(shape) and _is_index_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{path}: tensor {name} has a malformed shape or data_offsets")
        entry = TensorEntry(path, _DTYPES[info["dtype"]], tuple(shape), base + offsets[0], base + offsets[1])
        if entry.nbytes != entry.numel * entry.dtype.itemsize:
            raise ModelLoadError(f"{path}: tensor {name} has {entry.nbytes} bytes for shape {list(shape)}")
        if entry.end > file_size:
            raise ModelLoadError(f"{path} is truncated: {file_size} bytes, tensor {name} ends at byte {entry.end}")
        entries[name] = entry
    return entries


def _is_index_list(value: object) -> bool:
    """A JSON list of non-negative integers (not booleans, which are ints to Python)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


class Checkpoint:
    """The tensors of a model directory's ``*.safetensors`` files, by name, read on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"cannot read {index}: {exc}") from exc
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder} has no .safetensors files")
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(_read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a new CPU tensor in its stored dtype."""
        entry = self._entry(name)
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(entry.path, "rb") as handle:
            handle.seek(entry.start)
            if handle.readinto(memoryview(buffer.numpy())) != entry.nbytes:
                raise ModelLoadError(f"{entry.path} is truncated (tensor {name})")
        return buffer.view(entry.dtype).reshape(entry.shape)

    def sample(self, name: str) -> torch.Tensor:
        """The fingerprint's sample: ``flat[::step][:4096]`` with ``step = max(1, numel // 4096)``."""
        entry = self._entry(name)
        size = entry.dtype.itemsize
        step, count = _sample_layout(entry.numel)
        raw = torch.empty(count * size, dtype=torch.uint8)
        with open(entry.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_RANDOM)  # read only the touched pages
            data = np.frombuffer(mapped, dtype=np.uint8, count=entry.nbytes, offset=entry.start).reshape(-1, size)
            raw.numpy().reshape(-1, size)[:] = data[::step][:count]
            del data  # the mapping cannot close while a view of it exists
        return raw.view(entry.dtype)

    def _entry(self, name: str) -> TensorEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelLoadError(f"{self.folder}: the checkpoint has no tensor {name}")
        return entry


def _sample_layout(numel: int) -> tuple[int, int]:
    step = max(1, numel // FINGERPRINT_SAMPLE)
    return step, min(FINGERPRINT_SAMPLE, -(-numel // step))


def tensor_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The fingerprint's sample of a tensor in memory (on its own device)."""
    step, count = _sample_layout(tensor.numel())
    return tensor.detach().reshape(-1)[::step][:count]


def fingerprint(params: Iterable[tuple[str, tuple[int, ...], torch.dtype, torch.Tensor]]) -> str:
    """Hash of ``(name, shape, dtype, sample)`` per parameter; the sample is compared as float32."""
    digest = hashlib.sha256()
    for name, shape, dtype, sample in params:
        digest.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
        digest.update(sample.to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
