"""Tests for segnet.metrics: hand-derived cases, edge-case policy and a brute-force reference."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segnet import metrics
from segnet.metrics import ClassMetrics, compute_case_metrics, summarize, surface_distances

# --- Helpers ------------------------------------------------------------------------------


def _boxes(shape: tuple[int, ...], *boxes: tuple[slice, ...]) -> np.ndarray:
    """Label map with one box per label: boxes[0] gets label 1 (later boxes overwrite)."""
    labels = np.zeros(shape, np.int16)
    for label, box in enumerate(boxes, start=1):
        labels[box] = label
    return labels


def _one_class(
    prediction_box: tuple[slice, ...],
    reference_box: tuple[slice, ...],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    nsd_tolerance_mm: float = 1.0,
) -> ClassMetrics:
    """Metrics of label 1 for a prediction box against a reference box."""
    prediction, reference = _boxes(shape, prediction_box), _boxes(shape, reference_box)
    return compute_case_metrics(
        prediction, reference, spacing, num_classes=2, nsd_tolerance_mm=nsd_tolerance_mm
    )[1]


def _brute_force_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by the definition, without erosion: a face neighbour is outside mask or image."""
    padded = np.pad(mask, 1, constant_values=False)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    outside_neighbour = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            outside_neighbour |= ~np.roll(padded, step, axis=axis)[core]
    return mask & outside_neighbour


def _brute_force_directed(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance from each surface voxel of a to the nearest of b, over all pairs."""
    points_a = np.argwhere(_brute_force_surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(_brute_force_surface(b)) * np.asarray(spacing)
    pairwise = np.sqrt(((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1))
    return pairwise.min(axis=1)


def _random_blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A non-empty mask of smooth random blobs, often touching the image border."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return field > np.quantile(field, rng.uniform(0.55, 0.9))


# --- Identical and shifted masks ----------------------------------------------------------


def test_identical_masks_are_perfect():
    labels = _boxes((9, 10, 11), np.s_[2:7, 3:8, 1:10])
    m = compute_case_metrics(labels, labels, (1.0, 0.7, 2.5), num_classes=2)[1]
    assert (m.dice, m.iou, m.hd95_mm, m.assd_mm, m.nsd) == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert (m.fp, m.fn, m.volume_diff_mm3, m.volume_diff_percent) == (0, 0, 0.0, 0.0)


# Cubes of side 10 in a 15x16x17 image, reference shifted by 2 voxels along axis 0 (z):
# A covers z 1..10, B covers z 3..12, both y 2..11 and x 3..12, away from the image border.
# Overlap 8*10*10 = 800 of 1000 each: Dice = 2*800/2000 = 0.8, IoU = 800/1200 = 2/3.
# Each surface has 10**3 - 8**3 = 488 voxels; distances from S(A) to S(B) (B->A mirrors them),
# with s = spacing along z in mm:
#   far face of A (100 voxels):            2 voxels along z to B's near face        -> 2s
#   A's side ring at its 2nd slice (36):   1 voxel along z to B's near face         -> 1s
#   A's side rings in B's slices (8*36):   are B surface voxels too                 -> 0
#   A's inner face, 8x8 interior (64):     min(2s to B's far face, in-plane
#                                          distance k to B's sides, k = ring index 1..4)
CUBE_SHAPE = (15, 16, 17)
CUBE_A = np.s_[1:11, 2:12, 3:13]
CUBE_B = np.s_[3:13, 2:12, 3:13]


def test_cubes_shifted_by_two_voxels_isotropic():
    m = _one_class(CUBE_A, CUBE_B, CUBE_SHAPE, (1.0, 1.0, 1.0))
    assert m.dice == pytest.approx(0.8)  # 2*800 / (1000 + 1000)
    assert m.iou == pytest.approx(2 / 3)  # 800 / 1200
    # s = 1: inner face rings are 28 voxels at 1 and 36 (6x6) at min(2, >=2) = 2.
    # 0 x 288, 1 x (36 + 28) = 64, 2 x (100 + 36) = 136; 136/488 = 28 % > 5 % -> P95 = 2.
    assert m.hd95_mm == pytest.approx(2.0)
    assert m.assd_mm == pytest.approx(336 / 488)  # (64*1 + 136*2) / 488, same both ways
    assert m.nsd == pytest.approx(352 / 488)  # (288 + 64) within 1 mm


def test_cubes_anisotropic_spacing_keeps_dice_and_stretches_distances():
    m = _one_class(CUBE_A, CUBE_B, CUBE_SHAPE, (2.0, 1.0, 1.0))
    assert m.dice == pytest.approx(0.8)  # overlap is counted in voxels: unchanged
    assert m.pred_volume_mm3 == 2000.0  # 1000 voxels * 2 mm^3
    # s = 2: far face 100 x 4, side ring 36 x 2, inner face rings: 28 x 1, 20 x 2, 12 x 3,
    # 4 x min(4, 4) = 4; P95 = 4 (104/488 = 21 % at 4 mm).
    assert m.hd95_mm == pytest.approx(4.0)
    assert m.assd_mm == pytest.approx(592 / 488)  # 400 + 72 + 28 + 40 + 36 + 16 = 592
    assert m.nsd == pytest.approx(316 / 488)  # (288 + 28) within 1 mm


def test_cube_shifted_one_voxel_along_x_at_half_millimetre():
    # Side 10 cubes, B one voxel further along x; spacing (1, 1, 0.5).
    # Overlap 10*10*9 = 900: Dice = 1800/2000 = 0.9, IoU = 900/1100.
    # S(A) -> S(B): far x face 100 x 0.5 mm, inner x face interior 64 x 0.5 mm (B's far face
    # is 1 voxel away along x, B's sides >= 1 mm), side rings at x 1..9 (9*36 = 324) x 0.
    a_box, b_box = np.s_[1:11, 1:11, 1:11], np.s_[1:11, 1:11, 2:12]
    m = _one_class(a_box, b_box, (12, 12, 13), (1.0, 1.0, 0.5), nsd_tolerance_mm=0.25)
    assert m.dice == pytest.approx(0.9)
    assert m.iou == pytest.approx(900 / 1100)
    assert m.hd95_mm == pytest.approx(0.5)  # 164/488 = 34 % of distances are 0.5 mm
    assert m.assd_mm == pytest.approx(82 / 488)  # 164 * 0.5 / 488, same both ways
    assert m.nsd == pytest.approx(324 / 488)  # only the shared side rings are within 0.25 mm


@pytest.mark.parametrize(
    ("k", "spacing", "tolerance", "expected_nsd"),
    [
        (1, (1.0, 1.0, 1.0), 1.0, 1.0),  # 1 * 1.0 = 1.0 <= 1.0
        (3, (1.0, 1.0, 1.0), 1.0, 0.0),  # 3 * 1.0 = 3.0 > 1.0
        (2, (0.5, 1.0, 1.0), 1.0, 1.0),  # 2 * 0.5 = 1.0 <= 1.0
        (2, (2.5, 0.3, 0.7), 4.0, 0.0),  # 2 * 2.5 = 5.0 > 4.0
    ],
)
def test_parallel_slabs_are_k_times_spacing_apart(k, spacing, tolerance, expected_nsd):
    # One-voxel-thick slabs with the same footprint: every voxel is surface and its nearest
    # voxel on the other slab is straight across, k * sz away.
    a_box, b_box = np.s_[2:3, 1:7, 2:9], np.s_[2 + k : 3 + k, 1:7, 2:9]
    m = _one_class(a_box, b_box, (9, 8, 10), spacing, nsd_tolerance_mm=tolerance)
    assert m.hd95_mm == pytest.approx(k * spacing[0])
    assert m.assd_mm == pytest.approx(k * spacing[0])
    assert m.nsd == expected_nsd
    assert (m.dice, m.iou) == (0.0, 0.0)


def test_concentric_balls_one_millimetre_apart():
    # Balls of radius 10 and 11 voxels at spacing 1: surfaces are 1 mm apart in the continuum.
    # Voxelisation moves the nearest surface voxel by up to a face diagonal, so HD95 (sqrt(2)
    # here) and ASSD sit within 0.5 mm of 1; Dice within 0.01 of 2*10**3 / (10**3 + 11**3).
    grid = np.indices((27, 28, 29)) - np.array([13, 14, 14])[:, None, None, None]
    radius = np.sqrt((grid**2).sum(axis=0))
    prediction = (radius <= 10).astype(np.int8)
    reference = (radius <= 11).astype(np.int8)
    m = compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0), num_classes=2)[1]
    assert m.hd95_mm == pytest.approx(1.0, abs=0.5)
    assert m.assd_mm == pytest.approx(1.0, abs=0.5)
    assert m.dice == pytest.approx(2 * 10**3 / (10**3 + 11**3), abs=0.01)  # 0.8580


def test_two_dimensional_squares():
    # 4x4 squares, B one pixel further along x. Overlap 4*3 = 12: Dice = 24/32 = 0.75.
    # Each surface has 16 - 4 = 12 pixels; S(A) -> S(B): left column 4 x 1, top/bottom rows
    # inside B 6 x 0, right column interior 2 x 1 -> six 0s and six 1s both ways.
    m = _one_class(np.s_[1:5, 1:5], np.s_[1:5, 2:6], (6, 7), (1.0, 1.0))
    assert m.dice == pytest.approx(0.75)
    assert m.hd95_mm == pytest.approx(1.0)  # P95 of [0]*6 + [1]*6
    assert m.assd_mm == pytest.approx(0.5)  # 12 * 1 / 24
    assert m.nsd == 1.0
    assert m.pred_volume_mm3 == 16.0  # an area in mm^2 for 2D input


# --- Edge-case policy ---------------------------------------------------------------------


def test_both_empty_follows_policy():
    empty = np.zeros((5, 6, 7), np.int16)
    m = compute_case_metrics(empty, empty, (1.0, 1.0, 1.0), num_classes=3)
    for values in m.values():
        scores = (values.dice, values.iou, values.hd95_mm, values.assd_mm, values.nsd)
        assert scores == (1.0, 1.0, 0.0, 0.0, 1.0)
        assert (values.volume_diff_mm3, values.volume_diff_percent) == (0.0, 0.0)
        assert values.both_empty and values.as_dict()["both_empty"] is True


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_one_empty_gets_the_image_diagonal(empty_side):
    shape, spacing = (15, 16, 17), (1.0, 2.0, 0.5)
    diagonal = math.sqrt(1321.25)  # (15*1)**2 + (16*2)**2 + (17*0.5)**2 = 225 + 1024 + 72.25
    full, empty = _boxes(shape, np.s_[2:4, 2:4, 2:4]), np.zeros(shape, np.int16)
    pair = (empty, full) if empty_side == "prediction" else (full, empty)
    m = compute_case_metrics(*pair, spacing, num_classes=2)[1]
    assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
    assert m.hd95_mm == m.assd_mm == pytest.approx(diagonal, rel=1e-15)
    assert m.volume_diff_mm3 == (-8.0 if empty_side == "prediction" else 8.0)  # 8 voxels * 1 mm^3
    assert m.volume_diff_percent == (-100.0 if empty_side == "prediction" else 100.0)
    assert not m.both_empty  # a missed or invented structure counts in the statistics


def test_no_metric_is_ever_nan():
    labels = _boxes((6, 7, 8), np.s_[0:2, 0:2, 0:2])
    for prediction, reference in [(labels, labels * 0), (labels * 0, labels * 0)]:
        m = compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0), num_classes=2)[1]
        assert all(np.isfinite(v) for v in m.as_dict().values())


# --- Cropping and an independent reference ------------------------------------------------


def test_cropping_gives_the_uncropped_result():
    rng = np.random.default_rng(7)
    shape = (17, 18, 19)
    last_corner = np.array(shape) - 9
    # Blobs fill a 9^3 window and often touch its faces: at the image corners (crop clipped by
    # the image border) and at random places inside (crop bounded by the margin).
    corners = [np.zeros(3, int), last_corner] + [rng.integers(0, last_corner + 1) for _ in range(8)]
    for corner in corners:
        a, b = np.zeros(shape, bool), np.zeros(shape, bool)
        window = tuple(slice(lo, lo + 9) for lo in corner)
        a[window], b[window] = _random_blobs(rng, (9, 9, 9)), _random_blobs(rng, (9, 9, 9))
        spacing = tuple(rng.uniform(0.3, 3.0, size=3))
        for cropped, full in zip(
            surface_distances(a, b, spacing), surface_distances(a, b, spacing, crop=False)
        ):
            np.testing.assert_array_equal(cropped, full)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 10, 11)
    a, b = _random_blobs(rng, shape), _random_blobs(rng, shape)
    spacing = tuple(rng.uniform(0.3, 3.0, size=3))
    tolerance = float(rng.uniform(0.5, 3.0))
    m = compute_case_metrics(a.astype(np.uint8), b.astype(np.uint8), spacing, 2, tolerance)[1]

    a_to_b, b_to_a = _brute_force_directed(a, b, spacing), _brute_force_directed(b, a, spacing)
    both = np.concatenate([a_to_b, b_to_a])
    assert m.hd95_mm == pytest.approx(
        max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)), abs=1e-6
    )
    assert m.assd_mm == pytest.approx(both.mean(), abs=1e-6)
    assert m.nsd == pytest.approx(np.mean(both <= tolerance), abs=1e-6)
    overlap, union = np.sum(a & b), np.sum(a | b)
    assert m.dice == pytest.approx(2 * overlap / (a.sum() + b.sum()), abs=1e-12)
    assert m.iou == pytest.approx(overlap / union, abs=1e-12)
    assert (m.tp, m.fp, m.fn) == (overlap, np.sum(a & ~b), np.sum(~a & b))


def test_surface_voxels_match_the_definition_at_the_image_border():
    mask = np.ones((4, 5, 6), bool)  # fills the image: only its border layer is surface
    expected = np.ones_like(mask)
    expected[1:-1, 1:-1, 1:-1] = False
    np.testing.assert_array_equal(metrics.surface_voxels(mask), expected)


# --- Classes, validation, summaries -------------------------------------------------------


def test_classes_default_skips_background_and_can_be_chosen():
    labels = _boxes((5, 6, 7), np.s_[0:2, 0:2, 0:2], np.s_[3:5, 3:5, 3:5])
    assert list(compute_case_metrics(labels, labels, (1, 1, 1), num_classes=3)) == [1, 2]
    chosen = compute_case_metrics(labels, labels, (1, 1, 1), num_classes=3, classes=[2, 0])
    assert list(chosen) == [2, 0]


@pytest.mark.parametrize(
    ("prediction", "spacing", "error", "message"),
    [
        (np.zeros((4, 5, 6), np.int8), (1.0, 1.0), ValueError, "spacing"),
        (np.zeros((4, 5, 7), np.int8), (1.0, 1.0, 1.0), ValueError, "shape"),
        (np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 1.0), TypeError, "argmax"),
        (np.full((4, 5, 6), 3, np.int8), (1.0, 1.0, 1.0), ValueError, "num_classes=2"),
        (np.zeros((4, 5, 6), np.int8), (1.0, 0.0, 1.0), ValueError, "positive"),
    ],
)
def test_bad_inputs_say_what_is_wrong(prediction, spacing, error, message):
    with pytest.raises(error, match=message):
        compute_case_metrics(prediction, np.zeros((4, 5, 6), np.int8), spacing, num_classes=2)


def _metrics(dice: float, hd95: float, tp: int, fp: int, fn: int) -> ClassMetrics:
    return ClassMetrics(dice, 0.5, hd95, 1.0, 1.0, 0.0, 0.0, tp, fp, fn, 1.0, 1.0)


def test_summarize_three_cases_by_hand():
    per_case = [
        {1: _metrics(0.5, 4.0, 1, 2, 0), 2: _metrics(1.0, 0.0, 5, 0, 0)},
        {1: _metrics(0.7, 1.0, 2, 0, 1), 2: _metrics(0.8, 2.0, 4, 1, 1)},
        {1: _metrics(0.9, 1.0, 3, 1, 0), 2: _metrics(0.6, 1.0, 3, 2, 2)},
    ]
    summary = summarize(per_case)
    dice1, hd1 = summary["per_class"][1]["dice"], summary["per_class"][1]["hd95_mm"]
    assert dice1["mean"] == pytest.approx(0.7)  # (0.5 + 0.7 + 0.9) / 3
    assert dice1["median"] == pytest.approx(0.7)
    assert dice1["std"] == pytest.approx(math.sqrt(0.08 / 3))  # (0.2**2 + 0 + 0.2**2) / 3
    assert (dice1["min"], dice1["max"]) == (0.5, 0.9)
    assert hd1["mean"] == pytest.approx(2.0)  # (4 + 1 + 1) / 3
    assert hd1["median"] == 1.0
    assert hd1["std"] == pytest.approx(math.sqrt(2.0))  # (2**2 + 1 + 1) / 3 = 2
    # Class 2 Dice mean is (1.0 + 0.8 + 0.6) / 3 = 0.8; the foreground mean is (0.7 + 0.8) / 2.
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.75)
    # Pooled class 1: tp 6, fp 3, fn 1 -> 12 / (12 + 3 + 1) = 0.75.
    assert summary["pooled"][1]["dice"] == pytest.approx(0.75)
    assert summary["num_cases"] == 3


def test_summarize_leaves_out_a_class_empty_in_both_masks():
    empty = _metrics(1.0, 0.0, 0, 0, 0)  # class 2 in neither mask of case 0: Dice 1 by policy
    per_case = [
        {1: _metrics(0.5, 4.0, 1, 2, 0), 2: empty},
        {1: _metrics(0.7, 1.0, 2, 0, 1), 2: _metrics(0.8, 2.0, 4, 1, 1)},
        {1: _metrics(0.9, 1.0, 3, 1, 0), 2: _metrics(0.4, 3.0, 3, 2, 2)},
    ]
    summary = summarize(per_case)
    dice2, hd2 = summary["per_class"][2]["dice"], summary["per_class"][2]["hd95_mm"]
    # Over cases 1 and 2 only (with case 0, the mean Dice would be 0.733 and HD95 1.67 mm).
    assert dice2["mean"] == pytest.approx(0.6)  # (0.8 + 0.4) / 2
    assert dice2["median"] == pytest.approx(0.6)
    assert dice2["std"] == pytest.approx(0.2)  # sqrt((0.2**2 + 0.2**2) / 2)
    assert (dice2["min"], dice2["max"]) == (0.4, 0.8)
    assert hd2["mean"] == pytest.approx(2.5) and hd2["min"] == 2.0  # not 0 mm from case 0
    assert summary["per_class"][2]["counted"] == 2
    assert summary["per_class"][2]["excluded_empty"] == 1
    assert summary["per_class"][1]["counted"] == 3
    assert (summary["counted"], summary["excluded_empty"]) == (5, 1)
    # Class 1 Dice mean 0.7, class 2 0.6; NSD is 1.0 in every counted pair.
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.65)
    assert summary["foreground_mean"]["hd95_mm"] == pytest.approx((2.0 + 2.5) / 2)
    # Pooled class 2: tp 7, fp 3, fn 3 -> 14 / 20, the empty pair adds nothing.
    assert summary["pooled"][2]["dice"] == pytest.approx(0.7)


def test_a_class_absent_everywhere_has_no_statistics():
    empty = _metrics(1.0, 0.0, 0, 0, 0)
    per_case = [
        {1: _metrics(0.5, 4.0, 1, 2, 0), 2: empty},
        {1: _metrics(0.7, 2.0, 2, 0, 1), 2: empty},
    ]
    summary = summarize(per_case)
    absent = summary["per_class"][2]
    assert (absent["counted"], absent["excluded_empty"]) == (0, 2)
    for name in ClassMetrics.keys()[:-1]:  # every metric, not both_empty
        assert set(absent[name].values()) == {None}, name
    assert summary["pooled"][2] == {"dice": None, "iou": None}
    # The foreground mean is over class 1 alone: class 2 neither raises nor lowers it.
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.6)
    assert summary["foreground_mean"]["hd95_mm"] == pytest.approx(3.0)
    json.dumps(summary, allow_nan=False)  # None, not NaN: valid JSON


def test_no_foreground_class_counted_gives_no_foreground_mean():
    empty = _metrics(1.0, 0.0, 0, 0, 0)
    summary = summarize([{1: empty, 2: empty}])
    assert set(summary["foreground_mean"].values()) == {None}
    assert (summary["counted"], summary["excluded_empty"]) == (0, 2)


def test_both_empty_is_marked_on_real_masks():
    prediction = _boxes((5, 6, 7), np.s_[0:2, 0:2, 0:2])  # class 2 in neither map
    reference = _boxes((5, 6, 7), np.s_[1:3, 0:2, 0:2])
    case = compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0), num_classes=3)
    assert (case[1].both_empty, case[2].both_empty) == (False, True)
    summary = summarize([case])
    assert summary["per_class"][1]["dice"]["mean"] == pytest.approx(0.5)  # 2 * 4 / (8 + 8)
    assert summary["per_class"][2]["dice"]["mean"] is None
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.5)  # was (0.5 + 1) / 2


def test_summarize_rejects_no_cases():
    with pytest.raises(ValueError, match="no cases"):
        summarize([])


def test_module_does_not_import_tensorflow():
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("tensorflow", "keras")}
