"""Tests for segnet.training.progress and progress_plot: running statistics, metrics.csv,
progress.png, TensorBoard, overlays."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from segnet.training import progress, progress_plot
from segnet.training.progress import (
    EpochStats,
    MetricsCsv,
    Reporter,
    Summaries,
    epoch_line,
    overlay_panel,
)
from segnet.visuals import PALETTE


def test_epoch_stats_by_hand() -> None:
    stats = EpochStats(num_classes=3)
    # class 1: tp 3, fp 1, fn 0 -> 6/7; class 2: nothing anywhere -> 1 by convention.
    stats.add(1.0, np.array([[9, 0, 0], [2, 1, 0], [0, 0, 0]]), wait_seconds=0.1, step_seconds=0.5)
    stats.add(3.0, np.array([[9, 0, 0], [1, 0, 0], [0, 0, 0]]), wait_seconds=0.0, step_seconds=0.5)
    assert stats.loss == pytest.approx(2.0)
    assert stats.dice == pytest.approx((6 / 7 + 1.0) / 2)
    assert stats.steps_per_second == pytest.approx(2.0)
    assert stats.data_wait == pytest.approx(0.1)


def test_epoch_line_names_every_number() -> None:
    stats = EpochStats(num_classes=3)
    stats.add(0.5, np.zeros((3, 3)), 0.0, 1.0)
    line = epoch_line(1, 10, 40, stats, {"val_dice": 0.5, "val_dice_1": 0.4, "val_dice_2": 0.6})
    assert line.startswith("epoch 2/10 step 40: loss 0.5000")
    assert "val dice 0.500 (1: 0.400, 2: 0.600)" in line
    assert "\n" not in line


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_csv_resume_drops_the_epochs_trained_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    first = MetricsCsv(path, num_classes=3, first_epoch=1)
    for epoch in (1, 2, 3):
        first.append({"epoch": epoch, "loss": 1.0 / epoch, "val_dice_2": 0.5})
    resumed = MetricsCsv(path, num_classes=3, first_epoch=3)  # epoch 3 was not checkpointed
    assert [r["epoch"] for r in _rows(path)] == ["1", "2"]
    resumed.append({"epoch": 3, "loss": 0.25})
    rows = _rows(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_dice_2"] == "0.5" and rows[2]["val_dice_2"] == ""
    assert list(rows[0]) == first.columns


def test_epoch_line_counts_the_pairs_left_out_of_the_validation_dice() -> None:
    stats = EpochStats(num_classes=3)
    stats.add(0.5, np.zeros((3, 3)), 0.0, 1.0)
    row = {"val_dice": 0.4, "val_dice_1": 0.4, "val_excluded_empty": 3}
    line = epoch_line(1, 10, 40, stats, row)
    assert "(1: 0.400)" in line and "3 (case, class) pairs left out" in line
    assert "left out" not in epoch_line(1, 10, 40, stats, {**row, "val_excluded_empty": 0})


def test_metrics_csv_resumes_a_file_written_before_the_left_out_column(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    old_columns = "epoch,step,loss,train_dice,val_dice,val_dice_1,learning_rate,steps_per_s"
    path.write_text(f"{old_columns},data_wait,seconds\n1,5,0.9,0.2,0.3,0.3,0.01,2,0.1,9\n")
    resumed = MetricsCsv(path, num_classes=2, first_epoch=2)
    resumed.append({"epoch": 2, "val_dice": 0.5, "val_excluded_empty": 1})
    rows = _rows(path)
    assert list(rows[0]) == resumed.columns
    assert (rows[0]["val_dice"], rows[0]["seconds"], rows[0]["val_excluded_empty"]) == (
        "0.3",
        "9",
        "",
    )
    assert (rows[1]["val_dice"], rows[1]["val_excluded_empty"]) == ("0.5", "1")


def test_metrics_csv_rewrites_an_old_header(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    MetricsCsv(path, num_classes=2, first_epoch=1).append({"epoch": 1, "loss": 0.5})
    MetricsCsv(path, num_classes=4, first_epoch=2)
    rows = _rows(path)
    assert "val_dice_3" in rows[0] and rows[0]["loss"] == "0.5"


def _events(logdir: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for events_file in logdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events_file)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_summaries_are_tensorboard_scalars_and_images(tmp_path: Path) -> None:
    summaries = Summaries(tmp_path)
    summaries.scalars(3, {"train/loss": 0.75})
    rgb = np.zeros((5, 9, 3), np.uint8)
    rgb[1, 2] = (230, 25, 75)
    summaries.image(3, "val/overlay", rgb)
    summaries.close()
    events = _events(tmp_path)
    ((step, loss),) = events["train/loss"]
    assert step == 3 and loss.metadata.plugin_data.plugin_name == "scalars"
    assert tf.make_ndarray(loss.tensor) == pytest.approx(0.75)
    ((_, image),) = events["val/overlay"]
    assert image.metadata.plugin_data.plugin_name == "images"
    width, height, png = tf.make_ndarray(image.tensor)
    assert (int(width), int(height)) == (9, 5)
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), rgb)


def test_tensorboard_reads_the_summaries(tmp_path: Path) -> None:
    # The loader TensorBoard's own dashboards use.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    summaries = Summaries(tmp_path)
    summaries.scalars(2, {"val/dice": 0.5, "train/learning_rate": 0.01})
    summaries.scalars(4, {"val/dice": 0.625})
    summaries.image(4, "val/overlay", np.full((6, 7, 3), 200, np.uint8))
    summaries.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["tensors"]) == ["train/learning_rate", "val/dice", "val/overlay"]
    dice = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors("val/dice")]
    assert dice == [(2, 0.5), (4, 0.625)]
    assert events.SummaryMetadata("val/dice").plugin_data.plugin_name == "scalars"
    (image,) = events.Tensors("val/overlay")
    width, height, png = tf.make_ndarray(image.tensor_proto)
    assert (image.step, int(width), int(height)) == (4, 7, 6)
    assert (tf.io.decode_png(png).numpy() == 200).all()
    assert events.SummaryMetadata("val/overlay").plugin_data.plugin_name == "images"


def test_summaries_without_tensorboard_write_nothing_and_say_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "tensorboard_installed", lambda: False)
    with caplog.at_level(logging.INFO, logger="segnet"):
        summaries = Summaries(tmp_path / "logs")
    summaries.scalars(1, {"train/loss": 0.5})
    summaries.image(1, "val/overlay", np.zeros((2, 2, 3), np.uint8))
    summaries.close()
    assert not (tmp_path / "logs").exists()
    assert "pip install" in caplog.text and "tensorboard" in caplog.text


def test_reporter_without_run_dir_writes_nothing(tmp_path: Path) -> None:
    reporter = Reporter(None, num_classes=2, first_epoch=0, log_every=1, show_bars=False)
    stats = reporter.start_epoch(0, 1, 1, 0)
    stats.add(0.1, np.zeros((2, 3)), 0.0, 0.1)
    reporter.step(1, stats, {"train/loss": 0.1})
    reporter.end_epoch(0, 1, 1, stats, None, 0.01)
    reporter.close()
    assert not any(tmp_path.iterdir())


def test_overlay_panel_colours_only_labelled_pixels() -> None:
    image = np.linspace(0, 1, 6 * 7).reshape(6, 7)
    label = np.zeros((6, 7), int)
    label[1, 2] = 1
    prediction = np.zeros((6, 7), int)
    prediction[4, 5] = 2
    panel = overlay_panel(image, label, prediction)
    assert panel.shape == (6, 21, 3) and panel.dtype == np.uint8
    plain, truth, predicted = panel[:, :7], panel[:, 7:14], panel[:, 14:]
    changed_truth = np.argwhere((truth != plain).any(-1))
    changed_prediction = np.argwhere((predicted != plain).any(-1))
    assert changed_truth.tolist() == [[1, 2]]
    assert changed_prediction.tolist() == [[4, 5]]
    assert not np.array_equal(truth[1, 2], predicted[4, 5])  # classes get different colours


# ---------------------------------------------------------------------------------------------
# progress.png
# ---------------------------------------------------------------------------------------------
def _row(epoch: int, validated: bool = True, **cells: str) -> dict[str, str]:
    row = {
        "epoch": str(epoch),
        "step": str(10 * epoch),
        "loss": f"{1 / epoch:.4f}",
        "train_dice": "0.5",
        "learning_rate": f"{0.01 / epoch:.6g}",
        "steps_per_s": "3.5",
        "data_wait": "0.01",
        "seconds": "4",
        "val_dice": "",
        "val_dice_1": "",
        "val_dice_2": "",
    }
    if validated:
        row.update(val_dice=f"{0.5 + epoch / 20:.4f}", val_dice_1="0.6", val_dice_2="0.4")
    row.update(cells)
    return row


def _decode(png: bytes) -> np.ndarray:
    return tf.io.decode_png(png, channels=3).numpy()


def _pixels_of(picture: np.ndarray, colour: np.ndarray) -> int:
    return int((picture == colour).all(axis=-1).sum())


def test_progress_png_draws_each_class_in_its_colour() -> None:
    rows = [_row(epoch) for epoch in range(1, 6)]
    picture = _decode(progress_plot.progress_png(rows, "run", {1: "liver", 2: "tumour"}))
    assert picture.shape == (progress_plot.HEIGHT, progress_plot.WIDTH, 3)
    assert _pixels_of(picture, PALETTE[0]) > 20 and _pixels_of(picture, PALETTE[1]) > 20
    assert _pixels_of(picture, PALETTE[2]) == 0  # no class 3 column


def test_progress_png_of_a_resumed_csv_with_gaps_and_odd_cells() -> None:
    # Rows as csv.DictReader gives them for a file whose first rows were written by an older
    # version: a class column missing there (None), empty and NaN cells, a broken number.
    old = [{k: v for k, v in _row(e).items() if k != "val_dice_2"} for e in (1, 2)]
    old[0]["val_dice_2"] = None  # type: ignore[assignment]
    rows = [
        *old,
        _row(3, validated=False),  # val_every 2: no validation this epoch
        _row(4, loss="nan", steps_per_s="", learning_rate="1e-3x"),
        _row(5, val_dice_3="0.7"),
    ]
    picture = _decode(progress_plot.progress_png(rows, "resumed"))
    assert picture.shape == (progress_plot.HEIGHT, progress_plot.WIDTH, 3)
    assert _pixels_of(picture, PALETTE[2]) > 0  # class 3, in the last row only
    assert math.isnan(progress_plot.column(rows, "loss")[3])
    assert math.isnan(progress_plot.column(rows, "learning_rate")[3])
    assert np.isnan(progress_plot.column(rows, "val_dice_2")[:3]).all()


@pytest.mark.parametrize("rows", [[], [_row(1, validated=False), _row(2, validated=False)]])
def test_progress_png_without_validation(rows: list[dict[str, str]]) -> None:
    picture = _decode(progress_plot.progress_png(rows, "no validation", {1: "liver"}))
    assert picture.shape == (progress_plot.HEIGHT, progress_plot.WIDTH, 3)
    assert _pixels_of(picture, PALETTE[0]) == 0  # no Dice curve


def _end_epochs(reporter: Reporter, epochs: range, validation: dict[str, float] | None) -> None:
    for epoch in epochs:
        stats = reporter.start_epoch(epoch, 4, 1, 0)
        stats.add(0.5, np.zeros((3, 3)), 0.0, 0.1)
        reporter.end_epoch(epoch, 4, epoch + 1, stats, validation, 0.01)
    reporter.close()


def test_reporter_redraws_progress_png_from_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validation = {"val_dice": 0.5, "val_dice_1": 0.4, "val_dice_2": 0.6}
    _end_epochs(Reporter(tmp_path, 3, 0, 1, False), range(2), validation)
    first = _decode((tmp_path / "progress.png").read_bytes())
    assert first.shape == (progress_plot.HEIGHT, progress_plot.WIDTH, 3)
    drawn: list[tuple[list[str], str]] = []

    def record(rows: list[dict[str, str]], title: str, names: object) -> bytes:
        drawn.append(([row["epoch"] for row in rows], title))
        return b"png"

    monkeypatch.setattr(progress, "progress_png", record)
    _end_epochs(Reporter(tmp_path, 3, 2, 1, False), range(2, 4), None)  # resumed, no validation
    assert drawn == [(["1", "2", "3"], tmp_path.name), (["1", "2", "3", "4"], tmp_path.name)]
    assert (tmp_path / "progress.png").read_bytes() == b"png"


def test_a_failing_plot_is_a_warning_not_a_stopped_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> bytes:
        raise ValueError("odd rows")

    monkeypatch.setattr(progress, "progress_png", broken)
    with caplog.at_level(logging.WARNING, logger="segnet"):
        _end_epochs(Reporter(tmp_path, 3, 0, 1, False), range(1), None)
    assert "progress.png not updated" in caplog.text and "odd rows" in caplog.text
    assert (tmp_path / "metrics.csv").is_file() and not (tmp_path / "progress.png").exists()
