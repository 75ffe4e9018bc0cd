"""What the planner knows about a dataset: every case read once, summarised in a Fingerprint.

The dataset is described and checked exactly as training will (``describe_dataset``,
``check_cases``), so a plan is never written for data that cannot train. The layout, channel
and class counts come from ``dataset.json`` where there is one, else from the files. Then each
case contributes its spacing, shape, non-zero bounding box, class volumes and the number of
connected pieces each class forms in its label, and the
foreground intensity statistics per channel come from ``compute_fingerprint`` (the statistics
``normalization: ct`` uses at training time).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segnet.config import DataConfig, PreprocessingConfig, SplitConfig
from segnet.data.checks import Fixes, check_cases
from segnet.data.datasets import (
    SPLITS_FINAL,
    CaseFiles,
    dataset_channel_names,
    dataset_class_names,
    dataset_description,
    describe_dataset,
)
from segnet.data.preprocessing import ChannelStats, compute_fingerprint, nonzero_bbox
from segnet.data.volumes import read_channels, read_geometry, read_volume
from segnet.errors import DataError, UserError
from segnet.inference.postprocessing import pieces_per_class

Int3 = tuple[int, int, int]
Float3 = tuple[float, float, float]
MAX_LABEL = 255  # labels are stored as uint8 once preprocessed
_CHANNEL_FILE = re.compile(r"_(\d{4})\.nii(\.gz)?$")
_THREADS = min(4, (os.cpu_count() or 1) + 1)

PLAN_FIXES = Fixes(
    skip="move them out of the dataset folder",
    classes="dataset.json names {n} labels",
    channels="the dataset has {n} channels (dataset.json, or else its first case)",
)


@dataclass(frozen=True)
class ClassStats:
    """One foreground class over the cases.

    Attributes:
        name: from ``dataset.json``, else ``class <value>``.
        cases: how many cases hold it.
        median_ml: median volume in millilitres over the cases that hold it (0 if none does).
        one_piece: how many of those cases hold it as one connected piece (26-connected).
    """

    name: str
    cases: int
    median_ml: float
    one_piece: int = 0


@dataclass(frozen=True)
class Fingerprint:
    """The facts the planning rules read; built by :func:`fingerprint_dataset` or by hand.

    Attributes:
        name: the dataset's name (``dataset.json`` ``name``, else its folder's).
        root: the dataset folder as the user gave it.
        layout: ``msd``, ``nnunetv2`` or ``folders``.
        channel_names: per channel, what ``dataset.json`` calls it ('' where it says nothing).
        class_names: background first.
        spacings: per case, mm per array axis (depth, height, width).
        shapes: per case, voxels per axis.
        cropped_shapes: per case, the shape of the bounding box of non-zero voxels.
        intensity: per channel, foreground statistics (``low``/``high`` at 0.5 and 99.5 %).
        classes: foreground classes 1..n-1.
        folds_file: a segnet ``folds.json`` in the root, if any.
        splits_final: nnU-Net's ``splits_final.json`` is in the root (it then decides the split).
    """

    name: str
    root: str
    layout: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    spacings: tuple[Float3, ...]
    shapes: tuple[Int3, ...]
    cropped_shapes: tuple[Int3, ...]
    intensity: tuple[ChannelStats, ...]
    classes: tuple[ClassStats, ...]
    folds_file: str | None = None
    splits_final: bool = False

    @property
    def num_cases(self) -> int:
        return len(self.shapes)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def median_spacing(self) -> Float3:
        a, b, c = (float(v) for v in np.median(self.spacings, axis=0))
        return a, b, c

    def crop_fraction(self) -> float:
        """Median over cases of the non-zero bounding box's share of the volume."""
        shares = [math.prod(c) / math.prod(s) for c, s in zip(self.cropped_shapes, self.shapes)]
        return float(np.median(shares))


@dataclass(frozen=True)
class _CaseFacts:
    spacing: Float3
    shape: Int3
    cropped_shape: Int3
    class_ml: dict[int, float]
    pieces: dict[int, int]


# ---------------------------------------------------------------------------------------------
# Reading the dataset
# ---------------------------------------------------------------------------------------------
def fingerprint_dataset(root: str | Path) -> tuple[DataConfig, Fingerprint]:
    """Describes, checks and fingerprints the dataset in ``root``.

    Returns:
        The data section a config needs to read it (layout, channels, classes, split file),
        and its fingerprint.

    Raises:
        UserError: ``root`` is not a folder.
        DataError: the dataset cannot be read, or some case is unusable (every problem listed).
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"DATASET: folder not found: {folder}; pass a dataset folder")
    data = _data_config(folder)
    cases = describe_dataset(data, "train")
    if not dataset_channel_names(data):  # no dataset.json says: the first case does
        data = replace(data, num_channels=_channels_of(cases[0]))
    checked = check_cases(cases, data, PLAN_FIXES)
    found = frozenset().union(*(c.classes for c in checked.contents.values()))
    if found <= {0}:
        raise DataError([f"{folder}: no label of the {len(cases)} cases holds a foreground class"])
    if data.num_classes > MAX_LABEL:  # folders: no names, so the labels tell the classes
        data = replace(data, num_classes=max(found) + 1)
    with ThreadPoolExecutor(_THREADS) as pool:
        facts = list(pool.map(lambda case: _case_facts(case, data.num_classes), cases))
    statistics = compute_fingerprint(cases, PreprocessingConfig(normalization="ct"))
    return data, _summarise(folder, root, data, facts, statistics.intensity)


def _data_config(folder: Path) -> DataConfig:
    """Layout, channels and classes from ``dataset.json``, else the ``folders`` layout with the
    channels its file names show and classes to be read from the labels."""
    probe = DataConfig(root=str(folder))
    channels = len(dataset_channel_names(probe)) or _channel_suffixes(folder / "imagesTr")
    classes = len(dataset_class_names(probe)) or MAX_LABEL + 1
    folds = "folds.json" if (folder / "folds.json").is_file() else None
    return replace(
        probe,
        num_channels=max(channels, 1),
        num_classes=classes,
        split=SplitConfig(folds_file=folds, fold=0),
    )


def _channel_suffixes(images: Path) -> int:
    """The channel count the ``_0000``, ``_0001``... file names show (the highest + 1)."""
    if not images.is_dir():
        return 1
    found = [_CHANNEL_FILE.search(p.name) for p in images.iterdir()]
    return max((int(m.group(1)) + 1 for m in found if m), default=1)


def _channels_of(case: CaseFiles) -> int:
    """Channels of one case from its headers: one per 3D file, the last axis of a 4D one."""
    shapes = [read_geometry(path)[1] for path in case.images]
    return sum(shape[3] if len(shape) > 3 else 1 for shape in shapes)


def _case_facts(case: CaseFiles, num_classes: int) -> _CaseFacts:
    image, geometry = read_channels(case.images)
    box = nonzero_bbox(image)
    voxel_ml = math.prod(geometry.spacing) / 1000.0
    label, _ = read_volume(case.label) if case.label is not None else (np.zeros(0), None)
    label = np.asarray(label, np.int64)
    counts = np.bincount(label.ravel(), minlength=num_classes)
    a, b, c = (stop - start for start, stop in box)
    return _CaseFacts(
        geometry.spacing,
        geometry.shape,
        (a, b, c),
        {k: float(counts[k]) * voxel_ml for k in range(1, num_classes) if counts[k]},
        pieces_per_class(label) if label.ndim == 3 else {},
    )


def _summarise(
    folder: Path,
    root: str | Path,
    data: DataConfig,
    facts: Sequence[_CaseFacts],
    intensity: tuple[ChannelStats, ...],
) -> Fingerprint:
    info = dataset_description(data)
    channels = dataset_channel_names(data)
    names = dataset_class_names(data)
    classes = tuple(
        ClassStats(
            names.get(k, f"class {k}"),
            sum(k in f.class_ml for f in facts),
            float(np.median([f.class_ml[k] for f in facts if k in f.class_ml] or [0.0])),
            sum(f.pieces.get(k) == 1 for f in facts),
        )
        for k in range(1, data.num_classes)
    )
    return Fingerprint(
        name=str(info.get("name") or folder.resolve().name),
        root=str(root),
        layout=_layout(info),
        channel_names=tuple(channels.get(c, "") for c in range(data.num_channels)),
        class_names=(names.get(0, "background"), *(c.name for c in classes)),
        spacings=tuple(f.spacing for f in facts),
        shapes=tuple(f.shape for f in facts),
        cropped_shapes=tuple(f.cropped_shape for f in facts),
        intensity=intensity,
        classes=classes,
        folds_file=data.split.folds_file,
        splits_final=(folder / SPLITS_FINAL).is_file(),
    )


def _layout(info: dict) -> str:
    if not info:
        return "folders"
    return "msd" if "training" in info else "nnunetv2"
