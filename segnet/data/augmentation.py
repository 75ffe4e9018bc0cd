"""Random transforms of training patches, drawn from each sample's own random stream.

A patch is produced in four steps, all in numpy so they run the same eagerly and inside
``tf.data`` (through ``tf.numpy_function``):

1. :func:`draw_spatial` draws the spatial transform: quarter turns, an affine, flips.
2. :func:`extract_patch` reads the patch out of the (memory-mapped) case. Without an affine it
   is a padded crop; with one, the patch grid is mapped through the affine and the image is
   sampled at those source coordinates (linear per channel, nearest for labels) from a
   bounding region only, so a rotation never resamples the whole volume.
3. :func:`apply_patch_spatial` applies the quarter turns and flips, which are exact.
4. :func:`augment_intensity` changes the image only: noise, blur, scale, shift, gamma.

Quarter turns are taken *before cropping*: for an odd number of turns the patch is extracted
with height and width swapped and turned afterwards, so any (height, width) works and the
result always has the requested shape.

Outside the volume the image reads ``PAD_IMAGE`` and the label ``PAD_LABEL``; both behave as
if the volume were padded with them before interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segnet.config import AugmentationConfig

# 0 is the mean of a z-scored case and what nnU-Net pads with; preprocessing that crops to the
# non-zero region also sets the voxels outside the body to 0, so padding matches them.
PAD_IMAGE = 0.0
PAD_LABEL = 0  # background

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class SpatialParams:
    """The spatial transform of one patch; the default is the identity.

    Attributes:
        rot90: quarter turns in the (height, width) plane, 0..3, counter-clockwise from
            height towards width (``np.rot90`` with ``axes=(1, 2)``).
        matrix: (3, 3) map from offsets in the output patch to offsets in the source volume
            (axis order depth, height, width), or None for an axis-aligned crop.
        flips: spatial axes of the patch (0 = depth) reversed after the quarter turns.
    """

    rot90: int = 0
    matrix: np.ndarray | None = None
    flips: tuple[int, ...] = ()


def draw_spatial(
    rng: np.random.Generator, aug: AugmentationConfig, spatial_dims: int = 3
) -> SpatialParams:
    """Draws one patch's spatial transform, each part with its own probability.

    In 2D (``spatial_dims == 2``) the patch is a single axial slice: rotations and scaling act
    in the (height, width) plane only and depth flips are skipped.
    """
    if not aug.enabled:
        return SpatialParams()
    rot90 = int(rng.integers(1, 4)) if rng.random() < aug.rot90_prob else 0
    matrix = _draw_affine(rng, aug, spatial_dims) if rng.random() < aug.affine_prob else None
    axes = [axis for axis in aug.flip_axes if spatial_dims == 3 or axis != 0]
    flips = tuple(axis for axis in axes if rng.random() < aug.flip_prob)
    return SpatialParams(rot90=rot90, matrix=matrix, flips=flips)


def _draw_affine(rng: np.random.Generator, aug: AugmentationConfig, spatial_dims: int):
    limit = np.deg2rad(aug.rotation_degrees)
    # A 2D model's slice is the plane across axis 0; a coarse axis is treated the same way.
    fixed_axis = 0 if spatial_dims == 2 else aug.coarse_axis
    if fixed_axis is None:
        angles = rng.uniform(-limit, limit, size=3)
        return affine_matrix(angles, rng.uniform(*aug.scale_range))
    angle = rng.uniform(-limit, limit, size=1)
    zoom = rng.uniform(*aug.scale_range)
    angles = np.zeros(3)
    angles[fixed_axis] = angle[0]
    return affine_matrix(angles, zoom, fixed_axis=fixed_axis)


def affine_matrix(
    angles: np.ndarray | list[float], zoom: float, fixed_axis: int | None = None
) -> np.ndarray:
    """The (3, 3) output-to-source offset map of a rotation and an isotropic zoom.

    Args:
        angles: radians of rotation of the sampling grid about the depth, height and width
            axes in that order (fewer values leave the later axes unrotated); about depth is
            the axial plane. The content turns the other way: ``[pi / 2]`` gives
            ``np.rot90(k=-1, axes=(1, 2))``. Random angles are symmetric, so it does not matter.
        zoom: magnification; above 1 the anatomy looks larger (the grid samples a smaller
            region of the source).
        fixed_axis: an axis the zoom leaves alone (0: zoom height and width only), for 2D
            slices and for grids coarse along that axis.

    Returns:
        float64 array (3, 3); ``affine_matrix([], 1.0)`` is the identity.
    """
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        matrix = matrix @ _rotation(axis, float(angle))
    scale = np.full(3, 1.0 / zoom)
    if fixed_axis is not None:
        scale[fixed_axis] = 1.0
    return matrix @ np.diag(scale)


def _rotation(axis: int, angle: float) -> np.ndarray:
    i, j = (a for a in range(3) if a != axis)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = cos, -sin, sin, cos
    return rotation


def extraction_shape(patch: Shape3, rot90: int) -> Shape3:
    """The shape to extract so that ``rot90`` quarter turns yield ``patch``."""
    depth, height, width = patch
    return (depth, width, height) if rot90 % 2 else (depth, height, width)


def extract_patch(
    image: np.ndarray,
    label: np.ndarray,
    start: np.ndarray | tuple[int, int, int],
    shape: Shape3,
    matrix: np.ndarray | None = None,
    pivot: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one patch of a case, padding wherever it leaves the volume.

    Args:
        image: (depth, height, width, channels) float array, typically a read-only memmap.
        label: (depth, height, width) integer array of the same spatial shape.
        start: volume voxel at patch voxel (0, 0, 0) of the unrotated patch; may be negative
            or run past the end of the volume (that part is padding).
        shape: (depth, height, width) of the patch.
        matrix: (3, 3) output-to-source offset map (see :func:`affine_matrix`), or None.
        pivot: patch position the affine keeps in place, default the patch centre
            ``(shape - 1) / 2``; the pipeline pivots on a forced foreground voxel so it stays
            inside the patch whatever the rotation.

    Returns:
        ``(image_patch, label_patch)``: float32 (*shape, channels) and (*shape) of the label's
        dtype. Labels are only ever copied (nearest neighbour), never interpolated. An identity
        ``matrix`` gives exactly the same patch as ``None``.
    """
    start = np.asarray(start, dtype=np.int64)
    if matrix is None:
        return (
            _crop(image, start, shape, PAD_IMAGE).astype(np.float32, copy=False),
            _crop(label, start, shape, PAD_LABEL),
        )
    coords = _source_coords(start, shape, matrix, pivot)
    return (
        _linear(image, coords, cval=PAD_IMAGE).astype(np.float32, copy=False),
        _nearest(label, coords, cval=PAD_LABEL),
    )


def _crop(array: np.ndarray, start: np.ndarray, shape: Shape3, value: float) -> np.ndarray:
    out = np.full(tuple(shape) + array.shape[3:], value, dtype=array.dtype)
    stop = np.minimum(start + shape, array.shape[:3])
    begin = np.maximum(start, 0)
    if np.any(stop <= begin):
        return out
    source = tuple(slice(b, e) for b, e in zip(begin, stop))
    target = tuple(slice(b - s, e - s) for b, e, s in zip(begin, stop, start))
    out[target] = array[source]
    return out


def _source_coords(start: np.ndarray, shape: Shape3, matrix: np.ndarray, pivot) -> np.ndarray:
    """(3, *shape) source-volume coordinates of every patch voxel."""
    pivot = (np.asarray(shape) - 1) / 2.0 if pivot is None else np.asarray(pivot, np.float64)
    offsets = np.indices(shape, dtype=np.float64).reshape(3, -1) - pivot[:, None]
    # Half-integer pivots and integer starts are exact in float64, so an identity matrix
    # lands on integer coordinates and the interpolation below copies voxels unchanged.
    coords = (start + pivot)[:, None] + np.asarray(matrix, np.float64) @ offsets
    return coords.reshape(3, *shape)


def _linear(image: np.ndarray, coords: np.ndarray, cval: float) -> np.ndarray:
    """Interpolates (depth, height, width, channels) ``image`` at ``coords``, per channel.

    Only the region the coordinates cover is read, so a memmapped case is touched locally.
    """
    flat = coords.reshape(3, -1)
    begin = np.maximum(np.floor(flat.min(axis=1)).astype(np.int64), 0)
    stop = np.minimum(np.ceil(flat.max(axis=1)).astype(np.int64) + 1, image.shape[:3])
    if np.any(stop <= begin):
        return np.full(coords.shape[1:] + image.shape[3:], cval, dtype=image.dtype)
    region = np.asarray(image[tuple(slice(b, e) for b, e in zip(begin, stop))])
    local = coords - begin.reshape(3, 1, 1, 1)
    # 'grid-constant' treats the outside as cval *before* interpolating, as if padded.
    channels = [
        ndimage.map_coordinates(
            region[..., c], local, output=region.dtype, order=1, mode="grid-constant", cval=cval
        )
        for c in range(region.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _nearest(label: np.ndarray, coords: np.ndarray, cval: int) -> np.ndarray:
    """Copies each patch voxel's label from the source voxel nearest its coordinates.

    A plain gather (no interpolation code at all, so a label can only ever be copied), which
    reads only the voxels it needs from a memmap; outside the volume it is ``cval``.
    """
    index = np.rint(coords).astype(np.intp)
    inside = np.all((index >= 0) & (index < np.reshape(label.shape, (3, 1, 1, 1))), axis=0)
    out = np.full(coords.shape[1:], cval, dtype=label.dtype)
    out[inside] = label[tuple(index[:, inside])]
    return out


def apply_patch_spatial(
    image: np.ndarray, label: np.ndarray, params: SpatialParams
) -> tuple[np.ndarray, np.ndarray]:
    """Applies the exact parts of ``params`` (quarter turns, then flips) to a patch.

    Args:
        image: (depth, height, width, channels).
        label: (depth, height, width).
        params: the patch's spatial transform; its matrix was already used at extraction.

    Returns:
        Contiguous copies of both, with height and width swapped for an odd ``rot90``.
    """
    if params.rot90:
        image = np.rot90(image, params.rot90, axes=(1, 2))
        label = np.rot90(label, params.rot90, axes=(1, 2))
    if params.flips:
        image = np.flip(image, axis=params.flips)
        label = np.flip(label, axis=params.flips)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def augment_intensity(
    image: np.ndarray, rng: np.random.Generator, aug: AugmentationConfig
) -> np.ndarray:
    """Noise, blur, scale, shift and gamma, in nnU-Net's order, each with its probability.

    Args:
        image: float array (*spatial, channels), spatial of any rank (2D slices or 3D).
        rng: the sample's augmentation stream.
        aug: probabilities and ranges; nothing happens when ``aug.enabled`` is False.

    Returns:
        A new float32 array of the same shape (the input is never modified). Scale, shift and
        gamma are drawn per channel, as nnU-Net does.
    """
    image = np.array(image, dtype=np.float32, copy=True)
    if not aug.enabled:
        return image
    channels = image.shape[-1]
    if rng.random() < aug.noise_prob:
        image += aug.noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    if rng.random() < aug.blur_prob:
        sigma = rng.uniform(*aug.blur_sigma_range)
        image = ndimage.gaussian_filter(image, sigma=[sigma] * (image.ndim - 1) + [0.0])
    if rng.random() < aug.intensity_scale_prob:
        image *= np.asarray(rng.uniform(*aug.intensity_scale_range, size=channels), np.float32)
    if rng.random() < aug.intensity_shift_prob:
        image += np.asarray(rng.normal(0.0, aug.intensity_shift_std, size=channels), np.float32)
    if rng.random() < aug.gamma_prob:
        gammas = [_draw_gamma(rng, aug.gamma_range) for _ in range(channels)]
        image = np.stack([gamma(image[..., c], g) for c, g in enumerate(gammas)], axis=-1)
    return image


def _draw_gamma(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # Half the draws below 1 and half above, as nnU-Net does: a uniform draw over (0.7, 1.5)
    # would brighten only 3 times in 8.
    low, high = bounds
    if low < 1.0 < high:
        return rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high)
    return rng.uniform(low, high)


def gamma(channel: np.ndarray, value: float) -> np.ndarray:
    """Gamma on one channel rescaled to [0, 1], mapped back to its range and statistics.

    Normalised intensities are signed, so the power is taken on ``(x - min) / (max - min)``
    and the result mapped back to [min, max]; the mean and standard deviation are then
    restored (nnU-Net's ``retain_stats``), so only the contrast curve changes.
    """
    low, span = float(channel.min()), float(channel.max() - channel.min())
    if span <= 0.0:
        return channel.astype(np.float32)
    mean, std = float(channel.mean()), float(channel.std())
    curved = np.power((channel - low) / span, value) * span + low
    curved = (curved - curved.mean()) / (curved.std() + 1e-8) * std + mean
    return curved.astype(np.float32)
