"""The training input pipeline: random (foreground-biased) patches of preprocessed cases.

Training sample ``i`` is a pure function of ``(train.seed, i)``: its random streams come from
``np.random.SeedSequence([seed, i])``, which picks the case, the patch position and the
augmentation. The stream is therefore stateless: resuming after ``k`` steps is starting at
sample ``k * global_batch``, and yields exactly the batches an uninterrupted run would have
seen, whatever the parallelism (the map is ordered).

Cases stay on disk: each case's arrays are opened memory-mapped once per process, in a
least-recently-used table bounded by ``data.max_cached_cases``, and a patch reads only the
voxels it covers.

Usage::

    dataset = build_dataset(config, cases, start_step=step)
    dataset = strategy.experimental_distribute_dataset(dataset)  # global batches
"""

from __future__ import annotations

import math
import resource
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig
from segnet.data.augmentation import (
    apply_patch_spatial,
    augment_intensity,
    draw_spatial,
    extract_patch,
    extraction_shape,
)
from segnet.data.case import PreprocessedCase
from segnet.errors import DataError

# File descriptors left for everything else when every case is kept open (one per memmap).
_RESERVED_FDS = 256


@dataclass(frozen=True)
class _OpenCase:
    image: np.ndarray  # (depth, height, width, channels) read-only memmap
    label: np.ndarray  # (depth, height, width) read-only memmap
    foreground: dict[int, np.ndarray]  # present class -> (n, 3) voxel coordinates, n > 0


class _OpenCases:
    """Least-recently-used table of memory-mapped cases, shared by tf.data's map threads."""

    def __init__(self, cases: list[PreprocessedCase], capacity: int) -> None:
        self._cases = cases
        self._capacity = capacity
        self._open: OrderedDict[int, _OpenCase] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> _OpenCase:
        with self._lock:
            if index in self._open:
                self._open.move_to_end(index)
                return self._open[index]
            opened = _open_case(self._cases[index])
            self._open[index] = opened
            if len(self._open) > self._capacity:
                self._open.popitem(last=False)
            return opened


def _open_case(case: PreprocessedCase) -> _OpenCase:
    label = case.load_label(mmap=True)
    if label is None:  # check_training_cases refuses these before any sampling
        raise DataError([f"{case.case_id}: has no label; training cases need one"])
    foreground = {c: xyz for c, xyz in case.load_foreground().items() if len(xyz)}
    return _OpenCase(case.load_image(mmap=True), label, foreground)


def _cache_capacity(max_cached_cases: int, num_cases: int) -> int:
    """``max_cached_cases``, or all cases when 0 unless that would run out of descriptors."""
    if max_cached_cases > 0:
        return max_cached_cases
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return num_cases
    return max(1, min(num_cases, (soft_limit - _RESERVED_FDS) // 2))


def is_foreground_sample(index: int, fraction: float) -> bool:
    """Whether sample ``index`` must contain foreground.

    Exactly ``floor(n * fraction)`` of the first ``n`` samples are forced (the forced ones
    are evenly spread), so the share holds in every stretch of the stream, not just on
    average, and it does not depend on the batch size.
    """
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def training_patch_size(config: ExperimentConfig, spatial_dims: int = 3) -> tuple[int, ...]:
    """The spatial shape of one training sample: ``data.patch_size``, or its last two in 2D."""
    _check_spatial_dims(spatial_dims)
    return tuple(config.data.patch_size[3 - spatial_dims :])


def _volume_patch(config: ExperimentConfig, spatial_dims: int) -> tuple[int, int, int]:
    # A 2D sample is a 3D patch of depth 1, so one extraction path serves both.
    patch = config.data.patch_size
    return (1, patch[1], patch[2]) if spatial_dims == 2 else patch


class PatchSampler:
    """Produces training sample ``index`` as a pure function of ``(train.seed, index)``.

    Call it eagerly (``sampler(i)``) or through :func:`build_dataset`; both give the same
    arrays. In 2D the sample is one axial slice: a patch of depth 1 at a random depth.
    """

    def __init__(
        self, config: ExperimentConfig, cases: list[PreprocessedCase], spatial_dims: int = 3
    ) -> None:
        check_training_cases(config, cases, spatial_dims)
        self._config = config
        self._cases = list(cases)
        self._spatial_dims = spatial_dims
        self._patch = _volume_patch(config, spatial_dims)
        self._seed = config.train.seed % 2**63  # SeedSequence takes non-negative entropy
        capacity = _cache_capacity(config.data.max_cached_cases, len(self._cases))
        self._open = _OpenCases(self._cases, capacity)

    def __call__(self, index: int | np.integer) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(image, label)``: float32 (*patch, channels) and int32 (*patch)."""
        index = int(index)
        place_seed, augment_seed = np.random.SeedSequence([self._seed, index]).spawn(2)
        place_rng = np.random.default_rng(place_seed)
        augment_rng = np.random.default_rng(augment_seed)
        case = self._open.get(int(place_rng.integers(len(self._cases))))
        params = draw_spatial(augment_rng, self._config.augmentation, self._spatial_dims)
        shape = extraction_shape(self._patch, params.rot90)
        forced = is_foreground_sample(index, self._config.data.foreground_fraction)
        start, pivot = place_patch(place_rng, case.image.shape[:3], shape, case.foreground, forced)
        image, label = extract_patch(case.image, case.label, start, shape, params.matrix, pivot)
        image, label = apply_patch_spatial(image, label, params)
        if self._spatial_dims == 2:
            image, label = image[0], label[0]
        image = augment_intensity(image, augment_rng, self._config.augmentation)
        return image, label.astype(np.int32)


def place_patch(
    rng: np.random.Generator,
    volume: tuple[int, int, int],
    shape: tuple[int, int, int],
    foreground: dict[int, np.ndarray],
    forced: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chooses where a patch starts, and for a foreground patch the voxel it must hold.

    The patch stays inside the volume along every axis where it fits; where the volume is
    smaller, the volume lands at a random place inside the patch (the rest is padding). A
    forced patch picks a class uniformly among ``foreground``'s classes (nnU-Net's per-class
    sampling, so rare classes are seen as often as common ones), one of its voxels, and a
    random start that keeps that voxel inside. A case without foreground gets a random patch.

    Args:
        rng: the sample's placement stream.
        volume: (depth, height, width) of the case.
        shape: (depth, height, width) of the patch.
        foreground: class -> (n, 3) voxel coordinates, every n > 0.
        forced: whether the patch must contain foreground.

    Returns:
        ``(start, pivot)``: the int64 (3,) start, and for a forced patch the chosen voxel's
        position inside the patch (the affine pivots on it so it cannot rotate out), else None.
    """
    volume_arr, shape_arr = np.asarray(volume), np.asarray(shape)
    low = np.minimum(0, volume_arr - shape_arr)
    high = np.maximum(0, volume_arr - shape_arr)
    if not (forced and foreground):
        return rng.integers(low, high + 1), None
    classes = sorted(foreground)
    voxels = foreground[classes[int(rng.integers(len(classes)))]]
    voxel = np.asarray(voxels[int(rng.integers(len(voxels)))], dtype=np.int64)
    start = rng.integers(np.maximum(low, voxel - shape_arr + 1), np.minimum(high, voxel) + 1)
    return start, voxel - start


def check_training_cases(
    config: ExperimentConfig, cases: list[PreprocessedCase], spatial_dims: int = 3
) -> None:
    """Raises DataError listing every case the pipeline cannot train on.

    Reads only the ``.npy`` headers: every case needs a label, an image with
    ``data.num_channels`` channels and the label's shape, and (unless
    ``data.pad_small_volumes``) must be at least the patch size.
    """
    _check_spatial_dims(spatial_dims)
    if not cases:
        raise DataError(["no training cases: the training split is empty; check data.split"])
    patch = _volume_patch(config, spatial_dims)
    problems = [p for case in cases for p in _case_problems(config, case, patch)]
    if problems:
        raise DataError(problems, hint="re-run preprocessing, or fix the config keys named above")


def _case_problems(config: ExperimentConfig, case: PreprocessedCase, patch) -> list[str]:
    image, label = case.load_image(mmap=True), case.load_label(mmap=True)
    if label is None:
        return [f"{case.case_id}: has no label; training cases need one"]
    channels = config.data.num_channels
    if image.ndim != 4 or image.shape[-1] != channels:
        return [
            f"{case.image_path}: image shape {image.shape} is not (depth, height, width, "
            f"{channels}); set data.num_channels or re-run preprocessing"
        ]
    if label.shape != image.shape[:3]:
        return [f"{case.label_path}: label shape {label.shape} != image shape {image.shape[:3]}"]
    if not config.data.pad_small_volumes and any(v < p for v, p in zip(image.shape, patch)):
        return [
            f"{case.case_id}: volume {image.shape[:3]} is smaller than the patch {tuple(patch)}; "
            "set data.pad_small_volumes: true or a smaller data.patch_size"
        ]
    return []


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def dataset_element_spec(
    config: ExperimentConfig, spatial_dims: int = 3, batch_size: int | None = None
) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    """The ``(images, labels)`` specs of :func:`build_dataset`'s batches.

    Returns:
        float32 (batch, *patch, channels) and int32 (batch, *patch), every dimension static.
    """
    batch = batch_size or config.train.batch_size
    patch = training_patch_size(config, spatial_dims)
    return (
        tf.TensorSpec((batch, *patch, config.data.num_channels), tf.float32),
        tf.TensorSpec((batch, *patch), tf.int32),
    )


def build_dataset(
    config: ExperimentConfig,
    cases: list[PreprocessedCase],
    *,
    start_step: int = 0,
    spatial_dims: int = 3,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """An endless, deterministic stream of training batches.

    Args:
        config: uses ``data`` (patch size, foreground fraction, workers, cache bound),
            ``augmentation`` and ``train`` (seed, batch size).
        cases: the training cases, each with a label.
        start_step: steps already trained; the stream starts at sample
            ``start_step * batch_size`` and continues exactly as an uninterrupted one would.
        spatial_dims: 3 for patches, 2 for axial slices of ``data.patch_size[1:]``.
        batch_size: the global batch, default ``train.batch_size``; under a distribution
            strategy it is split across replicas by ``experimental_distribute_dataset``.

    Returns:
        A dataset of ``(images, labels)``: float32 (batch, *patch, channels) and int32
        (batch, *patch), with static shapes (the last partial batch never exists: the
        stream is infinite and batched with ``drop_remainder``).

    Raises:
        DataError: a case is unusable (see :func:`check_training_cases`).
    """
    batch = batch_size or config.train.batch_size
    sampler = PatchSampler(config, cases, spatial_dims)
    image_spec, label_spec = dataset_element_spec(config, spatial_dims, batch)

    def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(sampler, [index], (tf.float32, tf.int32), name="patch")
        image.set_shape(image_spec.shape[1:])
        label.set_shape(label_spec.shape[1:])
        return image, label

    parallel = config.data.num_workers or tf.data.AUTOTUNE
    dataset = tf.data.Dataset.counter(start=start_step * batch)
    dataset = dataset.map(load, num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return dataset.with_options(_options())


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # There are no files to shard: every worker computes the same global batches and keeps
    # its share, which keeps the stream identical for any number of workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def describe_pipeline(
    config: ExperimentConfig,
    cases: list[PreprocessedCase],
    *,
    start_step: int = 0,
    spatial_dims: int = 3,
    batch_size: int | None = None,
) -> str:
    """Short lines for the training log saying what :func:`build_dataset` will produce."""
    data, aug = config.data, config.augmentation
    batch = batch_size or config.train.batch_size
    patch = "x".join(map(str, training_patch_size(config, spatial_dims)))
    cache = _cache_capacity(data.max_cached_cases, len(cases))
    workers = data.num_workers or "auto"
    return "\n".join(
        [
            f"patches: {spatial_dims}D {patch} x {data.num_channels} channels, batches of "
            f"{batch}, {data.foreground_fraction:.0%} centred on foreground, from "
            f"{len(cases)} cases",
            _describe_augmentation(aug),
            f"data stream: seed {config.train.seed}, starting at sample {start_step * batch}; "
            f"{workers} parallel readers, up to {cache} cases memory-mapped",
        ]
    )


def _describe_augmentation(aug) -> str:
    """One line for the geometric transforms, one for the intensity ones."""
    if not aug.enabled:
        return "augmentation: off"
    low, high = aug.scale_range
    about = "" if aug.coarse_axis is None else f" about axis {aug.coarse_axis} only"
    geometry = {
        f"flip (axes {', '.join(map(str, aug.flip_axes))})": aug.flip_prob,
        "rot90": aug.rot90_prob,
        f"affine (±{aug.rotation_degrees:g}°{about}, zoom {low:g}-{high:g})": aug.affine_prob,
    }
    intensity = {
        "scale": aug.intensity_scale_prob,
        "shift": aug.intensity_shift_prob,
        "gamma": aug.gamma_prob,
        "noise": aug.noise_prob,
        "blur": aug.blur_prob,
    }

    def line(parts: dict[str, float]) -> str:
        return ", ".join(f"{name} p={p:g}" for name, p in parts.items() if p > 0) or "none"

    return (
        f"augmentation of geometry: {line(geometry)}\naugmentation of intensity: {line(intensity)}"
    )
