"""The one place that reads and writes volumes: ``read_volume`` and ``write_volume`` are inverses.

Arrays stay in the file's voxel axis order (axis 0, 1, 2 are the file's i, j, k; the config calls
them depth, height, width) and the original header travels with them in a :class:`Geometry`, so
a prediction written with its scan's geometry overlays that scan exactly, whatever the
orientation (RAS, LPS, oblique) or the qform/sform codes.
"""

from __future__ import annotations

import base64
import errno
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from segnet.errors import DataError, UserError
from segnet.files import atomic_output, describe_write_error

# Everything nibabel, gzip and zlib raise for a file that is not a readable NIfTI volume.
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error, MemoryError)
_SUFFIXES = (".nii.gz", ".nii")
_UNWRITABLE = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOENT,
)
AFFINE_TOLERANCE = 1e-3  # mm; largest affine difference still counted as the same grid


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels are in space, and how it was stored.

    Attributes:
        affine: (4, 4) voxel-to-world matrix (the header's sform, else its qform), read-only.
        shape: spatial shape (i, j, k) = (depth, height, width) of the array.
        spacing: mm per array axis, from the header's zooms.
        header: a copy of the file's NIfTI header (qform/sform codes, units, description).
        orientation: axis codes such as ``("R", "A", "S")`` from ``nib.aff2axcodes``.
        dtype: the on-disk data type.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header
    orientation: tuple[str, str, str]
    dtype: np.dtype

    def same_grid(self, other: Geometry, tolerance: float = AFFINE_TOLERANCE) -> bool:
        """True when both describe the same voxel grid (shape equal, affines within tolerance)."""
        return self.shape == other.shape and affine_difference(self, other) <= tolerance


def affine_difference(a: Geometry, b: Geometry) -> float:
    """The largest absolute difference between two affines, in mm."""
    return float(np.abs(a.affine - b.affine).max())


def geometry_to_dict(geometry: Geometry) -> dict[str, Any]:
    """JSON-serialisable form of a Geometry (the header's extensions are not kept)."""
    return {
        "affine": geometry.affine.tolist(),
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "dtype": geometry.dtype.str,
        "header": base64.b64encode(geometry.header.binaryblock).decode("ascii"),
    }


def geometry_from_dict(data: dict[str, Any]) -> Geometry:
    """Inverse of :func:`geometry_to_dict`."""
    header = nib.Nifti1Header(binaryblock=base64.b64decode(data["header"]))
    return _geometry(np.asarray(data["affine"]), header, tuple(data["shape"]))


def make_geometry(
    affine: np.ndarray,
    shape: Sequence[int],
    dtype: np.dtype | type = np.float32,
    qform_code: int = 1,
    sform_code: int = 1,
) -> Geometry:
    """A Geometry for data that has no file yet (synthetic volumes, tests).

    Args:
        affine: (4, 4) voxel-to-world matrix; spacing is the norm of its first three columns.
        shape: spatial shape (depth, height, width).
        dtype: data type the volume will be written with.
        qform_code: NIfTI qform code (1 = scanner, 2 = aligned); 0 leaves the qform unset.
        sform_code: NIfTI sform code.
    """
    affine = np.asarray(affine, dtype=np.float64)
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(s) for s in shape))
    header.set_data_dtype(np.dtype(dtype))
    header.set_qform(affine, code=qform_code)
    header.set_sform(affine, code=sform_code)
    header.set_xyzt_units("mm", "sec")
    return _geometry(affine, header, tuple(int(s) for s in shape[:3]))


def int3(values: Iterable[Any]) -> tuple[int, int, int]:
    """Three ints, typed as such (shapes, voxel indices)."""
    a, b, c = (int(v) for v in values)
    return a, b, c


def float3(values: Iterable[Any]) -> tuple[float, float, float]:
    """Three floats, typed as such (spacings)."""
    a, b, c = (float(v) for v in values)
    return a, b, c


def _geometry(affine: np.ndarray, header: nib.Nifti1Header, shape: tuple[int, ...]) -> Geometry:
    affine = np.array(affine, dtype=np.float64)
    affine.setflags(write=False)
    x, y, z = nib.aff2axcodes(affine)
    return Geometry(
        affine=affine,
        shape=int3(shape[:3]),
        spacing=float3(header.get_zooms()[:3]),
        header=header.copy(),
        orientation=(str(x), str(y), str(z)),
        dtype=np.dtype(header.get_data_dtype()),
    )


def _open(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError([f"{path}: file not found"])
    try:
        image = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise DataError([f"{path}: not a readable NIfTI file ({_reason(exc)})"]) from None
    if not isinstance(image, nib.Nifti1Image):
        raise DataError(
            [f"{path}: not a NIfTI file ({type(image).__name__}); convert it to .nii.gz"]
        )
    problem = _voxel_type_problem(np.dtype(image.header.get_data_dtype()))
    if problem:
        raise DataError([f"{path}: {problem}"])
    return image


def _voxel_type_problem(dtype: np.dtype) -> str | None:
    """Why voxels of ``dtype`` cannot be intensities or labels; None for real scalars.

    Checked from the header, before any voxel is read: an RGB file otherwise fails deep in a
    float cast (TypeError), and a complex one silently loses its imaginary part.
    """
    if dtype.kind in "uif":
        return None
    if dtype.kind == "c":
        return (
            f"complex-valued voxels ({dtype}); save the magnitude (abs) as a real volume, "
            "e.g. np.abs(data)"
        )
    # NIfTI's structured types are RGB24 and RGBA32: fields named R, G, B (and A).
    names = dtype.names or ()
    held = f"{''.join(names)} voxels ({len(names)} values each)" if names else f"{dtype} voxels"
    return (
        f"holds {held}, not scalar values; convert it to a single-channel scalar volume "
        "(one file per channel)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError | zlib.error):
        return "truncated or corrupt compressed data"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace(" - could the file be damaged?", "")


def read_geometry(path: str | Path) -> tuple[Geometry, tuple[int, ...]]:
    """The geometry and full data shape of a NIfTI file, from its header only (no voxel data).

    Raises:
        DataError: the file is missing, not a NIfTI file, or holds no real scalar voxels.
    """
    path = Path(path)
    image = _open(path)
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        raise DataError([f"{path}: expected a 3D volume, got shape {shape}"])
    return _geometry(image.affine, image.header, shape), shape


def _load(path: Path) -> tuple[np.ndarray, Geometry]:
    """Any-dimensional data of a NIfTI file, checked to be 3D or 4D."""
    image = _open(path)
    try:
        # dataobj keeps the on-disk dtype when the header has no scaling, so writes are exact.
        array = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise DataError([f"{path}: cannot read the voxel data ({_reason(exc)})"]) from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        raise DataError(
            [
                f"{path}: expected a 3D volume (or 4D with channels last), got shape "
                f"{tuple(array.shape)}"
            ]
        )
    return array, _geometry(image.affine, image.header, array.shape)


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Reads a 3D NIfTI volume.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file. A 4D file whose last dimension is 1 is squeezed.

    Returns:
        ``(array, geometry)``: the array of shape (depth, height, width) in the file's voxel
        order and on-disk dtype (float if the header scales the data), and its geometry.

    Raises:
        DataError: the file is missing, unreadable, truncated, not NIfTI, not 3D, or its
            voxels are not real scalars (RGB, complex).
    """
    path = Path(path)
    array, geometry = _load(path)
    if array.ndim != 3:
        raise DataError(
            [
                f"{path}: expected a 3D volume, got shape {tuple(array.shape)} "
                "(multi-channel images belong in the image list, not here)"
            ]
        )
    return array, geometry


def read_multichannel(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Reads one image file as channels-last: 3D -> 1 channel, 4D -> its last axis.

    Returns:
        ``(array, geometry)``: array of shape (depth, height, width, channels) in the file's
        dtype, and its geometry.

    Raises:
        DataError: the file is missing, unreadable, not NIfTI, neither 3D nor 4D, or its
            voxels are not real scalars (RGB, complex).
    """
    array, geometry = _load(Path(path))
    return array.reshape(*array.shape[:3], -1), geometry


def read_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Reads a multi-channel image from per-channel 3D files or 4D channels-last files.

    Args:
        paths: one file per channel (nnU-Net ``_0000``, ``_0001``, ...), or 4D files whose last
            axis holds channels (MSD), or a mix; channels are concatenated in this order.

    Returns:
        ``(array, geometry)``: float32 array of shape (depth, height, width, channels) and the
        geometry of the first file.

    Raises:
        DataError: a file is unreadable, or the files' spatial shapes differ.
    """
    arrays, geometries = [], []
    for path in paths:
        array, geometry = read_multichannel(path)
        arrays.append(array.astype(np.float32, copy=False))
        geometries.append(geometry)
    if len({g.shape for g in geometries}) > 1:
        listing = ", ".join(f"{Path(p).name} {g.shape}" for p, g in zip(paths, geometries))
        raise DataError([f"channel files of one case differ in shape: {listing}"])
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
    return image, geometries[0]


def _output_dtype(array: np.ndarray, dtype: np.dtype | type | str | None) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype == np.float16:
        return np.dtype(np.float32)  # NIfTI has no half floats
    if array.dtype in (np.int64, np.uint64):
        # nibabel refuses 64-bit integers without an explicit dtype; most viewers do too.
        return np.dtype(np.int32)
    return array.dtype


def _exact_cast(array: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """``array`` as ``dtype`` without loss; else nibabel would silently store scaled values."""
    if array.dtype == dtype or not np.issubdtype(dtype, np.integer):
        return array.astype(dtype, copy=False)
    if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
        raise UserError(
            f"{path}: non-integer values cannot be stored exactly as {dtype}; "
            "pass a float dtype or round the array first"
        )
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise UserError(
            f"{path}: values {array.min()}..{array.max()} do not fit {dtype}; pass a wider dtype"
        )
    return array.astype(dtype)


def _image_for(
    array: np.ndarray, geometry: Geometry, dtype: np.dtype, description: str | None
) -> nib.Nifti1Image:
    header = geometry.header.copy()
    header.set_data_dtype(dtype)
    if description is not None:
        header["descrip"] = description.encode("utf-8")[:79]  # the field holds 80 bytes
    header.set_slope_inter(None, None)  # data already has the on-disk dtype: store it unscaled
    if dtype != geometry.dtype:
        header["cal_min"], header["cal_max"] = 0, 0  # the source's display window is stale
    # With the header's own affine, nibabel keeps its qform/sform (and their codes) untouched.
    return nib.Nifti1Image(array, geometry.affine, header=header, dtype=dtype)


def write_volume(
    path: str | Path,
    array: np.ndarray,
    geometry: Geometry,
    dtype: np.dtype | type | str | None = None,
    description: str | None = None,
) -> Path:
    """Writes ``array`` on ``geometry``'s grid, atomically (a reader never sees half a file).

    Args:
        path: destination ending in ``.nii.gz`` or ``.nii``; missing parent folders are made.
        array: (depth, height, width) or (depth, height, width, channels), spatial shape equal
            to ``geometry.shape``.
        geometry: typically from :func:`read_volume` of the scan the array belongs to.
        dtype: on-disk dtype; None keeps the array's (bool -> uint8, int64 -> int32).
        description: the header's ``descrip`` text (80 bytes); None keeps the geometry's.

    Returns:
        The written path.

    Raises:
        UserError: bad suffix or shape, or the folder cannot be written.
    """
    path = Path(path)
    suffix = next((s for s in _SUFFIXES if path.name.endswith(s)), None)
    if suffix is None:
        raise UserError(f"{path}: volumes are written as .nii.gz or .nii; change the file name")
    array = np.asarray(array)
    if array.ndim not in (3, 4) or tuple(array.shape[:3]) != geometry.shape:
        raise UserError(
            f"{path}: array shape {tuple(array.shape)} does not fit the geometry's "
            f"grid {geometry.shape}"
        )
    out_dtype = _output_dtype(array, dtype)
    image = _image_for(_exact_cast(array, out_dtype, path), geometry, out_dtype, description)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(
            f"cannot write {path}: {blocker} is a file, not a folder; choose another output folder"
        )
    try:
        with atomic_output(path) as tmp:
            nib.save(image, str(tmp))
    except OSError as exc:
        if exc.errno in _UNWRITABLE:
            raise UserError(
                describe_write_error(exc, path.parent, "another output folder")
            ) from None
        raise
    return path


def header_description(path: Path) -> str | None:
    """The ``descrip`` text of a NIfTI file's header; None when it is not a readable NIfTI."""
    try:
        header = nib.load(str(path)).header
    except _READ_ERRORS:
        return None
    if not isinstance(header, nib.Nifti1Header):  # NIfTI-2 headers derive from it too
        return None
    raw = header["descrip"].item()
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
