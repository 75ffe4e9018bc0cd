"""Evaluation results as files and tables: ``metrics.json``, ``per_case.csv``, text summaries.

Plain Python over ``segnet.metrics`` results, so reports can be rebuilt from a saved
``metrics.json`` without TensorFlow. Every file is written atomically (readers see the old file
or the new one, never half of one).
"""

from __future__ import annotations

import csv
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
    """One row per (case, class): ``case``, ``class`` and ``ClassMetrics.as_dict``."""
    return [
        {"case": case_id, "class": label, **metrics.as_dict()}
        for case_id, classes in per_case.items()
        for label, metrics in classes.items()
    ]


def write_per_case_csv(path: Path, per_case: PerCase) -> None:
    """Writes ``per_case_rows`` as CSV with a header line (floats in full precision).

    ``both_empty`` is ``True`` on the rows ``summarize`` leaves out of the statistics.
    """
    fields = ["case", "class", *ClassMetrics.keys()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_case_rows(per_case))
    atomic_write_text(path, buffer.getvalue())


def metrics_document(
    *,
    config: dict[str, Any],
    checkpoint: str | list[str],
    summary: dict[str, Any],
    per_case: PerCase,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """The content of ``metrics.json``: everything needed to read the numbers later.

    Args:
        config: the resolved experiment as a plain dict (``config_to_dict``).
        checkpoint: the checkpoint path the predictions came from (an ensemble's paths).
        summary: ``segnet.metrics.summarize`` of the cases.
        per_case: ``{case_id: {label: ClassMetrics}}``.
        class_names: optional ``{label: name}`` from the dataset description.

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
        "failures": [],  # the evaluation fills in the cases it left out
        "config": config,
    }


def _string_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Writes ``document`` as strict JSON.

    Raises:
        ValueError: if it holds a NaN or an infinity, which JSON cannot express (Python would
            write ``NaN``, which other readers reject); a missing value must be None.
    """
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def summary_table(summary: dict[str, Any], class_names: Mapping[int, str] | None = None) -> str:
    """A fixed-width table: one block per class, rows mean/median/std, a column per metric.

    Column ``n`` holds the number of cases a class's statistics are over; a class without any
    shows ``n/a``. The line under the table counts the pairs left out (both masks empty).

    Args:
        summary: ``segnet.metrics.summarize`` output (integer or string label keys).
        class_names: optional ``{label: name}``.

    Returns:
        The table as text, then the foreground mean row and the line of left-out pairs.
    """
    header = ["class", "stat", "n", *(title for _, title, _ in TABLE_METRICS)]
    rows: list[list[str]] = []
    for label, table in summary["per_class"].items():
        for i, stat in enumerate(TABLE_STATISTICS):
            name = class_name(int(label), class_names) if i == 0 else ""
            n = str(table["counted"]) if i == 0 else ""
            rows.append([name, stat, n, *_metric_cells(table, stat)])
    if summary.get("foreground_mean"):
        means = {k: {"mean": v} for k, v in summary["foreground_mean"].items()}
        rows.append(["foreground", "mean", "", *_metric_cells(means, "mean")])
    return format_table(header, rows) + "\n" + excluded_line(summary, class_names)


def _metric_cells(table: Mapping[str, Any], stat: str) -> list[str]:
    return [_cell(table[key][stat], fmt) for key, _, fmt in TABLE_METRICS]


def excluded_line(summary: dict[str, Any], class_names: Mapping[int, str] | None = None) -> str:
    """``left out, both masks empty: 1 of 6 (case, class) pairs (class 2: 1)``."""
    excluded, total = summary["excluded_empty"], summary["excluded_empty"] + summary["counted"]
    by_class = [
        f"class {class_name(int(label), class_names)}: {table['excluded_empty']}"
        for label, table in summary["per_class"].items()
        if table["excluded_empty"]
    ]
    detail = f" ({', '.join(by_class)})" if by_class else ""
    return f"left out, both masks empty: {excluded} of {total} (case, class) pairs{detail}"


def ranking_table(results: Mapping[str, dict[str, Any]]) -> str:
    """Checkpoints ranked by mean foreground Dice, best first (any without one last).

    Args:
        results: ``{checkpoint name: summarize() output}``.

    Returns:
        A table with rank, checkpoint, mean foreground Dice, HD95 and NSD, and how many (case,
        class) pairs those are over, of all pairs (the others had both masks empty).
    """

    def best_first(item: tuple[str, dict[str, Any]]) -> tuple[bool, float]:
        dice = foreground_dice(item[1])
        return (dice is None, -(dice or 0.0))

    header = ["rank", "checkpoint", "Dice", "HD95 mm", "NSD", "pairs counted"]
    rows = []
    for rank, (name, summary) in enumerate(sorted(results.items(), key=best_first), start=1):
        means = summary.get("foreground_mean", {})
        total = summary["counted"] + summary["excluded_empty"]
        rows.append(
            [
                str(rank),
                name,
                _cell(foreground_dice(summary), "{:.4f}"),
                _cell(means.get("hd95_mm"), "{:.2f}"),
                _cell(means.get("nsd"), "{:.4f}"),
                f"{summary['counted']}/{total}",
            ]
        )
    return format_table(header, rows)


def foreground_dice(summary: dict[str, Any]) -> float | None:
    """Mean over foreground classes of the per-class mean Dice (the ranking key); None when no
    foreground class has a counted pair."""
    dice = summary.get("foreground_mean", {}).get("dice")
    return None if dice is None else float(dice)


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first two left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
