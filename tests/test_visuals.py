"""Tests for segnet.visuals: the one PNG writer, the palette and the overlays."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from segnet import visuals


@pytest.mark.parametrize(("width", "height"), [(333, 101), (1200, 800), (57, 457)])
def test_render_png_is_exactly_the_size_asked_whatever_the_users_settings(
    width: int, height: int
) -> None:
    # A user's matplotlibrc or style must not resize, recolour or re-backend our pictures.
    user = {"savefig.dpi": 300.0, "figure.dpi": 72.0, "figure.facecolor": "black"}
    with matplotlib.rc_context(user):
        backend = matplotlib.get_backend()
        png = visuals.render_png(width, height, lambda figure: figure.text(0.5, 0.5, "x"))
        assert {key: matplotlib.rcParams[key] for key in user} == pytest.approx(user, rel=0)
        assert matplotlib.get_backend() == backend
    picture = Image.open(io.BytesIO(png))
    assert (picture.format, picture.size) == ("PNG", (width, height))
    assert picture.getpixel((0, 0))[:3] == (255, 255, 255)


def test_overlay_tints_labelled_pixels_with_their_class_colour() -> None:
    grey = np.full((2, 3), 100.0, np.float32)
    label = np.array([[0, 1, 2], [9, 0, 0]])
    rgb = visuals.overlay(grey, label)
    assert (rgb[label == 0] == 100).all()
    for c in (1, 2, 9):  # 9 wraps around the palette to class 1's colour
        expected = 0.55 * 100 + 0.45 * visuals.PALETTE[(c - 1) % len(visuals.PALETTE)]
        np.testing.assert_array_equal(rgb[label == c][0], expected.round())
    assert visuals.class_colour(9) == visuals.class_colour(1)


def test_to_grey_survives_nan_and_constant_images() -> None:
    image = np.array([[np.nan, 0.0], [np.inf, 10.0]])
    grey = visuals.to_grey(image)
    assert np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= 255
    assert (visuals.to_grey(np.full((2, 2), 7.0)) == 0).all()
    assert visuals.class_name(1, {1: "liver"}) == "1 liver" and visuals.class_name(2, {}) == "2"
