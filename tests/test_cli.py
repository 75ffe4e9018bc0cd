"""The command line: bad input gives one message and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segnet.cli import evaluate_main, predict_main, train_main

REPO = Path(__file__).resolve().parents[1]


def run_script(
    name: str, *args: str, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
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


def test_train_requires_a_config(capsys: pytest.CaptureFixture[str]):
    # --print-config: were --config optional again, this would print the defaults, not train.
    with pytest.raises(SystemExit) as info:
        train_main(["--print-config"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_a_fifo_config_exits_2_at_once(tmp_path: Path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    result = run_script("train", "--config", str(fifo), timeout=60)  # blocked forever before
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and str(fifo) in result.stderr


BROKEN_STORED_CONFIGS = [
    ("name: a\nmodel: [1, 2\n", "invalid YAML at line 3"),
    (
        "name: a\ntrain:\n  epochs: 2\n  epochs: 3\n",
        "train.epochs: key given twice (lines 3 and 4)",
    ),
    ("name: a\ntrain:\n  epochs: -1\n", "train.epochs: must be at least 1"),
    ("", "empty"),
]


@pytest.mark.parametrize(("text", "problem"), BROKEN_STORED_CONFIGS)
@pytest.mark.parametrize("program", ["evaluate", "predict"])
def test_a_broken_stored_config_is_one_line_naming_the_run_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], program: str, text: str, problem: str
):
    # The run needs no checkpoints: the stored config is read before anything else.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    (run / "config.before-20250101-000000.yaml").write_text("name: a\n")
    argv = ["--run", str(run)]
    if program == "predict":
        argv += ["--input", str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "out")]
    main = evaluate_main if program == "evaluate" else predict_main
    assert main([*argv, "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{run / 'config.yaml'} is not a readable segnet config" in line
    assert problem in line
    assert "--run " in line and "--run-dir" not in line
    assert "config.before-20250101-000000.yaml" in line


def test_the_reported_error_is_kept_until_the_next_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from segnet import cli
    from segnet.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # the CLI configures the root logger
    try:
        assert train_main(["--config", str(bad)]) == 2
        assert type(cli.last_error) is ConfigError and "train.epochs" in str(cli.last_error)
        assert capsys.readouterr().err.count("error:") == 1  # printed as before, once
        good = str(REPO / "configs" / "segnet.yaml")
        assert train_main(["--config", good, "--print-config"]) == 0
        assert cli.last_error is None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_command_called_in_process_leaves_logging_as_it_found_it(tmp_path, capsys):
    import logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    (tmp_path / "c.yaml").write_text("data: {num_classes: 3}\nmodel: {name: segnet}\n")
    assert train_main(["--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    # Its handler wrote to this test's captured stderr, closed after the test: kept, it would
    # make the next caller's logging fail.
    assert (list(root.handlers), root.level) == before
