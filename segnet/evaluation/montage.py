"""PNG montages of a case: image, ground truth and prediction on representative axial slices.

The volumes are first turned to the usual axial view from their orientation codes
(``Geometry.orientation``): slices inferior to superior, rows anterior (top) to posterior,
columns from the patient's right to left (radiological display). For ``n`` chosen slices of
``(rows, columns)`` voxels, each drawn ``zoom`` times larger, :func:`build_montage` assembles::

    row i (slice i):  [ image | image + ground truth | image + prediction ]

an RGB array ``n * zoom * rows`` pixels high and ``3 * zoom * columns`` wide (two columns of
panels when there is no ground truth). Voxels are drawn square whatever the in-plane spacing.
:func:`render_montage` frames it, pixel for pixel, with a title (the case and its slices),
the column titles, the slice of each row and a legend of the class colours with their names;
:func:`montage_frame` gives that frame's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from segnet.files import atomic_write_bytes
from segnet.visuals import class_name, legend_handles, overlay_strip, render_png, to_grey

MIN_SLICE_PIXELS = 128  # small slices (e.g. 36x50 hippocampus) are enlarged to about this
AXIAL_VIEW = ("S", "P", "L")  # (slices, rows, columns) of the displayed arrays
# The frame around the montage, in pixels.
TITLE_HEIGHT = 26  # the case and its slices
HEADER_HEIGHT = 18  # image / reference / prediction
ROW_LABEL_WIDTH = 18  # the slice of each row, written upwards
MARGIN = 6
LEGEND_ROW_HEIGHT = 20
MIN_WIDTH = 320  # room for the title and the legend beside small montages
LEGEND_CHAR_PIXELS = 7  # a generous estimate of one legend character at font size 9


def axial_view(volume: np.ndarray, orientation: tuple[str, ...] | None) -> np.ndarray:
    """``volume`` reoriented so axis 0 runs inferior to superior, axis 1 anterior to posterior
    and axis 2 from the patient's right to left.

    Args:
        volume: (i, j, k) or (i, j, k, channels) in the file's voxel order.
        orientation: the axis codes of (i, j, k), e.g. ``("R", "A", "S")``, from
            ``nib.aff2axcodes`` (oblique grids take their closest axes); None leaves the
            volume as it is.

    Returns:
        A view (no copy) of ``volume`` with its spatial axes permuted and flipped.
    """
    if orientation is None:
        return volume
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(orientation), nib.orientations.axcodes2ornt(AXIAL_VIEW)
    )
    return nib.orientations.apply_orientation(volume, transform)


def representative_slices(label: np.ndarray, count: int = 3) -> list[int]:
    """The slices (along axis 0) with the most foreground voxels, in increasing order.

    Args:
        label: Integer label map, (slices, rows, columns); 0 is background.
        count: How many slices to return (fewer when the volume has fewer slices).

    Returns:
        Slice indices along axis 0. Without any foreground, evenly spaced slices are returned
        so the montage still shows the volume.
    """
    depth = label.shape[0]
    count = min(count, depth)
    per_slice = np.count_nonzero(label.reshape(depth, -1), axis=1)
    if not per_slice.any():
        return sorted({int(i) for i in np.linspace(0, depth - 1, count + 2)[1:-1].round()})
    # A stable sort keeps the lower index among ties, so the choice is reproducible.
    order = np.argsort(-per_slice, kind="stable")
    return sorted(int(i) for i in order[:count] if per_slice[i] > 0) or [int(order[0])]


def zoom_factor(height: int, width: int) -> int:
    """Integer enlargement that brings the smaller slice side to about ``MIN_SLICE_PIXELS``."""
    return max(1, math.ceil(MIN_SLICE_PIXELS / max(1, min(height, width))))


def build_montage(
    image: np.ndarray,
    prediction: np.ndarray,
    label: np.ndarray | None = None,
    slices: list[int] | None = None,
) -> np.ndarray:
    """The montage of one case as an RGB array (layout in the module docstring).

    Args:
        image: (slices, rows, columns) intensities of one channel.
        prediction: (slices, rows, columns) integer predicted labels.
        label: (slices, rows, columns) integer ground truth, or None.
        slices: Slices along axis 0 to show; default ``representative_slices`` of the ground truth
            (of the prediction when there is none).

    Returns:
        (len(slices) * zoom * rows, panels * zoom * columns, 3) uint8, with ``zoom_factor``
        and 3 panels (2 without ground truth).

    Raises:
        ValueError: if the three volumes do not share one shape.
    """
    for name, other in (("prediction", prediction), ("label", label)):
        if other is not None and other.shape != image.shape:
            raise ValueError(f"montage: {name} shape {other.shape} != image shape {image.shape}")
    if slices is None:
        slices = representative_slices(label if label is not None else prediction)
    grey = to_grey(image)
    overlays = ([None, label] if label is not None else [None]) + [prediction]
    strips = [
        overlay_strip(grey[z], [None if o is None else o[z] for o in overlays]) for z in slices
    ]
    zoom = zoom_factor(*image.shape[1:])
    montage = np.concatenate(strips, axis=0)
    return np.repeat(np.repeat(montage, zoom, axis=0), zoom, axis=1)


@dataclass(frozen=True)
class MontageFrame:
    """Where :func:`render_montage` puts the montage array, in pixels.

    Attributes:
        width: of the PNG.
        height: of the PNG.
        left: columns left of the montage.
        top: rows above the montage.
        legend_columns: legend entries per line.
    """

    width: int
    height: int
    left: int
    top: int
    legend_columns: int


def montage_frame(montage_height: int, montage_width: int, legend: list[str]) -> MontageFrame:
    """The frame of a ``montage_height`` x ``montage_width`` montage with ``legend`` entries."""
    width = max(ROW_LABEL_WIDTH + montage_width + MARGIN, MIN_WIDTH)
    entry = 30 + LEGEND_CHAR_PIXELS * max((len(text) for text in legend), default=0)
    columns = max(1, min(len(legend), (width - 2 * MARGIN) // entry))
    legend_height = math.ceil(len(legend) / columns) * LEGEND_ROW_HEIGHT + MARGIN
    top = TITLE_HEIGHT + HEADER_HEIGHT
    # Small montages sit in the middle of the minimum width.
    left = ROW_LABEL_WIDTH + (width - ROW_LABEL_WIDTH - MARGIN - montage_width) // 2
    height = top + montage_height + (legend_height if legend else MARGIN)
    return MontageFrame(width, height, left, top, columns)


def render_montage(
    rgb: np.ndarray,
    title: str,
    columns: list[str],
    rows: list[str],
    labels: list[int],
    names: Mapping[int, str] | None = None,
) -> bytes:
    """The PNG of a montage array in its frame (see :func:`montage_frame`).

    Args:
        rgb: (height, width, 3) uint8 from :func:`build_montage`; copied unscaled.
        title: the line above it.
        columns: one title per panel column, left to right.
        rows: one label per row of panels, top to bottom.
        labels: the foreground labels the legend shows, in its order.
        names: label -> class name, for the labels the dataset names.

    Returns:
        The PNG bytes, ``montage_frame(...).width`` x ``.height`` pixels.
    """
    handles = legend_handles(labels, names)
    frame = montage_frame(rgb.shape[0], rgb.shape[1], [class_name(c, names) for c in labels])
    width, height = frame.width, frame.height
    panel_width, row_height = rgb.shape[1] / len(columns), rgb.shape[0] / len(rows)

    def draw(figure: Figure) -> None:
        def text(x: float, y_from_top: float, words: str, **style: Any) -> None:
            figure.text(
                x / width, 1 - y_from_top / height, words, ha="center", va="center", **style
            )

        # figimage copies the array pixel for pixel: no resampling blurs the voxels.
        figure.figimage(rgb, xo=frame.left, yo=height - frame.top - rgb.shape[0], origin="upper")
        text(width / 2, TITLE_HEIGHT / 2, title, fontsize=11, fontweight="bold")
        for i, name in enumerate(columns):
            text(frame.left + (i + 0.5) * panel_width, TITLE_HEIGHT + HEADER_HEIGHT / 2, name)
        for i, name in enumerate(rows):
            text(
                ROW_LABEL_WIDTH / 2 + 1,
                frame.top + (i + 0.5) * row_height,
                name,
                fontsize=8,
                rotation=90,
            )
        if handles:
            figure.legend(
                handles=handles,
                loc="lower center",
                ncol=frame.legend_columns,
                frameon=False,
                fontsize=9,
                handlelength=1.4,
                borderaxespad=0.3,
            )

    return render_png(width, height, draw)


def write_montage(
    path: Path,
    image: np.ndarray,
    prediction: np.ndarray,
    label: np.ndarray | None = None,
    orientation: tuple[str, ...] | None = None,
    class_names: Mapping[int, str] | None = None,
    case_id: str | None = None,
) -> tuple[int, int]:
    """Builds the montage of one case and writes it atomically as a PNG.

    Args:
        path: Destination ``.png``.
        image: (i, j, k) or (i, j, k, channels) intensities; the first channel is shown.
        prediction: (i, j, k) integer predicted labels.
        label: (i, j, k) integer ground truth, or None.
        orientation: axis codes of (i, j, k) (``Geometry.orientation``) for the axial view;
            None takes axis 0 as the slice axis and axes 1 and 2 as rows and columns.
        class_names: label -> name (``dataset.json``); the legend lists every named
            foreground class and any other label the slices shown hold.
        case_id: the title; default the file name without ``.png``.

    Returns:
        ``(height, width)`` of the written image in pixels.
    """
    if image.ndim == 4:
        image = image[..., 0]
    intensities, predicted = axial_view(image, orientation), axial_view(prediction, orientation)
    reference = None if label is None else axial_view(label, orientation)
    slices = representative_slices(reference if reference is not None else predicted)
    rgb = build_montage(intensities, predicted, reference, slices)
    columns = ["image", "reference", "prediction"] if label is not None else ["image", "prediction"]
    # The slices shown are enough, and np.unique of a whole CT volume would take a second.
    shown = {int(c) for v in (predicted, reference) if v is not None for c in np.unique(v[slices])}
    labels = sorted((shown | set(class_names or {})) - {0})
    title = f"{case_id or Path(path).stem}: axial slices {', '.join(map(str, slices))}"
    png = render_montage(rgb, title, columns, [f"slice {z}" for z in slices], labels, class_names)
    # A viewer polling the folder must never open half a PNG.
    atomic_write_bytes(Path(path), png, fsync=False)
    frame = montage_frame(rgb.shape[0], rgb.shape[1], [class_name(c, class_names) for c in labels])
    return frame.height, frame.width
