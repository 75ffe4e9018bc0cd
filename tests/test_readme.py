"""Every shell command in the README is checked, so the README cannot drift from the code.

Commands are the README's ```bash blocks and its inline code that starts with a program
(``python``, ``pip``, ``segnet-*``, ``tensorboard``). The cheap ones run as written (from a
scratch folder where they would write); the long ones (training, benchmarks) have their flags
parsed by the program's own parser or checked against its ``--help``. Every ``--set key=value``
anywhere in the README must be a valid override of the config tree.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from segnet import cli
from segnet.config import build_config, load_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PROGRAMS = ("python ", "pip ", "segnet-", "tensorboard ")
# Placeholders of the syntax rows, and what stands in for them when flags are parsed.
PLACEHOLDERS = {
    "<config>": "segnet",
    "<name>": "segnet_synthetic",
    "C.yaml": "configs/segnet.yaml",
    "FILES_OR_DIRS": "scans/",
    "DATASET": "data/synthetic",
    "PATH": "runs/x/checkpoints/ckpt-1",
    "DIR": "runs/x",
    "k=v": "train.epochs=2",
    "--set ...": "--set train.epochs=2",
    " ...": "",
}


def is_cheap(command: str) -> bool:
    """Runs in seconds: printing a config, generating the synthetic data."""
    return "--print-config" in command or "make_synthetic_data.py" in command


def readme_commands() -> list[str]:
    """The README's commands, one per line, in order, without duplicates."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.splitlines():
            found += [part.split("#")[0].strip() for part in line.split("&&")]
    for span in re.findall(r"`([^`\n]+)`", README):
        found.append(span.replace("\\|", "|"))
    return list(dict.fromkeys(c for c in found if c.startswith(PROGRAMS)))


def concrete(command: str) -> list[str]:
    """The syntax row as one invocation: optional groups kept, the first alternative taken,
    placeholders filled in."""
    text = re.sub(r"\[([^\[\]]*)\]", r"\1", command) if " [" in command else command
    text = re.sub(r"(\S+?)\|\S+", r"\1", text)
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return shlex.split(text)


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert len(commands) >= 15, commands
    assert len([c for c in commands if is_cheap(c)]) >= 2, commands


@pytest.mark.parametrize("command", readme_commands())
def test_each_readme_command_is_valid(command: str):
    words = concrete(command)
    program, args = words[0], words[1:]
    if program.startswith("segnet-"):
        _parse(program, args)
    elif program == "python" and args[:2] == ["-m", "pytest"]:
        _check_pytest_flags(args[2:])
    elif program == "python" and args[0].startswith("scripts/"):
        script = Path(args[0]).stem
        if script in ("train", "evaluate", "predict", "compare"):
            _parse(f"segnet-{script}", args[1:])
        else:
            _check_against_help(args[0], args[1:])
    elif program == "python" and args[0].startswith("benchmarks/"):
        _check_against_help(args[0], args[1:])
    elif program == "pip":
        _check_extras(args)
    elif program == "tensorboard":
        assert "tensorboard" in _extras()["tensorboard"], "README uses tensorboard: an extra"
    else:
        pytest.fail(f"no check for README command {command!r}")


def _parse(program: str, args: list[str]) -> None:
    parser = {
        "segnet-train": cli.train_parser,
        "segnet-evaluate": cli.evaluate_parser,
        "segnet-predict": cli.predict_parser,
        "segnet-plan": cli.plan_parser,
        "segnet-compare": cli.compare_parser,
    }[program]()
    if not args:  # "installed as segnet-train": the name alone
        return
    parsed = parser.parse_args(args)  # a wrong flag exits with status 2 and fails the test
    if program == "segnet-train":  # the config it names exists and passes the strict checks
        load_config(REPO / parsed.config, parsed.overrides)


def _check_against_help(script: str, args: list[str]) -> None:
    assert (REPO / script).is_file(), f"{script} does not exist"
    done = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", done.stdout), f"{script}: no {flag}"


def _check_pytest_flags(args: list[str]) -> None:
    markers = configparser.ConfigParser()
    markers.read(REPO / "setup.cfg")
    known = {line.split(":")[0].strip() for line in markers["tool:pytest"]["markers"].split("\n")}
    if "-m" in args:
        expression = args[args.index("-m") + 1]
        used = set(re.findall(r"\w+", expression)) - {"not", "and", "or"}
        assert used <= known, f"unknown pytest markers {used - known}"


def _extras() -> dict[str, str]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    return dict(setup["options.extras_require"])


def _check_extras(args: list[str]) -> None:
    for match in re.findall(r"\.\[([\w,]+)\]", " ".join(args)):
        for extra in match.split(","):
            assert extra in _extras(), f"pip install names a missing extra [{extra}]"


@pytest.mark.parametrize("command", [c for c in readme_commands() if is_cheap(c)])
def test_cheap_readme_commands_run(command: str, tmp_path: Path):
    # From a scratch folder holding the repository's scripts and configs, so what a command
    # writes (data/synthetic) lands there and not in the checkout.
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    done = subprocess.run(
        [sys.executable if word == "python" else word for word in concrete(command)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_set_override_in_the_readme_is_a_valid_key():
    overrides = re.findall(r"--set\s+\"?([\w.]+=[^\s\"`]+)", README)
    assert len(overrides) >= 5, overrides
    for override in dict.fromkeys(overrides):
        if override.startswith(("key.path=", "k=")):
            continue
        build_config({"model": {"name": "unet3d"}}, [override])  # ConfigError fails the test
