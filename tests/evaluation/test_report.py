"""Tests for segnet.evaluation.report: metrics.json, per_case.csv and the printed tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from segnet.evaluation import report
from segnet.metrics import ClassMetrics, compute_case_metrics, summarize


def _per_case() -> dict[str, dict[int, ClassMetrics]]:
    """Two cases; class 2 is in neither map of case "a", and in both maps of case "b"."""
    shape, spacing = (5, 6, 7), (1.0, 1.0, 1.0)
    a = np.zeros(shape, np.int16)
    a[0:2, 0:2, 0:2] = 1
    b = a.copy()
    b[3:5, 3:5, 3:5] = 2
    return {
        "a": compute_case_metrics(a, a, spacing, num_classes=3),
        "b": compute_case_metrics(b, b, spacing, num_classes=3),
    }


def _absent_class_summary() -> dict:
    """Class 2 absent from both masks of the only case: it has no statistics."""
    return summarize([_per_case()["a"]])


def test_metrics_json_is_strict_json_and_marks_empty_pairs(tmp_path: Path) -> None:
    per_case = {"a": _per_case()["a"]}
    document = report.metrics_document(
        config={},
        checkpoint="ckpt-1",
        summary=summarize(list(per_case.values())),
        per_case=per_case,
    )
    path = tmp_path / "metrics.json"
    report.write_json(path, document)
    # parse_constant is called on NaN and Infinity only, which strict JSON does not have.
    loaded = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(name))
    assert loaded["summary"]["per_class"]["2"]["dice"]["mean"] is None
    assert loaded["summary"]["per_class"]["2"]["excluded_empty"] == 1
    assert loaded["summary"]["pooled"]["2"]["dice"] is None
    assert loaded["per_case"]["a"]["2"]["both_empty"] is True
    assert loaded["per_case"]["a"]["1"]["both_empty"] is False
    assert "left out" in loaded["edge_case_policy"]


def test_write_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        report.write_json(tmp_path / "metrics.json", {"dice": float("nan")})
    assert not (tmp_path / "metrics.json").exists()


def test_per_case_csv_carries_the_both_empty_flag(tmp_path: Path) -> None:
    path = tmp_path / "per_case.csv"
    report.write_per_case_csv(path, _per_case())
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    flags = {(r["case"], r["class"]): r["both_empty"] for r in rows}
    assert flags == {
        ("a", "1"): "False",
        ("a", "2"): "True",
        ("b", "1"): "False",
        ("b", "2"): "False",
    }
    assert rows[1]["dice"] == "1.0"  # the per-case value stays the policy's


def test_summary_table_prints_n_a_and_the_left_out_pairs() -> None:
    table = report.summary_table(_absent_class_summary(), {1: "liver", 2: "tumour"})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["class", "stat", "n"]
    tumour = next(line for line in lines if line.startswith("2 (tumour)"))
    assert tumour.split()[2:4] == ["mean", "0"] and tumour.split()[4:] == ["n/a"] * 6
    liver = next(line for line in lines if line.startswith("1 (liver)"))
    assert liver.split()[3:5] == ["1", "1.0000"]
    foreground = next(line for line in lines if line.startswith("foreground"))
    assert foreground.split()[2] == "1.0000"  # class 1 alone, not a Dice 1 for class 2
    assert "1 of 2" in lines[-1] and "tumour" in lines[-1]


def test_summary_table_of_string_keyed_json_summary() -> None:
    summary = json.loads(json.dumps(report._string_keys(summarize(list(_per_case().values())))))
    lines = report.summary_table(summary).splitlines()
    class_2 = next(line for line in lines if line.startswith("2 "))
    assert class_2.split()[1:3] == ["mean", "1"]  # case b counted, case a left out
    assert "1 of 4" in lines[-1]


def test_ranking_puts_a_checkpoint_without_foreground_dice_last() -> None:
    nothing = summarize([{1: ClassMetrics(1.0, 1.0, 0.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0, 0)}])
    counted = summarize(list(_per_case().values()))
    table = report.ranking_table({"empty": nothing, "good": counted})
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows[0][:3] == ["1", "good", "1.0000"] and rows[0][-1] == "3/4"
    assert rows[1][:5] == ["2", "empty", "n/a", "n/a", "n/a"] and rows[1][-1] == "0/1"
