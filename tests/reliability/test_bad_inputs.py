"""Every entry of the bad-input corpus: exit 2, the error class, one message naming the file,
key or flag, no traceback, and nothing written into a new run directory or changed in an
existing one.

Most entries run in-process through ``segnet.cli.*_main`` (seconds instead of a TensorFlow
import each); those marked ``subprocess`` run ``scripts/<program>.py`` for real, to prove the
contract end to end. Also checks that RELIABILITY.md states the figures this suite produces.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import REPO, child_env, crash_experiment, snapshot

from segnet import cli
from segnet.cli import evaluate_main, predict_main, train_main
from segnet.config import build_config

from .corpus import CATEGORIES, CORPUS, BadInput, Workspace
from .test_crash_resume import SCHEDULE

pytestmark = pytest.mark.reliability

OUTPUTS = ("checkpoints/", "export/", "metrics.csv", "evaluation/", ".")  # "." : a file run dir
MAINS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main}
# TensorFlow's native start-up lines, which the CLI filters in a terminal session.
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} [\d:.]+ +\d+ \S+\])")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> Path:
    """A finished tiny run (1 epoch of 2 steps, validated, exported), trained once per worker.

    Not deterministic: op determinism is process-wide and would outlive this fixture.
    """
    from segnet.training.trainer import train

    tmp = tmp_path_factory.mktemp("trained")
    data = crash_experiment(
        tiny_root, tmp / "cache", train={"epochs": 1, "steps_per_epoch": 2, "deterministic": False}
    )
    train(build_config(data), run_dir=tmp / "run", quiet=True)
    return tmp / "run"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI reconfigures the root logger for its process; give the next test its own."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _workspace(tmp_path: Path, tiny_root: Path, trained: Path | None) -> Workspace:
    root = tmp_path / "dataset"
    shutil.copytree(tiny_root, root)
    if trained is None:
        data = crash_experiment(root, tmp_path / "cache", train={"deterministic": False})
        return Workspace(tmp_path, root, data, tmp_path / "run", tmp_path / "out")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    return Workspace(tmp_path, root, data, run, tmp_path / "out")


def _untracked(entry: BadInput) -> re.Pattern[str]:
    """Files a failed command may still change: the logs and events.jsonl always; the config
    under --force."""
    config = r"|config\.yaml|config\.before-.*\.yaml" if entry.forced else ""
    return re.compile(rf"train\.log|events\.jsonl|logs/.*{config}")


def _contents(files: dict[str, tuple]) -> dict[str, tuple]:
    """Checkpoints, exports and metrics by content and mtime; the rest by content alone (a
    resume rewrites config.yaml and fingerprint.json with the same bytes)."""
    return {path: value if path.startswith(OUTPUTS) else value[:2] for path, value in files.items()}


def _run(entry: BadInput, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if not entry.subprocess:
        status = MAINS[entry.program](argv)
        return status, capsys.readouterr().err
    script = REPO / "scripts" / f"{entry.program}.py"
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    return done.returncode, done.stderr


def _message(program: str, stderr: str) -> str:
    """The one error message in ``stderr``: the CLI's ``error:`` (and the lines it goes on
    over), or the one line ``segnet-predict --quiet`` prints for the input it could not use."""
    lines = [line for line in stderr.splitlines() if line and not NATIVE_LOG.match(line)]
    assert not any("Traceback" in line for line in lines), stderr
    starts = [i for i, line in enumerate(lines) if line.startswith(f"segnet-{program}: error:")]
    if program == "predict" and not starts:
        assert len(lines) == 1, f"expected one failed input, got:\n{stderr}"
        return lines[0]
    assert len(starts) == 1, f"expected one error message, got {len(starts)}:\n{stderr}"
    return "\n".join(lines[starts[0] :])


def _params() -> list:
    return [
        pytest.param(
            entry,
            id=f"{entry.category}-{entry.id}",
            marks=[pytest.mark.xfail(strict=True, reason=entry.known_defect)]
            if entry.known_defect
            else [],
        )
        for entry in CORPUS
    ]


@pytest.mark.parametrize("entry", _params())
def test_bad_input_gives_exit_2_one_message_and_changes_nothing(
    entry: BadInput,
    tmp_path: Path,
    tiny_root: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trained = request.getfixturevalue("trained_run") if entry.existing_run else None
    ws = _workspace(tmp_path, tiny_root, trained)
    argv = [str(a) for a in entry.make(ws)]
    skip = _untracked(entry).fullmatch
    before = _contents(snapshot(ws.run, skip)), snapshot(ws.out)
    if entry.fault is not None:
        entry.fault(monkeypatch, ws)
    status, stderr = _run(entry, argv, capsys)
    assert status == 2, stderr
    if not entry.subprocess:  # a child's exception stays in the child
        raised = type(cli.last_error) if cli.last_error is not None else None
        assert raised is entry.error, f"{cli.last_error!r}\n{stderr}"
    message = _message(entry.program, stderr)
    for name in entry.names:
        assert name.format(**ws.fields()) in message, message
    after = _contents(snapshot(ws.run, skip)), snapshot(ws.out)
    assert not _changes(before, after), f"changed by the failed command: {_changes(before, after)}"


def _changes(before: tuple[dict, ...], after: tuple[dict, ...]) -> list[str]:
    """``+added``, ``-removed`` and ``~modified`` files between two sets of snapshots."""
    changes = []
    for old, new in zip(before, after):
        changes += [f"+{p}" for p in sorted(set(new) - set(old))]
        changes += [f"-{p}" for p in sorted(set(old) - set(new))]
        changes += [f"~{p}" for p in sorted(set(old) & set(new)) if old[p] != new[p]]
    return changes


# ---------------------------------------------------------------------------------------------
# RELIABILITY.md
# ---------------------------------------------------------------------------------------------
def _figures() -> dict[str, int]:
    """The ``| name | number |`` rows of RELIABILITY.md's figures table."""
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    return {
        name.strip(): int(value)
        for name, value in re.findall(r"^\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|\s*$", text, re.MULTILINE)
    }


def test_reliability_md_states_the_figures_of_this_suite() -> None:
    known = [entry for entry in CORPUS if entry.known_defect]
    expected = {
        "SIGKILLs survived, one chain of resumes": len(SCHEDULE),
        "kill points inside a checkpoint write": sum(kill.in_save for kill in SCHEDULE),
        "kill points chosen at seeded random moments": sum(
            kill.delay != (0.0, 0.0) for kill in SCHEDULE
        ),
        "bad inputs tried": len(CORPUS),
        **{f"bad inputs: {name}": len(entries) for name, entries in CATEGORIES.items()},
        "bad inputs run as real subprocesses": sum(entry.subprocess for entry in CORPUS),
        "bad inputs passing": len(CORPUS) - len(known),
        "bad inputs failing on a known, reported defect": len(known),
    }
    assert _figures() == expected
