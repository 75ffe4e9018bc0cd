"""Evaluation results as files and tables: ``metrics.json``, ``per_case.csv``, text summaries.

Plain Python over ``segnet.metrics`` results, so reports can be rebuilt from a saved
``metrics.json`` without TensorFlow. Every file is written atomically (readers see the old file
or the new one, never half of one).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segnet.files import atomic_write_text
from segnet.metrics import EDGE_CASE_POLICY, ClassMetrics

# (key in ClassMetrics / summaries, column title, number format) of the printed tables.
TABLE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", "{:.4f}"),
    ("iou", "IoU", "{:.4f}"),
    ("hd95_mm", "HD95 mm", "{:.2f}"),
    ("assd_mm", "ASSD mm", "{:.2f}"),
    ("nsd", "NSD", "{:.4f}"),
    ("volume_diff_mm3", "VolDiff mm3", "{:.1f}"),
)
TABLE_STATISTICS = ("mean", "median", "std")
PerCase = Mapping[str, Mapping[int, ClassMetrics]]


def class_name(label: int, names: Mapping[int, str] | None) -> str:
    """``"1 (edema)"`` when the dataset names its labels, else ``"1"``."""
    if names and label in names:
        return f"{label} ({names[label]})"
    return str(label)


def per_case_rows(per_case: PerCase) -> list[dict[str, Any]]:
    """One row per (case, class): ``case``, ``class`` and every ``ClassMetrics`` field."""
    return [
        {"case": case_id, "class": label, **metrics.as_dict()}
        for case_id, classes in per_case.items()
        for label, metrics in classes.items()
    ]


def write_per_case_csv(path: Path, per_case: PerCase) -> None:
    """Writes ``per_case_rows`` as CSV with a header line (floats in full precision)."""
    fields = ["case", "class", *(f.name for f in dataclasses.fields(ClassMetrics))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_case_rows(per_case))
    atomic_write_text(path, buffer.getvalue())


def metrics_document(
    *,
    config: dict[str, Any],
    checkpoint: str,
    summary: dict[str, Any],
    per_case: PerCase,
    class_names: Mapping[int, str] | None = None,
    failures: Sequence[str] = (),
) -> dict[str, Any]:
    """The content of ``metrics.json``: everything needed to read the numbers later.

    Args:
        config: the resolved experiment as a plain dict (``config_to_dict``).
        checkpoint: the checkpoint path the predictions came from.
        summary: ``segnet.metrics.summarize`` of the cases.
        per_case: ``{case_id: {label: ClassMetrics}}``.
        class_names: optional ``{label: name}`` from the dataset description.
        failures: one line per case that could not be evaluated.

    Returns:
        A JSON-ready dict; integer labels become strings, as JSON keys must be.
    """
    return {
        "checkpoint": checkpoint,
        "num_cases": len(per_case),
        "class_names": {str(k): v for k, v in (class_names or {}).items()},
        "summary": _string_keys(summary),
        "per_case": {
            case_id: {str(label): m.as_dict() for label, m in classes.items()}
            for case_id, classes in per_case.items()
        },
        "edge_case_policy": EDGE_CASE_POLICY,
        "failures": list(failures),
        "config": config,
    }


def _string_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def summary_table(summary: dict[str, Any], class_names: Mapping[int, str] | None = None) -> str:
    """A fixed-width table: one block per class, rows mean/median/std, a column per metric.

    Args:
        summary: ``segnet.metrics.summarize`` output (integer or string label keys).
        class_names: optional ``{label: name}``.

    Returns:
        The table as text, ending with the foreground mean row.
    """
    header = ["class", "stat", *(title for _, title, _ in TABLE_METRICS)]
    rows: list[list[str]] = []
    for label, table in summary["per_class"].items():
        for i, stat in enumerate(TABLE_STATISTICS):
            name = class_name(int(label), class_names) if i == 0 else ""
            rows.append([name, stat, *(fmt.format(table[k][stat]) for k, _, fmt in TABLE_METRICS)])
    if summary.get("foreground_mean"):
        means = summary["foreground_mean"]
        rows.append(["foreground", "mean", *(fmt.format(means[k]) for k, _, fmt in TABLE_METRICS)])
    return format_table(header, rows)


def ranking_table(results: Mapping[str, dict[str, Any]]) -> str:
    """Checkpoints ranked by mean foreground Dice, best first.

    Args:
        results: ``{checkpoint name: summarize() output}``.

    Returns:
        A table with rank, checkpoint, mean foreground Dice, HD95 and NSD.
    """
    ranked = sorted(results.items(), key=lambda item: -foreground_dice(item[1]))
    header = ["rank", "checkpoint", "Dice", "HD95 mm", "NSD"]
    rows = [
        [
            str(rank),
            name,
            f"{foreground_dice(summary):.4f}",
            f"{summary['foreground_mean'].get('hd95_mm', float('nan')):.2f}",
            f"{summary['foreground_mean'].get('nsd', float('nan')):.4f}",
        ]
        for rank, (name, summary) in enumerate(ranked, start=1)
    ]
    return format_table(header, rows)


def foreground_dice(summary: dict[str, Any]) -> float:
    """Mean over foreground classes of the per-class mean Dice (the ranking key)."""
    return float(summary.get("foreground_mean", {}).get("dice", float("nan")))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first two left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
