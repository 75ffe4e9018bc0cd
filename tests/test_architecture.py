"""The import graph: inference and evaluation stand without the trainer.

``segnet.training`` may use ``segnet.inference`` (validation slides windows like prediction
does), never the other way round: loading a predictor must not load the trainer. Checked twice:
statically over every import statement (function-local ones too), and dynamically in a fresh
process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import run_python

REPO = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "segnet/inference": ("segnet.training", "segnet.evaluation"),
    "segnet/evaluation": ("segnet.training",),
    "segnet/data": ("segnet.training", "segnet.inference", "segnet.evaluation", "segnet.models"),
    "segnet/models": ("segnet.training", "segnet.inference", "segnet.evaluation", "segnet.data"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_it_must_not(package: str):
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / package).rglob("*.py"))
        for line, module in imported_modules(path)
        if module.startswith(FORBIDDEN[package])
    ]
    assert not wrong, "\n".join(wrong)


def test_loading_a_predictor_does_not_load_the_trainer():
    code = (
        "import sys\n"
        "import segnet.inference.predict, segnet.inference.loading, segnet.evaluation.evaluate\n"
        "print(sorted(m for m in sys.modules if m.startswith('segnet.training')))\n"
    )
    printed = run_python(code)
    assert printed.strip() == "[]", printed
