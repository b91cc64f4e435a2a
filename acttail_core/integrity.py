"""Content hashes for the caches: recorded when a cache entry is written, checked whenever it is read.

A cache entry that fails its check is never used: the caller rebuilds it (with
a one-line warning) or refuses it. Two shapes are covered:

* a single file with a sidecar ``NAME.sha256`` holding the hex SHA-256 of its
  bytes (``write_with_digest`` / ``read_with_digest``), e.g. the spectra cache;
* a folder whose marker file lists every other file's size and SHA-256
  (``tree_digests`` / ``tree_problem``), e.g. a converted model.

Hashing a 500 MB model takes about a second, so results are remembered per
process, keyed by the file's inode, size, mtime and ctime: any write, rename
or ``chmod`` of the file changes the key and forces a fresh hash.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

from .errors import ActTailError
from .safe_io import write_bytes

DIGEST_SUFFIX = ".sha256"
_CHUNK = 1 << 22
_MEMO_SIZE = 256
_memo: OrderedDict[tuple, str] = OrderedDict()
_memo_lock = threading.Lock()


class CacheIntegrityError(ActTailError):
    """A cache entry is missing its checksum or does not match it."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (remembered while the file is unchanged)."""
    info = os.stat(path)
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _memo_lock:
        _memo[key] = value
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    return value


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_with_digest(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, then its checksum beside it (a crash in between reads as a mismatch)."""
    write_bytes(path, data, what="cache file")
    write_bytes(_sidecar(path), (hashlib.sha256(data).hexdigest() + "\n").encode("ascii"), what="cache checksum")


def read_with_digest(path: Path) -> bytes:
    """The bytes of ``path`` if they match the recorded checksum; else ``CacheIntegrityError``."""
    try:
        recorded = _sidecar(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise CacheIntegrityError(f"{path.name} has no checksum recorded") from None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded:
        raise CacheIntegrityError(f"{path.name} does not match its checksum")
    return data


def record_file_digest(path: Path, final: Optional[Path] = None) -> None:
    """Record the checksum of a file already written (``final``: the name it is about to be renamed to)."""
    final = final or path
    write_bytes(_sidecar(final), (file_sha256(path) + "\n").encode("ascii"), what="cache checksum")


def file_digest_problem(path: Path) -> Optional[str]:
    """Why a large cached file does not match its recorded checksum, or None (hashes stream, memoized)."""
    try:
        recorded = _sidecar(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "no checksum recorded"
    try:
        return None if file_sha256(path) == recorded else "does not match its checksum"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def tree_digests(folder: Path, skip: Iterable[str] = ()) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every regular file under ``folder`` except ``skip``."""
    skipped = set(skip)
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name in skipped or not path.is_file():
            continue
        files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def tree_problem(folder: Path, recorded: dict, skip: Iterable[str] = ()) -> Optional[str]:
    """Why ``folder`` does not match the recorded digests, or None when every file matches exactly."""
    skipped = set(skip)
    present = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if not path.is_dir() and path.relative_to(folder).as_posix() not in skipped
    }
    if not isinstance(recorded, dict) or not recorded:
        return "no checksums recorded"
    extra = sorted(present - set(recorded))
    if extra:
        return f"unexpected file {extra[0]}"
    for name, expected in recorded.items():
        path = folder / name
        try:
            if path.is_symlink() or not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected.get("size"):
                return f"{name} has the wrong size"
            if file_sha256(path) != expected.get("sha256"):
                return f"{name} does not match its checksum"
        except (OSError, AttributeError):
            return f"{name} cannot be checked"
    return None
