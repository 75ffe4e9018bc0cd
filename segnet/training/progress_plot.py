"""``progress.png``: the curves of a run, redrawn from ``metrics.csv`` after every epoch.

Four panels against the optimizer step, the ones nnU-Net users look at first: the training
loss, the learning rate, the validation Dice of each class with their mean (the score that
picks ``checkpoints/best``, its best value marked), and steps per second. The plot is drawn
from every row of ``metrics.csv``, so a resumed run's plot covers the whole run, and it reads
the file as it is: cells a run of an older version left empty, or epochs without validation,
are gaps, not errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from segnet.visuals import class_colour, class_name, render_png

WIDTH, HEIGHT = 1200, 800  # pixels
_VAL_CLASS = re.compile(r"val_dice_(\d+)")

Row = Mapping[str, "str | None"]  # a csv.DictReader row: a short row has None cells


def progress_png(
    rows: Sequence[Row], title: str, class_names: Mapping[int, str] | None = None
) -> bytes:
    """The four panels of the rows of ``metrics.csv``, as PNG bytes (``WIDTH`` x ``HEIGHT``).

    Args:
        rows: ``metrics.csv`` rows (strings; empty, missing or unreadable cells are gaps).
        title: the run's name, the first words of the title.
        class_names: label -> class name, for the Dice legend; unnamed classes show their number.
    """
    steps = column(rows, "step")

    def draw(figure: Figure) -> None:
        (loss, rate), (dice, speed) = figure.subplots(2, 2, sharex=True)
        figure.subplots_adjust(left=0.07, right=0.98, top=0.91, bottom=0.07, hspace=0.2)
        figure.suptitle(_title(rows, title), fontsize=13)
        _series(loss, steps, column(rows, "loss"), "training loss (epoch mean)", "tab:blue")
        _series(rate, steps, column(rows, "learning_rate"), "learning rate", "tab:orange")
        _dice_panel(dice, steps, rows, class_names)
        _series(speed, steps, column(rows, "steps_per_s"), "steps per second", "tab:purple")
        for axes in (dice, speed):
            axes.set_xlabel("optimizer step")

    return render_png(WIDTH, HEIGHT, draw)


def column(rows: Sequence[Row], name: str) -> np.ndarray:
    """The float values of column ``name``; NaN where a cell is empty, missing or not a number."""
    return np.array([_number(row.get(name)) for row in rows], dtype=np.float64)


def _number(cell: str | None) -> float:
    try:
        return float(cell) if cell else math.nan
    except ValueError:
        return math.nan


def _title(rows: Sequence[Row], name: str) -> str:
    if not rows:
        return name
    last = rows[-1]
    text = f"{name}: epoch {last.get('epoch') or '?'}, step {last.get('step') or '?'}"
    scores = column(rows, "val_dice")
    if np.isfinite(scores).any():
        best = int(np.nanargmax(scores))
        text += f"; best validation Dice {scores[best]:.4f} (epoch {rows[best].get('epoch')})"
    return text


def _panel(axes: Axes, title: str) -> None:
    axes.set_title(title, fontsize=10, loc="left")
    axes.grid(alpha=0.3)


def _curve(axes: Axes, x: np.ndarray, y: np.ndarray, **style: Any) -> bool:
    """Draws the finite points of ``y`` against ``x``; returns whether there were any."""
    finite = np.isfinite(x) & np.isfinite(y)
    # Gaps (epochs without validation, empty cells) are skipped, not drawn as breaks.
    if finite.any():
        axes.plot(x[finite], y[finite], marker="o", markersize=3, **style)
    return bool(finite.any())


def _note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", color="grey")


def _series(axes: Axes, x: np.ndarray, y: np.ndarray, title: str, colour: str) -> None:
    _panel(axes, title)
    if not _curve(axes, x, y, color=colour, linewidth=1.5):
        _note(axes, "no values yet")


def _dice_panel(
    axes: Axes, steps: np.ndarray, rows: Sequence[Row], names: Mapping[int, str] | None
) -> None:
    _panel(axes, "validation Dice per class, and their mean")
    mean = column(rows, "val_dice")
    if not np.isfinite(mean).any():
        _note(axes, "no validation yet (train.val_every: 0 turns it off)")
        return
    classes = sorted({int(m[1]) for key in _keys(rows) if (m := _VAL_CLASS.fullmatch(key))})
    for c in classes:
        colour, label = class_colour(c), class_name(c, names)
        _curve(axes, steps, column(rows, f"val_dice_{c}"), color=colour, linewidth=1.2, label=label)
    _curve(axes, steps, mean, color="black", linewidth=2.5, label="mean", zorder=3)
    best = int(np.nanargmax(mean))
    axes.plot(steps[best], mean[best], marker="*", markersize=14, color="black", label="best")
    axes.set_ylim(-0.02, 1.02)
    # "best" keeps the legend off the curves (they rise from 0 and level off at varied heights).
    axes.legend(loc="best", fontsize=8, ncol=max(1, math.ceil((len(classes) + 2) / 8)))


def _keys(rows: Sequence[Row]) -> set[str]:
    return {key for row in rows for key in row if isinstance(key, str)}
