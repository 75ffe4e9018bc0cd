"""The run directory refuses to silently change its experiment, to write into a folder that is
not a segnet run, and to serve two training processes at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segnet.config import build_config
from segnet.errors import RunDirError
from segnet.files import FolderBusyError, temporary_sibling
from segnet.run_dir import (
    MARKER_NAME,
    check_run_dir,
    hold_run_dir,
    initialise_run_dir,
    stored_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_new_directory_is_not_created_by_the_check(tmp_path: Path):
    run_dir = tmp_path / "runs" / "a"
    assert check_run_dir(run_dir, build_config({})) is False
    assert not run_dir.exists()


def test_same_config_resumes_and_different_config_is_refused(tmp_path: Path):
    config = build_config({})
    initialise_run_dir(tmp_path, config)
    assert stored_config(tmp_path) == config
    assert check_run_dir(tmp_path, config) is True
    other = build_config({"train": {"seed": 99}})
    with pytest.raises(RunDirError, match=r"train\.seed: 0 -> 99.*--force"):
        check_run_dir(tmp_path, other)
    assert check_run_dir(tmp_path, other, force=True) is True


def test_more_epochs_resume_without_force_and_fewer_are_refused(tmp_path: Path):
    initialise_run_dir(tmp_path, build_config({"train": {"epochs": 10}}))
    assert check_run_dir(tmp_path, build_config({"train": {"epochs": 25}})) is True
    with pytest.raises(RunDirError, match=r"train\.epochs: 10 -> 5"):
        check_run_dir(tmp_path, build_config({"train": {"epochs": 5}}))
    with pytest.raises(RunDirError, match=r"train\.steps_per_epoch"):  # the rest still counts
        check_run_dir(tmp_path, build_config({"train": {"epochs": 25, "steps_per_epoch": 7}}))


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


# --- Ownership ---------------------------------------------------------------------------------
def test_the_marker_is_written_first_and_makes_the_folder_ours(tmp_path: Path):
    run_dir = tmp_path / "run"
    initialise_run_dir(run_dir, build_config({}))
    assert (run_dir / MARKER_NAME).is_file()
    assert check_run_dir(run_dir, build_config({})) is True


@pytest.mark.parametrize("user_file", ["metrics.csv", "export/saved_model/saved_model.pb", "notes"])
def test_a_folder_holding_someone_elses_files_is_refused(tmp_path: Path, user_file: str):
    path = tmp_path / user_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's own data")
    with pytest.raises(RunDirError) as caught:
        check_run_dir(tmp_path, build_config({}))
    assert str(tmp_path) in str(caught.value) and MARKER_NAME in str(caught.value)
    assert path.read_text() == "the user's own data"


def test_an_empty_folder_and_a_half_written_marker_are_accepted(tmp_path: Path):
    assert check_run_dir(tmp_path, build_config({})) is False
    temporary_sibling(tmp_path / MARKER_NAME).write_text("{")  # killed while writing it
    assert check_run_dir(tmp_path, build_config({})) is False


def test_a_run_from_before_the_marker_is_adopted(tmp_path: Path):
    initialise_run_dir(tmp_path, build_config({}))
    (tmp_path / MARKER_NAME).unlink()
    (tmp_path / "metrics.csv").write_text("epoch\n")
    assert check_run_dir(tmp_path, build_config({})) is True
    initialise_run_dir(tmp_path, build_config({}))
    assert (tmp_path / MARKER_NAME).is_file()


# --- One training process at a time -----------------------------------------------------------
def _hold_in_child(run_dir: Path) -> subprocess.Popen:
    """A child process that takes the trainer's lock on ``run_dir`` and sleeps."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from segnet.run_dir import hold_run_dir\n"
        "with hold_run_dir(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_held_run_directory_is_refused_naming_its_owner(tmp_path: Path):
    child = _hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(FolderBusyError) as caught, hold_run_dir(tmp_path / "run"):
            pass
        assert f"pid {child.pid}" in str(caught.value)
        assert str(tmp_path / "run") in str(caught.value)
    finally:
        child.kill()
        child.wait()


def test_a_sigkilled_owner_does_not_leave_the_lock_behind(tmp_path: Path):
    child = _hold_in_child(tmp_path / "run")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process's last descriptor
        try:
            with hold_run_dir(tmp_path / "run"):
                break
        except FolderBusyError:
            assert time.monotonic() < deadline, "the lock outlived its SIGKILLed owner"
            time.sleep(0.05)


def test_a_folder_the_lock_created_is_removed_if_nothing_was_written(tmp_path: Path):
    run_dir = tmp_path / "runs" / "new"
    with hold_run_dir(run_dir):
        assert run_dir.is_dir()
    assert not (tmp_path / "runs").exists()
    with hold_run_dir(run_dir):
        (run_dir / "config.yaml").write_text("x")
    assert (run_dir / "config.yaml").is_file()
