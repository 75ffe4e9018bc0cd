"""Tests for segnet.evaluation.compare: paired, case-by-case comparison of two evaluations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from segnet.cli import compare_main
from segnet.errors import RunDirError, UserError
from segnet.evaluation import compare

FIELDS = ["case", "class", "dice", "iou", "hd95_mm", "assd_mm", "nsd", "both_empty"]


def write_evaluation(folder: Path, rows: list[tuple[str, int, float, float]], **extra) -> Path:
    """An evaluation folder: per_case.csv rows (case, class, dice, hd95) and a metrics.json."""
    folder.mkdir(parents=True)
    with (folder / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for case, label, dice, hd95 in rows:
            empty = extra.get("both_empty", set())
            writer.writerow(
                {"case": case, "class": label, "dice": dice, "iou": dice / (2 - dice),
                 "hd95_mm": hd95, "assd_mm": hd95 / 3, "nsd": dice,
                 "both_empty": (case, label) in empty}
            )  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps({"class_names": {"1": "anterior"}}))
    return folder


def test_hand_computed_differences(tmp_path: Path):
    base = write_evaluation(
        tmp_path / "a", [("c1", 1, 0.80, 2.0), ("c2", 1, 0.70, 3.0), ("c3", 1, 0.90, 1.0)]
    )
    cand = write_evaluation(
        tmp_path / "b", [("c1", 1, 0.82, 2.0), ("c2", 1, 0.74, 2.0), ("c3", 1, 0.89, 1.5)]
    )
    dice, hd95 = compare.compare(compare.read_scores(base), compare.read_scores(cand))
    # Dice differences +0.02, +0.04, -0.01: mean 0.05/3, sample std 0.025166, se std/sqrt(3).
    assert (dice.metric, dice.cases, dice.better, dice.worse) == ("dice", 3, 2, 1)
    assert dice.mean == pytest.approx(0.05 / 3)
    assert dice.standard_error == pytest.approx(0.0251661 / math.sqrt(3), rel=1e-5)
    assert dice.baseline == pytest.approx(0.8) and dice.candidate == pytest.approx(0.8166667)
    # Wilcoxon on (+0.02, +0.04, -0.01): ranks 2, 3, 1; W = min(5, 1) = 1; exact two-sided
    # p = P(W <= 1) * 2 = (2 of 8 sign patterns) * 2 / 8 = 0.5.
    assert dice.p_value == pytest.approx(0.5)
    # HD95: 0, -1, +0.5 mm; lower is better, so one better, one worse, one tie.
    assert (hd95.better, hd95.worse) == (1, 1)
    assert hd95.mean == pytest.approx(-0.5 / 3)


def test_pairs_empty_in_either_evaluation_and_infinite_distances_are_left_out(tmp_path: Path):
    rows = [("c1", 1, 0.8, 2.0), ("c2", 1, 0.7, 3.0), ("c3", 1, 0.0, float("inf"))]
    base = write_evaluation(tmp_path / "a", rows, both_empty={("c2", 1)})
    cand = write_evaluation(tmp_path / "b", [(c, k, d + 0.1, h) for c, k, d, h in rows])
    dice, hd95 = compare.compare(compare.read_scores(base), compare.read_scores(cand))
    assert dice.cases == 2 and dice.mean == pytest.approx(0.1)  # c2 left out
    assert hd95.cases == 1  # c2 left out, c3's infinite distance too
    assert hd95.p_value is None  # a single zero difference: nothing to test


def test_different_cases_are_refused_naming_them(tmp_path: Path):
    base = write_evaluation(tmp_path / "a", [("c1", 1, 0.8, 2.0), ("c2", 1, 0.7, 3.0)])
    cand = write_evaluation(tmp_path / "b", [("c1", 1, 0.8, 2.0), ("c9", 1, 0.7, 3.0)])
    with pytest.raises(
        UserError, match=r"only in the baseline \(c2\).*only in the candidate \(c9\)"
    ):
        compare.compare(compare.read_scores(base), compare.read_scores(cand))


def test_a_run_directory_is_answered_with_its_evaluations(tmp_path: Path):
    write_evaluation(tmp_path / "run" / "evaluation" / "latest", [("c1", 1, 0.8, 2.0)])
    with pytest.raises(RunDirError, match=r"run/evaluation/latest"):
        compare.read_scores(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"no per_case\.csv"):
        compare.read_scores(tmp_path)


def test_a_foreign_csv_is_refused(tmp_path: Path):
    (tmp_path / "per_case.csv").write_text("name,score\nx,1\n")
    with pytest.raises(RunDirError, match=r"not a per_case\.csv"):
        compare.read_scores(tmp_path)


def test_the_cli_prints_the_table_and_exits_2_on_bad_input(tmp_path: Path, capsys):
    rows = [("c1", 1, 0.8, 2.0), ("c2", 1, 0.7, 3.0)]
    base = write_evaluation(tmp_path / "a", rows)
    cand = write_evaluation(tmp_path / "b", [(c, k, d + 0.01, h) for c, k, d, h in rows])
    assert compare_main([str(base), str(cand), "--metric", "dice"]) == 0
    out = capsys.readouterr().out
    assert "1 (anterior)" in out and "+0.0100 ± 0.0000" in out
    assert compare_main([str(base), str(cand), "--metric", "volume"]) == 2
    error = capsys.readouterr().err
    assert "--metric volume" in error and "Traceback" not in error


def test_long_class_names_keep_the_columns_apart():
    difference = compare.PairedDifference(1, "dice", 28, 0.7956, 0.8306, 0.035, 0.015, 21, 7, 0.02)
    table = compare.format_table([difference], {1: "right ventricle"})
    header, row = table.splitlines()[:2]
    assert row.startswith("1 (right ventricle) dice")
    assert header.index("metric") == row.index("dice")
