"""The 3D U-Net and the blocks it is made of (segnet/models/unet3d.py, blocks.py).

References: ``scipy.ndimage.zoom(order=1, grid_mode=True)`` and ``tf.image.resize`` for the
linear up-sampling, a numpy block mean for the soft labels, numpy statistics for the norms.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from segnet.models import blocks
from segnet.models.unet3d import UNet3D

TINY = {"num_channels": 1, "num_classes": 3, "depth": 2, "filters": 4}


def _random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("factor", [2, 3, 4, (1, 2, 3)])
def test_linear_upsampling_matches_scipy_zoom(factor: int | tuple[int, ...]) -> None:
    x = _random((2, 5, 6, 7, 3))
    factors = (factor,) * 3 if isinstance(factor, int) else factor
    expected = scipy.ndimage.zoom(x, (1, *factors, 1), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(blocks.LinearUpsampling(factor)(x), expected, atol=1e-5)


def test_linear_upsampling_2d_matches_tf_image_resize() -> None:
    x = _random((2, 7, 4, 3))
    expected = tf.image.resize(x, (14, 8), method="bilinear")
    np.testing.assert_allclose(blocks.LinearUpsampling(2, spatial_dims=2)(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "factor"),
    [((8, 6, 4), 2), ((5, 6, 7), 2), ((9, 9, 10), 4), ((5, 9, 10), (1, 2, 4))],
)
def test_downsample_labels_is_the_block_mean_of_one_hot(size: tuple, factor: int | tuple) -> None:
    labels = np.random.default_rng(1).integers(0, 3, size=(2, *size))
    soft = keras.ops.convert_to_numpy(blocks.downsample_labels(labels, 3, factor))
    factors = (factor,) * 3 if isinstance(factor, int) else factor
    assert soft.shape[1:4] == tuple(-(-n // f) for n, f in zip(size, factors))
    onehot = np.eye(3, dtype="float32")[labels]
    for index in np.ndindex(*soft.shape[1:4]):
        block = tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))
        np.testing.assert_allclose(
            soft[(slice(None), *index)], onehot[(slice(None), *block)].mean((1, 2, 3)), atol=1e-6
        )


def test_pad_then_crop_restores_odd_sizes_inside_a_graph() -> None:
    image = keras.Input((None, None, None, 2))
    padded = blocks.PadToMultiple(8)(image)
    model = keras.Model(image, [padded, blocks.CropToReference(1)([padded, image])])
    x = _random((1, 17, 16, 9, 2))
    padded, cropped = model(x)
    assert tuple(padded.shape) == (1, 24, 16, 16, 2)
    np.testing.assert_array_equal(cropped, x)
    assert np.all(keras.ops.convert_to_numpy(padded)[:, 17:] == 0)


def test_pad_then_crop_per_axis() -> None:
    image = keras.Input((None, None, None, 1))
    padded = blocks.PadToMultiple((1, 4, 8))(image)
    model = keras.Model(image, [padded, blocks.CropToReference((1, 2, 4))([padded, image])])
    padded, cropped = model(_random((1, 5, 9, 9, 1)))
    assert tuple(padded.shape) == (1, 5, 12, 16, 1)
    assert tuple(cropped.shape) == (1, 5, 5, 3, 1)


ANISOTROPIC = {  # a 10 x 1.5 x 1.5 mm grid: depth pooled only at the last level
    "pool_sizes": [[1, 2, 2], [1, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
}


def test_per_axis_pools_and_kernels_keep_a_coarse_axis() -> None:
    model = UNet3D(**{**TINY, "depth": 3}, **ANISOTROPIC, deep_supervision=True)
    pools = [layer.pool_size for layer in model.layers if "down" in layer.name]
    assert pools == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert model.get_layer("encoder0_conv0").kernel_size == (1, 3, 3)
    assert model.get_layer("bottleneck_conv0").kernel_size == (3, 3, 3)
    assert model.get_layer("up0").strides == (1, 2, 2)
    assert model.output_scales == (1, (1, 2, 2), (1, 4, 4))
    assert model.output_names == ["logits", "logits_x1x2x2", "logits_x1x4x4"]
    # 9 slices pad to 10 (the divisor is 2 x 8 x 8), and every output is cropped back.
    shapes = [tuple(o.shape) for o in model(_random((1, 9, 33, 40, 1)))]
    assert shapes == [(1, 9, 33, 40, 3), (1, 9, 17, 20, 3), (1, 9, 9, 10, 3)]


def test_default_pools_and_kernels_build_todays_network() -> None:
    keras.utils.set_random_seed(0)
    today = UNet3D(**TINY, deep_supervision=True)
    explicit = UNet3D(
        **TINY,
        pool_sizes=[[2, 2, 2]] * 2,
        kernel_sizes=[[3, 3, 3]] * 3,
        input_downsample=[1, 1, 1],
        deep_supervision=True,
    )
    assert [layer.name for layer in explicit.layers] == [layer.name for layer in today.layers]
    explicit.set_weights(today.get_weights())  # the same weights fit, shape for shape
    x = _random((1, 9, 10, 11, 1))
    for a, b in zip(today(x), explicit(x)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert today.output_scales == explicit.output_scales == (1, 2)


def _assert_runs_at_low_resolution_inside(model: keras.Model, factor: int) -> None:
    """The model takes the full-resolution volume and pools it itself."""
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.AveragePooling3D)]
    assert [p.pool_size for p in pools] == [(factor,) * 3], "no in-graph AveragePooling3D"
    assert tuple(keras.tree.flatten(model(_random((1, 16, 16, 16, 1))))[0].shape[1:4]) == (
        16,
        16,
        16,
    )


def test_in_graph_downsampling_keeps_the_full_resolution_input() -> None:
    model = UNet3D(**TINY, input_downsample=2)
    _assert_runs_at_low_resolution_inside(model, 2)
    # The Keras 3 trap: rebinding the Input variable to the pooled tensor makes the pooled
    # tensor the model's input; the pooling disappears and outputs come out 2x too large.
    image = keras.Input((None, None, None, 1))
    image = keras.layers.AveragePooling3D(2)(image)
    buggy = keras.Model(image, blocks.LinearUpsampling(2)(blocks.head(image, 3, 3, name="h")))
    with pytest.raises(AssertionError):
        _assert_runs_at_low_resolution_inside(buggy, 2)


def test_loss_at_low_exposes_the_logits_that_are_upsampled() -> None:
    model = UNet3D(**TINY, input_downsample=4, loss_at="low")
    full, low = model(_random((1, 16, 16, 16, 1)))
    assert model.output_scales == (1, 4) and model.supervised_outputs == (1,)
    np.testing.assert_allclose(full, blocks.LinearUpsampling(4)(low), atol=1e-5)


def test_deep_supervision_adds_one_head_per_lower_decoder_level() -> None:
    model = UNet3D(**{**TINY, "depth": 3}, deep_supervision=True, upsampling="resize")
    assert model.output_scales == (1, 2, 4) and model.supervised_outputs == (0, 1, 2)
    assert model.output_names == ["logits", "logits_x2", "logits_x4"]
    shapes = [tuple(o.shape) for o in model(_random((1, 16, 24, 8, 1)))]
    assert shapes == [(1, 16, 24, 8, 3), (1, 8, 12, 4, 3), (1, 4, 6, 2, 3)]


def test_learned_output_upsampling_is_a_strided_transpose_convolution() -> None:
    model = UNet3D(**TINY, input_downsample=4, output_upsample="learned")
    layer = model.get_layer("head_learned_up")
    assert isinstance(layer, keras.layers.Conv3DTranspose) and layer.strides == (4, 4, 4)


@pytest.mark.parametrize(
    "arguments",
    [
        {"input_downsample": 3},
        {"loss_at": "low"},
        {"input_downsample": 2, "loss_at": "low", "output_upsample": "learned"},
    ],
)
def test_inconsistent_arguments_are_rejected(arguments: dict) -> None:
    with pytest.raises(ValueError, match=r"input_downsample|loss_at"):
        UNet3D(**TINY, **arguments)


def test_instance_norm_normalises_each_channel_of_each_sample() -> None:
    norm = blocks.normalization("instance", 4, groups=8, name="n")
    y = keras.ops.convert_to_numpy(norm(_random((2, 5, 6, 7, 4)) * 3 + 1))
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=(1, 2, 3)), 1, atol=1e-2)


def test_group_norm_falls_back_to_a_dividing_group_count() -> None:
    assert blocks.normalization("group", 12, groups=8, name="n").groups == 4
    assert blocks.normalization("none", 12, groups=8, name="n") is None


@pytest.mark.parametrize("factory", [blocks.normalization, blocks.activation])
def test_factories_name_the_options_of_an_unknown_kind(factory) -> None:
    arguments = ("batchnorm", 4, 8) if factory is blocks.normalization else ("relu6",)
    with pytest.raises(ValueError, match="expected one of"):
        factory(*arguments, name="x")


def test_level_filters_grow_and_cap() -> None:
    assert blocks.level_filters(16, 2.0, 100, 5) == [16, 32, 64, 100, 100]
    assert blocks.level_filters(10, 1.5, 320, 3) == [10, 15, 22]
