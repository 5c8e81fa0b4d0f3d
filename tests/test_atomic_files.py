"""Atomic writes (sae_lens/atomic_files.py): readers see the old file or the whole new one, a failed
write leaves the old file and no temporary behind, and a folder is replaced only when complete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.atomic_files import (
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
)


def entries(folder: Path) -> list[str]:
    """Everything in `folder`, hidden temporaries included."""
    return sorted(p.name for p in folder.iterdir())


def test_write_creates_parents_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(target, b"\x00\x01payload") == target
    assert target.read_bytes() == b"\x00\x01payload"
    assert entries(target.parent) == ["file.bin"]
    atomic_write_text(target, "ünïcode text\n")
    assert target.read_text(encoding="utf-8") == "ünïcode text\n"
    assert entries(target.parent) == ["file.bin"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    # A checkpoint other users (or a serving process) must read: the same mode as a plain open().
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert oct(atomic.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


def test_a_failing_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "cfg.json", '{"old": true}')
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert target.read_text() == '{"old": true}'
    assert entries(tmp_path) == ["cfg.json"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and renaming (here: the disk refuses the flush, or Ctrl-C) leaves the
    old content and no temporary file."""
    target = atomic_write_bytes(tmp_path / "weights.bin", b"old")

    def refuse(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["weights.bin"]

    def interrupt(descriptor: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["weights.bin"]


def test_atomic_save_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3).T, "b": torch.ones(2, dtype=torch.float64)}
    path = atomic_save_safetensors(tensors, tmp_path / "w.safetensors")
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], tensors["a"]) and loaded["b"].dtype == torch.float64
    with pytest.raises(AttributeError):
        atomic_save_safetensors({"a": "not a tensor"}, path)  # type: ignore[dict-item]
    assert torch.equal(load_file(str(path))["a"], tensors["a"])
    assert entries(tmp_path) == ["w.safetensors"]


def test_atomic_folder_creates_the_folder_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "step_10"
    with atomic_folder(target) as building:
        (building / "cfg.json").write_text("{}")
        assert building != target and building.parent == tmp_path
        assert not target.exists()  # nothing under the final name until the block succeeds
    assert entries(target) == ["cfg.json"]
    assert entries(tmp_path) == ["step_10"]


def test_atomic_folder_replaces_an_existing_folder_on_success(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as building:
        (building / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # still whole while the new one is built
    assert entries(target) == ["new.txt"]
    assert entries(tmp_path) == ["ckpt"]  # no temporary and no retired copy left


def test_atomic_folder_leaves_an_existing_folder_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_folder(target) as building:
        (building / "new.txt").write_text("half")
        raise RuntimeError("crash")
    assert entries(target) == ["old.txt"] and (target / "old.txt").read_text() == "old"
    assert entries(tmp_path) == ["ckpt"]
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "fresh"):
        raise RuntimeError
    assert not (tmp_path / "fresh").exists() and entries(tmp_path) == ["ckpt"]
