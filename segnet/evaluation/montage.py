"""PNG montages of a case: image, ground truth and prediction on representative axial slices.

numpy and zlib only (matplotlib is not a dependency): the montage is assembled as an RGB uint8
array and written by a minimal PNG encoder. The volumes are first turned to the usual axial
view from their orientation codes (``Geometry.orientation``): slices inferior to superior, rows
anterior (top) to posterior, columns from the patient's right to left (radiological display).
For ``n`` chosen slices of ``(rows, columns)`` voxels, each drawn ``zoom`` times larger::

    row i (slice i):  [ image | image + ground truth | image + prediction ]

so the PNG is ``n * zoom * rows`` pixels high and ``3 * zoom * columns`` wide (two columns of
panels when there is no ground truth). Voxels are drawn square whatever the in-plane spacing.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from segnet.files import atomic_write_bytes

# Class colours (RGB) for labels 1, 2, ...; background is not drawn. Chosen to stay distinct
# on a grey image; labels beyond the table reuse it cyclically.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
    ],
    dtype=np.float32,
)
OVERLAY_ALPHA = 0.45
MIN_SLICE_PIXELS = 128  # small slices (e.g. 36x50 hippocampus) are enlarged to about this
AXIAL_VIEW = ("S", "P", "L")  # (slices, rows, columns) of the displayed arrays


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


def to_grey(image: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 255] between the 0.5th and 99.5th percentiles.

    Args:
        image: (slices, rows, columns) float array, one channel.

    Returns:
        float32 array of the same shape in [0, 255].
    """
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.float32)
    low, high = np.percentile(finite, (0.5, 99.5))
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = (np.nan_to_num(image, nan=low) - low) * scale
    return np.clip(grey, 0.0, 255.0).astype(np.float32)


def overlay(grey: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """A grey slice as RGB with the labels' colours blended in.

    Args:
        grey: (height, width) floats in [0, 255].
        label: (height, width) integer labels, or None for the bare image.

    Returns:
        (height, width, 3) uint8 RGB.
    """
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if label is not None:
        mask = label > 0
        colours = PALETTE[(label[mask].astype(np.int64) - 1) % len(PALETTE)]
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours
    return np.clip(rgb.round(), 0, 255).astype(np.uint8)


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
        np.concatenate([overlay(grey[z], None if o is None else o[z]) for o in overlays], axis=1)
        for z in slices
    ]
    zoom = zoom_factor(*image.shape[1:])
    montage = np.concatenate(strips, axis=0)
    return np.repeat(np.repeat(montage, zoom, axis=0), zoom, axis=1)


def encode_png(rgb: np.ndarray) -> bytes:
    """A PNG file holding an 8-bit RGB or greyscale image.

    Args:
        rgb: (height, width, 3) or (height, width) uint8.

    Returns:
        The PNG bytes (no filtering, zlib level 6), readable by any decoder.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    colour_type = 2 if rgb.ndim == 3 else 0  # 2: truecolour RGB, 0: greyscale
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    # Each scanline is prefixed by its filter type; 0 means "none".
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def write_montage(
    path: Path,
    image: np.ndarray,
    prediction: np.ndarray,
    label: np.ndarray | None = None,
    orientation: tuple[str, ...] | None = None,
) -> tuple[int, int]:
    """Builds the montage of one case and writes it atomically as a PNG.

    Args:
        path: Destination ``.png``.
        image: (i, j, k) or (i, j, k, channels) intensities; the first channel is shown.
        prediction: (i, j, k) integer predicted labels.
        label: (i, j, k) integer ground truth, or None.
        orientation: axis codes of (i, j, k) (``Geometry.orientation``) for the axial view;
            None takes axis 0 as the slice axis and axes 1 and 2 as rows and columns.

    Returns:
        ``(height, width)`` of the written image in pixels.
    """
    if image.ndim == 4:
        image = image[..., 0]
    views = [None if v is None else axial_view(v, orientation) for v in (image, prediction, label)]
    rgb = build_montage(*views)  # type: ignore[arg-type]
    # A viewer polling the folder must never open half a PNG.
    atomic_write_bytes(Path(path), encode_png(rgb), fsync=False)
    return rgb.shape[0], rgb.shape[1]
