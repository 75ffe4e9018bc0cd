"""The planning rules: pure functions from a fingerprint (and the hardware) to settings.

Every rule returns :class:`Choice` objects: the value for a config key and a one-line reason,
which the planner prints and writes above the key in the YAML. The rules follow nnU-Net's
(Isensee et al. 2021) where segnet has the same knob, scaled to a CPU where that matters:

* target spacing: the median; an axis more than ``ANISOTROPY`` times coarser than the finest
  takes the 10th percentile of its spacings instead;
* normalisation: ``ct`` for channels ``dataset.json`` calls CT, z-score for everything else;
* topology: pool an axis only while its spacing is within 2x of the finest and it still has
  ``MIN_POOL_SIZE`` voxels; its kernel is 1 until its spacing is within 2x of the finest;
* patch: the aspect ratio of the median (resampled) case, within ``PATCH_VOXELS``;
* 2D: an axis with fewer than ``MIN_3D`` voxels is a slice axis (kernel 1, patch 1 along it);
* post-processing: keep only the largest connected piece of a class that is one piece in every
  label that holds it. nnU-Net measures this choice by cross-validation after training; the
  planner, before any training, asks the labels whether a second piece can ever be right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segnet.planning.fingerprint import Fingerprint, Float3, Int3

ANISOTROPY = 3.0  # an axis this much coarser than the finest is treated as anisotropic
SPACING_TOLERANCE = 0.02  # cases this close to the target spacing on every axis stay as they are
CROP_WORTH = 0.75  # crop to the non-zero box when it holds less than this share of a case
MIN_3D = 4  # an axis with fewer voxels (median case) cannot be convolved in 3D
MIN_POOL_SIZE = 8  # an axis is pooled only while it has at least this many voxels
MIN_PATCH = 8  # no patch axis (but a slice axis) is smaller: the U-Net pools at least once
MAX_DEPTH = 5  # nnU-Net's 3D U-Nets stop at about 4-8 voxels after 5 poolings
PATCH_VOXELS = {False: 2**18, True: 2**21}  # per patch: CPU (64^3), GPU (128^3)
MIN_VOXELS = 2**15  # the smallest patch budget (32^3) shrinking for steps goes down to
FILTERS = {False: 16, True: 32}  # first-level filters: CPU, GPU (nnU-Net's 32)
SMALLEST_FILTERS = 8  # the smallest network the budget falls back to
MAX_BATCH = 8
DATASET_BATCH_SHARE = 0.05  # nnU-Net: one batch holds at most 5% of the dataset's voxels
TRAINING_SHARE = 0.85  # of the budget for steps; validation, caching and export take the rest
# Steps a plan aims for: on hippocampus 1500 steps reached Dice 0.857 / 0.836, 3600-4000 steps
# 0.871-0.875 / 0.854-0.858 and 6500 smaller-patch steps 0.880 / 0.862 (README), so a patch
# shrinks until about this many fit the budget.
STEPS_WANTED = 4000
MIN_STEPS = 1000  # fewer training steps than this rarely converge; try the smallest network
EPOCH_STEPS = (50, 250)  # steps per epoch: at least (one epoch of it is the least plan), at most
EPOCHS_WANTED = 20  # epochs (checkpoints, validation, progress plot) a plan aims for
VALIDATIONS_WANTED = 10
_CT = re.compile(r"\bct\b", re.IGNORECASE)
Model = Literal["unet3d", "segnet"]


@dataclass(frozen=True)
class Choice:
    """A setting and why: ``reason`` is one line, printed and written above its key."""

    value: Any
    reason: str


@dataclass(frozen=True)
class Hardware:
    """What the plan runs on.

    Attributes:
        gpu: training will run on a GPU.
        name: e.g. ``Intel(R) Xeon(R) Processor (2 cores)``.
    """

    gpu: bool
    name: str


@dataclass(frozen=True)
class Sizing:
    """How big a network the plan may build.

    Attributes:
        max_voxels: the patch budget (the batch fills it too, see :func:`batch_size`).
        filters: first-level filters.
        why: the reason for this budget, in the patch's reason.
    """

    max_voxels: int
    filters: int
    why: str


def first_sizing(hardware: Hardware) -> Sizing:
    """The budget of a first plan: nnU-Net's on a GPU, a quarter of its patch on a CPU."""
    device = "a GPU" if hardware.gpu else "a CPU"
    return Sizing(
        PATCH_VOXELS[hardware.gpu], FILTERS[hardware.gpu], f"the patch budget of {device}"
    )


def sizing_for_steps(current: Sizing, steps: int) -> Sizing | None:
    """A smaller patch budget so that about ``STEPS_WANTED`` steps fit, or None when that
    would not shrink it (by a tenth at least)."""
    voxels = max(MIN_VOXELS, current.max_voxels * steps // STEPS_WANTED)
    if voxels > 0.9 * current.max_voxels:
        return None
    why = (
        f"shrunk from {current.max_voxels} voxels, of which only {steps} steps fit the budget: "
        f"about {STEPS_WANTED} smaller steps train better (README, hippocampus)"
    )
    return Sizing(voxels, current.filters, why)


def smallest_sizing(steps: int) -> Sizing:
    """The smallest network, when even a smaller patch leaves too few steps."""
    why = f"the smallest network: only {steps} steps of the last one fit the budget"
    return Sizing(MIN_VOXELS, SMALLEST_FILTERS, why)


@dataclass(frozen=True)
class Network:
    """The chosen network and its sample shape.

    Attributes:
        model: ``unet3d`` or ``segnet``.
        patch_size: (depth, height, width) voxels; 1 along a slice axis.
        pool_sizes: per level, per axis.
        kernel_sizes: per level and the bottleneck, per axis (the U-Net's).
        filters: first-level filters.
        batch_size: patches per step.
        slice_axis: the axis the network does not convolve across (2D), or None.
    """

    model: Model
    patch_size: Int3
    pool_sizes: tuple[Int3, ...]
    kernel_sizes: tuple[Int3, ...]
    filters: int
    batch_size: int
    slice_axis: int | None

    @property
    def depth(self) -> int:
        return len(self.pool_sizes)


def mm(values: Sequence[float]) -> str:
    """``1.5 x 1.5 x 10`` (spacings in reasons)."""
    return " x ".join(f"{v:.4g}" for v in values)


def voxels(values: Sequence[float]) -> str:
    """``216 x 256 x 9`` (shapes in reasons)."""
    return " x ".join(f"{v:.0f}" for v in values)


# ---------------------------------------------------------------------------------------------
# Spacing and intensities
# ---------------------------------------------------------------------------------------------
def target_spacing(fp: Fingerprint) -> Choice:
    """The median spacing, with nnU-Net's rule for one coarse axis."""
    median = fp.median_spacing
    coarse = int(np.argmax(median))
    ratio = median[coarse] / min(median)
    if ratio <= ANISOTROPY:
        return Choice(
            _rounded(median),
            f"the median spacing of the {fp.num_cases} cases (coarsest / finest axis "
            f"{ratio:.2g} <= {ANISOTROPY:g}: no axis needs its own rule)",
        )
    tenth = float(np.percentile([s[coarse] for s in fp.spacings], 10))
    others = max(s for a, s in enumerate(median) if a != coarse)
    target = list(median)
    target[coarse] = max(tenth, others)
    return Choice(
        _rounded(target),
        f"the median spacing, but axis {coarse} is {ratio:.2g}x coarser than the finest "
        f"(> {ANISOTROPY:g}): it takes the 10th percentile of its spacings, "
        f"{target[coarse]:.4g} mm, as nnU-Net does, so fewer cases are interpolated across it",
    )


def _rounded(spacing: Sequence[float]) -> list[float]:
    return [round(float(s), 4) for s in spacing]


def resample(fp: Fingerprint, target: Sequence[float]) -> Choice:
    """Resample only when some case is off the target spacing by more than the tolerance."""
    off = max(abs(s / t - 1.0) for case in fp.spacings for s, t in zip(case, target))
    if off <= SPACING_TOLERANCE:
        return Choice(
            False,
            f"every case is already on {mm(target)} mm (within {SPACING_TOLERANCE:.0%}): "
            "train on the voxels as they are",
        )
    return Choice(
        True,
        f"case spacings differ from {mm(target)} mm by up to {off:.0%}: resample every case",
    )


def normalization(fp: Fingerprint) -> dict[str, Choice]:
    """``normalization`` when every channel takes the same scheme, else
    ``channel_normalization``: ``ct`` for CT channels, z-score per case for the others."""
    schemes = [_scheme(name) for name in fp.channel_names]
    reasons = [_scheme_reason(c, name, fp) for c, name in enumerate(fp.channel_names)]
    if len(set(schemes)) == 1:
        return {"normalization": Choice(schemes[0], "; ".join(reasons))}
    return {"channel_normalization": Choice(schemes, "; ".join(reasons))}


def _scheme(channel_name: str) -> str:
    return "ct" if _CT.search(channel_name) else "zscore"


def _scheme_reason(channel: int, name: str, fp: Fingerprint) -> str:
    label = f"channel {channel} ({name})" if name else f"channel {channel}"
    if _scheme(name) == "ct":
        stats = fp.intensity[channel]
        return (
            f"{label} is CT: clip to the foreground's 0.5-99.5 percentiles "
            f"[{stats.low:.4g}, {stats.high:.4g}] and scale by its mean {stats.mean:.4g} and "
            f"std {stats.std:.4g} (nnU-Net's CT scheme; Hounsfield units mean the same in "
            "every scan)"
        )
    if not name:
        return f"{label}: dataset.json names no modality, so z-score per case (set 'ct' for CT)"
    return f"{label} is not CT: z-score per case (its intensities have no absolute scale)"


def crop_to_nonzero(fp: Fingerprint) -> Choice:
    """nnU-Net crops to the non-zero box, and normalises inside it, when that saves a lot."""
    share = fp.crop_fraction()
    if share < CROP_WORTH:
        return Choice(
            True,
            f"the non-zero region fills a median {share:.0%} of a case: crop to it, and "
            "z-score inside it",
        )
    return Choice(
        False,
        f"the non-zero region fills a median {share:.0%} of a case: cropping would save "
        "little, so keep the grid and z-score over all of it",
    )


def largest_component(fp: Fingerprint) -> Choice:
    """``evaluation.keep_largest_component``: the classes that are one piece in every label.

    Such a structure (a ventricle, an organ) has no second piece to lose, so a prediction's
    stray islands of it can only be errors; a class that some label holds in several pieces
    (a split structure, lesions) is left as predicted.
    """
    whole = [k for k, c in enumerate(fp.classes, start=1) if c.cases and c.one_piece == c.cases]
    split = [
        f"{c.name} {c.cases - c.one_piece} of {c.cases}"
        for c in fp.classes
        if c.one_piece < c.cases
    ]
    several = f"several pieces in some labels: {', '.join(split)}" if split else ""
    if not whole:
        return Choice(False, f"no class is one piece in every label ({several}): none")
    names = ", ".join(fp.class_names[k] for k in whole)
    return Choice(
        whole,
        f"{names}: one connected piece in every label, so predictions keep only the largest "
        f"piece{f' ({several})' if split else ''}; a cross-validation measures it (README)",
    )


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
def planned_shape(fp: Fingerprint, target: Sequence[float] | None, cropped: bool) -> Float3:
    """The median case's shape after preprocessing (cropping, then resampling to ``target``)."""
    shapes = fp.cropped_shapes if cropped else fp.shapes
    scale = [
        [n * s / t for n, s, t in zip(shape, spacing, target)] if target else list(shape)
        for shape, spacing in zip(shapes, fp.spacings)
    ]
    a, b, c = (float(v) for v in np.median(scale, axis=0))
    return a, b, c


def slice_axis(shape: Float3) -> int | None:
    """The axis too thin for 3D convolutions (the thinnest below ``MIN_3D``), or None."""
    thin = [a for a in range(3) if shape[a] < MIN_3D]
    return min(thin, key=lambda a: shape[a]) if thin else None


def topology(
    patch: Sequence[float], spacing: Sequence[float], thin: int | None
) -> tuple[tuple[Int3, ...], tuple[Int3, ...]]:
    """nnU-Net's pools and kernels for a patch at a spacing.

    Per level: an axis is pooled (2) while its spacing is within 2x of the finest and it has at
    least ``MIN_POOL_SIZE`` voxels; its kernel turns from 1 to 3 once its spacing is within 2x
    of the finest, and stays 3. A slice axis is never pooled and keeps kernel 1.

    Returns:
        ``(pool_sizes, kernel_sizes)``: ``depth`` pools and ``depth + 1`` kernels.
    """
    size, current = list(patch), list(spacing)
    kernel = [1, 1, 1]
    pools: list[Int3] = []
    kernels: list[Int3] = []
    axes = [a for a in range(3) if a != thin]
    while True:
        finest = min(current[a] for a in axes)
        near = [a in axes and current[a] <= 2 * finest for a in range(3)]
        kernel = [3 if near[a] else k for a, k in enumerate(kernel)]
        kernels.append(_int3(kernel))
        pool = _int3(2 if near[a] and size[a] >= MIN_POOL_SIZE else 1 for a in range(3))
        if len(pools) == MAX_DEPTH or max(pool) == 1:
            return tuple(pools), tuple(kernels)
        pools.append(pool)
        size = [n / p for n, p in zip(size, pool)]
        current = [s * p for s, p in zip(current, pool)]


def divisor(pools: Sequence[Int3]) -> Int3:
    """What each patch axis must divide by: the product of its pools."""
    return _int3(math.prod(pool[a] for pool in pools) for a in range(3))


def fit_patch(
    shape: Float3, spacing: Sequence[float], thin: int | None, max_voxels: int
) -> tuple[Int3, tuple[Int3, ...], tuple[Int3, ...]]:
    """The patch: the median shape's aspect ratio within ``max_voxels``, each axis a multiple of
    its pools' product, with the topology for it.

    The shape is scaled down by a common factor, rounded up to the multiples its topology
    needs, and the factor shrinks by 3% at a time until that fits.

    Returns:
        ``(patch_size, pool_sizes, kernel_sizes)``.
    """
    free = [a for a in range(3) if a != thin]
    volume = math.prod(max(float(MIN_PATCH), shape[a]) for a in free)
    factor = min(1.0, (max_voxels / volume) ** (1 / len(free)))
    while True:
        patch, pools, kernels = _divisible(_scaled(shape, thin, factor), spacing, thin)
        if math.prod(patch) <= max_voxels or all(patch[a] <= MIN_PATCH for a in free):
            return patch, pools, kernels
        factor *= 0.97


def _scaled(shape: Float3, thin: int | None, factor: float) -> Int3:
    """``shape`` times ``factor``, no axis below ``MIN_PATCH``; a slice axis is 1."""
    return _int3(1 if a == thin else max(MIN_PATCH, round(shape[a] * factor)) for a in range(3))


def _divisible(
    patch: Int3, spacing: Sequence[float], thin: int | None
) -> tuple[Int3, tuple[Int3, ...], tuple[Int3, ...]]:
    """``patch`` rounded up to its topology's multiples (a larger patch may pool once more, so
    until the topology holds still: at most ``MAX_DEPTH`` more levels)."""
    while True:
        pools, kernels = topology(patch, spacing, thin)
        fitted = _int3(math.ceil(p / d) * d for p, d in zip(patch, divisor(pools)))
        if fitted == patch:
            return patch, pools, kernels
        patch = fitted


def batch_size(patch: Int3, fp: Fingerprint, shape: Float3, max_voxels: int) -> Choice:
    """As many patches as fit the voxel budget (at least 2, at most ``MAX_BATCH``), and no more
    than ``DATASET_BATCH_SHARE`` of the dataset's voxels."""
    sample = math.prod(patch)
    by_budget = max_voxels // sample
    by_dataset = int(DATASET_BATCH_SHARE * math.prod(shape) * fp.num_cases // sample)
    batch = max(2, min(MAX_BATCH, by_budget, by_dataset))
    bound = " (more would hold over 5% of the dataset's voxels)" if by_dataset < by_budget else ""
    return Choice(
        batch,
        f"as many {sample}-voxel patches as the {max_voxels}-voxel budget holds, at least 2 "
        f"(nnU-Net's least) and at most {MAX_BATCH}{bound}",
    )


def plan_network(
    fp: Fingerprint,
    spacing: Sequence[float],
    shape: Float3,
    model: Model,
    sizing: Sizing,
) -> tuple[Network, dict[str, Choice]]:
    """The network for the median preprocessed case ``shape`` at ``spacing``.

    Returns:
        The network and the reasons for its patch, topology, filters and batch.
    """
    thin = slice_axis(shape)
    patch, pools, kernels = fit_patch(shape, spacing, thin, sizing.max_voxels)
    batch = batch_size(patch, fp, shape, sizing.max_voxels)
    network = Network(model, patch, pools, kernels, sizing.filters, batch.value, thin)
    return network, _network_reasons(network, shape, spacing, sizing, batch)


def _network_reasons(
    net: Network,
    shape: Float3,
    spacing: Sequence[float],
    sizing: Sizing,
    batch: Choice,
) -> dict[str, Choice]:
    patch_why = (
        f"the median case is {voxels(shape)} voxels; keeping its aspect ratio within "
        f"{sizing.max_voxels} voxels per patch ({sizing.why}), each axis a multiple of its "
        f"pools' product {list(divisor(net.pool_sizes))}"
    )
    if net.slice_axis is not None:
        patch_why += (
            f"; axis {net.slice_axis} has under {MIN_3D} voxels, so the network is 2D across it "
            "(patch 1, kernel 1 there)"
        )
    return {
        "patch_size": Choice(list(net.patch_size), patch_why),
        "depth": Choice(net.depth, _depth_reason(net)),
        "pool_sizes": Choice(
            [list(p) for p in net.pool_sizes],
            f"at {mm(spacing)} mm: pool an axis only while its spacing is within 2x of the "
            f"finest and it has >= {MIN_POOL_SIZE} voxels (nnU-Net)",
        ),
        "kernel_sizes": Choice(
            [list(k) for k in net.kernel_sizes],
            "3 along an axis once its spacing is within 2x of the finest, 1 (within slices) "
            "before that; the bottleneck's last",
        ),
        "filters": Choice(net.filters, _filters_reason(net, sizing)),
        "batch_size": batch,
    }


def _depth_reason(net: Network) -> str:
    bottom = [p // d for p, d in zip(net.patch_size, divisor(net.pool_sizes))]
    shrink = f"{voxels(net.patch_size)} -> {voxels(bottom)} at the bottleneck"
    if net.depth == MAX_DEPTH:
        return f"{MAX_DEPTH} poolings, nnU-Net's most: {shrink}"
    return f"pooling until no axis can (the rule below): {shrink}"


def _filters_reason(net: Network, sizing: Sizing) -> str:
    if net.filters == SMALLEST_FILTERS:
        return f"{net.filters}: {sizing.why}"
    where = "nnU-Net's" if net.filters == FILTERS[True] else "half of nnU-Net's 32, for a CPU"
    return f"{net.filters} at the first level ({where}), doubling per level up to the cap"


# ---------------------------------------------------------------------------------------------
# Training length
# ---------------------------------------------------------------------------------------------
def affordable_steps(step_seconds: float, budget_seconds: float) -> int:
    """Training steps that fit ``TRAINING_SHARE`` of the budget."""
    return int(budget_seconds * TRAINING_SHARE // step_seconds)


def schedule(steps: int, step_seconds: float, budget_seconds: float) -> dict[str, Choice]:
    """Epochs, steps per epoch and the validation cadence for ``steps`` affordable steps."""
    per_epoch = min(max(steps // EPOCHS_WANTED, EPOCH_STEPS[0]), EPOCH_STEPS[1])
    epochs = max(1, steps // per_epoch)
    minutes = epochs * per_epoch * step_seconds / 60
    return {
        "epochs": Choice(
            epochs,
            f"{epochs} x {per_epoch} steps of {step_seconds * 1e3:.0f} ms = {minutes:.0f} min, "
            f"{TRAINING_SHARE:.0%} of the {budget_seconds / 60:.0f} min budget (validation, "
            "caching and export take the rest)",
        ),
        "steps_per_epoch": Choice(
            per_epoch,
            f"about {EPOCHS_WANTED} epochs (checkpoints, progress plot), "
            f"{EPOCH_STEPS[0]}-{EPOCH_STEPS[1]} steps each",
        ),
        "val_every": Choice(
            max(1, epochs // VALIDATIONS_WANTED),
            f"about {VALIDATIONS_WANTED} whole-volume validations in the run",
        ),
    }


def _int3(values: Any) -> Int3:
    a, b, c = (int(v) for v in values)
    return a, b, c
