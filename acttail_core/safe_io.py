"""The one writer for every file a command produces, and the checks it runs before any work.

``check_output`` runs first, before a model is loaded: the target must be a new
name or an existing regular file (never a folder, a symbolic link, a device, a
pipe or a socket), its folder must exist and accept a new file, and it must not
be one of the command's inputs (compared by inode, so other spellings and hard
links count too). ``write_bytes`` then writes atomically: a temporary file next
to the target, flushed and synced, given the existing file's mode (or the
default mode for a new file), renamed over the target. Every error path removes
the temporary file, and every OS error becomes one ``OutputError`` line.

Temporary files and folders (``.NAME.<random>.tmp``, ``NAME.tmp-<random>``) are
locked with ``flock`` while in use, so a later run can tell the leftovers of a
killed run (unlocked) from those of a run still going (locked) and sweep only
the former.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from .errors import ActTailError

PathLike = Union[str, "os.PathLike[str]"]
TEMP_SUFFIX = ".tmp"


class OutputError(ActTailError):
    """An output path cannot (or must not) be written."""


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _expand(path: PathLike, what: str) -> Path:
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{what}: the path is empty")
    if text.endswith(("/", os.sep)):
        raise OutputError(f"{what} {text}: ends with '/'; give a file name")
    return Path(os.path.expanduser(text))  # Path.expanduser raises for an unknown ~user


def _inside(target: Path, folder: Path) -> bool:
    try:
        return target.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop: not something we write into anyway
        return False


def check_output(path: PathLike, inputs: Iterable[Optional[PathLike]] = (), what: str = "--out") -> Path:
    """The expanded output path, after checking it can be written without harm (see the module docstring)."""
    target = _expand(path, what)
    parent = target.parent
    try:
        parent_stat = os.stat(parent)
    except FileNotFoundError:
        raise OutputError(f"{what} {target}: folder {parent} does not exist") from None
    except OSError as exc:
        raise OutputError(f"{what} {target}: folder {parent} is not usable ({_why(exc)})") from None
    if not stat.S_ISDIR(parent_stat.st_mode):
        raise OutputError(f"{what} {target}: {parent} is not a folder")
    try:
        info: Optional[os.stat_result] = os.lstat(target)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"{what} {target}: {_why(exc)}") from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(f"{what} {target} is a symbolic link; name the file itself")
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{what} {target} is a folder; give a file name")
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{what} {target} is a special file (device, pipe or socket); refusing to replace it")
        if not os.access(target, os.W_OK):
            raise OutputError(f"{what} {target} is read-only")
    for source in inputs:
        if source is None or not os.fspath(source):
            continue
        source_path = Path(os.path.expanduser(os.fspath(source)))
        if info is not None and source_path.exists() and os.path.samefile(target, source_path):
            raise OutputError(f"{what} {target} is the input {source}; write the result to another file")
        if source_path.is_dir() and _inside(target, source_path):
            raise OutputError(f"{what} {target} is inside the input folder {source}; write the result elsewhere")
    _probe_folder(parent, target, what)
    return target


def check_output_folder(path: PathLike, what: str = "--out") -> Path:
    """The expanded path of an output folder: an existing writable folder, or a new one in an existing folder."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{what}: the path is empty")
    folder = Path(os.path.expanduser(text))
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} exists and is not a folder")
    home = folder if folder.is_dir() else folder.parent
    if not home.is_dir():
        raise OutputError(f"{what} {folder}: folder {home} does not exist")
    _probe_folder(home, folder / "report", what)
    return folder


def _probe_folder(parent: Path, target: Path, what: str) -> None:
    """Create and remove a file in ``parent``: the only test that holds for root and read-only file systems."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise OutputError(f"{what} {target}: cannot write in {parent} ({_why(exc)})") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # a concurrent sweep may have taken it already
        os.unlink(probe)


def _create_temp(parent: Path, name: str) -> tuple[int, Path]:
    """A new locked temporary file; ``O_CREAT`` with mode 0o666 lets the umask give a new file its usual mode."""
    while True:
        tmp = parent / f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A sweeper may have removed the file between open and flock: then start again under a new name.
        if os.fstat(fd).st_ino == os.stat(tmp, follow_symlinks=False).st_ino:
            return fd, tmp
        os.close(fd)


def _unlock_and_remove(fd: int, tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    with contextlib.suppress(OSError):
        os.close(fd)


def sweep_stale_temps(parent: Path, pattern: str) -> list[Path]:
    """Remove temporary files or folders matching ``pattern`` in ``parent`` that no live process holds locked."""
    removed = []
    try:
        candidates = sorted(parent.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # vanished, a symlink, or unreadable: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a run in progress
            os.close(fd)
            continue
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def write_bytes(path: PathLike, data: bytes, what: str = "--out") -> Path:
    """Write ``data`` to ``path`` atomically, keeping an existing file's mode; OS errors become one line."""
    target = _expand(path, what)
    parent = target.parent
    sweep_stale_temps(parent, f".{glob.escape(target.name)}.*{TEMP_SUFFIX}")
    try:
        fd, tmp = _create_temp(parent, target.name)
    except OSError as exc:
        raise OutputError(f"could not write {target}: {_why(exc)}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not stat.S_ISREG(existing.st_mode):  # changed since check_output ran
                raise OSError(errno.EEXIST, "it is no longer a regular file")
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        _unlock_and_remove(fd, tmp)
        raise OutputError(f"could not write {target}: {_why(exc)}") from None
    except BaseException:  # KeyboardInterrupt, a bug: still leave nothing behind
        _unlock_and_remove(fd, tmp)
        raise
    os.close(fd)
    with contextlib.suppress(OSError):  # durability of the rename; not all file systems allow it
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def write_text(path: PathLike, text: str, what: str = "--out") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: PathLike, data: Any, what: str = "--out", indent: Optional[int] = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent), what)


@contextlib.contextmanager
def locked_temp_dir(target: Path) -> Iterator[Path]:
    """A locked temporary folder ``TARGET.tmp-<random>`` next to ``target``, removed on exit.

    Stale folders of killed runs are swept first (see ``sweep_stale_temps``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target.parent, f"{glob.escape(target.name)}.tmp-*")
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:  # swept by another process before we could lock it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if tmp.is_dir():
            break
        os.close(fd)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)
