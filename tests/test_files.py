"""Tests for segnet.files: atomic text writes and the output-folder check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segnet.errors import UserError
from segnet.files import atomic_output, atomic_write_bytes, atomic_write_text, ensure_writable_dir

FIX = "choose another folder"


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "kept")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "lost")
    assert path.read_text(encoding="utf-8") == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_creates_nested_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert ensure_writable_dir(target, "--output", FIX) == target
    assert target.is_dir()


def test_an_existing_folder_is_left_as_it_is(tmp_path):
    (tmp_path / "keep.txt").write_text("x", encoding="utf-8")
    ensure_writable_dir(tmp_path, "--output", FIX)
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize(
    ("relative", "problem"),
    [("blocker", "is a file, not a folder"), ("blocker/sub", "cannot create the folder")],
)
def test_a_file_in_the_way_is_named_with_the_fix(tmp_path, relative, problem):
    (tmp_path / "blocker").write_text("data", encoding="utf-8")
    target = tmp_path / relative
    with pytest.raises(UserError) as caught:
        ensure_writable_dir(target, "cache folder", FIX)
    assert str(caught.value).startswith(f"cache folder {target}: {problem}")
    assert str(caught.value).endswith(FIX)
    assert (tmp_path / "blocker").read_text(encoding="utf-8") == "data"


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    # chmod cannot take write access away from root (CI runs as root), so the permission
    # check itself is what is made to say no.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=f"--output {tmp_path}: not writable; {FIX}"):
        ensure_writable_dir(tmp_path, "--output", FIX)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_the_umask_gives_any_other_file(tmp_path, umask):
    # mkstemp would make them 0600: unreadable by the group that shares the results.
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        atomic_write_bytes(tmp_path / "montage.png", b"png")
        (tmp_path / "reference.txt").write_text("any other tool's file", encoding="utf-8")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("metrics.json", "montage.png", "reference.txt"), expected)


def test_atomic_output_keeps_the_suffix_and_removes_the_temporary_on_failure(tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]
