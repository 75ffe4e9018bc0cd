"""Tests for segnet.data.pipeline on tiny PreprocessedCase files written to tmp_path."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from segnet.config import ExperimentConfig, build_config
from segnet.data import pipeline
from segnet.data.case import PreprocessedCase
from segnet.data.pipeline import (
    PatchSampler,
    build_dataset,
    dataset_element_spec,
    describe_pipeline,
    is_foreground_sample,
    place_patch,
)
from segnet.errors import DataError

PATCH = (8, 10, 12)
NO_SPATIAL = {"flip_prob": 0.0, "rot90_prob": 0.0, "affine_prob": 0.0}
NO_INTENSITY = {
    name: 0.0
    for name in ("intensity_scale_prob", "intensity_shift_prob", "gamma_prob", "noise_prob")
} | {"blur_prob": 0.0}
EVERYTHING = {
    "flip_prob": 0.5,
    "rot90_prob": 0.5,
    "affine_prob": 0.5,
    "intensity_scale_prob": 0.5,
    "intensity_shift_prob": 0.5,
    "gamma_prob": 0.5,
    "noise_prob": 0.5,
    "blur_prob": 0.5,
}


# --- Helpers ------------------------------------------------------------------------------


def _write_case(
    root: Path, case_id: str, shape: tuple[int, int, int], channels: int = 1, seed: int = 0
) -> PreprocessedCase:
    """A case whose image is > 0 everywhere (so padding, which is 0, is recognisable).

    Class 1 fills a corner box; class 2 is a single voxel, the rare class.
    """
    rng = np.random.default_rng(seed)
    image = (1.0 + rng.random((*shape, channels))).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[: max(1, shape[0] // 3), : max(1, shape[1] // 3), : max(1, shape[2] // 3)] = 1
    label[-1, -1, -1] = 2
    paths = [root / f"{case_id}_{kind}" for kind in ("image.npy", "label.npy", "fg.npz")]
    np.save(paths[0], image)
    np.save(paths[1], label)
    coords = {f"class_{c}": np.argwhere(label == c).astype(np.int32) for c in (1, 2)}
    np.savez(paths[2], **coords)
    return PreprocessedCase(case_id, paths[0], paths[1], paths[2], shape)


def _config(patch=PATCH, augmentation=None, seed=7, **data) -> ExperimentConfig:
    raw = {
        "data": {"patch_size": list(patch), "num_classes": 3, **data},
        "augmentation": augmentation if augmentation is not None else {"enabled": False},
        "train": {"batch_size": 2, "seed": seed},
    }
    return build_config(raw)


@pytest.fixture
def cases(tmp_path: Path) -> list[PreprocessedCase]:
    shapes = [(17, 18, 19), (5, 6, 7), (9, 23, 11)]  # larger, smaller, mixed vs the patch
    return [_write_case(tmp_path, f"case{i}", s, seed=i) for i, s in enumerate(shapes)]


def _batches(dataset: tf.data.Dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]


# --- Shapes and specs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spatial_dims", "batch_size", "sample_shape"),
    [(3, None, PATCH), (3, 3, PATCH), (2, None, PATCH[1:]), (2, 5, PATCH[1:])],
)
def test_batches_have_static_shapes_and_dtypes(cases, spatial_dims, batch_size, sample_shape):
    config = _config(augmentation=EVERYTHING)
    dataset = build_dataset(config, cases, spatial_dims=spatial_dims, batch_size=batch_size)
    batch = batch_size or config.train.batch_size
    assert dataset.element_spec == dataset_element_spec(config, spatial_dims, batch_size)
    assert dataset.element_spec[0].shape == (batch, *sample_shape, 1)
    for images, labels in _batches(dataset, 2):
        assert images.dtype == np.float32 and images.shape == (batch, *sample_shape, 1)
        assert labels.dtype == np.int32 and labels.shape == (batch, *sample_shape)
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert np.isfinite(images).all()


def test_multichannel_cases(tmp_path):
    cases = [_write_case(tmp_path, "two", (9, 11, 13), channels=2)]
    images, _ = _batches(build_dataset(_config(num_channels=2), cases), 1)[0]
    assert images.shape == (2, *PATCH, 2)


# --- Determinism and resumption -----------------------------------------------------------


@pytest.mark.parametrize(("spatial_dims", "start_step"), [(3, 1), (3, 3), (2, 2)])
def test_resumed_stream_equals_uninterrupted_stream(cases, spatial_dims, start_step):
    config = _config(augmentation=EVERYTHING, num_workers=3)
    full = _batches(build_dataset(config, cases, spatial_dims=spatial_dims), 5)
    resumed = build_dataset(config, cases, start_step=start_step, spatial_dims=spatial_dims)
    for (x_full, y_full), (x_resumed, y_resumed) in zip(full[start_step:], _batches(resumed, 5)):
        np.testing.assert_array_equal(x_resumed, x_full)
        np.testing.assert_array_equal(y_resumed, y_full)


def test_dataset_equals_eager_sampler(cases):
    config = _config(augmentation=EVERYTHING)
    sampler = PatchSampler(config, cases)
    batches = _batches(build_dataset(config, cases, start_step=4), 2)
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    for offset in range(4):
        image, label = sampler(8 + offset)
        np.testing.assert_array_equal(images[offset], image)
        np.testing.assert_array_equal(labels[offset], label)


@pytest.mark.parametrize(("seed_a", "seed_b", "same"), [(7, 7, True), (7, 8, False)])
def test_seed_decides_the_stream(cases, seed_a, seed_b, same):
    def first_batches(seed: int):
        config = _config(augmentation=EVERYTHING, seed=seed)
        return np.concatenate([x for x, _ in _batches(build_dataset(config, cases), 3)])

    assert np.array_equal(first_batches(seed_a), first_batches(seed_b)) == same


# --- Foreground sampling and placement ------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.33, 0.5, 1.0])
@pytest.mark.parametrize("count", [1, 7, 30, 301])
def test_forced_share_is_exact_in_every_prefix(fraction, count):
    forced = sum(is_foreground_sample(i, fraction) for i in range(count))
    assert forced == math.floor(count * fraction)


@pytest.mark.parametrize("augmentation", [{"enabled": False}, EVERYTHING | {"affine_prob": 1.0}])
def test_forced_patches_hold_foreground_and_rare_classes_appear(cases, augmentation):
    config = _config(augmentation=augmentation, foreground_fraction=1.0)
    sampler = PatchSampler(config, cases)
    labels = [sampler(i)[1] for i in range(60)]
    assert all((label > 0).any() for label in labels)
    # Class 2 is one voxel per case: per-class sampling forces it in about half the patches.
    with_rare = sum((label == 2).any() for label in labels)
    assert 15 <= with_rare <= 45


@pytest.mark.parametrize(
    ("volume", "shape"),
    [((17, 18, 19), (8, 10, 12)), ((5, 6, 7), (8, 10, 12)), ((9, 23, 11), (8, 10, 12))],
)
@pytest.mark.parametrize("forced", [False, True])
def test_placement_keeps_patch_inside_or_volume_inside(volume, shape, forced):
    rng = np.random.default_rng(0)
    foreground = {1: np.array([[0, 0, 0], [v - 1 for v in volume], [2, 3, 4]])}
    volume_arr, shape_arr = np.array(volume), np.array(shape)
    for _ in range(200):
        start, pivot = place_patch(rng, volume, shape, foreground, forced)
        # Along each axis the smaller of patch and volume lies wholly inside the other.
        assert (start >= np.minimum(0, volume_arr - shape_arr)).all()
        assert (start <= np.maximum(0, volume_arr - shape_arr)).all()
        assert (pivot is None) != forced
        if forced:
            assert ((pivot >= 0) & (pivot < shape_arr)).all()
            assert any((start + pivot == xyz).all() for xyz in foreground[1])


def test_small_volume_is_padded_with_zeros_around_the_whole_volume(tmp_path):
    case = _write_case(tmp_path, "small", (5, 6, 7))
    sampler = PatchSampler(_config(foreground_fraction=0.0), [case])
    placements = set()
    for index in range(20):
        image, label = sampler(index)
        inside = image[..., 0] > 0  # the case's image is >= 1 everywhere
        assert inside.sum() == 5 * 6 * 7
        assert (label[~inside] == 0).all() and (label[inside] == 1).sum() == 1 * 2 * 2
        placements.add(tuple(np.argwhere(inside).min(axis=0)))
    assert len(placements) > 1  # randomly placed, not always centred


# --- Memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "expected_open"), [(1, 1), (2, 2), (5, 3)])
def test_open_case_table_is_bounded(cases, capacity, expected_open):
    table = pipeline._OpenCases(cases, capacity)
    for index in [0, 1, 2, 0, 2, 1]:
        opened = table.get(index)
        assert isinstance(opened.image, np.memmap)
        assert opened.image.shape[:3] == cases[index].shape
    assert len(table._open) == expected_open
    assert table.get(1) is table.get(1)  # reused, not reopened


@pytest.mark.parametrize(
    ("max_cached", "num_cases", "fd_limit", "expected"),
    [(3, 10, 20000, 3), (0, 10, 20000, 10), (0, 1000, 300, 22), (0, 5, 200, 1)],
)
def test_unbounded_table_stays_within_the_descriptor_limit(
    monkeypatch, max_cached, num_cases, fd_limit, expected
):
    # Each memmap holds a file descriptor: "open every case" must not exhaust them.
    monkeypatch.setattr(pipeline.resource, "getrlimit", lambda _: (fd_limit, fd_limit))
    assert pipeline._cache_capacity(max_cached, num_cases) == expected


# --- Bad input ------------------------------------------------------------------------------


def test_bad_cases_are_listed_with_their_files(tmp_path, cases):
    unlabelled = PreprocessedCase("nolabel", cases[0].image_path, None, None, (17, 18, 19))
    config = _config(pad_small_volumes=False, num_channels=2)
    with pytest.raises(DataError) as raised:
        build_dataset(config, [*cases, unlabelled])
    message = str(raised.value)
    assert "nolabel: has no label" in message
    assert all(str(case.image_path) in message for case in cases)  # 1 channel, 2 expected
    assert "4 problems" in message


def test_small_volume_refused_without_padding(cases):
    with pytest.raises(DataError, match=r"case1: volume \(5, 6, 7\) is smaller"):
        build_dataset(_config(pad_small_volumes=False), cases)


def test_empty_case_list_is_refused():
    with pytest.raises(DataError, match="no training cases"):
        build_dataset(_config(), [])


def test_spatial_dims_must_be_2_or_3(cases):
    with pytest.raises(ValueError, match="spatial_dims"):
        build_dataset(_config(), cases, spatial_dims=1)


# --- Distribution and logging ---------------------------------------------------------------


def test_distributed_dataset_yields_the_global_batch(cases):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    dataset = build_dataset(_config(augmentation=EVERYTHING), cases, batch_size=4)
    distributed = strategy.experimental_distribute_dataset(dataset)
    images, labels = next(iter(distributed))
    local = strategy.experimental_local_results(images)
    assert sum(x.shape[0] for x in local) == 4
    assert strategy.experimental_local_results(labels)[0].dtype == tf.int32


def test_describe_pipeline_names_the_settings(cases):
    config = _config(augmentation=EVERYTHING, max_cached_cases=2)
    text = describe_pipeline(config, cases, start_step=3, spatial_dims=2)
    for part in ("3 cases", "2D 10x12 x 1 channels", "batches of 2", "sample 6", "rot90"):
        assert part in text
    assert "up to 2 cases memory-mapped" in text
    assert "augmentation: off" in describe_pipeline(_config(), cases)
    assert "augmentation of intensity: scale p=" in text
    assert max(map(len, text.splitlines())) <= 120  # lines a person reads, not a 330-char dump
