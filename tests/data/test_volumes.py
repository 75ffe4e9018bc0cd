"""read_volume / write_volume are exact inverses; bad files give a DataError naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segnet.data import volumes
from segnet.data.volumes import (
    geometry_from_dict,
    geometry_to_dict,
    make_geometry,
    read_channels,
    read_geometry,
    read_multichannel,
    read_volume,
    write_volume,
)
from segnet.errors import DataError, UserError

SHAPE = (17, 18, 19)
OBLIQUE = np.array(
    [[0.9, -0.2, 0.05, 12.0], [0.18, 0.95, 0.1, -40.0], [-0.03, -0.09, 2.4, 7.5], [0, 0, 0, 1]]
)
# name, affine, on-disk dtype, qform code, sform code, expected orientation
GRIDS = [
    ("ras_iso_float32", np.diag([1.0, 1.0, 1.0, 1.0]), np.float32, 1, 1, ("R", "A", "S")),
    ("lps_aniso_int16", np.diag([-0.8, -0.8, 3.0, 1.0]), np.int16, 1, 2, ("L", "P", "S")),
    ("oblique_float64_sform_only", OBLIQUE, np.float64, 0, 2, ("R", "A", "S")),
    ("ras_aniso_uint8_qform_only", np.diag([1.5, 0.7, 2.2, 1.0]), np.uint8, 2, 0, ("R", "A", "S")),
]


def _values(dtype: type, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, SHAPE).astype(dtype)
    return rng.normal(size=SHAPE).astype(dtype)


@pytest.mark.parametrize(("name", "affine", "dtype", "qcode", "scode", "axes"), GRIDS)
def test_round_trip_is_exact(tmp_path: Path, name, affine, dtype, qcode, scode, axes) -> None:
    array = _values(dtype, np.random.default_rng(0))
    path = write_volume(
        tmp_path / f"{name}.nii.gz", array, make_geometry(affine, SHAPE, dtype, qcode, scode)
    )
    first, geometry = read_volume(path)
    again, regeometry = read_volume(write_volume(tmp_path / "again.nii", first, geometry))
    for values, geo in ((first, geometry), (again, regeometry)):
        assert values.dtype == dtype and geo.dtype == dtype
        np.testing.assert_array_equal(values, array)
        np.testing.assert_allclose(geo.affine, affine, atol=1e-5)
        assert (int(geo.header["qform_code"]), int(geo.header["sform_code"])) == (qcode, scode)
        assert geo.orientation == axes and geo.shape == SHAPE
    np.testing.assert_array_equal(regeometry.affine, geometry.affine)
    assert regeometry.spacing == geometry.spacing


@pytest.mark.parametrize(
    ("affine", "spacing"),
    [
        (np.diag([-0.8, -0.8, 3.0, 1.0]), (0.8, 0.8, 3.0)),
        (np.diag([1.5, 0.7, 2.2, 1.0]), (1.5, 0.7, 2.2)),
    ],
)
def test_spacing_comes_from_the_header_zooms(tmp_path: Path, affine, spacing) -> None:
    path = write_volume(
        tmp_path / "x.nii.gz", np.zeros(SHAPE, np.float32), make_geometry(affine, SHAPE)
    )
    assert read_geometry(path)[0].spacing == pytest.approx(spacing)


def test_geometry_survives_json(tmp_path: Path) -> None:
    geometry = make_geometry(OBLIQUE, SHAPE, np.int16, qform_code=2, sform_code=1)
    back = geometry_from_dict(geometry_to_dict(geometry))
    assert back.same_grid(geometry) and back.dtype == np.int16
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (2, 1)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.ones(SHAPE, bool), np.uint8),
        (np.arange(np.prod(SHAPE)).reshape(SHAPE), np.int32),
        (np.ones(SHAPE, np.float16), np.float32),
    ],
)
def test_dtypes_nifti_lacks_are_mapped(tmp_path: Path, array: np.ndarray, expected: type) -> None:
    path = write_volume(tmp_path / "x.nii.gz", array, make_geometry(np.eye(4), SHAPE))
    values, geometry = read_volume(path)
    assert geometry.dtype == expected
    np.testing.assert_array_equal(values, array.astype(expected))


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.full(SHAPE, 2.0), np.uint8),
        (np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE) % 3, np.uint8),
        (np.arange(np.prod(SHAPE)).reshape(SHAPE) - 3000, np.int16),
    ],
)
def test_integer_dtypes_store_values_unscaled(tmp_path: Path, array, dtype) -> None:
    path = write_volume(tmp_path / "x.nii.gz", array, make_geometry(np.eye(4), SHAPE), dtype)
    values, geometry = read_volume(path)
    assert values.dtype == dtype and geometry.dtype == dtype  # no slope/inter scaling
    np.testing.assert_array_equal(values, array)


@pytest.mark.parametrize(
    ("array", "dtype", "match"),
    [
        (np.full(SHAPE, 0.5), np.uint8, "non-integer values"),
        (np.full(SHAPE, 300), np.uint8, "do not fit"),
        (np.full(SHAPE, 2**40), None, "do not fit"),
    ],
)
def test_lossy_casts_are_refused(tmp_path: Path, array, dtype, match) -> None:
    with pytest.raises(UserError, match=match):
        write_volume(tmp_path / "x.nii.gz", array, make_geometry(np.eye(4), SHAPE), dtype)


def test_explicit_dtype_and_4d_probabilities(tmp_path: Path) -> None:
    geometry = make_geometry(np.eye(4), SHAPE)
    probabilities = np.random.default_rng(1).random((*SHAPE, 3)).astype(np.float32)
    values, _ = read_multichannel(write_volume(tmp_path / "p.nii.gz", probabilities, geometry))
    np.testing.assert_array_equal(values, probabilities)
    labels = np.full(SHAPE, 2.0)
    assert (
        read_volume(write_volume(tmp_path / "l.nii", labels, geometry, np.uint8))[1].dtype
        == np.uint8
    )


@pytest.mark.parametrize(("shape", "squeezed"), [((*SHAPE, 1), SHAPE)])
def test_trailing_singleton_is_squeezed(tmp_path: Path, shape, squeezed) -> None:
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    assert read_volume(path)[0].shape == squeezed


@pytest.mark.parametrize("shape", [(*SHAPE, 2), (17, 18), (5, 6, 7, 2, 3)])
def test_wrong_dimensionality_names_file_and_shape(tmp_path: Path, shape) -> None:
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match=rf"odd\.nii\.gz.*{shape[0]}, {shape[1]}"):
        read_volume(path)


def test_channels_from_4d_and_per_channel_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    four = rng.random((*SHAPE, 2)).astype(np.float32)
    third = rng.random(SHAPE).astype(np.float32)
    geometry = make_geometry(np.eye(4), SHAPE)
    a = write_volume(tmp_path / "a.nii.gz", four, geometry)
    b = write_volume(tmp_path / "b.nii.gz", third, geometry)
    image, _ = read_channels([a, b])
    assert image.shape == (*SHAPE, 3) and image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 2], third)
    c = write_volume(
        tmp_path / "c.nii.gz", np.zeros((3, 4, 5)), make_geometry(np.eye(4), (3, 4, 5))
    )
    with pytest.raises(DataError, match="differ in shape"):
        read_channels([a, c])


def _gz_bytes(tmp_path: Path) -> bytes:
    path = write_volume(
        tmp_path / "good.nii.gz",
        np.random.default_rng(3).random(SHAPE),
        make_geometry(np.eye(4), SHAPE),
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("truncated.nii.gz", lambda good: good[: len(good) // 2], "truncated"),
        ("truncated.nii", None, "Expected"),
        ("text.nii.gz", lambda good: b"not a volume at all\n" * 20, "not a readable NIfTI"),
        ("empty.nii.gz", lambda good: b"", "not a readable NIfTI"),
        ("missing.nii.gz", None, "not found"),
    ],
)
def test_unreadable_files_name_the_file_and_reason(tmp_path: Path, name, content, reason) -> None:
    good = _gz_bytes(tmp_path)
    path = tmp_path / name
    if name == "truncated.nii":
        raw = write_volume(tmp_path / "raw.nii", np.ones(SHAPE), make_geometry(np.eye(4), SHAPE))
        path.write_bytes(raw.read_bytes()[:600])
    elif content is not None:
        path.write_bytes(content(good))
    with pytest.raises(DataError, match=reason) as info:
        read_volume(path)
    assert name in str(info.value)


def _structured(*fields: str) -> np.ndarray:
    return np.zeros(SHAPE, np.dtype([(f, "u1") for f in fields]))


# name, voxels nibabel writes as they are, text the message must hold (what it is, the fix)
VOXEL_TYPES = [
    ("rgb24", _structured("R", "G", "B"), ("RGB voxels", "single-channel scalar volume")),
    ("rgba32", _structured("R", "G", "B", "A"), ("RGBA voxels", "one file per channel")),
    ("complex64", np.ones(SHAPE, np.complex64), ("complex-valued", "magnitude (abs)")),
    ("complex128", np.ones(SHAPE, np.complex128), ("complex-valued", "magnitude (abs)")),
]
READERS = [
    read_volume,
    read_multichannel,
    lambda path: read_channels([path]),
    read_geometry,
]


@pytest.mark.filterwarnings("error")  # complex voxels once gave a raw numpy ComplexWarning
@pytest.mark.parametrize(("name", "voxels", "expect"), VOXEL_TYPES, ids=[v[0] for v in VOXEL_TYPES])
@pytest.mark.parametrize("read", READERS, ids=["volume", "multichannel", "channels", "geometry"])
def test_non_scalar_voxels_are_a_data_error(tmp_path: Path, name, voxels, expect, read) -> None:
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
    with pytest.raises(DataError) as info:
        read(path)
    assert str(path) in str(info.value)
    for text in expect:
        assert text in str(info.value)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    geometry = make_geometry(np.eye(4), SHAPE)
    path = write_volume(tmp_path / "x.nii.gz", np.ones(SHAPE, np.float32), geometry)
    before = path.read_bytes()

    def half_write(image, filename):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(volumes.nib, "save", half_write)
    with pytest.raises(RuntimeError):
        write_volume(path, np.zeros(SHAPE, np.float32), geometry)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("blocker/out.nii.gz", "is a file, not a folder"),
        ("blocker/deeper/out.nii.gz", "is a file, not a folder"),
        ("out.mha", r"\.nii\.gz or \.nii"),
    ],
)
def test_unwritable_destinations_raise_user_error(tmp_path: Path, target: str, match: str) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(UserError, match=match):
        write_volume(tmp_path / target, np.zeros(SHAPE), make_geometry(np.eye(4), SHAPE))


def test_shape_that_does_not_fit_the_geometry(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not fit"):
        write_volume(tmp_path / "x.nii.gz", np.zeros((17, 18, 20)), make_geometry(np.eye(4), SHAPE))
