"""Per-case preprocessing as a recorded forward transform, and its inverse for predictions.

Forward (:func:`preprocess`), in nnU-Net's order: crop to the bounding box of non-zero image
voxels (union over channels), normalise each channel, resample to the target spacing (images
linear or cubic, labels nearest). Every step is recorded in a :class:`PreprocessInfo`, so that
:func:`restore_to_original` can put a prediction back on the scan's own voxel grid: undo the
resampling, then paste into the uncropped grid with background elsewhere.

Dataset-level values (median spacing, foreground intensity statistics for CT) come from the
training cases once, in a JSON-serialisable :class:`DatasetFingerprint` that inference reuses.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from segnet.config import PreprocessingConfig
from segnet.data.datasets import CaseFiles
from segnet.data.volumes import (
    Geometry,
    float3,
    geometry_from_dict,
    geometry_to_dict,
    int3,
    read_channels,
    read_geometry,
    read_volume,
)
from segnet.errors import UserError

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
FOREGROUND_SAMPLES = 10_000  # voxels kept per class per case (and per case for statistics)
_ORDERS = {"linear": 1, "cubic": 3}


# ---------------------------------------------------------------------------------------------
# Dataset fingerprint
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelStats:
    """Foreground intensity statistics of one channel over the training cases."""

    mean: float
    std: float
    low: float  # value at preprocessing.ct_percentiles[0]
    high: float  # value at preprocessing.ct_percentiles[1]


@dataclass(frozen=True)
class DatasetFingerprint:
    """What preprocessing needs to know about the whole training set; stored with a run.

    Attributes:
        spacing: median voxel spacing (mm per array axis) of the training cases.
        median_shape: median (depth, height, width) of the training cases.
        num_cases: how many training cases it summarises.
        intensity: per channel foreground statistics, only when some channel is normalised
            ``ct``.
        percentiles: the ``ct_percentiles`` that ``intensity.low/high`` were taken at.
    """

    spacing: tuple[float, float, float]
    median_shape: tuple[int, int, int]
    num_cases: int
    intensity: tuple[ChannelStats, ...] = ()
    percentiles: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "median_shape": list(self.median_shape),
            "num_cases": self.num_cases,
            "intensity": [asdict(s) for s in self.intensity],
            "percentiles": list(self.percentiles) if self.percentiles else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetFingerprint:
        """Inverse of :meth:`to_dict`; UserError names what is missing or malformed."""
        try:
            spacing, shape = float3(data["spacing"]), int3(data["median_shape"])
            stats = tuple(
                ChannelStats(**{k: float(s[k]) for k in ("mean", "std", "low", "high")})
                for s in data.get("intensity") or ()
            )
            pct = data.get("percentiles")
            percentiles = (float(pct[0]), float(pct[1])) if pct else None
            return cls(spacing, shape, int(data["num_cases"]), stats, percentiles)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UserError(
                f"dataset fingerprint is malformed ({exc!r}); delete it so it is computed again"
            ) from None


def case_seed(case_id: str, seed: int = 0) -> int:
    """A stable per-case seed (Python's hash() changes between processes)."""
    return zlib.crc32(case_id.encode("utf-8")) ^ seed


def _foreground_intensities(case: CaseFiles) -> np.ndarray:
    """(n, channels) image values at up to FOREGROUND_SAMPLES random labelled voxels."""
    image, _ = read_channels(case.images)
    if case.label is None:
        raise UserError(f"{case.case_id}: CT statistics need labelled training cases")
    label, _ = read_volume(case.label)
    values = image[label > 0]
    rng = np.random.default_rng(case_seed(case.case_id))
    if len(values) > FOREGROUND_SAMPLES:
        values = values[rng.choice(len(values), FOREGROUND_SAMPLES, replace=False)]
    return values


def _intensity_stats(
    cases: Sequence[CaseFiles], percentiles: tuple[float, float]
) -> tuple[ChannelStats, ...]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        values = np.concatenate(list(pool.map(_foreground_intensities, cases)), axis=0)
    if len(values) == 0:
        raise UserError("normalization 'ct': the training labels hold no foreground voxels")
    stats = []
    for channel in values.T:
        low, high = np.percentile(channel, percentiles)
        stats.append(
            ChannelStats(float(channel.mean()), float(channel.std()), float(low), float(high))
        )
    return tuple(stats)


def compute_fingerprint(
    cases: Sequence[CaseFiles], config: PreprocessingConfig
) -> DatasetFingerprint:
    """Summarises the training cases: headers only, plus foreground voxels for ``ct``.

    Args:
        cases: the training cases (never the held-out ones: they must not leak into it).
        config: decides whether intensity statistics are needed.
    """
    if not cases:
        raise UserError("cannot compute a dataset fingerprint without training cases")
    geometries = [read_geometry(case.images[0])[0] for case in cases]
    spacing = np.median([g.spacing for g in geometries], axis=0)
    shape = np.median([g.shape for g in geometries], axis=0)
    stats: tuple[ChannelStats, ...] = ()
    percentiles = None
    if config.uses_ct:
        percentiles = config.ct_percentiles
        stats = _intensity_stats(cases, percentiles)
    return DatasetFingerprint(
        float3(spacing), int3(np.round(shape)), len(cases), stats, percentiles
    )


# ---------------------------------------------------------------------------------------------
# The forward transform
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessInfo:
    """What :func:`preprocess` did to one case, enough to undo it.

    Attributes:
        geometry: the original scan's geometry (grid, affine, header).
        bbox: per axis ``(start, stop)`` of the crop, in original voxels.
        spacing: mm per axis after resampling (the original spacing when not resampling).
        shape: (depth, height, width) after cropping and resampling: the stored arrays' shape.
    """

    geometry: Geometry
    bbox: Box
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return int3(stop - start for start, stop in self.bbox)

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry": geometry_to_dict(self.geometry),
            "bbox": [list(b) for b in self.bbox],
            "spacing": list(self.spacing),
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessInfo:
        starts, stops = int3(b[0] for b in data["bbox"]), int3(b[1] for b in data["bbox"])
        bbox = _box(starts, stops)
        return cls(
            geometry_from_dict(data["geometry"]), bbox, float3(data["spacing"]), int3(data["shape"])
        )


def target_spacing(
    config: PreprocessingConfig, fingerprint: DatasetFingerprint | None
) -> tuple[float, float, float] | None:
    """The spacing cases are resampled to, or None when ``resample`` is off."""
    if not config.resample:
        return None
    if config.target_spacing is not None:
        return config.target_spacing
    if fingerprint is None:
        raise UserError(
            "preprocessing.resample needs preprocessing.target_spacing or the "
            "dataset fingerprint (its median spacing)"
        )
    return fingerprint.spacing


def nonzero_bbox(image: np.ndarray) -> Box:
    """Bounding box of voxels non-zero in any channel; the whole grid if there is none.

    Args:
        image: (depth, height, width, channels).
    """
    mask = np.any(image != 0, axis=-1)
    starts, stops = [0, 0, 0], list(mask.shape)
    for axis in range(3):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if hits.size:
            starts[axis], stops[axis] = int(hits[0]), int(hits[-1]) + 1
    return _box(int3(starts), int3(stops))


def _box(starts: tuple[int, int, int], stops: tuple[int, int, int]) -> Box:
    return (starts[0], stops[0]), (starts[1], stops[1]), (starts[2], stops[2])


def resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resamples the first three axes to ``shape``, aligning the grids' outer voxel edges.

    Args:
        array: (depth, height, width) or (depth, height, width, channels).
        shape: the new (depth, height, width).
        order: spline order: 0 nearest (labels), 1 linear, 3 cubic.

    Returns:
        The resampled array, same dtype and trailing channel axis.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[:3]) == shape:
        return array
    if array.ndim == 4:
        return np.stack(
            [resize(array[..., c], shape, order) for c in range(array.shape[-1])], axis=-1
        )
    if array.dtype == np.bool_:
        return resize(array.view(np.uint8), shape, order).astype(bool)
    scale = np.asarray(array.shape, float) / np.asarray(shape, float)
    # Output voxel centre (i + 0.5) * scale - 0.5 in input voxels: edges of both grids align.
    return ndimage.affine_transform(
        array,
        scale,
        offset=0.5 * scale - 0.5,
        output_shape=shape,
        order=order,
        mode="nearest",
        output=array.dtype,
    )


def normalize(
    image: np.ndarray,
    config: PreprocessingConfig,
    fingerprint: DatasetFingerprint | None,
    mask: np.ndarray | None,
) -> np.ndarray:
    """Per-channel intensity normalisation, float32, each channel by its own scheme
    (``config.normalization_of``).

    Args:
        image: (depth, height, width, channels).
        config: ``normalization`` (or ``channel_normalization``) and its parameters.
        fingerprint: dataset statistics; required for ``ct``.
        mask: (depth, height, width) region for the z-score statistics; voxels outside it are
            set to 0 (the background of a cropped scan). None uses every voxel.
    """
    # Channels-first while working: strided channels-last views make masking several times slower.
    planes = np.moveaxis(image, -1, 0).astype(np.float32, order="C", copy=True)
    for c, channel in enumerate(planes):
        _normalize_channel(channel, c, config, fingerprint, mask)
    return np.moveaxis(planes, 0, -1)


def _normalize_channel(
    channel: np.ndarray,
    index: int,
    config: PreprocessingConfig,
    fingerprint: DatasetFingerprint | None,
    mask: np.ndarray | None,
) -> None:
    """Normalises image channel ``index`` in place."""
    scheme = config.normalization_of(index)
    if scheme == "none":
        return
    if scheme == "range":
        low, high = config.intensity_range
        np.clip(channel, low, high, out=channel)
        channel -= low
        channel /= high - low
        return
    if scheme == "ct":
        stats = _ct_stats(fingerprint, index)
        np.clip(channel, stats.low, stats.high, out=channel)
        mean, std = stats.mean, stats.std
    else:
        region = channel[mask] if mask is not None else channel
        mean, std = (float(region.mean()), float(region.std())) if region.size else (0, 1)
    channel -= mean
    channel /= max(std, 1e-8)
    if mask is not None and scheme == "zscore":
        channel[~mask] = 0.0


def _ct_stats(fingerprint: DatasetFingerprint | None, channel: int) -> ChannelStats:
    if fingerprint is None or len(fingerprint.intensity) <= channel:
        raise UserError(
            "normalization 'ct' needs the dataset fingerprint's foreground "
            "statistics for every channel; compute it with normalization: ct"
        )
    return fingerprint.intensity[channel]


def preprocess(
    image: np.ndarray,
    geometry: Geometry,
    label: np.ndarray | None,
    config: PreprocessingConfig,
    fingerprint: DatasetFingerprint | None,
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """Crops, normalises and resamples one case.

    Args:
        image: (depth, height, width, channels) on ``geometry``'s grid.
        geometry: the scan's geometry, kept in the returned info.
        label: (depth, height, width) integer-valued labels on the same grid, or None.
        config: the preprocessing section of the experiment config.
        fingerprint: dataset statistics (median spacing, CT statistics) when needed.

    Returns:
        ``(image, label, info)``: float32 (d, h, w, channels), uint8 (d, h, w) or None, and
        the record that :func:`restore_to_original` needs; (d, h, w) is ``info.shape``.
    """
    full = _box((0, 0, 0), int3(image.shape[:3]))
    bbox = nonzero_bbox(image) if config.crop_to_nonzero else full
    crop = tuple(slice(a, b) for a, b in bbox)
    image = image[crop]
    mask = np.any(image != 0, axis=-1) if config.crop_to_nonzero else None
    image = normalize(image, config, fingerprint, mask)
    if label is not None:
        label = np.rint(label[crop]).astype(np.uint8)
    spacing = target_spacing(config, fingerprint) or geometry.spacing
    shape = int3(
        max(1, round(n * s / t)) for n, s, t in zip(image.shape[:3], geometry.spacing, spacing)
    )
    image = resize(image, shape, _ORDERS[config.image_interpolation])
    label = resize(label, shape, 0) if label is not None else None
    info = PreprocessInfo(geometry, bbox, float3(spacing), shape)
    return np.ascontiguousarray(image), label, info


def preprocess_case(
    case: CaseFiles, config: PreprocessingConfig, fingerprint: DatasetFingerprint | None
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """Reads a case's files and runs :func:`preprocess` on them."""
    image, geometry = read_channels(case.images)
    label = read_volume(case.label)[0] if case.label is not None else None
    return preprocess(image, geometry, label, config, fingerprint)


# ---------------------------------------------------------------------------------------------
# The inverse, and foreground sampling
# ---------------------------------------------------------------------------------------------
def restore_to_original(
    array: np.ndarray, info: PreprocessInfo, order: int | None = None
) -> np.ndarray:
    """Puts a prediction made on a preprocessed case back on the original scan's grid.

    Args:
        array: labels (d, h, w) or per-class probabilities (d, h, w, classes), where
            (d, h, w) is ``info.shape``.
        info: the record from :func:`preprocess`.
        order: resampling order; None picks 0 (nearest) for integer arrays, 1 for floats.

    Returns:
        The array on ``info.geometry.shape`` (plus the class axis), same dtype. Outside the
        crop it holds background: label 0, or probability 1 for class 0 and 0 for the others.
    """
    if tuple(array.shape[:3]) != info.shape:
        raise ValueError(f"array shape {array.shape[:3]} is not the preprocessed {info.shape}")
    if order is None:
        order = 0 if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else 1
    restored = resize(array, info.cropped_shape, order)
    out = np.zeros(info.geometry.shape + array.shape[3:], dtype=array.dtype)
    if array.ndim == 4:
        out[..., 0] = 1
    out[tuple(slice(a, b) for a, b in info.bbox)] = restored
    return out


def sample_foreground(
    label: np.ndarray, num_classes: int, seed: int, max_per_class: int = FOREGROUND_SAMPLES
) -> dict[int, np.ndarray]:
    """Random voxel coordinates of each foreground class present in ``label``.

    Args:
        label: (depth, height, width) integer labels.
        num_classes: classes 1..num_classes-1 are sampled.
        seed: makes the sample reproducible.
        max_per_class: at most this many coordinates per class.

    Returns:
        ``{class: int32 array (n, 3)}`` in sorted voxel order, only for classes present.
    """
    rng = np.random.default_rng(seed)
    flat = label.reshape(-1)
    samples = {}
    for cls in range(1, num_classes):
        index = np.flatnonzero(flat == cls)
        if index.size == 0:
            continue
        if index.size > max_per_class:
            index = np.sort(rng.choice(index, max_per_class, replace=False))
        samples[cls] = np.stack(np.unravel_index(index, label.shape), axis=1).astype(np.int32)
    return samples
