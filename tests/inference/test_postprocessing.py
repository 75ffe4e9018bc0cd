"""Tests for segnet.inference.postprocessing on hand-made 17x18x19 label maps."""

from __future__ import annotations

import numpy as np
import pytest

from segnet.inference.postprocessing import (
    choose_largest_component_classes,
    keep_largest_component,
    pieces_per_class,
)

SHAPE = (17, 18, 19)


def _labels(*blobs: tuple[int, tuple[slice, ...]], dtype=np.uint8) -> np.ndarray:
    """A label map with each (label, box) painted in order."""
    labels = np.zeros(SHAPE, dtype)
    for label, box in blobs:
        labels[box] = label
    return labels


BIG_1 = (1, np.s_[1:5, 1:5, 1:5])  # 64 voxels
SMALL_1 = (1, np.s_[10:12, 10:12, 10:12])  # 8 voxels
BIG_2 = (2, np.s_[8:14, 1:4, 12:18])  # 108 voxels
SMALL_2 = (2, np.s_[15:16, 15:17, 1:2])  # 2 voxels


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_smaller_blob_of_each_class_becomes_background(dtype):
    labels = _labels(BIG_1, SMALL_1, BIG_2, SMALL_2, dtype=dtype)
    cleaned = keep_largest_component(labels)
    np.testing.assert_array_equal(cleaned, _labels(BIG_1, BIG_2, dtype=dtype))
    assert cleaned.dtype == dtype
    np.testing.assert_array_equal(labels, _labels(BIG_1, SMALL_1, BIG_2, SMALL_2, dtype=dtype))


def test_classes_are_cleaned_independently():
    # Class 2's small blob touches class 1's big one: another label never joins components,
    # and class 1 being largest overall does not remove class 2's own largest blob.
    touching_2 = (2, np.s_[5:6, 1:3, 1:3])  # 4 voxels, face-adjacent to BIG_1
    labels = _labels(BIG_1, SMALL_1, touching_2, SMALL_2)
    expected = _labels(BIG_1, touching_2)
    np.testing.assert_array_equal(keep_largest_component(labels), expected)


@pytest.mark.parametrize(
    "classes, expected_blobs",
    [
        ((1,), (BIG_1, BIG_2, SMALL_2)),
        ((2,), (BIG_1, SMALL_1, BIG_2)),
        ((1, 2), (BIG_1, BIG_2)),
        ((0, 3), (BIG_1, SMALL_1, BIG_2, SMALL_2)),  # background and absent classes: no-ops
    ],
)
def test_only_the_chosen_classes_change(classes, expected_blobs):
    labels = _labels(BIG_1, SMALL_1, BIG_2, SMALL_2)
    np.testing.assert_array_equal(keep_largest_component(labels, classes), _labels(*expected_blobs))


# A 2-voxel blob plus one voxel touching it at an edge, and one more touching at a corner only.
_PAIR = np.s_[3:4, 3:4, 3:5]
_EDGE = (4, 4, 3)  # shares an edge with voxel (3, 3, 3)
_CORNER = (2, 2, 2)  # shares only a corner with voxel (3, 3, 3)


@pytest.mark.parametrize(
    "connectivity, keeps_edge, keeps_corner",
    [(26, True, True), (18, True, False), (6, False, False)],
)
def test_connectivity_decides_what_touches(connectivity, keeps_edge, keeps_corner):
    labels = np.zeros(SHAPE, np.uint8)
    labels[_PAIR] = 1
    labels[_EDGE] = labels[_CORNER] = 1
    cleaned = keep_largest_component(labels, connectivity=connectivity)
    assert (cleaned[_PAIR] == 1).all()
    assert (cleaned[_EDGE] == 1) == keeps_edge
    assert (cleaned[_CORNER] == 1) == keeps_corner


def test_tie_keeps_the_component_found_first():
    labels = _labels((1, np.s_[0:2, 0:2, 0:2]), (1, np.s_[9:11, 9:11, 9:11]))
    np.testing.assert_array_equal(
        keep_largest_component(labels), _labels((1, np.s_[0:2, 0:2, 0:2]))
    )


def test_empty_and_single_component_maps_are_unchanged():
    empty = np.zeros(SHAPE, np.uint8)
    single = _labels(BIG_1, BIG_2)
    np.testing.assert_array_equal(keep_largest_component(empty), empty)
    np.testing.assert_array_equal(keep_largest_component(single), single)


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (np.zeros(SHAPE, np.float32), {}, "integer"),
        (np.zeros(SHAPE[:2], np.uint8), {}, "3D"),
        (np.zeros(SHAPE, np.uint8), {"connectivity": 8}, "6, 18 or 26"),
    ],
)
def test_bad_input_is_rejected(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_largest_component(labels, **kwargs)


def _blob(shape, corner, size, label, out):
    z, y, x = corner
    out[z : z + size, y : y + size, x : x + size] = label


def test_the_largest_component_is_chosen_where_it_helps_and_not_where_it_hurts():
    # Class 1: one structure, predicted with a stray island (removing it helps). Class 2: two
    # real structures, both predicted (keeping the larger alone loses the other: it hurts).
    reference = np.zeros((20, 20, 20), np.uint8)
    _blob(reference.shape, (2, 2, 2), 5, 1, reference)
    _blob(reference.shape, (12, 12, 12), 4, 2, reference)
    _blob(reference.shape, (2, 12, 12), 3, 2, reference)
    prediction = reference.copy()
    _blob(prediction.shape, (14, 2, 2), 2, 1, prediction)  # 8 stray voxels of class 1
    choice = choose_largest_component_classes([(prediction, reference)], num_classes=4)
    # By hand: class 1 without: 2*125 / (133 + 125); with: 1. Class 2 without: 1; with:
    # 2*64 / (64 + 91). Class 3 is in neither mask: nothing to decide on.
    assert choice[1]["dice_without"] == pytest.approx(250 / 258)
    assert choice[1]["dice_with"] == pytest.approx(1.0) and choice[1]["chosen"] is True
    assert choice[2]["dice_with"] == pytest.approx(128 / 155) and choice[2]["chosen"] is False
    assert choice[3] == {"dice_without": 0.0, "dice_with": 0.0, "cases": 0, "chosen": False}


@pytest.mark.parametrize(("connectivity", "corner_pieces"), [(26, 1), (18, 2), (6, 2)])
def test_pieces_per_class_counts_by_hand(connectivity, corner_pieces):
    # class 1: two separate blobs; class 2: one blob; class 3: two voxels touching at a corner
    labels = _labels(BIG_1, SMALL_1, BIG_2, (3, np.s_[14, 10, 5]), (3, np.s_[15, 11, 6]))
    assert pieces_per_class(labels, connectivity) == {1: 2, 2: 1, 3: corner_pieces}


def test_pieces_per_class_of_an_empty_map_and_of_a_class_cut_by_another():
    assert pieces_per_class(np.zeros(SHAPE, np.uint8)) == {}
    labels = _labels((1, np.s_[2:12, 2:12, 2:12]), (2, np.s_[6:7, :, :]))  # a wall of 2 cuts 1
    assert pieces_per_class(labels) == {1: 2, 2: 1}
