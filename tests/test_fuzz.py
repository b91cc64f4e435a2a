"""Fuzz suite (issue 14): hostile and careless input to the CLI, the budget parser and the caches.

Five classes, each held to one contract: the command exits 2 with exactly one ``error: ...`` line
on stderr and no traceback, or it gives a correct result; and nothing changed but the output asked for.

* write targets: every kind of ``--out`` (folders, links, devices, pipes, sockets, an input under
  another name, missing or file parents, odd names, ``~``), and an OS error injected at each step of
  the write;
* budget JSON: arbitrary JSON, mutations of a valid budget, raw bytes and cut-off files;
* CLI arguments: generated argument lists for ``allocate``, ``spectra``, ``eval`` and ``bench``;
* cache corruption: a converted model, the spectra and the demo texts of a copied cache, damaged in
  every way a file can be (the real default model once, end to end);
* interrupted run: a write killed (SIGKILL) or interrupted (Ctrl-C) just before its rename, and
  kills at random moments; a rerun then gives the same result.

The CLI runs in this process on a tiny random Llama (``load_from_args`` patched) in temporary
folders, with ``ACTTAIL_CACHE`` pointing at a temporary cache; the shared cache is only read (its
files are hard-linked, and damage always replaces a file instead of writing into it). The number of
inputs tried per class is printed at the end of the run (``fuzz inputs tried: ...``).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from acttail_core import corpora, models, safe_io
from acttail_core.allocation import allocate
from acttail_core.budget import keep_count, load_budget
from acttail_core.errors import BudgetError, CorpusError
from acttail_core.integrity import file_sha256, read_with_digest, tree_digests
from acttail_core.models import from_module
from acttail_core.projections import find_projections
from acttail_core.spectra import compute_spectra
from acttail_core.spectra_io import cache_path, load_spectra, spectra_to_dict
from tests.conftest import FUZZ_COUNTS, byte_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SHARED_CACHE = os.environ.get("ACTTAIL_CACHE")  # before the env fixture points ACTTAIL_CACHE elsewhere
TRIED: Counter = Counter()  # inputs tried per class, printed at the end of the run (tests/conftest.py)
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IS_ROOT = os.geteuid() == 0

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # hundreds of generated inputs, CLI runs, killed writers


@pytest.fixture(scope="module", autouse=True)
def count_inputs(request):
    request.config.stash[FUZZ_COUNTS] = TRIED


# --------------------------------------------------------------------------- harness


def visible_lines(text: str) -> list[str]:
    """What a terminal shows: progress bars redraw with carriage returns and erase themselves."""
    return [shown for raw in text.split("\n") if (shown := raw.split("\r")[-1].strip())]


def run_cli(argv: Sequence[str], cwd: Path, home: Optional[Path] = None) -> tuple[int, str, str]:
    """``python -m acttail_core ARGV`` in this process and in ``cwd``: (exit code, stdout, stderr)."""
    from acttail_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous_cwd, previous_home = os.getcwd(), os.environ.get("HOME")
    os.chdir(cwd)
    if home is not None:
        os.environ["HOME"] = str(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(previous_cwd)
        if previous_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = previous_home
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str) -> str:
    lines = visible_lines(err)
    assert code == 2, f"exit {code}\nstdout: {out[-800:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Kind, mode and content hash (or link target) of everything under ``root``."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            key = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[key] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entries[key] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return entries


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def replace_file(path: Path, data: bytes) -> None:
    """Damage a cache file without writing into it: it may be a hard link to the shared cache."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, its spectra and budget, a temporary cache with the demo texts, the CLI loading the tiny model."""
    import acttail_core.cli.common as cli_common

    real_demo = corpora.ensure_demo_corpus()
    root = tmp_path_factory.mktemp("fuzz")
    cache = root / "cache"
    shutil.copytree(real_demo, cache / "corpora" / real_demo.name, copy_function=link_or_copy)
    patch = pytest.MonkeyPatch()
    patch.setenv("ACTTAIL_CACHE", str(cache))
    loaded = from_module(make_tiny_llama(), byte_tokenizer(), name="tiny")
    patch.setattr(cli_common, "load_from_args", lambda args: loaded)
    spectra = compute_spectra(loaded)
    budget = allocate(spectra, 0.5)
    text = (real_demo / "alice29.txt").read_text()
    inputs = {
        "spectra.json": json.dumps(spectra_to_dict(spectra)).encode(),
        "in-budget.json": budget.to_json().encode(),
        "eval.txt": text[:20000].encode(),
        "empty.txt": b" \n",
        "binary.bin": bytes(range(256)) * 4,
        "corrupt.json": b'{"kind": "acttail-spectra", "schema_version": 1, "entries": [{"name": 1}]}',
    }
    yield SimpleNamespace(root=root, cache=cache, loaded=loaded, spectra=spectra, budget=budget, inputs=inputs,
                          projections=find_projections(loaded.model), real_demo=real_demo)
    patch.undo()


@contextlib.contextmanager
def workspace(env, extra: Optional[dict] = None):
    """A fresh folder holding the inputs, with a home folder for ``~``."""
    work = Path(tempfile.mkdtemp(dir=env.root, prefix="work-"))
    for name, data in {**env.inputs, **(extra or {})}.items():
        (work / name).write_bytes(data)
    (work / "home").mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_output_file(command: str, path: Path, env, sparsity: Optional[float] = None) -> None:
    """The output of a successful command is complete and right."""
    if command == "allocate":
        budget = load_budget(path, env.projections, env.loaded.fingerprint)
        if sparsity is not None:
            assert budget.target_sparsity == pytest.approx(sparsity, abs=1e-12)
        assert abs(budget.effective_sparsity - budget.target_sparsity) <= 1e-6
        assert budget.target_sparsity <= 0.95
    elif command == "spectra":
        assert len(load_spectra(path).entries) == len(env.projections)
    else:
        data = json.loads(path.read_text())
        assert data["runs"] and data["config"]["fingerprint"] == env.loaded.fingerprint


# --------------------------------------------------------------------------- class 1: write targets

COMMANDS = {
    "allocate": ["allocate", "--sparsity", "0.5", "--spectra", "spectra.json"],
    "eval": ["eval", "--budget", "in-budget.json", "--corpus", "eval.txt", "--max-tokens", "128", "--seqlen", "64",
             "--no-dense"],
    "spectra": ["spectra", "--model", "mdir"],  # a local model folder: its files are inputs (the load is patched)
}


def make_target(kind: str, work: Path, command: str) -> tuple[str, bool]:
    """Prepare ``kind`` of output target in ``work``: (the --out argument, whether writing it is right)."""
    old = work / "old.json"
    old.write_bytes(b"old content\n")
    old.chmod(0o640)
    (work / "mdir").mkdir()
    (work / "mdir" / "config.json").write_text("{}")
    own_input = {"allocate": "spectra.json", "eval": "in-budget.json", "spectra": "mdir/config.json"}[command]
    if kind == "new":
        return "out.json", True
    if kind == "existing file (mode 0640 kept)":
        return "old.json", True
    if kind == "read-only file":
        old.chmod(0o444)
        return "old.json", IS_ROOT  # root may write it (the mode is kept), anyone else is refused
    if kind == "folder":
        (work / "adir").mkdir()
        return "adir", False
    if kind == "trailing slash":
        return "out.json/", False
    if kind == "symlink to a file":
        (work / "link.json").symlink_to("old.json")
        return "link.json", False
    if kind == "dangling symlink":
        (work / "link.json").symlink_to("nowhere.json")
        return "link.json", False
    if kind == "fifo":
        os.mkfifo(work / "fifo")
        return "fifo", False
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(work / "sock"))
        return "sock", False
    if kind == "device":  # a null device made in the temporary folder (root only; a FIFO otherwise)
        if IS_ROOT:
            os.mknod(work / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        else:
            os.mkfifo(work / "null")
        return "null", False
    if kind == "missing parent":
        return "nope/out.json", False
    if kind == "parent is a file":
        return "old.json/out.json", False
    if kind == "empty path":
        return "", False
    if kind == "an input":
        return own_input, False
    if kind == "an input spelled differently":
        (work / "sub").mkdir()
        return f"./sub/../{own_input}", False
    if kind == "hard link to an input":
        os.link(work / own_input, work / "hard.json")
        # The same file as an input: refused. A link to a file inside an input folder is not the folder itself,
        # and the atomic rename replaces the link, never the folder's file: written.
        return "hard.json", command == "spectra"
    if kind == "home":
        return "~/x.json", True
    if kind == "name too long":
        return "a" * 300 + ".json", False
    if kind == "odd name":
        return "we ird\n[*?] é.json", True
    if kind == "starts with a dash":
        return "-x.json", False
    raise AssertionError(kind)


TARGET_KINDS = [
    "new", "existing file (mode 0640 kept)", "read-only file", "folder", "trailing slash", "symlink to a file",
    "dangling symlink", "fifo", "socket", "device", "missing parent", "parent is a file", "empty path", "an input",
    "an input spelled differently", "hard link to an input", "home", "name too long", "odd name", "starts with a dash",
]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_write_targets(env, command, kind) -> None:
    TRIED["write targets"] += 1
    with workspace(env) as work:
        out_arg, writable = make_target(kind, work, command)
        before = snapshot(work)
        mode_before = stat.S_IMODE(os.lstat(work / "old.json").st_mode)
        code, out, err = run_cli(COMMANDS[command] + ["--out", out_arg], work, home=work / "home")
        diff = changed(before, snapshot(work))
        if not writable:
            assert_one_line_error(code, out, err)
            assert diff == set(), diff
            return
        assert code == 0, err[-2000:]
        written = work / "home" / "x.json" if out_arg.startswith("~") else work / out_arg
        assert diff == {os.path.relpath(written, work)}, diff
        check_output_file(command, written, env, 0.5 if command == "allocate" else None)
        if out_arg == "old.json":
            assert stat.S_IMODE(os.lstat(written).st_mode) == mode_before


class FaultyOS:
    """``os`` as safe_io sees it, with one call failing (an OSError, or a Ctrl-C)."""

    def __init__(self, call: str, error: BaseException) -> None:
        self.call, self.error = call, error

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name != self.call:
            return real

        def failing(*args, **kwargs):
            if name == "open" and not str(args[0]).endswith(safe_io.TEMP_SUFFIX):
                return real(*args, **kwargs)  # only the temporary file's creation fails
            raise self.error

        return failing


@pytest.mark.parametrize("call", ["open", "write", "fsync", "fchmod", "replace"])
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EIO, errno.EACCES])
def test_write_errors_are_one_line_and_leave_nothing(env, monkeypatch, call, error) -> None:
    """Disk full, read-only file system, I/O error, permission denied: at whichever step, one line and no temp file."""
    TRIED["write targets"] += 1
    monkeypatch.setattr(safe_io, "os", FaultyOS(call, OSError(error, os.strerror(error))))
    with workspace(env) as work:
        (work / "budget.json").write_bytes(b"old content\n")
        before = snapshot(work)
        code, out, err = run_cli(COMMANDS["allocate"] + ["--out", "budget.json"], work)
        line = assert_one_line_error(code, out, err)
        assert "could not write" in line and os.strerror(error) in line
        assert changed(before, snapshot(work)) == set()


names = st.text(st.sampled_from("abcXYZ019 ._-~[]*?!'\"\n\t,#%&()+=@é中"), min_size=1, max_size=24).filter(
    lambda n: n not in (".", "..") and "/" not in n)


@settings(max_examples=60, **FUZZ)
@given(
    parent=st.sampled_from(["", "sub/", "missing/", "old.json/"]),
    name=names,
    existing=st.sampled_from(["none", "file", "folder", "symlink", "fifo", "spectra input"]),
)
def test_generated_write_targets(env, parent, name, existing) -> None:
    """Any name in any kind of place: written exactly there, or refused with one line and nothing changed."""
    TRIED["write targets"] += 1
    with workspace(env) as work:
        (work / "sub").mkdir()
        (work / "old.json").write_bytes(b"old\n")
        target = work / parent / name
        expands = not parent and name.startswith("~") and os.path.expanduser(name) != name
        if parent in ("", "sub/") and not expands:
            if existing == "file":
                target.write_bytes(b"old\n")
            elif existing == "folder":
                target.mkdir(exist_ok=True)
            elif existing == "symlink" and not target.exists():
                target.symlink_to(work / "old.json")
            elif existing == "fifo" and not target.exists():
                os.mkfifo(target)
            elif existing == "spectra input" and not target.exists():
                os.link(work / "spectra.json", target)
        info = os.lstat(target) if parent in ("", "sub/") and os.path.lexists(target) else None
        before = snapshot(work)
        # --out=VALUE, so that a name starting with '-' is a name, not an option
        code, out, err = run_cli(COMMANDS["allocate"] + [f"--out={parent}{name}"], work, home=work / "home")
        diff = changed(before, snapshot(work))
        must_refuse = (parent in ("missing/", "old.json/") or expands or not (parent + name).strip()
                       or (not parent and name == "spectra.json")  # the input itself
                       or (info is not None and not stat.S_ISREG(info.st_mode))
                       or (info is not None and info.st_nlink > 1))  # a hard link to the spectra input
        if must_refuse or code != 0:
            assert must_refuse, f"refused a plain target {parent + name!r}: {err}"
            assert_one_line_error(code, out, err)
            assert diff == set(), diff
        else:
            assert diff == {os.path.relpath(target, work)}, diff
            check_output_file("allocate", target, env, 0.5)
            assert not any(n.endswith(safe_io.TEMP_SUFFIX) for n in os.listdir(target.parent))


# --------------------------------------------------------------------------- class 2: budget JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=16,
)
TOP_FIELDS = ["schema_version", "model_name", "model_fingerprint", "method", "target_sparsity", "params", "temperature",
              "eps", "direction", "group", "xmin_rule", "weighting", "effective_sparsity", "tool_version", "created_at",
              "calibration", "projections", "extra"]
ENTRY_FIELDS = ["name", "layer", "type", "in_features", "out_features", "params", "alpha", "sparsity", "keep", "extra"]


@st.composite
def mutated_budgets(draw, base: dict) -> bytes:
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "delete", "set entry", "delete entry field", "nudge", "swap names",
                                   "drop entry", "duplicate entry", "fingerprint"]))
        entries = data.get("projections") if isinstance(data.get("projections"), list) else None
        index = draw(st.integers(0, 13))
        if op == "set":
            data[draw(st.sampled_from(TOP_FIELDS))] = draw(json_values)
        elif op == "delete":
            data.pop(draw(st.sampled_from(TOP_FIELDS)), None)
        elif op in ("set entry", "delete entry field", "nudge") and entries and index < len(entries):
            entry = entries[index]
            if not isinstance(entry, dict):
                continue
            field = draw(st.sampled_from(ENTRY_FIELDS))
            if op == "set entry":
                entry[field] = draw(json_values)
            elif op == "delete entry field":
                entry.pop(field, None)
            elif isinstance(entry.get(field), (int, float)) and not isinstance(entry.get(field), bool):
                entry[field] += draw(st.sampled_from([1, -1, 1e-7, -1e-7, 0.5, 1e-12]))
        elif op == "swap names" and entries and len(entries) > 1 and all(isinstance(e, dict) for e in entries[:2]):
            entries[0]["name"], entries[1]["name"] = entries[1].get("name"), entries[0].get("name")
        elif op == "drop entry" and entries:
            entries.pop(index % len(entries))
        elif op == "duplicate entry" and entries:
            entries.append(entries[index % len(entries)])
        elif op == "fingerprint":
            data["model_fingerprint"] = draw(st.sampled_from(["0123456789abcdef", "", "x" * 64]))
    raw = json.dumps(data).encode()
    trick = draw(st.sampled_from(["none", "none", "duplicate key", "cut", "nest"]))
    if trick == "duplicate key":
        raw = raw.replace(b"{", b'{"method": "uniform", ', 1)
    elif trick == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif trick == "nest":
        raw = b"[" * 5000 + raw + b"]" * 5000
    return raw


def assert_budget_contract(raw: bytes, env) -> None:
    """Refused with one line, or a budget that is right for the model in every checked respect."""
    try:
        budget = load_budget(raw, env.projections, env.loaded.fingerprint)
    except BudgetError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    by_name = {p.name: p for p in env.projections}
    assert sorted(e.name for e in budget.projections) == sorted(by_name)
    for entry in budget.projections:
        proj = by_name[entry.name]
        assert (entry.layer, entry.type, entry.in_features, entry.out_features) == (
            proj.layer, proj.type, proj.in_features, proj.out_features)
        assert entry.params == proj.params and entry.keep == keep_count(entry.sparsity, entry.in_features) >= 1
        assert 0 <= entry.sparsity < 1 and (entry.alpha is None or math.isfinite(entry.alpha))
    total = sum(e.params for e in budget.projections)
    mean = sum(e.params * e.sparsity for e in budget.projections) / total
    assert abs(mean - budget.effective_sparsity) <= 1e-6 and abs(mean - budget.target_sparsity) <= 1e-6
    assert budget.target_sparsity <= 0.95 and budget.model_fingerprint == env.loaded.fingerprint
    assert load_budget(budget.to_json()) == budget


@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_mutated_budgets(env, data) -> None:
    TRIED["budget JSON"] += 1
    assert_budget_contract(data.draw(mutated_budgets(json.loads(env.budget.to_json()))), env)


@settings(max_examples=100, **FUZZ)
@given(value=json_values)
def test_arbitrary_json_as_a_budget(env, value) -> None:
    TRIED["budget JSON"] += 1
    assert_budget_contract(json.dumps(value).encode(), env)


@settings(max_examples=100, **FUZZ)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_raw_bytes_as_a_budget(env, raw) -> None:
    TRIED["budget JSON"] += 1
    assert_budget_contract(raw, env)


# --------------------------------------------------------------------------- class 3: CLI arguments

junk_floats = st.one_of(st.floats().map(repr), st.sampled_from(
    ["nan", "inf", "-inf", "1e999", "0x10", "", "abc", "0.951", "0.99", "1", "-1", "1e6", "-0.0001"]))


def pick(valid, junk):
    """Absent half the time, else a valid value, or junk one time in twenty: about half the runs get no junk."""
    return st.integers(0, 39).flatmap(lambda r: st.none() if r < 20 else (valid if r < 38 else junk))


def one_of(*values: str):
    return st.sampled_from(values)


@st.composite
def cli_arguments(draw, env_budget: dict) -> tuple[list[str], dict]:
    command = draw(one_of("allocate", "spectra", "eval", "bench"))
    options: dict[str, Optional[str]] = {}
    extra_files: dict[str, bytes] = {}
    if command != "spectra":
        sources = ("sparsity",) if command == "allocate" else ("sparsity", "sparsity", "budget", "both", "neither")
        source = draw(one_of(*sources))
        if source in ("sparsity", "both"):
            options["--sparsity"] = draw(st.integers(0, 4).flatmap(
                lambda r: junk_floats if r == 0 else st.floats(0, 0.95).map(repr)))
        if source in ("budget", "both"):
            choice = draw(one_of("in-budget.json", "in-budget.json", "mutated.json", "binary.bin", "missing.json"))
            if choice == "mutated.json":
                extra_files["mutated.json"] = draw(mutated_budgets(env_budget))
            options["--budget"] = choice
        options["--method"] = draw(pick(one_of("uniform", "acttail", "linear", "greedy"), one_of("magic", "")))
        options["--temperature"] = draw(pick(st.floats(0, 1000).map(repr), junk_floats))
        options["--eps"] = draw(pick(st.floats(0, 0.999).map(repr), junk_floats))
        options["--lower"] = draw(pick(st.floats(0, 0.3).map(repr), junk_floats))
        options["--upper"] = draw(pick(st.floats(0.96, 0.999).map(repr), junk_floats))
        options["--direction"] = draw(pick(one_of("keep-heavy", "keep-light"), one_of("up")))
        options["--group"] = draw(pick(one_of("projection", "type", "layer"), one_of("row")))
    options["--rule"] = draw(pick(one_of("ks", "peak", "mid"), one_of("median")))
    inputs = {"allocate": "spectra.json", "eval": "in-budget.json", "bench": "in-budget.json", "spectra": "adir"}
    options["--out"] = draw(pick(one_of("out.json", "~/o.json"), one_of("adir", "", "missing/o.json", inputs[command])))
    if command == "allocate":
        options["--spectra"] = draw(pick(one_of("spectra.json"),
                                         one_of("corrupt.json", "missing.json", "in-budget.json", "binary.bin")))
    if command in ("eval", "bench"):
        options["--mode"] = draw(pick(one_of("topk", "threshold"), one_of("magic")))
        options["--calib-tokens"] = draw(pick(one_of("64"), one_of("1", "x")))
        options["--device"] = draw(pick(one_of("cpu"), one_of("cuda", "tpu")))
        options["--spectra"] = draw(pick(one_of("spectra.json"), one_of("corrupt.json")))
    if command == "eval":
        options["--corpus"] = draw(pick(one_of("eval.txt", "demo", "demo:lcet10"),
                                        one_of("demo:nope", "missing.txt", "empty.txt", "binary.bin")))
        options["--calib-corpus"] = draw(pick(one_of("demo"), one_of("eval.txt", "missing.txt")))
        options["--max-tokens"] = draw(st.integers(0, 5).flatmap(  # always given: keeps runs short
            lambda r: one_of("0", "-5", "x") if r == 0 else one_of("64", "128", "256")))
        options["--seqlen"] = draw(pick(one_of("32", "64"), one_of("1", "1000", "x")))
        options["--batch-size"] = draw(pick(one_of("1", "3"), one_of("0", "-1")))
    if command == "bench":
        options["--prompt-len"] = draw(pick(one_of("1", "16"), one_of("0", "-2", "x", "600")))
        options["--new-tokens"] = draw(st.integers(0, 5).flatmap(
            lambda r: one_of("0", "x") if r == 0 else one_of("1", "2")))
        options["--repeats"] = draw(st.integers(0, 5).flatmap(lambda r: one_of("0", "x") if r == 0 else one_of("1")))
    argv = [command]
    for name, value in options.items():
        if value is not None:
            argv += [name, value]
    flags = {"eval": ["--no-dense", "--no-uniform", "--allow-other-weights"], "bench": ["--no-dense"],
             "spectra": ["--no-cache"], "allocate": []}[command]
    argv += draw(st.lists(st.sampled_from(flags), unique=True)) if flags else []
    if draw(st.integers(0, 19)) == 0:  # a stray argument now and then
        argv.insert(draw(st.integers(1, len(argv))), draw(one_of("--bogus", "stray", "--out")))
    return argv, extra_files


def out_of(argv: list[str]) -> Optional[str]:
    """Where a successful run may write: the last --out, or allocate's default."""
    outs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--out"]
    if outs:
        return outs[-1]
    return "budget.json" if argv[0] == "allocate" else None


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # a drawn budget file is long
@settings(max_examples=120, **FUZZ)
@given(data=st.data())
def test_generated_cli_arguments(env, data) -> None:
    TRIED["CLI arguments"] += 1
    argv, extra = data.draw(cli_arguments(json.loads(env.budget.to_json())))
    with workspace(env, extra) as work:
        (work / "adir").mkdir()
        before = snapshot(work)
        code, out, err = run_cli(argv, work, home=work / "home")
        event(f"{argv[0]}: exit {code}")  # --hypothesis-show-statistics shows how many runs succeeded
        diff = changed(before, snapshot(work))
        if code != 0:
            assert_one_line_error(code, out, err)
            assert diff == set(), diff
            return
        assert "Traceback" not in err
        target = out_of(argv)
        if target is None:
            assert diff == set(), diff
            return
        written = work / "home" / target[2:] if target.startswith("~/") else work / target
        assert diff <= {os.path.relpath(written, work)}, diff  # equal content rewritten reads as no change
        sparsity = argv[argv.index("--sparsity") + 1] if "--sparsity" in argv and argv[0] == "allocate" else None
        check_output_file(argv[0], written, env, float(sparsity) if sparsity else None)


# --------------------------------------------------------------------------- class 4: cache corruption


@pytest.fixture(scope="module")
def tiny_converted(env, tmp_path_factory) -> Path:
    """A converted-model folder as convert_gguf leaves it (the tiny model: fast to damage and check)."""
    folder = tmp_path_factory.mktemp("converted") / "tiny-0123"
    env.loaded.model.save_pretrained(folder, safe_serialization=True)
    env.loaded.tokenizer.save_pretrained(folder)
    marker = {"gguf": "tiny.gguf", "format": models.CACHE_FORMAT, "files": tree_digests(folder)}
    (folder / models.COMPLETE_MARKER).write_text(json.dumps(marker))
    assert models.converted_cache_problem(folder) is None
    return folder


DAMAGES = ["truncate", "flip a byte", "append", "delete", "extra file", "marker junk", "marker size", "symlink"]


@settings(max_examples=30, **FUZZ)
@given(damage=st.sampled_from(DAMAGES), pick=st.integers(0, 10**9), value=st.integers(0, 255))
def test_converted_model_cache_damage_is_detected(tiny_converted, damage, pick, value) -> None:
    TRIED["cache corruption"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(tiny_converted, folder)
        files = sorted(p for p in folder.iterdir() if p.name != models.COMPLETE_MARKER)
        path = files[pick % len(files)]
        data = path.read_bytes()
        if damage == "truncate":
            replace_file(path, data[: pick % max(len(data), 1)])
        elif damage == "flip a byte":
            index = pick % len(data)
            assume(data[index] != value)
            replace_file(path, data[:index] + bytes([value]) + data[index + 1:])
        elif damage == "append":
            replace_file(path, data + bytes([value]))
        elif damage == "delete":
            path.unlink()
        elif damage == "extra file":
            (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickled")
        elif damage == "marker junk":
            replace_file(folder / models.COMPLETE_MARKER, bytes([value]) * (pick % 50))
        elif damage == "marker size":
            marker = json.loads((folder / models.COMPLETE_MARKER).read_text())
            marker["files"][path.name]["size"] += 1
            replace_file(folder / models.COMPLETE_MARKER, json.dumps(marker).encode())
        elif damage == "symlink":
            copy = Path(tmp) / "elsewhere"
            copy.write_bytes(data)
            path.unlink()
            path.symlink_to(copy)
        assert models.converted_cache_problem(folder) is not None


def test_damaged_default_model_cache_is_converted_again(tmp_path, monkeypatch, caplog) -> None:
    """End to end on a copy of the real cache: a truncated model.safetensors is converted again, with one notice;
    killed conversions' temp folders are swept, a live one is left alone, the shared cache is untouched."""
    TRIED["cache corruption"] += 1
    if SHARED_CACHE is None:
        monkeypatch.delenv("ACTTAIL_CACHE", raising=False)
    else:
        monkeypatch.setenv("ACTTAIL_CACHE", SHARED_CACHE)
    gguf = models.default_model_gguf()
    models.convert_gguf(gguf, "smollm2-135m-instruct")  # the shared cache as the set-up leaves it
    real = models._gguf_cache_dir(gguf, "smollm2-135m-instruct")
    assert models.converted_cache_problem(real) is None
    shared_weights = real / "model.safetensors"
    shared_hash = file_sha256(shared_weights)
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path))
    copy = models._gguf_cache_dir(gguf, "smollm2-135m-instruct")
    shutil.copytree(real, copy, copy_function=link_or_copy)
    with open(copy / "model.safetensors", "rb") as handle:
        head = handle.read(1 << 20)
    replace_file(copy / "model.safetensors", head)
    dead = copy.parent / f"{copy.name}.tmp-dead"
    live = copy.parent / f"{copy.name}.tmp-live"
    dead.mkdir()
    live.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a conversion still running in another process holds it
    try:
        with caplog.at_level(logging.WARNING, logger="acttail_core.models"):
            loaded = models.load_model("default")
        assert loaded.source == str(copy)
        assert file_sha256(copy / "model.safetensors") == shared_hash  # the conversion is deterministic
        notices = [r.getMessage() for r in caplog.records if r.name == "acttail_core.models"]
        assert len(notices) == 1 and "damaged" in notices[0] and "\n" not in notices[0], notices
        assert models.converted_cache_problem(copy) is None
        assert not dead.exists() and live.exists()
    finally:
        os.close(lock)
    assert file_sha256(shared_weights) == shared_hash and models.converted_cache_problem(real) is None


SPECTRA_DAMAGES = ["truncate", "flip a byte", "alpha NaN", "alpha negative", "alpha 9.9", "no checksum",
                   "checksum junk", "empty"]


@settings(max_examples=25, **FUZZ)
@given(damage=st.sampled_from(SPECTRA_DAMAGES), pick=st.integers(0, 10**9))
def test_spectra_cache_damage_is_recomputed(env, damage, pick) -> None:
    TRIED["cache corruption"] += 1
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACTTAIL_CACHE", tmp)
        original = compute_spectra(env.loaded)
        path = cache_path(env.loaded.fingerprint, original.rule, original.backend)
        sidecar = path.with_name(path.name + ".sha256")
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: pick % len(data)])
        elif damage == "flip a byte":
            index = pick % len(data)
            path.write_bytes(data[:index] + bytes([data[index] ^ 0x20]) + data[index + 1:])
        elif damage.startswith("alpha"):
            doc = json.loads(data)
            doc["entries"][pick % len(doc["entries"])]["alpha"] = {"alpha NaN": float("nan"), "alpha negative": -1.0,
                                                                 "alpha 9.9": 9.9}[damage]
            path.write_text(json.dumps(doc))
        elif damage == "no checksum":
            sidecar.unlink()
        elif damage == "checksum junk":
            sidecar.write_bytes(os.urandom(pick % 70))
        elif damage == "empty":
            path.write_bytes(b"")
        handler = logging.getLogger("acttail_core.spectra_io")
        records: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = records.append
        handler.addHandler(capture)
        try:
            again = compute_spectra(env.loaded)
        finally:
            handler.removeHandler(capture)
        np.testing.assert_array_equal(again.alphas(), original.alphas())
        assert len(records) == 1 and "recomputing" in records[0].getMessage()
        read_with_digest(path)  # rewritten with a matching checksum


CORPUS_DAMAGES = ["truncate", "other text", "flip a byte", "delete", "symlink", "empty"]


@settings(max_examples=20, **FUZZ)
@given(damage=st.sampled_from(CORPUS_DAMAGES), name=st.sampled_from(corpora.DEMO_FILES), online=st.booleans(),
       pick=st.integers(0, 10**9))
def test_demo_text_damage_is_fetched_again_or_refused(env, damage, name, online, pick) -> None:
    TRIED["cache corruption"] += 1
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACTTAIL_CACHE", tmp)
        folder = corpora.demo_dir()
        shutil.copytree(env.real_demo, folder, copy_function=link_or_copy)
        path = folder / f"{name}.txt"
        data = path.read_bytes()
        if damage == "truncate":
            replace_file(path, data[: pick % len(data)])
        elif damage == "other text":
            replace_file(path, b"Some other text entirely.\n" * 100)
        elif damage == "flip a byte":
            index = pick % len(data)
            replace_file(path, data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:])
        elif damage == "delete":
            path.unlink()
        elif damage == "symlink":
            path.unlink()
            path.symlink_to(env.real_demo / f"{name}.txt")
        elif damage == "empty":
            replace_file(path, b"")

        def fetch(dest: Path) -> Path:
            if not online:
                raise CorpusError("could not download the demo corpus (brotli==1.2.1) with pip: offline")
            dest.mkdir(parents=True)
            return dest / corpora.DEMO_SDIST

        def extract(sdist: Path, out: Path) -> None:  # what the real sdist holds
            for each in corpora.DEMO_FILES:
                shutil.copyfile(env.real_demo / f"{each}.txt", out / f"{each}.txt")

        patch.setattr(corpora, "_download_sdist", fetch)
        patch.setattr(corpora, "_extract", extract)
        if online:
            assert corpora.load_text(f"demo:{name}") == (env.real_demo / f"{name}.txt").read_text()
            assert corpora.demo_problem(folder) is None
        else:
            with pytest.raises(CorpusError, match="damaged") as info:
                corpora.load_text(f"demo:{name}")
            assert "\n" not in str(info.value)
        assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


# --------------------------------------------------------------------------- class 5: interrupted run

WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
from acttail_core import safe_io
from acttail_core.cli import main

class StopAtRename:
    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, source, target):
        if sys.argv[1] == "kill":
            print("ready", flush=True)
            sys.stdin.read()  # the test kills this process here: after the temp file is complete, before the rename
        raise KeyboardInterrupt

safe_io.os = StopAtRename()
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def tiny_dir(env, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    env.loaded.model.save_pretrained(folder, safe_serialization=True)
    env.loaded.tokenizer.save_pretrained(folder)
    return folder


def allocate_argv(tiny_dir: Path) -> list[str]:
    return ["allocate", "--model", str(tiny_dir), "--spectra", "spectra.json", "--sparsity", "0.6",
            "--out", "budget.json"]


def assert_rerun_matches(env, work: Path, tiny_dir: Path) -> None:
    """A rerun succeeds, sweeps what the interrupted run left, and writes what an uninterrupted run writes."""
    code, out, err = run_cli(allocate_argv(tiny_dir), work)
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(safe_io.TEMP_SUFFIX)) == []
    expected = json.loads(allocate(env.spectra, 0.6).to_json())
    written = json.loads((work / "budget.json").read_text())
    for doc in (expected, written):
        doc.pop("created_at")
    assert written == expected


def subprocess_env(env) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), ACTTAIL_CACHE=str(env.cache))


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_interrupted_write_leaves_the_old_file(env, tiny_dir, tmp_path, how) -> None:
    TRIED["interrupted run"] += 1
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    with workspace(env) as work:
        old = env.inputs["in-budget.json"]
        (work / "budget.json").write_bytes(old)
        command = [sys.executable, str(wrapper), "kill" if how == "SIGKILL" else "interrupt", *allocate_argv(tiny_dir)]
        proc = subprocess.Popen(command, cwd=work, env=subprocess_env(env), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if how == "SIGKILL":
            lines = iter(proc.stdout.readline, "")  # the summary table comes first
            assert any(line.strip() == "ready" for line in lines), proc.communicate()[1][-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            leftovers = [p for p in work.iterdir() if p.name.endswith(safe_io.TEMP_SUFFIX)]
            assert len(leftovers) == 1  # a kill cannot clean up; the next write sweeps it
        else:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 130 and visible_lines(err)[-1] == "interrupted", err[-2000:]
            assert not [p for p in work.iterdir() if p.name.endswith(safe_io.TEMP_SUFFIX)]
        assert (work / "budget.json").read_bytes() == old
        assert_rerun_matches(env, work, tiny_dir)


@settings(max_examples=4, **FUZZ)
@given(delay=st.floats(0.0, 6.0))
def test_killed_at_a_random_moment(env, tiny_dir, delay) -> None:
    """Wherever a kill lands, the output is the old file or the complete new one, and a rerun gives the same result."""
    TRIED["interrupted run"] += 1
    with workspace(env) as work:
        old = env.inputs["in-budget.json"]
        (work / "budget.json").write_bytes(old)
        proc = subprocess.Popen([sys.executable, "-m", "acttail_core", *allocate_argv(tiny_dir)], cwd=work,
                                env=subprocess_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)  # the moment of the kill, not an assertion
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        data = (work / "budget.json").read_bytes()
        if data != old:
            budget = load_budget(data, env.projections, env.loaded.fingerprint)
            assert budget.target_sparsity == 0.6
        assert_rerun_matches(env, work, tiny_dir)
