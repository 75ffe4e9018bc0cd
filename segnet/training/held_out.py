"""Held-out Dice during training: whole volumes, sliding-window inference, per-class Dice.

Patches flatter a model (they are drawn near the foreground); whole volumes are what
evaluation and users see, so validation predicts every held-out case completely with the same
sliding window as inference (``config.window``, ``evaluation.overlap``, weighting, batch
size). Test-time mirroring is left to evaluation: it multiplies the cost by up to 8 for a
small gain, and validation only has to rank checkpoints.

A class in neither the label nor the prediction of a case would score Dice 1 there and reward
the model for a class that does not exist, so such (case, class) pairs are left out of the
score, as in evaluation (``segnet.metrics.summarize``) and nnU-Net.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segnet import metrics
from segnet.config import ExperimentConfig
from segnet.data.case import PreprocessedCase
from segnet.inference.sliding_window import configured_sliding_window, probabilities_to_labels


@dataclass(frozen=True)
class ValidationResult:
    """Dice of the held-out cases, without the (case, class) pairs where both masks are empty.

    Attributes:
        per_case: case id -> {foreground class -> Dice}, for the classes in the case's label
            or prediction.
        per_class: foreground class -> mean Dice over the cases that hold it (``per_case``);
            a class no case holds is missing.
        mean: mean of ``per_class``, the score that picks the best checkpoint; 0.0, the
            lowest Dice, when ``per_class`` is empty, so nothing is rewarded.
        excluded_empty: the (case, foreground class) pairs left out, both masks empty.
        example: (image, label, prediction) of one axial slice of the first case, the slice
            with the most foreground, for the TensorBoard overlay; each (height, width).
        seconds: wall time of the validation.
    """

    per_case: dict[str, dict[int, float]]
    per_class: dict[int, float]
    mean: float
    example: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    seconds: float
    excluded_empty: int

    def as_row(self) -> dict[str, float]:
        """``{"val_dice": mean, "val_dice_1": ..., ..., "val_excluded_empty": n}`` for
        metrics.csv and TensorBoard."""
        row = {"val_dice": self.mean}
        row.update({f"val_dice_{c}": d for c, d in self.per_class.items()})
        row["val_excluded_empty"] = self.excluded_empty
        return row


def validate(
    predict_fn: Callable[[Any], Any],
    cases: Sequence[PreprocessedCase],
    config: ExperimentConfig,
    spatial_dims: int = 3,
) -> ValidationResult:
    """Predicts each case whole and scores it.

    Args:
        predict_fn: from :func:`make_predict_fn`; keep one per model, since sliding-window
            inference caches its compiled graph per function.
        cases: the held-out cases used for validation, each with a label.
        config: reads ``window``, ``evaluation`` and ``data.num_classes``.
        spatial_dims: 2 for a model that predicts axial slices (batched a window's depth of
            slices at a time), else 3.

    Returns:
        The per-case and per-class Dice, without the pairs where both masks are empty.
    """
    started = time.perf_counter()
    classes = range(1, config.data.num_classes)
    per_case: dict[str, dict[int, float]] = {}
    example = None
    for case in cases:
        label = np.asarray(case.load_label())
        prediction = predict_case(predict_fn, case, config, spatial_dims)
        per_case[case.case_id] = present_class_dice(prediction, label, classes)
        if example is None:
            example = _example_slice(np.asarray(case.load_image()), label, prediction)
    held = {c: [scores[c] for scores in per_case.values() if c in scores] for c in classes}
    per_class = {c: float(np.mean(dice)) for c, dice in held.items() if dice}
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    excluded = len(per_case) * len(classes) - sum(len(scores) for scores in per_case.values())
    seconds = time.perf_counter() - started
    return ValidationResult(per_case, per_class, mean, example, seconds, excluded)


def present_class_dice(
    prediction: np.ndarray, label: np.ndarray, classes: Sequence[int]
) -> dict[int, float]:
    """Dice of each of ``classes`` found in ``prediction`` or ``label`` (same shape)."""
    dice = {}
    for c in classes:
        tp, fp, fn = metrics.confusion_counts(prediction == c, label == c)
        if tp + fp + fn:
            dice[c] = metrics.dice_from_counts(tp, fp, fn)
    return dice


def predict_case(
    predict_fn: Callable[[Any], Any],
    case: PreprocessedCase,
    config: ExperimentConfig,
    spatial_dims: int = 3,
) -> np.ndarray:
    """uint8 (depth, height, width) labels of one whole case by sliding-window inference."""
    probabilities = configured_sliding_window(
        np.asarray(case.load_image()), predict_fn, config, spatial_dims=spatial_dims, mirror=False
    )
    return probabilities_to_labels(probabilities)


def _example_slice(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    depth = int(np.argmax((label > 0).sum(axis=(1, 2))))
    return image[depth, ..., 0], label[depth], prediction[depth]
