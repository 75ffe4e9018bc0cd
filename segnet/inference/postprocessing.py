"""Label-map clean-ups applied after the argmax of the probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

from segnet.metrics import dice  # the metrics' own Dice: the numbers evaluation reports

BACKGROUND = 0
# Neighbours that join two voxels into one component -> scipy's connectivity rank: 6 share a
# face, 18 a face or an edge, 26 a face, an edge or a corner.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def keep_largest_component(
    labels: np.ndarray,
    classes: Sequence[int] | None = None,
    connectivity: Literal[6, 18, 26] = 26,
) -> np.ndarray:
    """Keeps only the largest connected component of each foreground class.

    Each class is treated on its own (a class's components are separated by any other label),
    so a class never changes another's voxels; the removed voxels become background (0).
    26-connectivity is the default, as in nnU-Net's post-processing: voxels touching at a corner
    belong to one structure, so thin oblique structures are not cut into pieces. Where two
    components tie for largest, the one found first in C order is kept.

    Args:
        labels: (depth, height, width) integer label map.
        classes: the classes to clean; None means every foreground label present.
        connectivity: 6, 18 or 26 neighbours.

    Returns:
        A new label map of the same shape and dtype.

    Raises:
        ValueError: for a non-3D or non-integer label map or an unknown connectivity.
    """
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 3D integer label map, got shape {labels.shape} and dtype "
            f"{labels.dtype}; take the argmax of probabilities first"
        )
    structure = _structure(connectivity)
    targets = np.unique(labels) if classes is None else np.asarray(classes)
    cleaned = labels.copy()
    for label in targets[targets != BACKGROUND]:
        cleaned[_outside_largest(labels == label, structure)] = BACKGROUND
    return cleaned


def pieces_per_class(labels: np.ndarray, connectivity: Literal[6, 18, 26] = 26) -> dict[int, int]:
    """How many connected pieces each foreground class present in ``labels`` forms.

    The same connectivity as :func:`keep_largest_component`, so a class in one piece here is a
    class that post-processing leaves untouched in a perfect prediction. Each class is labelled
    within its own bounding box, which keeps this cheap on large volumes.

    Args:
        labels: (depth, height, width) integer label map.
        connectivity: 6, 18 or 26 neighbours.

    Returns:
        ``{class: pieces}`` for every foreground class present.
    """
    structure = _structure(connectivity)
    boxes = ndimage.find_objects(np.asarray(labels, np.int64).clip(0))
    return {
        label: ndimage.label(labels[box] == label, structure=structure)[1]
        for label, box in enumerate(boxes, start=1)
        if box is not None
    }


def _structure(connectivity: int) -> np.ndarray:
    """scipy's neighbourhood for 6, 18 or 26 neighbours."""
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])


def _outside_largest(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` outside its largest connected component."""
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # component 0 is everything outside the mask
    return mask & (components != np.argmax(sizes))


def choose_largest_component_classes(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> dict[int, dict[str, float | int | bool]]:
    """For each foreground class, whether keeping only its largest component helps, measured.

    Chosen on validation predictions (the out-of-fold predictions of a cross-validation), never
    on test data. Classes are independent here: removing a class's stray components turns
    them into background, which changes no other class's Dice.

    Args:
        cases: ``(prediction, reference)`` label maps of the same shape, one pair per case.
        num_classes: labels are ``0..num_classes-1``.

    Returns:
        ``{class: {"dice_without", "dice_with", "cases", "chosen"}}``: the mean Dice over the
        cases where the class is in the prediction or the reference (pairs empty in both are
        left out, as in ``segnet.metrics.summarize``), and ``chosen`` when it strictly improves.
    """
    choice: dict[int, dict[str, float | int | bool]] = {}
    for label in range(1, num_classes):
        without, with_ = [], []
        for prediction, reference in cases:
            predicted, expected = prediction == label, reference == label
            if not predicted.any() and not expected.any():
                continue
            without.append(dice(predicted, expected))
            cleaned = keep_largest_component(prediction, [label]) == label
            with_.append(dice(cleaned, expected))
        before = float(np.mean(without)) if without else 0.0
        after = float(np.mean(with_)) if with_ else 0.0
        choice[label] = {
            "dice_without": before,
            "dice_with": after,
            "cases": len(without),
            "chosen": bool(without) and after > before,
        }
    return choice
