"""The plan as a commented YAML config: a header like every ``configs/*.yaml``, then each
choice with its reason above it. The text is parsed back by the strict config parser before
it is written, and a file is only replaced when ``segnet-plan`` wrote it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from segnet.config import ExperimentConfig, build_config, parse_yaml
from segnet.errors import UserError
from segnet.files import atomic_write_text
from segnet.planning.rules import Choice
from segnet.strict_dataclass import to_dict

MARK = "planned from the data by segnet-plan"  # in the first line of every plan
WIDTH = 100

Tree = dict[str, Any]  # sections -> keys -> Choice | plain value | Tree


def plain(tree: Tree) -> dict[str, Any]:
    """The tree's values without their reasons: what a config file holds."""
    return {
        key: plain(node) if isinstance(node, dict) else to_dict(_value(node))
        for key, node in tree.items()
    }


def choices(tree: Tree, prefix: str = "") -> list[tuple[str, Choice]]:
    """Every ``(dotted key, choice)`` of the tree, in order."""
    found: list[tuple[str, Choice]] = []
    for key, node in tree.items():
        if isinstance(node, dict):
            found += choices(node, f"{prefix}{key}.")
        elif isinstance(node, Choice):
            found.append((f"{prefix}{key}", node))
    return found


def render(tree: Tree, header: list[str]) -> str:
    """The YAML text: ``header`` as a comment block (wrapped, but for command lines), each
    choice's reason above its key."""
    lines = []
    for line in header:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        wrapped = textwrap.wrap(line, WIDTH - 2, subsequent_indent=indent) or [""]
        if line.lstrip().startswith("python "):  # a command stays whole, to be copied
            wrapped = [line]
        lines += [f"# {part}".rstrip() for part in wrapped]
    lines.append("")
    _render_mapping(tree, "", lines)
    return "\n".join(lines) + "\n"


def _render_mapping(tree: Tree, indent: str, lines: list[str]) -> None:
    for key, node in tree.items():
        if isinstance(node, dict):
            lines.append(f"{indent}{key}:")
            _render_mapping(node, indent + "  ", lines)
            continue
        if isinstance(node, Choice):
            width = WIDTH - len(indent) - 2
            lines += [f"{indent}# {line}" for line in textwrap.wrap(node.reason, width)]
        lines.append(f"{indent}{key}: {flow(_value(node))}")


def flow(value: Any) -> str:
    """One value as inline YAML: ``[160, 160, 10]``, ``zscore``, ``1.5``."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _value(node: Any) -> Any:
    return node.value if isinstance(node, Choice) else node


def check(text: str, source: str) -> ExperimentConfig:
    """The plan parsed as ``train.py`` will parse it; a failure is the planner's bug."""
    return build_config(parse_yaml(text), source=source)


def write_plan(path: Path, text: str) -> None:
    """Writes the plan atomically; an existing file only if segnet-plan wrote it.

    Raises:
        UserError: ``path`` exists and is not a plan (it would be lost), or is a folder.
    """
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; name the YAML file to write")
    if path.exists() and not _is_plan(path):
        raise UserError(
            f"--out {path}: exists and was not written by segnet-plan; choose another --out "
            "(or move the file) so that it is not overwritten"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _is_plan(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as file:
            return MARK in file.readline()
    except (OSError, UnicodeDecodeError):
        return False
