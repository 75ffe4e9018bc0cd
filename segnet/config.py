"""The experiment: a typed, frozen dataclass tree parsed strictly from YAML.

Every section is a frozen dataclass whose fields carry their defaults and a one-line comment.
Cross-field rules live in each class's ``validate()``, next to the fields they relate, and
return ``(relative dotted path, message)`` pairs so the parser can report every problem in a
file at once. Load with :func:`load_config`; the result is what a run directory stores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import math
import os
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from segnet.errors import ConfigError
from segnet.strict_dataclass import from_dict, set_path, suggest, to_dict

Problems = list[tuple[str, str]]
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (keras.utils.set_random_seed) takes no more

Norm = Literal["batch", "instance", "group", "none"]
Activation = Literal["relu", "leaky_relu", "elu", "gelu", "swish"]
Normalization = Literal["zscore", "ct", "range", "none"]
Triple = tuple[int, int, int]  # one value per spatial axis (depth, height, width)
Factor = Literal[1, 2, 4]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseEntry:
    """One case of an explicit dataset list (``data.format: list``)."""

    id: str = ""  # unique case identifier
    images: tuple[str, ...] = ()  # one file per channel, relative to data.root
    label: str | None = None  # label map, relative to data.root; None for unlabelled images

    def validate(self) -> Problems:
        problems: Problems = []
        if not self.id:
            problems.append(("id", "must be a non-empty string"))
        if not self.images:
            problems.append(("images", "must list at least one image file"))
        return problems


@dataclass(frozen=True)
class SplitConfig:
    """Which cases train and which are held out for validation/evaluation."""

    folds_file: str | None = None  # {"folds": {"0": [ids]}} or splits_final.json; in data.root
    fold: int = 0  # the held-out fold; the others train
    num_folds: int = 5  # folds made by a seeded shuffle when there is no folds_file
    seed: int = 0  # seed of that shuffle
    train: tuple[str, ...] = ()  # explicit training case ids (overrides folds)
    val: tuple[str, ...] = ()  # explicit held-out case ids (overrides folds)
    test_fold: int | None = None  # a fold no training sees; --folds all cross-validates the rest

    def validate(self) -> Problems:
        problems: Problems = []
        if self.test_fold is not None:
            if self.train or self.val:
                problems.append(("test_fold", "works with folds, not with explicit train/val"))
            if self.test_fold < 0:
                problems.append(("test_fold", f"must be >= 0, got {self.test_fold}"))
        if self.num_folds < 2:
            problems.append(("num_folds", f"must be at least 2, got {self.num_folds}"))
        elif not self.folds_file and not 0 <= self.fold < self.num_folds:
            problems.append(("fold", f"must be in 0..{self.num_folds - 1}, got {self.fold}"))
        if self.fold < 0:
            problems.append(("fold", f"must be >= 0, got {self.fold}"))
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(("seed", f"must be in 0..{MAX_SEED}, got {self.seed}"))
        overlap = set(self.train) & set(self.val)
        if overlap:
            problems.append(("val", f"cases in both train and val: {sorted(overlap)[:5]}"))
        return problems


@dataclass(frozen=True)
class DataConfig:
    """Where the volumes are and how patches are drawn from them."""

    root: str = "data/synthetic"  # dataset directory (relative paths resolve from the cwd)
    root_alternatives: tuple[str, ...] = ()  # tried in order when root does not exist
    format: Literal["auto", "msd", "nnunetv2", "folders", "list"] = "auto"  # auto: detected
    cases: tuple[CaseEntry, ...] = ()  # the explicit case list for format: list
    synthetic: bool = False  # generate the synthetic phantom dataset into root when missing
    num_classes: int = 4  # label values 0..num_classes-1, background included
    num_channels: int = 1  # image channels (nnU-Net suffixes _0000, _0001, ...)
    split: SplitConfig = field(default_factory=SplitConfig)
    patch_size: tuple[int, int, int] = (64, 64, 64)  # (depth, height, width) voxels
    foreground_fraction: float = 0.33  # share of patches forced to contain a foreground class
    skip_bad_cases: bool = False  # drop unusable cases with a report instead of stopping
    pad_small_volumes: bool = True  # pad volumes smaller than the patch instead of failing
    cache_dir: str = "data/cache"  # preprocessed, memory-mappable copies of the cases
    num_workers: int = 0  # parallel map calls in tf.data; 0 means AUTOTUNE
    max_cached_cases: int = 0  # 0: open every case memory-mapped; >0 bounds resident cases

    def validate(self) -> Problems:
        problems: Problems = []
        if self.num_classes < 2:
            problems.append(("num_classes", f"must be at least 2, got {self.num_classes}"))
        if self.num_channels < 1:
            problems.append(("num_channels", f"must be at least 1, got {self.num_channels}"))
        if any(p < 1 for p in self.patch_size):
            problems.append(("patch_size", f"sizes must be positive, got {list(self.patch_size)}"))
        if not 0.0 <= self.foreground_fraction <= 1.0:
            problems.append(("foreground_fraction", "must be in [0, 1]"))
        if self.format == "list" and not self.cases:
            problems.append(("cases", "format 'list' needs at least one case"))
        if self.num_workers < 0:
            problems.append(("num_workers", "must be >= 0 (0 means AUTOTUNE)"))
        return problems


@dataclass(frozen=True)
class PreprocessingConfig:
    """Applied identically at training and inference time, and undone on predictions."""

    resample: bool = False  # resample every case to target_spacing
    target_spacing: tuple[float, float, float] | None = None  # mm; None: the dataset median
    image_interpolation: Literal["linear", "cubic"] = "linear"  # labels always use nearest
    crop_to_nonzero: bool = True  # crop to the bounding box of non-zero image voxels
    normalization: Normalization = "zscore"  # each channel on its own
    # One scheme per channel (e.g. [ct, zscore] for CT + MR); empty: normalization for all
    channel_normalization: tuple[Normalization, ...] = ()
    ct_percentiles: tuple[float, float] = (0.5, 99.5)  # 'ct': clip to foreground percentiles
    intensity_range: tuple[float, float] = (0.0, 1.0)  # 'range': clip to this, scale to [0, 1]
    use_cache: bool = True  # keep preprocessed cases in data.cache_dir
    # Cases the fingerprint (median spacing, CT intensities) is computed on: the training cases,
    # or every case but the test fold, so that all folds of a cross-validation share it.
    fingerprint_cases: Literal["training", "all_folds"] = "training"

    def validate(self) -> Problems:
        problems: Problems = []
        if self.target_spacing is not None and any(s <= 0 for s in self.target_spacing):
            problems.append(("target_spacing", "spacings must be positive millimetres"))
        lo, hi = self.ct_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            problems.append(("ct_percentiles", "must satisfy 0 <= low < high <= 100"))
        if self.intensity_range[0] >= self.intensity_range[1]:
            problems.append(("intensity_range", "low must be below high"))
        return problems

    def normalization_of(self, channel: int) -> Normalization:
        """The normalisation scheme of image channel ``channel``."""
        if self.channel_normalization:
            return self.channel_normalization[channel]
        return self.normalization

    @property
    def uses_ct(self) -> bool:
        """Whether some channel needs the dataset's foreground intensity statistics."""
        return "ct" in (self.channel_normalization or (self.normalization,))


@dataclass(frozen=True)
class AugmentationConfig:
    """Random transforms of training patches; each has its own probability."""

    enabled: bool = True  # master switch
    flip_prob: float = 0.5  # per axis in flip_axes
    flip_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes (0 = depth)
    rot90_prob: float = 0.0  # 90-degree rotations in the axial (height, width) plane
    affine_prob: float = 0.2  # random rotation + scaling, resampled on the fly
    rotation_degrees: float = 15.0  # max absolute rotation per axis
    # A voxel axis far coarser than the others (e.g. 0 for 10 mm slices of 1.5 mm pixels): the
    # affine then rotates about it only and zooms the other two, so no sample mixes distant
    # slices. null: rotate about, and zoom, every axis
    coarse_axis: int | None = None
    scale_range: tuple[float, float] = (0.85, 1.15)  # isotropic zoom factor
    intensity_scale_prob: float = 0.15
    intensity_scale_range: tuple[float, float] = (0.75, 1.25)
    intensity_shift_prob: float = 0.15
    intensity_shift_std: float = 0.1  # shift in units of the normalised intensity
    gamma_prob: float = 0.15
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.15
    noise_std: float = 0.1
    blur_prob: float = 0.1
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # voxels

    def validate(self) -> Problems:
        problems: Problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                problems.append((f.name, f"must be a probability in [0, 1], got {value}"))
            if f.name.endswith("_range") and value[0] > value[1]:
                problems.append((f.name, f"low must not exceed high, got {list(value)}"))
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            problems.append(("flip_axes", "axes must be 0, 1 or 2"))
        if self.coarse_axis not in (None, 0, 1, 2):
            problems.append(("coarse_axis", f"must be 0, 1, 2 or null, got {self.coarse_axis}"))
        for name in ("noise_std", "intensity_shift_std", "rotation_degrees"):
            if getattr(self, name) < 0:
                problems.append((name, "must be >= 0"))
        if self.scale_range[0] <= 0 or self.gamma_range[0] <= 0:
            problems.append(
                ("scale_range" if self.scale_range[0] <= 0 else "gamma_range", "must be positive")
            )
        return problems


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _encoder_problems(model: UNet3DConfig | SegNetConfig) -> Problems:
    """The rules on the settings every encoder-decoder shares.

    The model constructors apply them too (``segnet.models.base.check_arguments``), so this
    is their only copy.
    """
    problems: Problems = []
    if not 1 <= model.depth <= 7:
        problems.append(("depth", f"must be in 1..7, got {model.depth}"))
    if model.filters < 1:
        problems.append(("filters", f"must be positive, got {model.filters}"))
    if model.growth < 1.0:
        problems.append(("growth", f"must be >= 1, got {model.growth}"))
    if not 0.0 <= model.dropout < 1.0:
        problems.append(("dropout", f"must be in [0, 1), got {model.dropout}"))
    if model.convs_per_level < 1:
        problems.append(("convs_per_level", "must be at least 1"))
    if model.max_filters < model.filters:
        problems.append(("max_filters", "must be >= filters"))
    if model.pool_sizes is not None:
        pool_problems = _per_level_problems(
            "pool_sizes", model.pool_sizes, model.depth, "depth", _spatial_dims(model), (1, 2)
        )
        if not pool_problems and any(max(pool) < 2 for pool in model.pool_sizes):
            pool_problems.append(("pool_sizes", "every level must pool (2) along some axis"))
        problems += pool_problems
    return problems


def _spatial_dims(model: UNet3DConfig | SegNetConfig) -> int:
    return model.spatial_dims if isinstance(model, SegNetConfig) else 3


def _per_level_problems(
    key: str,
    levels: Sequence[Sequence[int]],
    count: int,
    count_says: str,
    dims: int,
    allowed: tuple[int, ...] | None,
) -> Problems:
    """Rules of a per-level, per-axis list (``pool_sizes``, ``kernel_sizes``)."""
    if len(levels) != count:
        return [(key, f"needs {count} levels ({count_says}), got {len(levels)}")]
    problems: Problems = []
    for i, level in enumerate(levels):
        if len(level) != dims:
            problems.append(
                (f"{key}[{i}]", f"needs {dims} values (one per axis), got {list(level)}")
            )
        elif allowed is not None and any(v not in allowed for v in level):
            wanted = " or ".join(map(str, allowed))
            problems.append((f"{key}[{i}]", f"values must be {wanted}, got {list(level)}"))
        elif allowed is None and any(v < 1 or v % 2 == 0 for v in level):
            problems.append((f"{key}[{i}]", f"sizes must be odd and positive, got {list(level)}"))
    return problems


def per_axis(value: int | Sequence[int], dims: int = 3) -> tuple[int, ...]:
    """A factor given once for every axis or per axis, as one int per axis."""
    return (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)


def collapse(factors: Sequence[int]) -> int | tuple[int, ...]:
    """``(2, 2, 2) -> 2``: the plain int where every axis agrees (what isotropic models keep)."""
    return factors[0] if len(set(factors)) == 1 else tuple(factors)


@dataclass(frozen=True)
class UNet3DConfig:
    """3D U-Net; ``input_downsample`` runs it at a lower resolution inside the graph."""

    depth: int = 4  # poolings; patch axes must divide by their product of pools x input_downsample
    filters: int = 16  # filters at the first level
    growth: float = 2.0  # filters multiply by this per level
    max_filters: int = 320  # cap, as nnU-Net does
    convs_per_level: int = 2
    norm: Norm = "instance"
    groups: int = 8  # for norm: group
    activation: Activation = "leaky_relu"
    dropout: float = 0.0
    upsampling: Literal["transpose", "resize"] = "transpose"  # decoder up-sampling
    deep_supervision: bool = False  # extra heads at lower decoder levels
    # AveragePooling3D factor applied inside the graph: one for all axes, or [d, h, w]
    input_downsample: Factor | tuple[Factor, Factor, Factor] = 1
    output_upsample: Literal["learned", "trilinear"] = "trilinear"  # back to full resolution
    loss_at: Literal["full", "low"] = "full"  # 'low': loss vs labels averaged down in-graph
    # Per level [d, h, w] pool of 1 or 2 (1 keeps a coarse axis); null: 2 along every axis
    pool_sizes: tuple[Triple, ...] | None = None
    # Per level (depth + 1 entries, the bottleneck last) odd [d, h, w] kernels, e.g. [1, 3, 3]
    # where an axis is coarse; null: 3 along every axis
    kernel_sizes: tuple[Triple, ...] | None = None

    def validate(self) -> Problems:
        problems = _encoder_problems(self)
        if self.loss_at == "low" and self.input_factors == (1, 1, 1):
            problems.append(("loss_at", "'low' needs input_downsample 2 or 4"))
        if self.loss_at == "low" and self.output_upsample == "learned":
            # The learned up-sampling only feeds the full-resolution output, which is unsupervised.
            problems.append(("output_upsample", "'learned' is untrained with loss_at 'low'"))
        if self.kernel_sizes is not None:
            problems += _per_level_problems(
                "kernel_sizes", self.kernel_sizes, self.depth + 1, "depth + 1", 3, None
            )
        return problems

    @property
    def input_factors(self) -> Triple:
        """``input_downsample`` per axis."""
        d, h, w = per_axis(self.input_downsample)
        return d, h, w

    @property
    def level_pools(self) -> tuple[Triple, ...]:
        """The pool of each of the ``depth`` levels, per axis."""
        return self.pool_sizes if self.pool_sizes is not None else ((2, 2, 2),) * self.depth

    @property
    def level_kernels(self) -> tuple[Triple, ...]:
        """The kernel of each level's convolutions, per axis; the bottleneck's last."""
        return (
            self.kernel_sizes if self.kernel_sizes is not None else ((3, 3, 3),) * (self.depth + 1)
        )

    @property
    def level_scales(self) -> tuple[Triple, ...]:
        """Per level 0..depth: how much coarser than the input its features are, per axis."""
        scales = [self.input_factors]
        for pool in self.level_pools:
            d, h, w = (s * p for s, p in zip(scales[-1], pool))
            scales.append((d, h, w))
        return tuple(scales)

    @property
    def divisor(self) -> Triple:
        """What every patch axis must divide by: the bottleneck's scale."""
        return self.level_scales[-1]


@dataclass(frozen=True)
class CascadeConfig:
    """Coarse-to-fine: a low-resolution U-Net guides a full-resolution one."""

    downsample: Literal[2, 4] = 2  # resolution factor of the first stage
    low: UNet3DConfig = field(default_factory=lambda: UNet3DConfig(depth=3))
    high: UNet3DConfig = field(default_factory=lambda: UNet3DConfig(depth=4))
    train_stage: Literal["joint", "low", "high"] = "joint"  # which stage's weights train
    # Run directory of a finished train_stage 'low' run whose latest stage 1 weights start this
    # run: required by 'high' (stage 1 is frozen there), an optional warm start for 'joint'.
    stage1_from: str | None = None

    def validate(self) -> Problems:
        problems: Problems = []
        if self.train_stage == "high" and self.stage1_from is None:
            problems.append(
                (
                    "stage1_from",
                    "train_stage 'high' freezes stage 1, so it needs trained weights: set "
                    "stage1_from to the run directory of a train_stage 'low' run",
                )
            )
        if self.train_stage == "low" and self.stage1_from is not None:
            problems.append(("stage1_from", "has no use with train_stage 'low'; remove it"))
        for name in ("low", "high"):
            if getattr(self, name).input_factors != (1, 1, 1):
                problems.append((f"{name}.input_downsample", "must be 1 inside a cascade"))
            if getattr(self, name).deep_supervision:  # the cascade already outputs both stages
                problems.append((f"{name}.deep_supervision", "must be false inside a cascade"))
        return problems

    @property
    def divisor(self) -> Triple:
        """What every patch axis must divide by: stage 1's, downsampled, and stage 2's, which
        train_stage 'low' does not build."""
        high = self.high.divisor if self.train_stage != "low" else (1, 1, 1)
        d, h, w = (max(a * self.downsample, b) for a, b in zip(self.low.divisor, high))
        return d, h, w


@dataclass(frozen=True)
class SegNetConfig:
    """SegNet: max-pool encoder, decoder that unpools at the encoder's argmax positions."""

    spatial_dims: Literal[2, 3] = 3  # 2: slices of the patch's (height, width)
    depth: int = 4  # number of pool/unpool pairs; odd sizes are handled exactly
    filters: int = 16
    growth: float = 2.0
    max_filters: int = 256
    convs_per_level: int = 2
    norm: Norm = "batch"
    groups: int = 8
    activation: Activation = "relu"
    dropout: float = 0.0
    # Per level pool of 1 or 2 per spatial axis ([d, h, w], or [h, w] in 2D); null: 2 everywhere
    pool_sizes: tuple[tuple[int, ...], ...] | None = None

    def validate(self) -> Problems:
        return _encoder_problems(self)

    @property
    def level_pools(self) -> tuple[tuple[int, ...], ...]:
        """The pool of each of the ``depth`` levels, per spatial axis."""
        default = ((2,) * self.spatial_dims,) * self.depth
        return self.pool_sizes if self.pool_sizes is not None else default

    @property
    def divisor(self) -> Triple:
        return 1, 1, 1  # the argmax unpooling crops back to any recorded size


@dataclass(frozen=True)
class ModelConfig:
    """``name`` picks the architecture; its sub-config below holds its settings."""

    name: str = "segnet"  # a key of segnet.models.registry
    unet3d: UNet3DConfig = field(default_factory=UNet3DConfig)
    unet3d_cascade: CascadeConfig = field(default_factory=CascadeConfig)
    segnet: SegNetConfig = field(default_factory=SegNetConfig)

    def validate(self) -> Problems:
        names = [f.name for f in dataclasses.fields(self) if f.name != "name"]
        if self.name not in names:
            return [("name", f"unknown model '{self.name}'{suggest(self.name, names)}")]
        return []

    @property
    def selected(self) -> UNet3DConfig | CascadeConfig | SegNetConfig:
        return getattr(self, self.name)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    """Computed in float32 whatever the compute precision."""

    name: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_weights: tuple[float, ...] | None = None  # cross-entropy weight per class
    include_background_in_dice: bool = False
    deep_supervision_weights: tuple[float, ...] | None = None  # None: halve per level
    smooth: float = 1e-5

    def validate(self) -> Problems:
        problems: Problems = []
        if self.dice_weight < 0 or self.ce_weight < 0:
            problems.append(("dice_weight", "weights must be >= 0"))
        if self.class_weights is not None and any(w < 0 for w in self.class_weights):
            problems.append(("class_weights", "weights must be >= 0"))
        return problems


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD + Nesterov + poly decay is nnU-Net's default; AdamW pairs with warm-up + cosine."""

    name: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = 0.01  # peak learning rate
    momentum: float = 0.99  # SGD only
    nesterov: bool = True  # SGD only
    weight_decay: float = 3e-5
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    clip_norm: float | None = 12.0  # global gradient norm clipping; null disables it

    def validate(self) -> Problems:
        problems: Problems = []
        if self.learning_rate <= 0:
            problems.append(("learning_rate", f"must be positive, got {self.learning_rate}"))
        if not 0.0 <= self.momentum < 1.0:
            problems.append(("momentum", "must be in [0, 1)"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", "must be >= 0"))
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", "must be >= 0"))
        if self.clip_norm is not None and self.clip_norm <= 0:
            problems.append(("clip_norm", "must be positive or null"))
        return problems


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's length and cadence."""

    epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 2  # global batch: split across replicas under a distribution strategy
    seed: int = 0  # seeds weights, patch sampling and augmentation
    val_every: int = 1  # validate every N epochs (0 disables validation)
    val_max_cases: int = 0  # validate on at most this many held-out cases (0 = all)
    deterministic: bool = False  # tf.config.experimental.enable_op_determinism
    ema_decay: float | None = None  # weight EMA to validate and export, e.g. 0.999; null/0: off

    @property
    def averages_weights(self) -> bool:
        """Whether an exponential moving average of the weights is kept (``ema_decay``)."""
        return bool(self.ema_decay)

    def validate(self) -> Problems:
        problems: Problems = []
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be at least 1, got {getattr(self, name)}"))
        for name in ("val_every", "val_max_cases"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(("seed", f"must be in 0..{MAX_SEED}, got {self.seed}"))
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            problems.append(
                (
                    "ema_decay",
                    f"must be in (0, 1), typically 0.999, or null/0 for off; got {self.ema_decay}",
                )
            )
        return problems


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # also save every N steps (0: only at epoch ends)
    keep: int = 3  # latest checkpoints kept; the best one is kept apart
    keep_best: bool = True  # keep the best by mean validation Dice in checkpoints/best

    def validate(self) -> Problems:
        problems: Problems = []
        if self.every_steps < 0:
            problems.append(("every_steps", "must be >= 0"))
        if self.keep < 1:
            problems.append(("keep", "must be at least 1"))
        return problems


@dataclass(frozen=True)
class EvaluationConfig:
    """Sliding-window inference and metrics on held-out volumes."""

    window: tuple[int, int, int] | None = None  # None: data.patch_size
    overlap: float = 0.5  # fraction of the window shared by neighbours
    weighting: Literal["gaussian", "constant"] = "gaussian"  # sigma = window * sigma_scale
    sigma_scale: float = 0.125
    batch_size: int = 2  # windows per forward pass
    # The models' convolutions: auto = bfloat16 where the hardware runs it natively (AMX or
    # AVX512-BF16 CPUs, compute capability 8+ GPUs), else float32; softmax and metrics: float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    mirror_axes: tuple[int, ...] = ()  # test-time mirroring over these spatial axes
    accumulate_on_cpu: bool = False  # bound accelerator memory on very large volumes
    # post-processing: keep only the largest connected piece of each foreground class (true), or
    # of the classes listed (segnet-plan lists those that are one piece in every training label)
    keep_largest_component: bool | tuple[int, ...] = False
    nsd_tolerance_mm: float = 1.0  # normalised surface Dice tolerance
    save_probabilities: bool = False  # also write a probability map per case
    montage: bool = True  # PNG montage per case

    def validate(self) -> Problems:
        problems: Problems = []
        if not 0.0 <= self.overlap < 1.0:
            problems.append(("overlap", f"must be in [0, 1), got {self.overlap}"))
        if self.window is not None and any(w < 1 for w in self.window):
            problems.append(("window", "sizes must be positive"))
        if self.batch_size < 1:
            problems.append(("batch_size", "must be at least 1"))
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            problems.append(("mirror_axes", "axes must be 0, 1 or 2"))
        if self.sigma_scale <= 0 or self.nsd_tolerance_mm < 0:
            problems.append(("sigma_scale", "sigma_scale must be > 0, tolerance >= 0"))
        return problems


@dataclass(frozen=True)
class RuntimeConfig:
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    # auto: mixed precision only where the hardware runs it natively (segnet/precision.py)
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16", "auto"] = "float32"
    jit_compile: bool = False  # XLA: slower for 3D convolutions on CPU, often faster on GPU
    # XLA for the loss and batch counts alone, when the step is not compiled: fuses their
    # element-wise passes over the logits (the bf16 64^3 step on the AMX Xeon 0.44 -> 0.40 s)
    jit_compile_loss: bool = True
    sync_batchnorm: bool = False  # synchronise BatchNorm statistics across replicas
    log_every_steps: int = 10  # TensorBoard scalar cadence

    def validate(self) -> Problems:
        if self.log_every_steps < 1:
            return [("log_every_steps", "must be at least 1")]
        return []


MAX_NAME_LENGTH = 128  # characters; a name of long UTF-8 characters meets 255 bytes first


def _bad_name(name: str) -> str | None:
    """Why ``name`` cannot be a folder of its own under runs/, or None when it can."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"{name!r} is the {'current' if name == '.' else 'parent'} folder"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character (NUL, newline, ...)"
    size = len(name.encode("utf-8", "surrogatepass"))
    if len(name) > MAX_NAME_LENGTH or size > 255:  # 255 bytes: the usual file system limit
        return f"is too long: {len(name)} characters, {size} bytes (at most {MAX_NAME_LENGTH}, 255)"
    return None


def _name_like(name: str) -> str:
    """A valid name close to ``name``: separators and control characters become '_'."""
    cleaned = "".join(
        "_" if c in "/\\" or unicodedata.category(c) == "Cc" else c for c in name
    ).strip("._ ")
    cleaned = cleaned[:MAX_NAME_LENGTH].encode("utf-8", "ignore")[:255].decode("utf-8", "ignore")
    return cleaned or "experiment"


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment, as stored in ``<run_dir>/config.yaml``."""

    name: str = "experiment"  # default run directory: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> Problems:
        problems: Problems = []
        why = _bad_name(self.name)
        if why:
            problems.append(
                (
                    "name",
                    f"{why}; it names the run folder runs/<name>, so it must be a plain folder "
                    f"name, e.g. {_name_like(self.name)!r}",
                )
            )
        problems += self._patch_rules()
        per_channel = self.preprocessing.channel_normalization
        if per_channel and len(per_channel) != self.data.num_channels:
            problems.append(
                (
                    "preprocessing.channel_normalization",
                    f"needs {self.data.num_channels} values (data.num_channels), "
                    f"got {len(per_channel)}",
                )
            )
        largest = self.evaluation.keep_largest_component
        if not isinstance(largest, bool):
            outside = [k for k in largest if not 1 <= k < self.data.num_classes]
            if outside:
                problems.append(
                    (
                        "evaluation.keep_largest_component",
                        f"lists {outside}, not foreground classes (1 to {self.data.num_classes - 1}"
                        " with data.num_classes "
                        f"{self.data.num_classes}); list foreground labels, or true for all",
                    )
                )
        weights = self.loss.class_weights
        if weights is not None and len(weights) != self.data.num_classes:
            problems.append(
                (
                    "loss.class_weights",
                    f"needs {self.data.num_classes} values (data.num_classes), got {len(weights)}",
                )
            )
        return problems

    def _patch_rules(self) -> Problems:
        selected = getattr(self.model, self.model.name, None)
        if selected is None:  # an unknown model name is reported by ModelConfig
            return []
        divisor = selected.divisor
        patch = self.data.patch_size
        if not any(p % d for p, d in zip(patch, divisor)):
            return []
        what = collapse(divisor)
        per_axis_note = "" if isinstance(what, int) else " per axis"
        fit = [max(d, math.ceil(p / d) * d) for p, d in zip(patch, divisor)]
        return [
            (
                "data.patch_size",
                f"{list(patch)} must be divisible by {list(divisor) if per_axis_note else what}"
                f"{per_axis_note} for model '{self.model.name}' (the product of its pool sizes x "
                f"input downsampling); try {fit}",
            )
        ]

    @property
    def window(self) -> tuple[int, int, int]:
        return self.evaluation.window or self.data.patch_size

    @property
    def spatial_dims(self) -> int:
        """2 for a 2D SegNet (trained on axial slices, predicting slice by slice), else 3."""
        return 2 if self.model.name == "segnet" and self.model.segnet.spatial_dims == 2 else 3


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 1 << 20  # a config is a small YAML file; anything bigger is the wrong file
MAX_NESTING = 32  # YAML levels; the deepest setting (data.cases[i].images[j]) needs 6


class _Refused(yaml.YAMLError):
    """A YAML document that parses but that no config may hold (a key given twice, ...)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class StrictLoader(yaml.SafeLoader):
    """The one YAML loader for configs: SafeLoader that also refuses what PyYAML lets through.

    A key given twice (PyYAML keeps the last silently, dropping the first block), nesting deeper
    than ``MAX_NESTING`` (PyYAML's recursive composer hits RecursionError near 1000 levels) and
    integers too long for Python's int parser all become YAML errors with a line number.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= MAX_NESTING:
            raise _Refused(
                f"nested too deeply at {_where(self.peek_event().start_mark)} (more than "
                f"{MAX_NESTING} levels; a config needs a few)"
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(self, node)
        return super().construct_document(node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise _Refused(
                f"integer at {_where(node.start_mark)} has {len(node.value)} digits, too many "
                "for any setting"
            ) from None


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def _where(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _refuse_duplicate_keys(loader: StrictLoader, root: yaml.Node) -> None:
    """Raises _Refused for the first mapping that gives one key twice, naming both lines."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()  # aliases can make the node graph cyclic
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            stack += _check_mapping(loader, node, path)


def _check_mapping(
    loader: StrictLoader, node: yaml.MappingNode, path: str
) -> list[tuple[yaml.Node, str]]:
    """The mapping's values with their dotted paths; raises _Refused on a repeated key."""
    lines: dict[Any, int] = {}
    children: list[tuple[yaml.Node, str]] = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue  # `<<:` merges are explicit overrides; complex keys fail the schema later
        key = loader.construct_object(key_node)
        dotted = f"{path}.{key}" if path else str(key)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise _Refused(f"{dotted}: key given twice (lines {lines[key]} and {line}); keep one")
        lines[key] = line
        children.append((value_node, dotted))
    return children


def parse_yaml(text: str) -> Any:
    """One YAML document read with :class:`StrictLoader`.

    Raises:
        ConfigError: one problem, in one line: ``invalid YAML at line L, column C: ...`` or
            what StrictLoader refused (a key given twice, too deep a nesting).
    """
    try:
        return yaml.load(text, Loader=StrictLoader)  # safe: a SafeLoader subclass
    except _Refused as exc:
        raise ConfigError([exc.problem]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at {_where(mark)}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"invalid YAML{where}: {problem}"]) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", yaml value of c)``; raises ConfigError on malformed text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {text!r}: expected key.path=value, e.g. train.epochs=5"])
    if key.count(".") >= MAX_NESTING:  # no setting is that deep, and set_path would build it
        raise ConfigError(
            [f"--set {key[:40]}...: nested too deeply (more than {MAX_NESTING} levels)"]
        )
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except ConfigError as exc:
        raise ConfigError([f"--set {key}: {exc.problems[0]}"]) from None
    return key, value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; ConfigError names the file and line for every failure."""
    path = Path(path)
    text = _read_config_text(path)  # its errors name the file already
    try:
        data = parse_yaml(text)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=str(path)) from None
    if data is None or data == {}:
        raise ConfigError(
            [
                "the config is empty; it needs at least the data and model sections "
                "(see configs/ for examples)"
            ],
            source=str(path),
        )
    if not isinstance(data, dict):
        raise ConfigError(
            ["the top level must be a mapping of sections (data:, model:, ...)"], source=str(path)
        )
    return data


def _read_config_text(path: Path) -> str:
    """The text of ``path``, refused unless it is a regular file of at most MAX_CONFIG_BYTES.

    Opened without blocking and checked on the open descriptor: opening a FIFO waits for a
    writer forever, and reading a device such as /dev/zero never ends.
    """
    try:
        raw = _read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"config file not found; check the path ({path})"]) from None
    except OSError as exc:
        kind = None
        with contextlib.suppress(OSError):  # a socket cannot even be opened: say what it is
            kind = _file_kind(path.stat().st_mode)
        if kind:
            raise ConfigError([_not_a_config_file(path, kind)]) from None
        raise ConfigError([f"cannot read config file {path}: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        why = f"larger than {MAX_CONFIG_BYTES >> 20} MiB, far more than any config"
        raise ConfigError([_not_a_config_file(path, why)])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc}"]) from None


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``; OSError unless it is a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as file:
        kind = _file_kind(os.fstat(fd).st_mode)
        if kind:
            raise OSError(errno.EINVAL, kind, str(path))
        return file.read(limit)


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is (``a directory``, ``a FIFO``...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _not_a_config_file(path: Path, why: str) -> str:
    return f"cannot read config file {path}: it is {why}; pass an experiment YAML (see configs/)"


def build_config(
    data: dict[str, Any], overrides: Sequence[str] = (), source: str | None = None
) -> ExperimentConfig:
    """Validates plain data (plus ``key=value`` overrides) into an ExperimentConfig.

    ``data`` is left as it was: the overrides go into a deep copy, so one mapping can seed
    several configs.
    """
    data = copy.deepcopy(data)
    syntax_problems: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            syntax_problems += exc.problems
            continue
        set_path(data, key, value)
    config, problems = from_dict(ExperimentConfig, data)
    problems = syntax_problems + problems
    if problems or config is None:
        raise ConfigError(problems, source=source)
    return config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML experiment (or only defaults when ``path`` is None) and validates it."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, list(overrides), source=str(path) if path else None)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return to_dict(config)


def config_to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
