"""What the user sees of a training run: bars, the epoch log line, metrics.csv, plots, TensorBoard.

* A tqdm bar per epoch with the running loss, the running Dice of the training patches,
  steps per second and the share of each step spent waiting for data. Hidden with ``--quiet``
  or when stderr is not a terminal (a log file gets the epoch lines only).
* One log line per epoch (the ``segnet`` logger), also the line a non-interactive run prints.
* ``metrics.csv``: one row per epoch. On resume the rows of epochs that will be trained again
  are dropped first, so the file never holds an epoch twice, and a file with other columns (a
  run of an older version) is rewritten with the current ones, old cells kept.
* ``progress.png``: loss, learning rate, validation Dice per class and step rate against the
  step, redrawn from metrics.csv after every epoch (``segnet.training.progress_plot``).
* TensorBoard in ``<run_dir>/logs``: training loss, learning rate, gradient norm, validation
  Dice per class, and an image of one validation slice with ground-truth and prediction
  overlays. Written with ``tf.summary``, whose scalar and image writers come with the
  ``tensorboard`` package; without it the logs are skipped, and the log says how to get them.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from segnet.console import progress_bar
from segnet.files import atomic_write_bytes, atomic_write_text
from segnet.run_dir import RunLayout
from segnet.training.progress_plot import progress_png
from segnet.visuals import overlay_strip, to_grey

log = logging.getLogger("segnet")


# ---------------------------------------------------------------------------------------------
# Running statistics of an epoch
# ---------------------------------------------------------------------------------------------
@dataclass
class EpochStats:
    """Loss, hard Dice counts and timing accumulated over the steps of one epoch.

    ``counts`` is (num_classes, 3) true positives, false positives and false negatives of the
    argmax of the training logits, summed over the epoch's steps.
    """

    num_classes: int
    steps: int = 0
    loss_sum: float = 0.0
    wait_seconds: float = 0.0
    step_seconds: float = 0.0
    counts: np.ndarray = field(init=False)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.num_classes, 3), np.float64)

    def add(
        self, loss: float, counts: np.ndarray, wait_seconds: float, step_seconds: float
    ) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.counts += counts
        self.wait_seconds += wait_seconds
        self.step_seconds += step_seconds

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def dice(self) -> float:
        """Mean over foreground classes of the Dice pooled over the epoch's patches."""
        tp, fp, fn = self.counts[1:].T
        denominator = 2 * tp + fp + fn
        per_class = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
        return float(per_class.mean()) if len(per_class) else float("nan")

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def data_wait(self) -> float:
        """Share of the step time spent blocked on the input pipeline, in [0, 1]."""
        return self.wait_seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class EpochBar:
    """The tqdm bar of one epoch (a no-op when hidden)."""

    def __init__(self, epoch: int, epochs: int, steps: int, done: int, show: bool) -> None:
        self._bar = progress_bar(
            total=steps,
            initial=done,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            leave=False,
            quiet=not show,
        )

    def update(self, stats: EpochStats) -> None:
        # tqdm shows steps per second itself, from wall time between updates.
        self._bar.set_postfix_str(
            f"loss {stats.loss:.4f} dice {stats.dice:.3f} data wait {stats.data_wait:.0%}",
            refresh=False,
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def epoch_line(
    epoch: int, epochs: int, step: int, stats: EpochStats, validation: dict[str, float] | None
) -> str:
    """The one-line summary of an epoch for the log."""
    text = (
        f"epoch {epoch + 1}/{epochs} step {step}: loss {stats.loss:.4f}, train dice "
        f"{stats.dice:.3f}, {stats.steps_per_second:.2f} steps/s, data wait "
        f"{stats.data_wait:.0%}, {stats.elapsed:.0f} s"
    )
    if validation:
        per_class = ", ".join(
            f"{k.removeprefix('val_dice_')}: {v:.3f}"
            for k, v in validation.items()
            if k.startswith("val_dice_")
        )
        text += f"; val dice {validation['val_dice']:.3f} ({per_class})"
        if validation.get("val_excluded_empty"):
            left_out = validation["val_excluded_empty"]
            text += f", {left_out:.0f} (case, class) pairs left out as empty in both masks"
    return text


# ---------------------------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------------------------
class MetricsCsv:
    """``metrics.csv``: one row per epoch (1-based), appended as epochs finish.

    Args:
        path: the file.
        num_classes: classes, background included; one validation column per foreground class.
        first_epoch: the 1-based epoch the run is about to write; rows from it on are dropped
            (they belong to the epochs a resumed run trains again).
    """

    def __init__(self, path: Path, num_classes: int, first_epoch: int) -> None:
        self.path = path
        self.columns = [
            "epoch",
            "step",
            "loss",
            "train_dice",
            "val_dice",
            *(f"val_dice_{c}" for c in range(1, num_classes)),
            "val_excluded_empty",
            "learning_rate",
            "steps_per_s",
            "data_wait",
            "seconds",
        ]
        self._truncate(first_epoch)

    def _truncate(self, first_epoch: int) -> None:
        rows = self.rows()
        kept = [row for row in rows if _epoch_of(row) < first_epoch]
        if rows and len(kept) == len(rows) and self._header_matches():
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buffer.getvalue())

    def rows(self) -> list[dict[str, str]]:
        """The rows in the file, as strings (none when there is no file)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def _header_matches(self) -> bool:
        with self.path.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), []) == self.columns

    def append(self, row: dict[str, Any]) -> None:
        """Appends one epoch's row; missing columns stay empty."""
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, self.columns, restval="", extrasaction="ignore").writerow(
                {k: _format(v) for k, v in row.items()}
            )


def _epoch_of(row: dict[str, str]) -> int:
    try:
        return int(row.get("epoch") or 0)
    except ValueError:
        return 0


def _format(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------
class Summaries:
    """TensorBoard event files in ``logdir``, written with ``tf.summary``.

    A no-op when ``logdir`` is None (a non-chief worker) or when the ``tensorboard`` package
    is missing: TensorFlow's ``tf.summary.scalar`` and ``tf.summary.image`` are implemented
    there, and without it the logs could not be viewed either.
    """

    def __init__(self, logdir: Path | None) -> None:
        self._writer = None
        if logdir is not None and tensorboard_installed():
            self._writer = tf.summary.create_file_writer(str(logdir))
        elif logdir is not None:
            log.info(
                "TensorBoard logs are off: the tensorboard package is not installed (pip "
                'install tensorboard, or pip install -e ".[tensorboard]"); metrics.csv and '
                "progress.png are written as usual"
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def image(self, step: int, name: str, rgb: np.ndarray) -> None:
        """``rgb``: uint8 (height, width, 3)."""
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            tf.summary.image(name, rgb[np.newaxis])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package, which implements ``tf.summary.scalar``, is there."""
    return importlib.util.find_spec("tensorboard") is not None


def overlay_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Image | ground-truth overlay | prediction overlay, side by side.

    Args:
        image: float (height, width), any range (scaled to its 0.5th-99.5th percentile).
        label: int (height, width) ground truth.
        prediction: int (height, width).

    Returns:
        uint8 (height, 3 * width, 3).
    """
    return overlay_strip(to_grey(image), [None, label, prediction])


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------
class Reporter:
    """Bars, log lines, metrics.csv, progress.png and TensorBoard for one run.

    Args:
        run_dir: the run directory, or None on a worker that must not write it.
        num_classes: classes, background included.
        first_epoch: the 0-based epoch the run starts (or resumes) in.
        log_every: TensorBoard cadence of the per-step scalars, in steps.
        show_bars: whether tqdm bars are drawn (see :func:`is_interactive`).
        class_names: label -> class name (``dataset.json``), for the plot's legend.
    """

    def __init__(
        self,
        run_dir: Path | None,
        num_classes: int,
        first_epoch: int,
        log_every: int,
        show_bars: bool,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        self.class_names = class_names
        self.num_classes = num_classes
        self.log_every = log_every
        self.show_bars = show_bars
        layout = RunLayout(run_dir) if run_dir else None
        self.progress_path = layout.progress_png if layout else None
        self.csv = MetricsCsv(layout.metrics_csv, num_classes, first_epoch + 1) if layout else None
        self.summaries = Summaries(layout.logs if layout else None)
        self._bar: EpochBar | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> EpochStats:
        self._bar = EpochBar(epoch, epochs, steps, done, self.show_bars)
        return EpochStats(self.num_classes)

    def step(self, step: int, stats: EpochStats, scalars: dict[str, float]) -> None:
        """After each step: the bar, and every ``log_every`` steps the TensorBoard scalars."""
        if self._bar is not None:
            self._bar.update(stats)
        if step % self.log_every == 0:
            self.summaries.scalars(step, scalars)

    def end_epoch(
        self,
        epoch: int,
        epochs: int,
        step: int,
        stats: EpochStats,
        validation: dict[str, float] | None,
        learning_rate: float,
    ) -> None:
        """The epoch's log line, its metrics.csv row, progress.png and TensorBoard scalars."""
        self.close_bar()
        log.info(epoch_line(epoch, epochs, step, stats, validation))
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "loss": stats.loss,
            "train_dice": stats.dice,
            "learning_rate": learning_rate,
            "steps_per_s": stats.steps_per_second,
            "data_wait": stats.data_wait,
            "seconds": stats.elapsed,
            **(validation or {}),
        }
        if self.csv is not None and self.progress_path is not None:
            self.csv.append(row)
            self._write_progress(self.csv, self.progress_path)
        scalars = {"epoch/loss": stats.loss, "epoch/train_dice": stats.dice}
        scalars["epoch/data_wait"] = stats.data_wait
        scalars.update({f"val/{k.removeprefix('val_')}": v for k, v in (validation or {}).items()})
        self.summaries.scalars(step, scalars)
        self.summaries.flush()

    def _write_progress(self, metrics: MetricsCsv, path: Path) -> None:
        """Redraws progress.png from every row of metrics.csv (those of earlier sessions too)."""
        try:
            png = progress_png(metrics.rows(), metrics.path.parent.name, self.class_names)
        except Exception as exc:  # a picture must never stop a long run; the csv has it all
            log.warning("%s not updated: %s: %s", path, type(exc).__name__, exc)
            return
        atomic_write_bytes(path, png, fsync=False)  # cheap to redraw: no fsync

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        self.summaries.close()
