"""The command line: bad input gives one message and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_three_mistakes_in_one_message_exit_2(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model:\n  unet3d:\n    filterz: 8\ntrain:\n  epochs: -3\n  batch_size: two\n"
    )
    result = run_script("train", "--config", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for path in ("model.unet3d.filterz", "train.epochs", "train.batch_size"):
        assert path in result.stderr
    assert "did you mean 'filters'" in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 0\n")
    result = run_script("train", "--config", str(config), "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "train.epochs" in result.stderr


@pytest.mark.parametrize("args", [["--bogus-flag"], ["--config"], ["--set"]])
def test_bad_flags_exit_2(args: list[str]):
    result = run_script("train", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr


def test_missing_config_file_exit_2(tmp_path: Path):
    result = run_script("train", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_print_config_resolves_defaults_and_overrides():
    result = run_script(
        "train",
        "--config",
        str(REPO / "configs" / "segnet.yaml"),
        "--set",
        "train.epochs=7",
        "--print-config",
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["epochs"] == 7
    assert set(resolved) >= {
        "data",
        "preprocessing",
        "augmentation",
        "model",
        "loss",
        "optimizer",
        "train",
        "checkpoint",
        "evaluation",
        "runtime",
    }


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_other_scripts_reject_missing_arguments(name: str):
    result = run_script(name)
    assert result.returncode == 2 and "required" in result.stderr
