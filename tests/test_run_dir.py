"""The run directory refuses to silently change its experiment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segnet.config import build_config
from segnet.errors import RunDirError
from segnet.run_dir import check_run_dir, initialise_run_dir, stored_config


def test_new_directory_is_not_created_by_the_check(tmp_path: Path):
    run_dir = tmp_path / "runs" / "a"
    assert check_run_dir(run_dir, build_config({})) is False
    assert not run_dir.exists()


def test_same_config_resumes_and_different_config_is_refused(tmp_path: Path):
    config = build_config({})
    initialise_run_dir(tmp_path, config)
    assert stored_config(tmp_path) == config
    assert check_run_dir(tmp_path, config) is True
    other = build_config({"train": {"epochs": 99}})
    with pytest.raises(RunDirError, match=r"train\.epochs: 10 -> 99.*--force"):
        check_run_dir(tmp_path, other)
    assert check_run_dir(tmp_path, other, force=True) is True


def test_forced_change_keeps_the_old_config(tmp_path: Path):
    initialise_run_dir(tmp_path, build_config({}))
    initialise_run_dir(tmp_path, build_config({"train": {"epochs": 99}}))
    assert stored_config(tmp_path).train.epochs == 99
    (previous,) = tmp_path.glob("config.before-*.yaml")
    assert "epochs: 10" in previous.read_text()


def test_foreign_config_file_is_reported(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("something: [else\n")
    with pytest.raises(RunDirError, match="not a readable segnet config"):
        check_run_dir(tmp_path, build_config({}))


def test_a_file_is_not_a_run_directory(tmp_path: Path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(path, build_config({}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_unwritable_parent_is_reported(tmp_path: Path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            check_run_dir(tmp_path / "run", build_config({}))
    finally:
        tmp_path.chmod(0o700)
