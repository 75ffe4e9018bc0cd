"""SegNet (segnet/models/segnet.py): argmax wiring, 2D/3D layouts and sizes without a rule."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest

from segnet.models.segnet import SegNet


@pytest.mark.parametrize("depth", [1, 3])
def test_each_decoder_level_unpools_with_its_own_encoder_level(depth: int) -> None:
    model = SegNet(1, 2, depth=depth, filters=4)
    for level in range(depth):
        values, argmax, reference = model.get_layer(f"unpool{level}").input
        _, recorded = model.get_layer(f"pool{level}").output
        assert argmax is recorded
        assert reference is model.get_layer(f"pool{level}").input
        deeper = f"pool{level}" if level == depth - 1 else f"decoder{level + 1}_act1"
        assert values is keras.tree.flatten(model.get_layer(deeper).output)[0]


def test_decoder_narrows_to_the_next_level_width() -> None:
    model = SegNet(1, 2, depth=3, filters=4, growth=2.0, convs_per_level=2)
    widths = [model.get_layer(f"decoder{level}_conv1").filters for level in range(3)]
    assert widths == [4, 4, 8]
    assert [model.get_layer(f"decoder{level}_conv0").filters for level in range(3)] == [4, 8, 16]


@pytest.mark.parametrize(
    ("spatial_dims", "size"),
    [(3, (5, 6, 7)), (3, (3, 1, 2)), (2, (17, 9)), (2, (1, 33))],
    ids=["3d-odd", "3d-smaller-than-the-pools", "2d-odd", "2d-thin"],
)
def test_any_size_comes_back_unchanged(spatial_dims: int, size: tuple[int, ...]) -> None:
    model = SegNet(2, 3, spatial_dims=spatial_dims, depth=3, filters=2, norm="none")
    x = np.random.default_rng(0).normal(size=(1, *size, 2)).astype("float32")
    assert model.input_shape == (None,) * (spatial_dims + 1) + (2,)
    logits = keras.ops.convert_to_numpy(model(x))
    assert logits.shape == (1, *size, 3) and np.all(np.isfinite(logits))


def test_unsupported_dimensionality_is_rejected() -> None:
    with pytest.raises(ValueError, match="spatial_dims: must be one of 2, 3"):
        SegNet(spatial_dims=1)
