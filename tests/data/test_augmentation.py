"""Tests for segnet.data.augmentation: exactness, label safety, determinism, 2D, tf.data."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from segnet.config import AugmentationConfig
from segnet.data.augmentation import (
    SpatialParams,
    affine_matrix,
    apply_patch_spatial,
    augment_intensity,
    draw_spatial,
    extract_patch,
    extraction_shape,
    gamma,
)

VOLUME = (17, 18, 19)
NUM_CLASSES = 4
PROBABILITIES = [f.name for f in dataclasses.fields(AugmentationConfig) if f.name.endswith("_prob")]
ALL_ZERO = AugmentationConfig(**{name: 0.0 for name in PROBABILITIES})
INTENSITY = [
    "intensity_scale_prob",
    "intensity_shift_prob",
    "gamma_prob",
    "noise_prob",
    "blur_prob",
]


def _only(name: str) -> AugmentationConfig:
    """A config in which only the transform ``name`` fires, always."""
    return dataclasses.replace(ALL_ZERO, **{name: 1.0})


@pytest.fixture
def volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(*VOLUME, 2)).astype(np.float32)
    label = rng.integers(0, NUM_CLASSES, VOLUME).astype(np.uint8)
    return image, label


def _transform(volume, aug: AugmentationConfig, seed: int, patch=(8, 9, 10), start=(3, -2, 12)):
    """The full per-sample chain, as the pipeline runs it."""
    rng = np.random.default_rng(seed)
    params = draw_spatial(rng, aug)
    shape = extraction_shape(patch, params.rot90)
    image, label = extract_patch(*volume, start, shape, params.matrix)
    image, label = apply_patch_spatial(image, label, params)
    return augment_intensity(image, rng, aug), label


# --- Labels stay labels ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PROBABILITIES)
def test_labels_stay_valid_integers_under_every_transform(volume, name):
    for seed in range(4):
        image, label = _transform(volume, _only(name), seed)
        assert label.dtype == np.uint8 and image.dtype == np.float32
        assert image.shape == (8, 9, 10, 2) and label.shape == (8, 9, 10)
        assert set(np.unique(label)) <= set(range(NUM_CLASSES))


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_change_the_image_but_never_the_label(volume, name):
    raw_image, raw_label = _transform(volume, ALL_ZERO, seed=1)
    image, label = _transform(volume, _only(name), seed=1)
    np.testing.assert_array_equal(label, raw_label)
    assert not np.allclose(image, raw_image)


def test_affine_labels_are_copied_not_interpolated(volume):
    image, label = volume
    matrix = affine_matrix([0.3, -0.2, 0.25], 1.1)
    out_image, out_label = extract_patch(image, label, (4, 4, 4), (9, 9, 9), matrix)
    # Every label comes from a source voxel: round the source coordinates and compare.
    grid = np.indices((9, 9, 9)).reshape(3, -1) - 4.0
    source = np.rint(np.array([8.0, 8.0, 8.0])[:, None] + matrix @ grid).astype(int)
    np.testing.assert_array_equal(out_label.ravel(), label[tuple(source)])
    assert not np.array_equal(out_image, image[4:13, 4:13, 4:13])


# --- Exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SpatialParams(rot90=1),
        SpatialParams(rot90=2),
        SpatialParams(rot90=3, flips=(0, 2)),
        SpatialParams(flips=(1,)),
        SpatialParams(flips=(0, 1, 2)),
    ],
)
def test_flips_and_quarter_turns_are_exactly_invertible(volume, params):
    image, label = extract_patch(*volume, (1, 2, 3), (7, 9, 11))
    turned = apply_patch_spatial(image, label, params)
    undo_flips = apply_patch_spatial(*turned, SpatialParams(flips=params.flips))
    back = apply_patch_spatial(*undo_flips, SpatialParams(rot90=(4 - params.rot90) % 4))
    np.testing.assert_array_equal(back[0], image)
    np.testing.assert_array_equal(back[1], label)


@pytest.mark.parametrize("rot90", [0, 1, 2, 3])
def test_quarter_turns_give_the_requested_shape_when_height_differs_from_width(volume, rot90):
    patch = (5, 7, 12)
    shape = extraction_shape(patch, rot90)
    image, label = apply_patch_spatial(
        *extract_patch(*volume, (0, 0, 0), shape), SpatialParams(rot90=rot90)
    )
    assert image.shape == (*patch, 2) and label.shape == patch


@pytest.mark.parametrize(
    ("start", "shape", "pivot"),
    [
        ((0, 0, 0), (17, 18, 19), None),  # the whole volume
        ((3, 4, 5), (8, 9, 10), None),  # inside
        ((-3, 10, 15), (8, 9, 10), None),  # runs off both ends
        ((-4, -5, -6), (25, 28, 31), None),  # larger than the volume
        ((30, 0, 0), (4, 4, 4), None),  # entirely outside
        ((2, 3, 4), (8, 9, 10), (1.0, 7.0, 2.0)),  # pivot off centre
    ],
)
def test_identity_affine_reproduces_the_plain_patch_exactly(volume, start, shape, pivot):
    plain = extract_patch(*volume, start, shape)
    affine = extract_patch(*volume, start, shape, affine_matrix([], 1.0), pivot)
    np.testing.assert_array_equal(affine[0], plain[0])
    np.testing.assert_array_equal(affine[1], plain[1])


def test_plain_patch_pads_image_and_label_with_zero(volume):
    image, label = extract_patch(*volume, (-2, 0, 15), (5, 6, 7))
    np.testing.assert_array_equal(image[2:, :, :4], volume[0][:3, :6, 15:])
    assert (image[:2] == 0).all() and (image[:, :, 4:] == 0).all()
    assert (label[:2] == 0).all() and (label[:, :, 4:] == 0).all()


@pytest.mark.parametrize("k", [1, 3])
def test_affine_quarter_turn_matches_rot90(volume, k):
    """Checks the convention: the affine turns the sampling grid, so content turns back."""
    start, shape = (2, 3, 4), (7, 9, 9)
    plain = extract_patch(*volume, start, shape)
    turned = extract_patch(*volume, start, shape, affine_matrix([k * np.pi / 2], 1.0))
    expected = apply_patch_spatial(*plain, SpatialParams(rot90=4 - k))
    np.testing.assert_allclose(turned[0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(turned[1], expected[1])


@pytest.mark.parametrize("zoom", [0.8, 1.25, 2.0])
def test_zoom_magnifies_about_the_pivot(zoom):
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[None, None, :, None], (9, 9, 40, 1))
    label = np.zeros(ramp.shape[:3], np.uint8)
    image, _ = extract_patch(ramp, label, (0, 0, 10), (9, 9, 21), affine_matrix([], zoom))
    # Linear interpolation of a ramp is exact: the slope shrinks by the zoom about x = 20.
    expected = 20.0 + (np.arange(21) - 10.0) / zoom
    np.testing.assert_allclose(image[4, 4, :, 0], expected, atol=1e-5)


# --- Probabilities, determinism -------------------------------------------------------------


@pytest.mark.parametrize("aug", [ALL_ZERO, AugmentationConfig(enabled=False)])
def test_no_transform_leaves_the_raw_patch(volume, aug):
    raw = extract_patch(*volume, (3, -2, 12), (8, 9, 10))
    for seed in range(3):
        image, label = _transform(volume, aug, seed)
        np.testing.assert_array_equal(image, raw[0])
        np.testing.assert_array_equal(label, raw[1])


@pytest.mark.parametrize(("seed_a", "seed_b", "same"), [(5, 5, True), (5, 6, False)])
def test_seed_decides_the_augmentation(volume, seed_a, seed_b, same):
    aug = dataclasses.replace(
        ALL_ZERO, affine_prob=1.0, noise_prob=1.0, gamma_prob=1.0, flip_prob=0.5
    )
    first, second = _transform(volume, aug, seed_a), _transform(volume, aug, seed_b)
    assert np.array_equal(first[0], second[0]) == same


def test_probabilities_are_respected():
    aug = dataclasses.replace(ALL_ZERO, affine_prob=0.3, rot90_prob=0.6, flip_prob=0.5)
    drawn = [draw_spatial(np.random.default_rng(seed), aug) for seed in range(2000)]
    assert abs(np.mean([p.matrix is not None for p in drawn]) - 0.3) < 0.04
    assert abs(np.mean([p.rot90 > 0 for p in drawn]) - 0.6) < 0.04
    assert abs(np.mean([0 in p.flips for p in drawn]) - 0.5) < 0.04


# --- Intensity details ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.7, 1.0, 1.5])
def test_gamma_keeps_order_and_statistics_of_signed_intensities(value):
    channel = np.random.default_rng(3).normal(-0.5, 2.0, size=(7, 8, 9)).astype(np.float32)
    out = gamma(channel, value)
    assert np.isfinite(out).all() and out.dtype == np.float32
    np.testing.assert_allclose([out.mean(), out.std()], [channel.mean(), channel.std()], atol=1e-4)
    np.testing.assert_array_equal(np.argsort(out, axis=None), np.argsort(channel, axis=None))
    if value == 1.0:
        np.testing.assert_allclose(out, channel, atol=1e-5)


def test_gamma_of_a_constant_channel_is_unchanged():
    np.testing.assert_array_equal(gamma(np.full((3, 4, 5), 2.5, np.float32), 1.3), 2.5)


@pytest.mark.parametrize("shape", [(11, 13, 2), (7, 11, 13, 2)])
def test_blur_never_mixes_channels(shape):
    image = np.zeros(shape, np.float32)
    image[..., 1] = np.random.default_rng(0).normal(size=shape[:-1])
    out = augment_intensity(image, np.random.default_rng(0), _only("blur_prob"))
    assert (out[..., 0] == 0).all()
    assert out[..., 1].std() < image[..., 1].std()


# --- 2D -------------------------------------------------------------------------------------


def test_2d_draws_act_in_the_axial_plane_only():
    aug = dataclasses.replace(ALL_ZERO, affine_prob=1.0, flip_prob=1.0)
    for seed in range(20):
        params = draw_spatial(np.random.default_rng(seed), aug, spatial_dims=2)
        np.testing.assert_array_equal(params.matrix[0], [1.0, 0.0, 0.0])
        np.testing.assert_array_equal(params.matrix[:, 0], [1.0, 0.0, 0.0])
        assert params.flips == (1, 2)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_coarse_axis_is_neither_rotated_into_nor_zoomed(axis: int):
    aug = dataclasses.replace(ALL_ZERO, affine_prob=1.0, coarse_axis=axis)
    unit = np.eye(3)[axis]
    turned = 0
    for seed in range(20):
        matrix = draw_spatial(np.random.default_rng(seed), aug).matrix
        # The coarse coordinate of every sample is its own: no slice borrows from another.
        np.testing.assert_array_equal(matrix[axis], unit)
        np.testing.assert_array_equal(matrix[:, axis], unit)
        turned += not np.allclose(matrix, np.diag(np.diag(matrix)))
    assert turned == 20  # the other two axes do rotate


def test_without_a_coarse_axis_every_axis_turns():
    aug = dataclasses.replace(ALL_ZERO, affine_prob=1.0)
    matrix = draw_spatial(np.random.default_rng(0), aug).matrix
    assert all(not np.allclose(matrix[a], np.eye(3)[a]) for a in range(3))


def test_2d_slice_chain(volume):
    aug = AugmentationConfig(rot90_prob=0.5, affine_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        params = draw_spatial(rng, aug, spatial_dims=2)
        shape = extraction_shape((1, 12, 12), params.rot90)
        image, label = apply_patch_spatial(*extract_patch(*volume, (8, 3, 4), shape), params)
        image = augment_intensity(image[0], rng, aug)
        assert image.shape == (12, 12, 2) and label[0].shape == (12, 12)
        assert set(np.unique(label)) <= set(range(NUM_CLASSES))


# --- Eager and inside tf.data ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["affine_prob", "gamma_prob", "blur_prob", "flip_prob"])
def test_same_result_eagerly_and_inside_tf_data(volume, name):
    aug = _only(name)

    def sample(seed: np.int64) -> tuple[np.ndarray, np.ndarray]:
        image, label = _transform(volume, aug, int(seed))
        return image, label.astype(np.int32)

    dataset = tf.data.Dataset.range(4).map(
        lambda s: tf.numpy_function(sample, [s], (tf.float32, tf.int32)),
        num_parallel_calls=2,
        deterministic=True,
    )
    for seed, (image, label) in enumerate(dataset):
        eager_image, eager_label = sample(np.int64(seed))
        np.testing.assert_array_equal(image.numpy(), eager_image)
        np.testing.assert_array_equal(label.numpy(), eager_label)
