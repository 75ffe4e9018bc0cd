"""Preprocessing: crop, normalise, resample, and the inverse that restores predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segnet.config import PreprocessingConfig
from segnet.data.datasets import CaseFiles
from segnet.data.preprocessing import (
    ChannelStats,
    DatasetFingerprint,
    PreprocessInfo,
    compute_fingerprint,
    nonzero_bbox,
    normalize,
    preprocess,
    preprocess_case,
    resize,
    restore_to_original,
    sample_foreground,
    target_spacing,
)
from segnet.data.volumes import make_geometry, write_volume
from segnet.errors import UserError

SHAPE = (17, 18, 19)


def phantom(shape=SHAPE, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A (d, h, w, 2) image, zero outside a box, with a 3-class label inside that box."""
    rng = np.random.default_rng(seed)
    image = np.zeros((*shape, 2), np.float32)
    image[2:-3, 3:-2, 4:-4] = rng.normal(50, 5, (shape[0] - 5, shape[1] - 5, shape[2] - 8, 2))
    label = np.zeros(shape, np.uint8)
    label[5:10, 6:12, 7:12] = 1
    label[8:12, 10:14, 9:14] = 2
    return image, label


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([((2, 5), (3, 4), (0, 19))], ((2, 5), (3, 4), (0, 19))),
        ([((0, 1), (0, 1), (0, 1)), ((16, 17), (17, 18), (18, 19))], ((0, 17), (0, 18), (0, 19))),
        ([], ((0, 17), (0, 18), (0, 19))),
    ],
)
def test_nonzero_bbox_is_the_union_over_channels(boxes, expected) -> None:
    image = np.zeros((*SHAPE, 2), np.float32)
    for channel, box in enumerate(boxes):
        image[(*[slice(a, b) for a, b in box], channel % 2)] = 1.0
    assert nonzero_bbox(image) == expected


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", [(9, 30, 19), (34, 18, 7)])
def test_resize_keeps_constants_and_shapes(order: int, shape) -> None:
    resized = resize(np.full(SHAPE, 3.5, np.float32), shape, order)
    assert resized.shape == shape and resized.dtype == np.float32
    np.testing.assert_allclose(resized, 3.5, atol=1e-4)


def test_resize_aligns_voxel_edges() -> None:
    ramp = np.broadcast_to(np.arange(17, dtype=np.float32)[:, None, None], SHAPE)
    resized = resize(np.ascontiguousarray(ramp), (34, 18, 19), order=1)
    # output voxel j of a 2x upsampling sits at input coordinate (j + 0.5) / 2 - 0.5
    np.testing.assert_allclose(resized[5:30, 0, 0], (np.arange(5, 30) + 0.5) / 2 - 0.5, atol=1e-5)


def test_resize_labels_with_nearest_keeps_label_values() -> None:
    _, label = phantom()
    resized = resize(label, (23, 11, 30), order=0)
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1, 2}


FINGERPRINT = DatasetFingerprint(
    (1.0, 1.0, 1.0),
    SHAPE,
    3,
    (ChannelStats(40.0, 10.0, 30.0, 60.0), ChannelStats(0.0, 2.0, -1.0, 1.0)),
    (0.5, 99.5),
)


@pytest.mark.parametrize("mode", ["zscore", "ct", "range", "none"])
def test_normalization_modes(mode: str) -> None:
    image, _ = phantom()
    mask = np.any(image != 0, axis=-1)
    config = PreprocessingConfig(normalization=mode, intensity_range=(45.0, 55.0))
    out = normalize(image, config, FINGERPRINT, mask)
    assert out.dtype == np.float32 and out.shape == image.shape
    if mode == "zscore":
        np.testing.assert_allclose(out[mask].mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(out[mask].std(axis=0), 1.0, atol=1e-4)
        assert not out[~mask].any()
    elif mode == "ct":
        expected = (np.clip(image[..., 0], 30.0, 60.0) - 40.0) / 10.0
        np.testing.assert_allclose(out[..., 0], expected, rtol=1e-5)
        # channel 1: zeros stay (0 - 0) / 2, values near 50 clip to 1 -> 0.5
        assert set(np.unique(out[..., 1]).tolist()) == {0.0, 0.5}
    elif mode == "range":
        assert out.min() == 0.0 and out.max() == 1.0
        np.testing.assert_allclose(
            out[3, 4, 5], np.clip(image[3, 4, 5] - 45.0, 0, 10) / 10.0, rtol=1e-5
        )
    else:
        np.testing.assert_array_equal(out, image)


def test_each_channel_gets_its_own_scheme() -> None:
    image, _ = phantom()
    mask = np.any(image != 0, axis=-1)
    config = PreprocessingConfig(channel_normalization=("ct", "zscore"))
    out = normalize(image, config, FINGERPRINT, mask)
    ct_only = normalize(image, PreprocessingConfig(normalization="ct"), FINGERPRINT, mask)
    zscore_only = normalize(image, PreprocessingConfig(normalization="zscore"), FINGERPRINT, mask)
    np.testing.assert_array_equal(out[..., 0], ct_only[..., 0])
    np.testing.assert_array_equal(out[..., 1], zscore_only[..., 1])
    assert config.uses_ct and not PreprocessingConfig(channel_normalization=("zscore",)).uses_ct


def test_ct_without_statistics_is_a_user_error() -> None:
    image, _ = phantom()
    with pytest.raises(UserError, match="normalization 'ct'"):
        normalize(image, PreprocessingConfig(normalization="ct"), None, None)


# spacing of the scan, preprocessing settings, expected agreement of the restored label
ROUND_TRIPS = [
    ((1.0, 1.0, 1.0), PreprocessingConfig(), 1.0),
    ((1.0, 1.0, 1.0), PreprocessingConfig(crop_to_nonzero=False), 1.0),
    ((0.7, 1.1, 2.5), PreprocessingConfig(resample=True, target_spacing=(1.0, 1.0, 1.0)), 0.97),
    (
        (1.0, 1.0, 1.0),
        PreprocessingConfig(
            resample=True, target_spacing=(1.5, 0.8, 1.3), image_interpolation="cubic"
        ),
        0.95,
    ),
]


@pytest.mark.parametrize(("spacing", "config", "agreement"), ROUND_TRIPS)
def test_restore_puts_labels_back_on_the_original_grid(spacing, config, agreement) -> None:
    image, label = phantom()
    geometry = make_geometry(np.diag([*spacing, 1.0]), SHAPE)
    out_image, out_label, info = preprocess(image, geometry, label, config, None)
    expected_shape = tuple(
        round((b - a) * s / t)
        for (a, b), s, t in zip(info.bbox, spacing, config.target_spacing or spacing)
    )
    assert out_image.shape == (*expected_shape, 2) and out_label.shape == expected_shape
    assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
    assert out_image.flags.c_contiguous and info.shape == expected_shape
    restored = restore_to_original(out_label, info)
    assert restored.shape == SHAPE and restored.dtype == np.uint8
    assert (restored == label).mean() >= agreement
    if agreement == 1.0:
        np.testing.assert_array_equal(restored, label)


def test_restore_probabilities_fills_background_outside_the_crop() -> None:
    image, label = phantom()
    _, out_label, info = preprocess(
        image,
        make_geometry(np.eye(4), SHAPE),
        label,
        PreprocessingConfig(resample=True, target_spacing=(0.9, 1.2, 1.0)),
        None,
    )
    probabilities = np.eye(3, dtype=np.float32)[out_label]
    restored = restore_to_original(probabilities, info)
    assert restored.shape == (*SHAPE, 3)
    np.testing.assert_allclose(restored.sum(axis=-1), 1.0, atol=1e-5)
    assert restored[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert (restored.argmax(-1) == label).mean() > 0.97


def test_restore_rejects_the_wrong_shape() -> None:
    image, label = phantom()
    _, _, info = preprocess(
        image, make_geometry(np.eye(4), SHAPE), label, PreprocessingConfig(), None
    )
    with pytest.raises(ValueError, match="not the preprocessed"):
        restore_to_original(np.zeros(SHAPE, np.uint8), info)


def test_info_and_fingerprint_survive_json() -> None:
    image, label = phantom()
    _, _, info = preprocess(
        image,
        make_geometry(np.diag([0.7, 1.1, 2.5, 1.0]), SHAPE),
        label,
        PreprocessingConfig(resample=True),
        FINGERPRINT,
    )
    back = PreprocessInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert back.bbox == info.bbox and back.shape == info.shape and back.spacing == info.spacing
    assert back.geometry.same_grid(info.geometry)
    assert (
        DatasetFingerprint.from_dict(json.loads(json.dumps(FINGERPRINT.to_dict()))) == FINGERPRINT
    )


@pytest.mark.parametrize(
    "broken", [{}, {"spacing": [1, 1], "median_shape": [1, 2, 3], "num_cases": 1}, {"spacing": "x"}]
)
def test_malformed_fingerprint_is_a_user_error(broken) -> None:
    with pytest.raises(UserError, match="fingerprint is malformed"):
        DatasetFingerprint.from_dict(broken)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (PreprocessingConfig(), None),
        (PreprocessingConfig(resample=True), (1.0, 1.0, 1.0)),
        (PreprocessingConfig(resample=True, target_spacing=(2.0, 2.0, 3.0)), (2.0, 2.0, 3.0)),
    ],
)
def test_target_spacing(config, expected) -> None:
    assert target_spacing(config, FINGERPRINT) == expected


def _write_cases(root: Path, spacings: list[tuple[float, float, float]]) -> list[CaseFiles]:
    cases = []
    for i, spacing in enumerate(spacings):
        image, label = phantom(seed=i)
        image[..., 0][label > 0] = 100.0 + i  # foreground values known exactly
        geometry = make_geometry(np.diag([*spacing, 1.0]), SHAPE)
        paths = tuple(
            write_volume(root / f"c{i}_{c:04d}.nii.gz", image[..., c], geometry) for c in range(2)
        )
        cases.append(
            CaseFiles(f"c{i}", paths, write_volume(root / f"c{i}.nii.gz", label, geometry))
        )
    return cases


def test_fingerprint_median_spacing_and_ct_statistics(tmp_path: Path) -> None:
    cases = _write_cases(tmp_path, [(1.0, 1.0, 3.0), (0.5, 1.0, 2.0), (0.8, 1.2, 5.0)])
    plain = compute_fingerprint(cases, PreprocessingConfig())
    assert plain.spacing == pytest.approx((0.8, 1.0, 3.0)) and plain.intensity == ()
    assert plain.median_shape == SHAPE and plain.num_cases == 3
    ct = compute_fingerprint(
        cases, PreprocessingConfig(normalization="ct", ct_percentiles=(0.0, 100.0))
    )
    assert len(ct.intensity) == 2
    assert ct.intensity[0].mean == pytest.approx(101.0, abs=0.01)
    assert (ct.intensity[0].low, ct.intensity[0].high) == (100.0, 102.0)


def test_preprocess_case_reads_channel_files(tmp_path: Path) -> None:
    case = _write_cases(tmp_path, [(1.0, 1.0, 1.0)])[0]
    image, label, info = preprocess_case(case, PreprocessingConfig(), None)
    assert image.shape[-1] == 2 and label is not None and label.shape == info.shape


def test_sample_foreground_is_seeded_bounded_and_correct() -> None:
    _, label = phantom()
    samples = sample_foreground(label, num_classes=4, seed=3, max_per_class=50)
    assert sorted(samples) == [1, 2]  # class 3 is absent, so it has no entry
    for cls, coords in samples.items():
        assert coords.dtype == np.int32 and coords.shape == (50, 3)
        assert (label[tuple(coords.T)] == cls).all()
        assert len(np.unique(coords, axis=0)) == 50
    again = sample_foreground(label, num_classes=4, seed=3, max_per_class=50)
    other = sample_foreground(label, num_classes=4, seed=4, max_per_class=50)
    np.testing.assert_array_equal(again[1], samples[1])
    assert not np.array_equal(other[1], samples[1])
    everything = sample_foreground(label, num_classes=3, seed=0)
    assert len(everything[2]) == int((label == 2).sum())
