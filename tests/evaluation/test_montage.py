"""PNG montages: slice choice, layout size, the frame (titles, legend) and pixel-exact PNGs."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from segnet.evaluation import montage
from segnet.visuals import PALETTE


def _volume(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:9, 3:12, 5:14] = 1
    label[6, 2:6, 2:6] = 2  # slice 6 holds the most foreground
    return image, label


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([0, 5, 0, 9, 2, 9, 0], [1, 3, 5]),  # ties keep the lower index
        ([0, 0, 4, 0, 0, 0, 0], [2]),  # fewer labelled slices than asked: only those
        ([0] * 7, [2, 3, 4]),  # nothing labelled: evenly spaced slices
        ([3, 1], [0, 1]),  # fewer slices than asked
    ],
)
def test_representative_slices(counts: list[int], expected: list[int]):
    label = np.zeros((len(counts), 4, 5), np.uint8)
    for z, count in enumerate(counts):
        label[z].flat[:count] = 1
    assert montage.representative_slices(label, 3) == expected


def _decode(path: Path) -> np.ndarray:
    return tf.io.decode_png(path.read_bytes(), channels=3).numpy()


@pytest.mark.parametrize(
    ("shape", "with_label", "expected_hw"),
    [
        ((17, 18, 19), True, (3 * 8 * 18, 3 * 8 * 19)),  # zoom ceil(128 / 18) = 8
        ((17, 18, 19), False, (3 * 8 * 18, 2 * 8 * 19)),  # no ground truth: two columns
        ((9, 130, 140), True, (3 * 130, 3 * 140)),  # large slices are not enlarged
    ],
)
def test_png_holds_the_layout_pixel_for_pixel_in_its_frame(
    tmp_path: Path, shape: tuple[int, int, int], with_label: bool, expected_hw: tuple[int, int]
):
    image, label = _volume(shape)
    reference = label if with_label else None
    path = tmp_path / "case.png"
    size = montage.write_montage(path, image[..., None], label, reference)
    decoded = _decode(path)
    rgb = montage.build_montage(image, label, reference)
    assert rgb.shape == (*expected_hw, 3)
    frame = montage.montage_frame(*expected_hw, ["1", "2"])  # labels 1 and 2, no names
    assert size == (frame.height, frame.width) == decoded.shape[:2]
    assert frame.top > 0 and frame.height > frame.top + expected_hw[0]  # title, legend
    block = decoded[
        frame.top : frame.top + expected_hw[0], frame.left : frame.left + expected_hw[1]
    ]
    np.testing.assert_array_equal(block, rgb)  # not resampled, not blurred
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_legend_shows_each_class_colour_with_its_name(tmp_path: Path):
    image, label = _volume((17, 18, 19))
    path = tmp_path / "case.png"
    names = {0: "background", 1: "liver", 2: "tumour", 3: "vessel"}
    height, _ = montage.write_montage(path, image, label, label, class_names=names)
    decoded = _decode(path)
    frame = montage.montage_frame(3 * 8 * 18, 3 * 8 * 19, ["1 liver", "2 tumour", "3 vessel"])
    legend = decoded[frame.top + 3 * 8 * 18 :]
    assert height == frame.height and legend.shape[0] > 0
    # Overlays blend the colours with grey; only the legend shows them pure. Class 3 is in
    # no mask, but the dataset names it, so the legend lists it too.
    for colour in PALETTE[:3]:
        assert (legend == colour).all(axis=-1).sum() > 20, colour
    assert not (decoded[: frame.top + 3 * 8 * 18] == PALETTE[2]).all(axis=-1).any()
    assert not (legend == PALETTE[3]).all(axis=-1).any()  # no class 4


def test_legend_lists_the_unnamed_labels_shown(tmp_path: Path):
    image, label = _volume((17, 18, 19))
    prediction = label.copy()
    prediction[6, 10:14, 10:14] = 5  # a label the dataset does not name
    montage.write_montage(tmp_path / "a.png", image, prediction, label, class_names={1: "a"})
    legend = _decode(tmp_path / "a.png")[-montage.LEGEND_ROW_HEIGHT :]
    for colour in (PALETTE[0], PALETTE[1], PALETTE[4]):
        assert (legend == colour).all(axis=-1).any(), colour


def test_overlays_colour_only_labelled_voxels():
    image, label = _volume((17, 18, 19))
    rgb = montage.build_montage(image, label, label, slices=[6])
    zoom = montage.zoom_factor(18, 19)
    width = 19 * zoom
    bare, truth = rgb[:, :width], rgb[:, width : 2 * width]
    labelled = np.repeat(np.repeat(label[6] > 0, zoom, 0), zoom, 1)
    assert np.array_equal(bare[~labelled], truth[~labelled])  # background untouched
    assert (bare[labelled] != truth[labelled]).any(axis=-1).all()  # every label voxel tinted
    assert (bare[..., 0] == bare[..., 1]).all()  # the bare image is grey


@pytest.mark.parametrize(
    ("codes", "axes", "corner"),
    [
        (("R", "A", "S"), (2, 1, 0), (-1, -1, 0)),  # RAS: anterior and right sides flipped
        (("L", "P", "S"), (2, 1, 0), (0, 0, 0)),  # LPS (DICOM) is the display order already
        (("P", "I", "R"), (1, 0, 2), (0, -1, -1)),  # slices from j reversed, columns from k
        (None, (0, 1, 2), (0, 0, 0)),  # no orientation: as stored
    ],
)
def test_axial_view_orders_slices_rows_and_columns(
    codes: tuple[str, str, str] | None, axes: tuple[int, int, int], corner: tuple[int, ...]
):
    volume = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    view = montage.axial_view(volume, codes)
    assert view.shape == tuple(volume.shape[a] for a in axes)
    assert view[0, 0, 0] == volume[corner]


def test_write_montage_shows_axial_slices_of_a_ras_volume(tmp_path: Path):
    image, label = _volume((17, 18, 19))  # i, j, k; k is superior for RAS
    size = montage.write_montage(tmp_path / "ras.png", image, label, label, ("R", "A", "S"))
    zoom = montage.zoom_factor(18, 17)
    frame = montage.montage_frame(3 * zoom * 18, 3 * zoom * 17, ["1", "2"])
    assert size == (frame.height, frame.width)  # rows from j (A-P), columns from i (R-L)


def test_shape_mismatch_is_refused():
    image, label = _volume((17, 18, 19))
    with pytest.raises(ValueError, match="prediction shape"):
        montage.build_montage(image, label[:-1], label)
