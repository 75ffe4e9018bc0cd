"""Per-class segmentation metrics in millimetres: overlap, surface distance and volume.

numpy and scipy only, so evaluation runs without TensorFlow. Inputs are integer label maps of
shape (depth, height, width), or (height, width) for 2D, on one grid whose voxel spacing in mm
is given in the same axis order: (sz, sy, sx), or (sy, sx).

Definitions, for one class with A the predicted mask and B the reference mask:

* Dice = 2|A∩B| / (|A| + |B|); IoU (Jaccard) = |A∩B| / |A∪B|.
* Surface S(X): the voxels of X with at least one face neighbour (6-connected in 3D,
  4-connected in 2D) outside X or outside the image. The image border counts as outside, so a
  mask that touches it is closed there.
* d(x, Y): Euclidean distance in mm from the centre of voxel x to the nearest voxel of S(Y),
  computed with ``scipy.ndimage.distance_transform_edt(~S(Y), sampling=spacing)``.
* HD95 = max(P95{d(a, B) : a in S(A)}, P95{d(b, A) : b in S(B)}): the 95th percentile of each
  directed set (numpy's linear interpolation), then the larger of the two. This is the MONAI /
  medpy convention, not the 95th percentile of the pooled distances.
* ASSD = (sum d(a, B) + sum d(b, A)) / (|S(A)| + |S(B)|).
* NSD(tau) = (|{a : d(a, B) <= tau}| + |{b : d(b, A) <= tau}|) / (|S(A)| + |S(B)|).
* Volume difference = vol(A) - vol(B) in mm^3 (mm^2 for 2D input), and relative to vol(B) in %.

Empty masks (``EDGE_CASE_POLICY`` holds the same policy as text) never give NaN:

* both empty: Dice = IoU = NSD = 1, HD95 = ASSD = 0 mm, volume difference 0 mm^3 and 0 %;
* one empty: Dice = IoU = NSD = 0, HD95 = ASSD = image diagonal in mm,
  sqrt(sum((shape * spacing)**2)); relative volume difference -100 % for a missed structure
  and, as its mirror, +100 % for a structure predicted where the reference has none.

A (case, class) pair with both masks empty keeps those values per case (``both_empty`` marks
it), but ``summarize`` leaves it out of every statistic, as nnU-Net does: a perfect score for a
class that is in neither mask would reward a model for classes that do not exist. Each class's
summary counts the pairs it used and the pairs it left out; a class with no pair left has no
statistics (None, ``null`` in JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

EDGE_CASE_POLICY = (
    "Both masks empty: Dice 1, IoU 1, HD95 0 mm, ASSD 0 mm, NSD 1, volume difference 0 mm^3 "
    "and 0 %. Exactly one mask empty: Dice 0, IoU 0, NSD 0, and HD95 = ASSD = the image "
    "diagonal in mm, sqrt(sum((shape * spacing)**2)), more than any distance inside the image. "
    "Reference empty, prediction not: relative volume difference +100 % (the mirror of a "
    "missed structure's -100 %); volume_diff_mm3 carries the size. No metric is ever NaN. "
    "Pairs (case, class) with both masks empty keep these values per case (both_empty: true) "
    "but are left out of every summary statistic, as nnU-Net does; each class's summary counts "
    "them as excluded_empty, and a class with no counted pair has null statistics."
)
DEFAULT_NSD_TOLERANCE_MM = 1.0
BACKGROUND = 0
# Population std (ddof=0), numpy's default.
_REDUCERS: dict[str, Callable[[np.ndarray], Any]] = {
    "mean": np.mean,
    "median": np.median,
    "std": np.std,
    "min": np.min,
    "max": np.max,
}
SUMMARY_STATISTICS = tuple(_REDUCERS)

# Cropping to the joint bounding box never changes a result: every surface voxel lies inside
# it, so the distance transform finds the same nearest ones, and the crop's faces count as
# "outside" just as the image border does. With one voxel of margin, a crop face holds mask
# voxels only where it is the true image border, so the rule is decided by the image border
# alone and does not rest on the box being tight.
_CROP_MARGIN = 1


@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class in one case (A = prediction, B = reference).

    Attributes:
        dice: 2|A∩B| / (|A| + |B|).
        iou: |A∩B| / |A∪B| (Jaccard index).
        hd95_mm: max of the two directed 95th-percentile surface distances, in mm.
        assd_mm: average symmetric surface distance, in mm.
        nsd: normalised surface Dice at the tolerance the metrics were computed with.
        volume_diff_mm3: vol(A) - vol(B) (mm^2 for 2D input).
        volume_diff_percent: 100 * (vol(A) - vol(B)) / vol(B); see ``EDGE_CASE_POLICY``.
        tp: voxels in A and B.
        fp: voxels in A only.
        fn: voxels in B only.
        pred_volume_mm3: vol(A).
        ref_volume_mm3: vol(B).
    """

    dice: float
    iou: float
    hd95_mm: float
    assd_mm: float
    nsd: float
    volume_diff_mm3: float
    volume_diff_percent: float
    tp: int
    fp: int
    fn: int
    pred_volume_mm3: float
    ref_volume_mm3: float

    @property
    def both_empty(self) -> bool:
        """Neither mask holds the class: the pair is left out of ``summarize``'s statistics."""
        return self.tp + self.fp + self.fn == 0

    @classmethod
    def keys(cls) -> list[str]:
        """The keys of ``as_dict``, in its order."""
        return [*_metric_names(), "both_empty"]

    def as_dict(self) -> dict[str, float | int | bool]:
        """The fields by name and ``both_empty``, ready for a CSV row or JSON."""
        return {**dataclasses.asdict(self), "both_empty": self.both_empty}


# --- Overlap ------------------------------------------------------------------------------


def confusion_counts(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[int, int, int]:
    """Counts true positives, false positives and false negatives of two binary masks.

    Args:
        pred_mask: Boolean mask of any shape.
        ref_mask: Boolean mask of the same shape.

    Returns:
        ``(tp, fp, fn)`` voxel counts.
    """
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    tp = int(np.count_nonzero(pred_mask & ref_mask))
    return tp, int(np.count_nonzero(pred_mask)) - tp, int(np.count_nonzero(ref_mask)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice from voxel counts; 1.0 when both masks are empty (no NaN)."""
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else 1.0


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) from voxel counts; 1.0 when both masks are empty (no NaN)."""
    denominator = tp + fp + fn
    return tp / denominator if denominator else 1.0


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape; 1.0 if both are empty."""
    return dice_from_counts(*confusion_counts(pred_mask, ref_mask))


# --- Surfaces -----------------------------------------------------------------------------


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the image diagonal, ``sqrt(sum((shape * spacing)**2))``."""
    return float(np.sqrt(np.sum((np.asarray(shape) * np.asarray(spacing, float)) ** 2)))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask.

    Args:
        mask: Boolean mask, (depth, height, width) or (height, width).

    Returns:
        Boolean array of the same shape: voxels of ``mask`` with at least one face neighbour
        outside the mask or outside the image (the image border counts as outside).
    """
    mask = np.asarray(mask, bool)
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0 is what makes the image border count as outside the mask.
    return mask & ~ndimage.binary_erosion(mask, structure=faces, border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float], crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm between the surfaces of two non-empty binary masks.

    Args:
        a: Boolean mask, (depth, height, width) or (height, width).
        b: Boolean mask of the same shape.
        spacing: Voxel size in mm per axis, in the masks' axis order.
        crop: Work on the joint bounding box plus a one-voxel margin (same result, faster on
            large volumes). ``False`` exists to check that claim.

    Returns:
        ``(a_to_b, b_to_a)``: for each surface voxel of ``a`` (C order) the distance to the
        nearest surface voxel of ``b``, and the same from ``b`` to ``a``. Both 1D float64.

    Raises:
        ValueError: if either mask is empty (use ``surface_metrics``, which applies
            ``EDGE_CASE_POLICY``) or the shapes and spacing disagree.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    spacing = _check_geometry(a.shape, b.shape, spacing)
    if not a.any() or not b.any():
        raise ValueError(
            "surface_distances: both masks must be non-empty; surface_metrics() handles empty "
            "masks with EDGE_CASE_POLICY"
        )
    if crop:
        window = _joint_bounding_box(a | b, _CROP_MARGIN)
        a, b = a[window], b[window]
    surface_a, surface_b = surface_voxels(a), surface_voxels(b)
    a_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    b_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return a_to_b, b_to_a


def _joint_bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask grown by ``margin``, clipped to the image."""
    window = []
    for axis, size in enumerate(mask.shape):
        other_axes = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(mask.any(axis=other_axes))
        window.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, size)))
    return tuple(window)


def hd95(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    """Max of the two directed 95th percentiles (MONAI / medpy convention), in mm."""
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def assd(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    """Average symmetric surface distance: mean over both directed sets pooled, in mm."""
    return float((a_to_b.sum() + b_to_a.sum()) / (a_to_b.size + b_to_a.size))


def nsd(a_to_b: np.ndarray, b_to_a: np.ndarray, tolerance_mm: float) -> float:
    """Normalised surface Dice: share of both surfaces within ``tolerance_mm`` of the other."""
    within = np.count_nonzero(a_to_b <= tolerance_mm) + np.count_nonzero(b_to_a <= tolerance_mm)
    return float(within / (a_to_b.size + b_to_a.size))


def surface_metrics(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> tuple[float, float, float]:
    """HD95, ASSD and NSD of two binary masks, with ``EDGE_CASE_POLICY`` for empty ones.

    Args:
        pred_mask: Boolean mask, (depth, height, width) or (height, width).
        ref_mask: Boolean mask of the same shape.
        spacing: Voxel size in mm per axis.
        nsd_tolerance_mm: Distance up to which a surface voxel counts as matched for NSD.

    Returns:
        ``(hd95_mm, assd_mm, nsd)``.
    """
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    _check_geometry(pred_mask.shape, ref_mask.shape, spacing)
    pred_empty, ref_empty = not pred_mask.any(), not ref_mask.any()
    if pred_empty and ref_empty:
        return 0.0, 0.0, 1.0
    if pred_empty or ref_empty:
        diagonal = image_diagonal_mm(pred_mask.shape, spacing)
        return diagonal, diagonal, 0.0
    a_to_b, b_to_a = surface_distances(pred_mask, ref_mask, spacing)
    return hd95(a_to_b, b_to_a), assd(a_to_b, b_to_a), nsd(a_to_b, b_to_a, nsd_tolerance_mm)


# --- Per case -----------------------------------------------------------------------------


def class_metrics(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> ClassMetrics:
    """All metrics of one class from its two binary masks (see the module docstring).

    Args:
        pred_mask: Boolean mask, (depth, height, width) or (height, width).
        ref_mask: Boolean mask of the same shape.
        spacing: Voxel size in mm per axis.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        The class's ``ClassMetrics``.
    """
    spacing = _check_geometry(np.shape(pred_mask), np.shape(ref_mask), spacing)
    tp, fp, fn = confusion_counts(pred_mask, ref_mask)
    voxel_volume = float(np.prod(spacing))
    pred_volume, ref_volume = (tp + fp) * voxel_volume, (tp + fn) * voxel_volume
    hd, mean_distance, surface_dice = surface_metrics(
        pred_mask, ref_mask, spacing, nsd_tolerance_mm
    )
    return ClassMetrics(
        dice=dice_from_counts(tp, fp, fn),
        iou=iou_from_counts(tp, fp, fn),
        hd95_mm=hd,
        assd_mm=mean_distance,
        nsd=surface_dice,
        volume_diff_mm3=pred_volume - ref_volume,
        volume_diff_percent=_relative_difference_percent(pred_volume, ref_volume),
        tp=tp,
        fp=fp,
        fn=fn,
        pred_volume_mm3=pred_volume,
        ref_volume_mm3=ref_volume,
    )


def _relative_difference_percent(pred_volume: float, ref_volume: float) -> float:
    if ref_volume:
        return 100.0 * (pred_volume - ref_volume) / ref_volume
    return 100.0 if pred_volume else 0.0  # EDGE_CASE_POLICY: no reference volume to divide by


def compute_case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    num_classes: int,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    classes: Sequence[int] | None = None,
) -> dict[int, ClassMetrics]:
    """Per-class metrics of one case.

    Args:
        prediction: Integer label map, (depth, height, width) or (height, width), labels in
            ``[0, num_classes)``.
        reference: Integer label map of the same shape and label range.
        spacing: Voxel size in mm per axis, ``(sz, sy, sx)`` or ``(sy, sx)``.
        num_classes: Number of labels including background.
        nsd_tolerance_mm: NSD tolerance in mm.
        classes: Labels to evaluate; default every label but background (0).

    Returns:
        ``{label: ClassMetrics}`` in the order of ``classes``.

    Raises:
        TypeError: if a label map does not hold integers.
        ValueError: on mismatched shapes, a bad spacing, or labels out of range.
    """
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    spacing = _check_geometry(prediction.shape, reference.shape, spacing)
    for name, labels in (("prediction", prediction), ("reference", reference)):
        _check_labels(name, labels, num_classes)
    if classes is None:
        classes = [c for c in range(num_classes) if c != BACKGROUND]
    _check_classes(classes, num_classes)
    return {
        int(c): class_metrics(prediction == c, reference == c, spacing, nsd_tolerance_mm)
        for c in classes
    }


def _check_geometry(
    shape: tuple[int, ...], other_shape: tuple[int, ...], spacing: Sequence[float]
) -> tuple[float, ...]:
    if shape != other_shape:
        raise ValueError(f"prediction shape {shape} differs from reference shape {other_shape}")
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a (depth, height, width) or (height, width) map, got {shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"spacing {spacing} must hold {len(shape)} positive mm values, one per axis of {shape}"
        )
    return spacing


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(
            f"{name}: expected an integer label map, got dtype {labels.dtype}; did you mean "
            "argmax over the class axis, or .astype(np.int16) on labels read as floats?"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name}: labels span [{labels.min()}, {labels.max()}] but num_classes={num_classes} "
            f"allows [0, {num_classes - 1}]"
        )


def _check_classes(classes: Sequence[int], num_classes: int) -> None:
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"classes {unknown} are outside [0, {num_classes - 1}]")


# --- Across cases -------------------------------------------------------------------------


def summarize(per_case: list[dict[int, ClassMetrics]]) -> dict[str, Any]:
    """Statistics of every metric over cases, per class, and means over foreground classes.

    Pairs (case, class) with both masks empty (``ClassMetrics.both_empty``) are left out of
    every statistic and counted instead (see ``EDGE_CASE_POLICY``).

    Args:
        per_case: One ``compute_case_metrics`` result per case.

    Returns:
        A dict with
        ``"num_cases"``: ``len(per_case)``;
        ``"per_class"``: ``{label: {metric: {stat: value}, "counted": n, "excluded_empty": k}}``
        with stat in ``SUMMARY_STATISTICS`` over the n cases where the label is in the
        prediction or the reference (std is the population std, ddof=0); every value is None
        when n is 0; k counts the cases where it is in neither;
        ``"counted"``, ``"excluded_empty"``: those counts summed over classes;
        ``"pooled"``: ``{label: {"dice": ..., "iou": ...}}`` from tp/fp/fn summed over cases
        (None when n is 0);
        ``"foreground_mean"``: ``{metric: value}``, the mean over labels other than 0 with
        n > 0 of each label's mean (None when there is no such label; an empty dict when
        there is no foreground label at all).

    Raises:
        ValueError: if ``per_case`` is empty.
    """
    if not per_case:
        raise ValueError("summarize: no cases to summarize")
    labels = sorted(set().union(*per_case))
    by_label = {c: [case[c] for case in per_case if c in case] for c in labels}
    counted = {c: [m for m in metrics if not m.both_empty] for c, metrics in by_label.items()}
    per_class = {c: _class_summary(counted[c], len(by_label[c])) for c in labels}
    return {
        "num_cases": len(per_case),
        "counted": sum(s["counted"] for s in per_class.values()),
        "excluded_empty": sum(s["excluded_empty"] for s in per_class.values()),
        "per_class": per_class,
        "pooled": {c: _pooled_overlap(metrics) for c, metrics in counted.items()},
        "foreground_mean": _foreground_mean(per_class),
    }


def _metric_names() -> list[str]:
    return [field.name for field in dataclasses.fields(ClassMetrics)]


def _class_summary(counted: list[ClassMetrics], total: int) -> dict[str, Any]:
    """``_statistics`` of the counted pairs (None without any) and the two counts."""
    table: dict[str, Any] = (
        _statistics(counted)
        if counted
        else {name: dict.fromkeys(SUMMARY_STATISTICS) for name in _metric_names()}
    )
    return {**table, "counted": len(counted), "excluded_empty": total - len(counted)}


def _statistics(metrics: list[ClassMetrics]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in _metric_names():
        values = np.array([getattr(m, name) for m in metrics], float)
        table[name] = {stat: float(reduce(values)) for stat, reduce in _REDUCERS.items()}
    return table


def _foreground_mean(per_class: dict[int, dict[str, Any]]) -> dict[str, float | None]:
    foreground = [c for c in per_class if c != BACKGROUND]
    counted = [c for c in foreground if per_class[c]["counted"]]
    return {
        name: float(np.mean([per_class[c][name]["mean"] for c in counted])) if counted else None
        for name in (_metric_names() if foreground else ())
    }


def _pooled_overlap(metrics: list[ClassMetrics]) -> dict[str, float | None]:
    # Pooled counts weigh every voxel equally, so large cases dominate; the per-case mean weighs
    # every case equally, so small structures count as much. Both views are worth reporting.
    # Both-empty pairs add nothing to the sums; without any other pair there is nothing to pool.
    if not metrics:
        return {"dice": None, "iou": None}
    tp, fp, fn = (sum(getattr(m, name) for m in metrics) for name in ("tp", "fp", "fn"))
    return {"dice": dice_from_counts(tp, fp, fn), "iou": iou_from_counts(tp, fp, fn)}
