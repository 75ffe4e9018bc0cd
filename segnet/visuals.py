"""The look of every picture segnet makes: one class palette, one way to write a PNG.

Evaluation montages, the training run's ``progress.png`` and the TensorBoard overlay image all
colour class ``c`` with :func:`class_colour` and blend it over a grey image with
:func:`overlay`. PNG files are drawn with matplotlib and encoded by :func:`render_png` only.
matplotlib is driven through ``Figure`` and its Agg canvas directly, never ``pyplot``: that
works without a display, leaves the backend and the open figures of a user's own process
alone, and draws under matplotlib's default style, so a user's ``matplotlibrc`` cannot change
the pixel size of a montage. TensorBoard gets the RGB arrays and encodes them itself.

Neither training nor evaluation owns this module, so both import it without importing each
other.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

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
    dtype=np.uint8,
)
OVERLAY_ALPHA = 0.45
DPI = 100  # figure inches times DPI is the PNG size in pixels


def class_colour(label: int) -> tuple[float, float, float]:
    """The colour of foreground ``label`` (1, 2, ...) as matplotlib takes it: RGB in [0, 1]."""
    red, green, blue = PALETTE[(int(label) - 1) % len(PALETTE)] / 255.0
    return float(red), float(green), float(blue)


def class_name(label: int, names: Mapping[int, str] | None) -> str:
    """``"1 liver"`` when the dataset names the class, else ``"1"``."""
    name = (names or {}).get(int(label))
    return f"{label} {name}" if name else str(label)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 255] between the 0.5th and 99.5th percentiles.

    Args:
        image: float array of any shape, one channel; NaN and infinities are allowed.

    Returns:
        float32 array of the same shape in [0, 255].
    """
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.float32)
    low, high = np.percentile(finite, (0.5, 99.5))
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = (np.nan_to_num(image, nan=low, posinf=high, neginf=low) - low) * scale
    return np.clip(grey, 0.0, 255.0).astype(np.float32)


def overlay(grey: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """A grey slice as RGB with the labels' colours blended in.

    Args:
        grey: (height, width) floats in [0, 255].
        label: (height, width) integer labels, or None for the bare image.

    Returns:
        (height, width, 3) uint8 RGB.
    """
    rgb = np.repeat(np.asarray(grey, np.float32)[..., None], 3, axis=-1)
    if label is not None:
        mask = label > 0
        colours = PALETTE[(label[mask].astype(np.int64) - 1) % len(PALETTE)].astype(np.float32)
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours
    return np.clip(rgb.round(), 0, 255).astype(np.uint8)


def overlay_strip(grey: np.ndarray, labels: Sequence[np.ndarray | None]) -> np.ndarray:
    """Panels side by side: the grey slice with each of ``labels`` blended in (None: bare).

    Returns:
        (height, len(labels) * width, 3) uint8 RGB.
    """
    return np.concatenate([overlay(grey, label) for label in labels], axis=1)


def legend_handles(labels: Iterable[int], names: Mapping[int, str] | None) -> list[Patch]:
    """One filled patch per foreground label, in its colour, named by :func:`class_name`."""
    return [
        Patch(
            facecolor=class_colour(c),
            edgecolor="black",
            linewidth=0.5,
            label=class_name(c, names),
        )
        for c in labels
    ]


def render_png(width: int, height: int, draw: Callable[[Figure], None]) -> bytes:
    """A ``width`` x ``height`` pixel PNG of the figure ``draw`` fills in.

    Args:
        width: pixels.
        height: pixels.
        draw: called with an empty white figure of that size (``DPI`` dots per inch).

    Returns:
        The PNG bytes (RGBA, opaque).
    """
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
        canvas = FigureCanvasAgg(figure)
        draw(figure)
        buffer = io.BytesIO()
        canvas.print_png(buffer)  # at the figure's own DPI, whatever savefig.dpi says
    return buffer.getvalue()
