"""Check every case up front and report all problems at once, each naming its file and reason.

A training run that stops after an hour on case 173's truncated label wastes the hour; reading
every volume once before training costs seconds (208 hippocampus cases: about one second). The
same pass notes what each usable case holds (its label's classes, an all-zero image), so data
that trains but cannot teach what it should is warned about without reading anything twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segnet.config import DataConfig, ExperimentConfig
from segnet.data.datasets import CaseFiles
from segnet.data.volumes import (
    AFFINE_TOLERANCE,
    Geometry,
    affine_difference,
    read_multichannel,
    read_volume,
)
from segnet.errors import DataError, shortened

log = logging.getLogger("segnet")
_MAX_THREADS = 4  # decompression releases the GIL; more threads than this only add memory
_LISTED = 10  # case ids a warning names before "and N more"


@dataclass(frozen=True)
class Fixes:
    """How the problems name their fix for the command that checks the cases: training can
    change ``data.num_classes``, evaluation cannot (the model's classes are fixed) and takes
    settings as ``--set key=value``.

    Attributes:
        skip: how to leave unusable cases out.
        classes: what label values must be; ``{last}`` and ``{n}`` are filled in.
        channels: what the channel count must be; ``{n}`` is filled in.
    """

    skip: str
    classes: str
    channels: str


TRAIN_FIXES = Fixes(
    skip="set data.skip_bad_cases: true",
    classes="data.num_classes is {n}",
    channels="data.num_channels is {n}",
)
EVALUATE_FIXES = Fixes(
    skip="pass --set data.skip_bad_cases=true",
    classes="the model predicts classes 0..{last}; the data must use the same labels",
    channels="the model takes {n} channels (data.num_channels of the run)",
)


@dataclass(frozen=True)
class CaseContents:
    """What the checking pass saw in a usable case.

    Attributes:
        classes: label values present (empty for an unlabelled case).
        blank_image: every voxel of every channel is 0.
    """

    classes: frozenset[int]
    blank_image: bool


@dataclass(frozen=True)
class CheckedCases:
    """The usable cases from :func:`check_cases`, what each holds, and the problems of the
    cases ``data.skip_bad_cases`` left out."""

    cases: list[CaseFiles]
    contents: dict[str, CaseContents]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def warnings(self, training: Collection[str], num_classes: int) -> list[str]:
        """Data that trains but cannot teach what it should: one message per kind of problem.

        Args:
            training: ids of the training cases (classes must occur in their labels).
            num_classes: ``data.num_classes``.
        """
        train = [self.contents[i] for i in training if self.contents[i].classes]
        found = frozenset().union(*(c.classes for c in train))
        never = sorted(set(range(num_classes)) - found)
        warnings = []
        if train and never:
            warnings.append(
                f"classes {never} never occur in the labels of the {_cases(len(train))} "
                f"trained on (they hold {sorted(found)}), so the model cannot learn them; "
                f"check data.num_classes ({num_classes}) against the dataset's labels"
            )
        background = [i for i in training if self.contents[i].classes == {0}]
        if background:
            warnings.append(
                f"all-background label (class 0 only) in {len(background)} of the "
                f"{_cases(len(training))} trained on, which teach background alone: "
                f"{shortened(background, _LISTED)}"
            )
        blank = [i for i, c in self.contents.items() if c.blank_image and c.classes - {0}]
        if blank:
            warnings.append(
                f"all-zero image (every channel 0) but foreground in the label in "
                f"{_cases(len(blank))}; check their image files: {shortened(blank, _LISTED)}"
            )
        return warnings


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _data(config: ExperimentConfig | DataConfig) -> DataConfig:
    return config.data if isinstance(config, ExperimentConfig) else config


def _non_finite(array: np.ndarray, path: Path) -> list[str]:
    if array.dtype.kind != "f":
        return []
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    return [f"{path}: {bad} voxels are NaN or infinite"] if bad else []


def _grid_problems(
    path: Path, geometry: Geometry, reference: Geometry, ref_path: Path
) -> list[str]:
    if geometry.shape != reference.shape:
        return [f"{path}: shape {geometry.shape} differs from {ref_path.name} {reference.shape}"]
    difference = affine_difference(geometry, reference)
    if difference > AFFINE_TOLERANCE:
        return [
            f"{path}: affine differs from {ref_path.name} by up to {difference:.4g} mm "
            "(the volumes are not on the same voxel grid)"
        ]
    return []


def _label_values(label: np.ndarray, path: Path, num_classes: int, fixes: Fixes) -> list[str]:
    """Labels must be integers in 0..num_classes-1 (float storage is fine if values are)."""
    if label.dtype.kind == "f":
        finite = np.isfinite(label)
        if not finite.all():
            return [f"{path}: {int(label.size - finite.sum())} label voxels are NaN or infinite"]
        fractional = label != np.round(label)
        if fractional.any():
            examples = np.unique(label[fractional])[:5].tolist()
            return [f"{path}: non-integer label values, e.g. {examples}"]
    low, high = label.min(), label.max()
    if low < 0 or high > num_classes - 1:
        outside = np.unique(label[(label < 0) | (label > num_classes - 1)])[:10]
        values = [int(v) for v in outside]
        wanted = fixes.classes.format(n=num_classes, last=num_classes - 1)
        return [f"{path}: label values {values} outside 0..{num_classes - 1} ({wanted})"]
    return []


def _classes_present(label: np.ndarray, num_classes: int) -> frozenset[int]:
    """The values of a checked label (integers in 0..num_classes-1)."""
    if num_classes <= 16:  # a comparison per class beats bincount's int64 copy of the volume
        return frozenset(c for c in range(num_classes) if np.any(label == c))
    counts = np.bincount(label.reshape(-1).astype(np.intp), minlength=num_classes)
    return frozenset(int(c) for c in np.flatnonzero(counts))


@dataclass
class _Images:
    """The image files of one case as the checking pass saw them."""

    problems: list[str]
    reference: tuple[Path, Geometry] | None = None  # the first readable file and its grid
    blank: bool = True  # every voxel read so far is 0


def _read_images(case: CaseFiles, data: DataConfig, fixes: Fixes) -> _Images:
    seen = _Images([])
    channels = 0
    for path in case.images:
        try:
            array, geometry = read_multichannel(path)
        except DataError as exc:
            seen.problems += exc.problems
            continue
        channels += array.shape[-1]
        seen.problems += _non_finite(array, path)
        seen.blank = seen.blank and not np.any(array)
        if seen.reference is None:
            seen.reference = (path, geometry)
        else:
            ref_path, ref_geometry = seen.reference
            seen.problems += _grid_problems(path, geometry, ref_geometry, ref_path)
    if not seen.problems and channels != data.num_channels:
        names = ", ".join(p.name for p in case.images)
        wanted = fixes.channels.format(n=data.num_channels)
        seen.problems.append(f"{case.case_id}: {channels} image channels ({names}) but {wanted}")
    return seen


def _inspect_case(
    case: CaseFiles, data: DataConfig, fixes: Fixes = TRAIN_FIXES
) -> tuple[list[str], CaseContents | None]:
    """Every problem of one case, and (when there is none) what it holds; one read of each file."""
    images = _read_images(case, data, fixes)
    problems, reference = images.problems, images.reference
    if reference is not None and not data.pad_small_volumes:
        shape = reference[1].shape
        if any(s < p for s, p in zip(shape, data.patch_size)):
            problems.append(
                f"{reference[0]}: shape {shape} is smaller than data.patch_size "
                f"{tuple(data.patch_size)}; set data.pad_small_volumes: true"
            )
    classes: frozenset[int] = frozenset()
    if case.label is not None:
        try:
            label, geometry = read_volume(case.label)
        except DataError as exc:
            return problems + exc.problems, None
        if reference is not None:
            problems += _grid_problems(case.label, geometry, reference[1], reference[0])
        problems += _label_values(label, case.label, data.num_classes, fixes)
        if not problems:
            classes = _classes_present(label, data.num_classes)
    return problems, None if problems else CaseContents(classes, images.blank)


def case_problems(case: CaseFiles, data: DataConfig) -> list[str]:
    """Every problem of one case; empty when the case is usable."""
    return _inspect_case(case, data)[0]


def _inspect_all(
    cases: Sequence[CaseFiles], data: DataConfig, fixes: Fixes
) -> list[tuple[list[str], CaseContents | None]]:
    threads = min(_MAX_THREADS, (os.cpu_count() or 1) + 1, max(1, len(cases)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda case: _inspect_case(case, data, fixes), cases))


def problems_by_case(
    cases: Sequence[CaseFiles], config: ExperimentConfig | DataConfig
) -> dict[str, list[str]]:
    """``case_id -> problems`` for the cases that have any, in the cases' order."""
    found = _inspect_all(cases, _data(config), TRAIN_FIXES)
    return {case.case_id: p for case, (p, _) in zip(cases, found) if p}


def check_cases(
    cases: Sequence[CaseFiles],
    config: ExperimentConfig | DataConfig,
    fixes: Fixes = TRAIN_FIXES,
) -> CheckedCases:
    """The usable cases; raises unless ``data.skip_bad_cases``, which logs and drops bad ones.

    Checks: files readable and not truncated; 3D (4D only for channels-last images); channel
    count equals ``data.num_channels``; channel files and label share the first image's shape
    and affine (within 1e-3 mm); no NaN/inf voxels; label values integers in
    ``0..num_classes-1``; with ``pad_small_volumes: false``, no volume smaller than the patch.

    Args:
        cases: the cases to check; every volume is read once.
        config: the data settings they must fit.
        fixes: how the problems phrase their fix: :data:`TRAIN_FIXES` for training,
            :data:`EVALUATE_FIXES` for a trained model's evaluation.

    Returns:
        The usable cases in order, and what each holds (for :meth:`CheckedCases.warnings`).

    Raises:
        DataError: listing every problem of every case (or, when skipping, if no case is left).
    """
    data = _data(config)
    found = dict(zip((c.case_id for c in cases), _inspect_all(cases, data, fixes)))
    contents = {case_id: c for case_id, (_, c) in found.items() if c is not None}
    bad = {case_id: p for case_id, (p, _) in found.items() if p}
    if not bad:
        return CheckedCases(list(cases), contents)
    problems = [p for case_problems in bad.values() for p in case_problems]
    if not data.skip_bad_cases:
        raise DataError(
            problems,
            hint=f"{len(bad)} of {len(cases)} cases are unusable: fix "
            f"or remove them, or {fixes.skip} to leave them out.",
        )
    kept = [case for case in cases if case.case_id not in bad]
    log.warning(
        "Skipping %d of %d cases (data.skip_bad_cases):\n%s",
        len(bad),
        len(cases),
        "\n".join(f"  - {p}" for p in problems),
    )
    if not kept:
        raise DataError(problems, hint="No usable case is left.")
    return CheckedCases(kept, contents, bad)
