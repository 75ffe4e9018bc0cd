"""Describe a dataset as a list of :class:`CaseFiles`, and split it into training and held out.

Four ways to describe one (``data.format``):

* ``msd``: a Medical Segmentation Decathlon ``dataset.json``; its ``training`` entries are the
  labelled cases. An entry's image is either one file (3D, or 4D with channels last) or, in the
  nnU-Net v1 convention, per-channel files ``<name>_0000.nii.gz``, ``<name>_0001.nii.gz``, ...
* ``nnunetv2``: nnU-Net v2's ``dataset.json`` (``channel_names``, ``labels`` as name -> value,
  ``file_ending``) beside the ``folders`` layout, which holds the cases (or its ``dataset``
  mapping, when present). Region labels and an ``ignore`` label are refused.
* ``folders``: ``imagesTr/<case>_0000.nii.gz`` (one file per channel) with
  ``labelsTr/<case>.nii.gz``; ``imagesTs/`` holds unlabelled cases.
* ``list``: the explicit ``data.cases`` list.

``auto`` reads ``dataset.json``: with ``training`` it is MSD's, with ``channel_names`` or
``file_ending`` nnU-Net v2's; without a ``dataset.json`` the folders. The split may come from
nnU-Net's ``splits_final.json``, which is used when it lies in the dataset root. Every problem
found while describing or splitting is collected and raised together in one DataError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segnet.config import DataConfig, SplitConfig
from segnet.errors import DataError, shortened

log = logging.getLogger("segnet")
Subset = Literal["train", "test"]
_NIFTI = re.compile(r"^(?P<stem>.+?)(?:\.nii\.gz|\.nii)$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SPLITS_FINAL = "splits_final.json"  # nnU-Net's folds; used when data.split.folds_file is unset


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: unique identifier (the label's or image's file name without suffixes).
        images: one file per channel in channel order, or a single 4D channels-last file.
        label: the label map, or None for an unlabelled case.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None

    @property
    def files(self) -> tuple[Path, ...]:
        return self.images + ((self.label,) if self.label is not None else ())


@dataclass(frozen=True)
class Split:
    """Training cases and held-out (validation) cases; no case is in both.

    Attributes:
        source: what decided the split, in words (``folds.json, fold 0``).
    """

    train: tuple[CaseFiles, ...]
    val: tuple[CaseFiles, ...]
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Describing
# ---------------------------------------------------------------------------------------------
def dataset_root(data: DataConfig) -> Path:
    """``data.root`` as an absolute path, generating the synthetic dataset there if asked to.

    Raises:
        DataError: the root does not exist (with a hint on how to fix it).
    """
    candidates = [Path(p).expanduser().absolute() for p in (data.root, *data.root_alternatives)]
    # The first location that exists; otherwise the primary one, to generate or report.
    root = next((path for path in candidates if path.exists()), candidates[0])
    if data.synthetic and not root.exists():
        from segnet.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

        ensure_synthetic_dataset(
            root, SyntheticSpec(num_classes=data.num_classes, num_channels=data.num_channels)
        )
    if not root.is_dir():
        raise DataError(
            [
                f"data.root: dataset folder not found: {root}"
                + "".join(f" (nor {a})" for a in data.root_alternatives)
            ],
            hint="Check the path (relative paths start from the current directory), "
            "or set data.synthetic: true to generate a phantom dataset there.",
        )
    return root


def dataset_class_names(data: DataConfig) -> dict[int, str]:
    """Label names from the dataset's ``dataset.json`` (MSD or nnU-Net v2 style), if any."""
    return _names(data, "labels")


def dataset_channel_names(data: DataConfig) -> dict[int, str]:
    """Channel names (``CT``, ``T2``, ...) from ``dataset.json``: MSD's ``modality`` or nnU-Net
    v2's ``channel_names``, if any."""
    return _names(data, "modality") or _names(data, "channel_names")


def dataset_description(data: DataConfig) -> dict[str, Any]:
    """The dataset's ``dataset.json``; {} when it has none or it cannot be read (the describing
    functions report that; here it only names things)."""
    try:
        info = json.loads((dataset_root(data) / "dataset.json").read_text("utf-8"))
    except (OSError, ValueError, DataError):
        return {}
    return info if isinstance(info, dict) else {}


def _names(data: DataConfig, key: str) -> dict[int, str]:
    """``dataset.json[key]`` as index -> name, whichever way round it maps; {} if absent."""
    try:
        labels = dataset_description(data).get(key) or {}
        pairs = [(v, k) if isinstance(v, int) else (k, v) for k, v in labels.items()]
        return {int(label): str(name) for label, name in pairs}
    except (ValueError, TypeError, AttributeError):
        return {}  # names only decorate tables and pictures, and guide the planner


def describe_dataset(data: DataConfig, subset: Subset = "train") -> list[CaseFiles]:
    """The cases of ``data.root`` in ``data.format``, checked for missing and duplicate files.

    Args:
        data: the data section of the experiment config.
        subset: ``train`` for the labelled cases, ``test`` for the unlabelled ones (MSD ``test``
            entries, or ``imagesTs/``).

    Returns:
        The cases sorted by id; paths are absolute.

    Raises:
        DataError: listing every problem (missing root or files, duplicate ids, ...).
    """
    root = dataset_root(data)
    problems: list[str] = []
    fmt = _detect_format(root, problems) if data.format == "auto" else data.format
    cases = []
    if fmt == "msd":
        cases = _msd_cases(root, data, subset, problems)
    elif fmt == "nnunetv2":
        cases = _nnunet_cases(root, data, subset, problems)
    elif fmt == "folders":
        cases = _folder_cases(root, data, subset, problems)
    elif fmt == "list":
        cases = _list_cases(root, data, problems)
    problems += _duplicate_problems(cases)
    if not cases and not problems:
        problems.append(f"{root}: no {subset} cases found (format '{fmt}')")
    if problems:
        raise DataError(problems, hint=_format_hint(root, data.format, fmt, bool(cases)))
    return sorted(cases, key=lambda c: c.case_id)


def _detect_format(root: Path, problems: list[str]) -> str | None:
    """The layout of ``root`` for ``data.format: auto``; None (with a problem) if unknown."""
    if not (root / "dataset.json").is_file():
        return "folders"
    info = _read_dataset_json(root, "auto", problems)
    if "training" in info:
        return "msd"
    if "channel_names" in info or "file_ending" in info:
        return "nnunetv2"
    if info:
        problems.append(
            f"{root / 'dataset.json'}: neither MSD's (no 'training' list) nor nnU-Net v2's "
            "(no 'channel_names' or 'file_ending')"
        )
    return None


def _format_hint(root: Path, asked: str, fmt: str | None, read_some: bool) -> str:
    """Where the problems are and, when the layout was guessed, how to choose it; the layouts
    tried too when the guess read nothing (the guess may be what went wrong)."""
    choose = "set data.format: msd | nnunetv2 | folders | list to choose"
    if asked != "auto":
        return f"(dataset {root}, data.format: {asked})"
    if fmt is not None and read_some:
        return f"(dataset {root}, read as '{fmt}' by data.format: auto; {choose} another)"
    outcome = f"chose '{fmt}' from" if fmt else "recognised none of"
    return (
        f"(dataset {root}: data.format: auto {outcome} msd (dataset.json with 'training'), "
        "nnunetv2 (dataset.json with 'channel_names' or 'file_ending') and folders (imagesTr/ "
        f"and labelsTr/, no dataset.json); {choose} one)"
    )


def _duplicate_problems(cases: Sequence[CaseFiles]) -> list[str]:
    counts = Counter(c.case_id for c in cases)
    return [f"case id '{case_id}' appears {n} times" for case_id, n in counts.items() if n > 1]


def _strip_nifti(name: str) -> str | None:
    match = _NIFTI.match(name)
    return match.group("stem") if match else None


def _channel_files(base: Path, num_channels: int) -> tuple[list[Path], list[int]]:
    """nnU-Net per-channel files next to ``base`` (``x.nii.gz`` -> ``x_0000.nii.gz``, ...)."""
    stem = _strip_nifti(base.name) or base.name
    suffix = base.name[len(stem) :] or ".nii.gz"
    paths = [base.with_name(f"{stem}_{c:04d}{suffix}") for c in range(num_channels)]
    return paths, [c for c, p in enumerate(paths) if not p.is_file()]


def _resolve_images(
    root: Path, entry: Any, data: DataConfig, where: str, problems: list[str]
) -> tuple[Path, ...] | None:
    """An MSD entry's image: a list of files, one file, or its per-channel files."""
    if isinstance(entry, list):
        paths = tuple(root / str(p) for p in entry)
        absent = [str(p) for p in paths if not p.is_file()]
        problems += [f"{where}: image file not found: {p}" for p in absent]
        return None if absent else paths
    path = root / str(entry)
    if path.is_file():
        return (path,)
    channels, missing = _channel_files(path, data.num_channels)
    if not missing:
        return tuple(channels)
    if len(missing) < data.num_channels:
        problems.append(f"{where}: missing channel files {[channels[c].name for c in missing]}")
    else:
        problems.append(
            f"{where}: image file not found: {path} (nor per-channel files like {channels[0].name})"
        )
    return None


def _read_dataset_json(root: Path, fmt: str, problems: list[str]) -> dict[str, Any]:
    path = root / "dataset.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(
            f"{path}: not found (data.format is '{fmt}'); use format 'folders' for "
            "imagesTr/labelsTr without a dataset.json"
        )
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: not valid JSON ({exc})")
        return {}
    if not isinstance(info, dict):
        problems.append(f"{path}: expected a JSON object (MSD's or nnU-Net v2's dataset.json)")
        return {}
    return info


def _msd_cases(
    root: Path, data: DataConfig, subset: Subset, problems: list[str]
) -> list[CaseFiles]:
    info = _read_dataset_json(root, "msd", problems)
    problems += _channel_count_problems(info, data, root / "dataset.json")
    problems += _label_count_problems(info, data, root / "dataset.json")
    if info and subset == "train" and "training" not in info:
        problems.append(
            f"{root / 'dataset.json'}: has no 'training' list (data.format is 'msd')"
            + ("; it is nnU-Net v2's: set data.format: nnunetv2" if "channel_names" in info else "")
        )
    entries = info.get("training" if subset == "train" else "test", [])
    if not isinstance(entries, list):
        problems.append(f"{root / 'dataset.json'}: '{subset}' must be a list")
        return []
    cases = []
    for i, entry in enumerate(entries):
        where = f"dataset.json {'training' if subset == 'train' else 'test'}[{i}]"
        case = _msd_case(root, entry, data, where, subset, problems)
        if case is not None:
            cases.append(case)
    return cases


def _msd_case(
    root: Path, entry: Any, data: DataConfig, where: str, subset: Subset, problems: list[str]
) -> CaseFiles | None:
    if subset == "test" and not isinstance(entry, dict):
        entry = {"image": entry}  # MSD test entries are bare image paths
    if not isinstance(entry, dict) or "image" not in entry:
        problems.append(f"{where}: expected an object with 'image' (and 'label')")
        return None
    label = None
    if subset == "train":
        if "label" not in entry:
            problems.append(f"{where}: training entry has no 'label'")
            return None
        label = root / str(entry["label"])
        if not label.is_file():
            problems.append(f"{where}: label file not found: {label}")
            label = None
    images = _resolve_images(root, entry["image"], data, where, problems)
    if images is None or (subset == "train" and label is None):
        return None
    name = (label or images[0]).name
    stem = _strip_nifti(name) or name
    if label is None and len(images) > 1:
        stem = _CHANNEL.sub(r"\g<case>", stem)
    return CaseFiles(stem, images, label)


def _channel_count_problems(info: dict[str, Any], data: DataConfig, path: Path) -> list[str]:
    """dataset.json's ``modality`` (MSD) or ``channel_names`` (nnU-Net) against num_channels."""
    key = "modality" if "modality" in info else "channel_names"
    channels = info.get(key)
    if not isinstance(channels, dict) or len(channels) == data.num_channels:
        return []
    return [
        f"{path}: '{key}' lists {len(channels)} channels but data.num_channels is "
        f"{data.num_channels}; set data.num_channels: {len(channels)}"
    ]


def _label_count_problems(info: dict[str, Any], data: DataConfig, path: Path) -> list[str]:
    """dataset.json's ``labels`` against data.num_classes."""
    labels = info.get("labels")
    if not isinstance(labels, dict) or len(labels) == data.num_classes:
        return []
    return [
        f"{path}: defines {len(labels)} labels in 'labels' (background included) but "
        f"data.num_classes is {data.num_classes}; set data.num_classes: {len(labels)}"
    ]


# nnU-Net v2 ------------------------------------------------------------------------------------
_NNUNET_KEYS = {"channel_names": dict, "labels": dict, "file_ending": str}


def _nnunet_cases(
    root: Path, data: DataConfig, subset: Subset, problems: list[str]
) -> list[CaseFiles]:
    """nnU-Net v2: dataset.json describes the data; the files (or its ``dataset``) the cases."""
    info = _read_dataset_json(root, "nnunetv2", problems)
    if not info:
        return []
    path = root / "dataset.json"
    not_nifti = _file_ending_problems(info, path)
    problems += not_nifti + _nnunet_header_problems(info, data, path)
    if not_nifti:
        return []  # listing files segnet cannot read would only add noise
    found: list[str] = []
    if subset == "train" and "dataset" in info:
        cases = _nnunet_listed_cases(root, info["dataset"], data, found)
    else:
        cases = _folder_cases(root, data, subset, found)
    problems += found
    expected = info.get("numTraining")
    if subset == "train" and not found and isinstance(expected, int) and expected != len(cases):
        problems.append(
            f"{path}: 'numTraining' is {expected} but {len(cases)} labelled cases were found; "
            "add the missing cases or correct 'numTraining'"
        )
    return cases


def _file_ending_problems(info: dict[str, Any], path: Path) -> list[str]:
    ending = info.get("file_ending")
    if not isinstance(ending, str) or ending in (".nii.gz", ".nii"):
        return []
    return [
        f"{path}: 'file_ending' is {ending!r}, but segnet reads NIfTI only; convert the "
        "images and labels to .nii.gz and set 'file_ending': '.nii.gz'"
    ]


def _nnunet_header_problems(info: dict[str, Any], data: DataConfig, path: Path) -> list[str]:
    """Missing keys, labels segnet cannot train, counts that disagree with the config."""
    problems = []
    for key, kind in _NNUNET_KEYS.items():
        if key not in info:
            problems.append(f"{path}: '{key}' is missing (nnU-Net v2's dataset.json needs it)")
        elif not isinstance(info[key], kind):
            kind_name = "object" if kind is dict else "string"
            problems.append(f"{path}: '{key}' must be a JSON {kind_name}")
    problems += _channel_count_problems(info, data, path)
    label_problems = _nnunet_label_problems(info, path)
    return problems + (label_problems or _label_count_problems(info, data, path))


def _nnunet_label_problems(info: dict[str, Any], path: Path) -> list[str]:
    """Region-based and ignore labels, which segnet cannot train, and values not 0..n-1."""
    labels = info.get("labels")
    if not isinstance(labels, dict):
        return []
    # nnU-Net treats a one-value list as that value; longer lists are regions.
    values = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in labels.items()}
    regions = [name for name, v in values.items() if isinstance(v, list)]
    if regions or "regions_class_order" in info:
        return [_region_problem(path, labels, regions)]
    if "ignore" in labels:
        return [
            f"{path}: 'labels' has an 'ignore' label (value {labels['ignore']}), but segnet "
            "has no ignore label: its losses train on every voxel. Annotate or relabel those "
            "voxels in labelsTr/, then remove 'ignore' from 'labels'"
        ]
    numbers = sorted(v for v in values.values() if isinstance(v, int) and not isinstance(v, bool))
    if len(numbers) < len(values) or numbers != list(range(len(values))):
        return [
            f"{path}: 'labels' must give the values 0..{len(values) - 1} once each "
            f"(background 0), got {list(labels.values())}"
        ]
    return []


def _region_problem(path: Path, labels: dict[str, Any], regions: list[str]) -> str:
    """Region-based training is refused, with the one-name-per-value labels to use instead."""
    plain = {v for v in labels.values() if isinstance(v, int)}
    plain |= {i for v in labels.values() if isinstance(v, list) for i in v if isinstance(i, int)}
    example = {"background" if v == 0 else f"class {v}": v for v in sorted(plain)}
    what = f"'labels' defines regions {regions}" if regions else "'regions_class_order' is set"
    return (
        f"{path}: {what} (nnU-Net's region-based training), but segnet "
        "trains mutually exclusive classes, one per label value. Give each value in the label "
        f"files one name, e.g. 'labels': {json.dumps(example)}, and remove "
        "'regions_class_order'"
    )


def _nnunet_listed_cases(
    root: Path, listing: Any, data: DataConfig, problems: list[str]
) -> list[CaseFiles]:
    """nnU-Net v2's optional ``dataset`` mapping: ``{case: {"images": [...], "label": ...}}``."""
    shape = "{'images': [one file per channel], 'label': file}"
    if not isinstance(listing, dict):
        problems.append(f"{root / 'dataset.json'}: 'dataset' must map case ids to {shape}")
        return []
    cases = []
    for case_id, entry in listing.items():
        where = f"{root / 'dataset.json'}: 'dataset' entry '{case_id}'"
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or len(images) != data.num_channels or "label" not in entry:
            problems.append(f"{where}: expected {shape} with data.num_channels={data.num_channels}")
            continue
        files = [_nnunet_path(root, p) for p in (*images, entry["label"])]
        missing = [str(p) for p in files if not p.is_file()]
        problems += [f"{where}: file not found: {p}" for p in missing]
        if not missing:
            cases.append(CaseFiles(str(case_id), tuple(files[:-1]), files[-1]))
    return cases


def _nnunet_path(root: Path, name: Any) -> Path:
    """A ``dataset`` entry's file: environment variables expanded, relative to the root."""
    return root / os.path.expandvars(str(name))  # an absolute path replaces the root


def _folder_cases(
    root: Path, data: DataConfig, subset: Subset, problems: list[str]
) -> list[CaseFiles]:
    images_dir = root / ("imagesTr" if subset == "train" else "imagesTs")
    labels_dir = root / ("labelsTr" if subset == "train" else "labelsTs")
    if not images_dir.is_dir():
        problems.append(
            f"{images_dir}: folder not found (expected imagesTr/ and labelsTr/, or a dataset.json)"
        )
        return []
    channels = _group_channels(images_dir, problems)
    problems += _orphan_labels(labels_dir, channels)
    cases = []
    for case_id, found in sorted(channels.items()):
        channel_problems = _channel_problems(images_dir, case_id, found, data.num_channels)
        label = _find_label(labels_dir, case_id)
        if subset == "train" and label is None:
            problems.append(
                f"{labels_dir}: no label file for case '{case_id}' (expected {case_id}.nii.gz)"
            )
        problems += channel_problems
        if not channel_problems:
            cases.append(CaseFiles(case_id, tuple(found[c] for c in sorted(found)), label))
    return cases


def _channel_problems(
    images_dir: Path, case_id: str, found: dict[int, Path], num_channels: int
) -> list[str]:
    missing = [f"{case_id}_{c:04d}" for c in range(num_channels) if c not in found]
    extra = sorted(c for c in found if c >= num_channels)
    problems = []
    if missing:
        problems.append(f"{images_dir}: case '{case_id}' is missing channel files {missing}")
    if extra:
        problems.append(
            f"{images_dir}: case '{case_id}' has channel files {extra} beyond "
            f"data.num_channels={num_channels}; set data.num_channels: {max(found) + 1}"
        )
    return problems


def _orphan_labels(labels_dir: Path, channels: dict[str, dict[int, Path]]) -> list[str]:
    """Labels whose case has no image file at all (else the case would vanish silently)."""
    if not labels_dir.is_dir():
        return []
    stems = (_strip_nifti(p.name) for p in sorted(labels_dir.iterdir()) if p.name[0] != ".")
    return [
        f"{labels_dir / stem}: label without image files (expected {stem}_0000.nii.gz in "
        f"{labels_dir.parent / labels_dir.name.replace('labels', 'images')})"
        for stem in stems
        if stem is not None and stem not in channels
    ]


def _group_channels(images_dir: Path, problems: list[str]) -> dict[str, dict[int, Path]]:
    groups: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is None or path.name.startswith("."):
            continue  # not a volume (README, hidden temp files)
        match = _CHANNEL.match(stem)
        if match is None:
            problems.append(
                f"{path}: image name lacks the channel suffix _0000 (nnU-Net "
                "naming: <case>_0000.nii.gz)"
            )
            continue
        groups.setdefault(match.group("case"), {})[int(match.group("channel"))] = path
    return groups


def _find_label(labels_dir: Path, case_id: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (labels_dir / f"{case_id}{suffix}").is_file():
            return labels_dir / f"{case_id}{suffix}"
    return None


def _list_cases(root: Path, data: DataConfig, problems: list[str]) -> list[CaseFiles]:
    cases = []
    for i, entry in enumerate(data.cases):
        images = tuple(root / p for p in entry.images)
        label = root / entry.label if entry.label else None
        missing = [p for p in (*images, label) if p is not None and not p.is_file()]
        problems += [f"data.cases[{i}] ({entry.id}): file not found: {p}" for p in missing]
        if not missing:
            cases.append(CaseFiles(entry.id, images, label))
    return cases


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------
def split_cases(cases: Sequence[CaseFiles], data: DataConfig) -> Split:
    """Training and held-out cases by ``data.split``.

    Explicit ``train``/``val`` lists win (either alone: the other is every remaining case);
    else fold ``fold`` of ``folds_file`` (segnet's ``{"folds": ...}`` or nnU-Net's
    ``splits_final.json`` list; without ``folds_file``, a ``splits_final.json`` in the dataset
    root) is held out and every other case trains; else a shuffle seeded by ``seed`` deals the
    sorted ids into ``num_folds`` folds.

    Raises:
        DataError: listing unknown ids, a missing fold, a bad folds file or an empty split.
    """
    split, problems = data.split, list[str]()
    by_id = {c.case_id: c for c in cases}
    folds_path = None if split.train or split.val else _folds_path(data)
    if split.train or split.val:
        val_ids = _explicit_val(split, by_id, problems)
        source = "the explicit lists data.split.train / data.split.val"
    else:
        val_ids = _fold_ids(folds_path, split.fold, split, by_id, problems)
        source = (
            f"{folds_path}, fold {split.fold}"
            if folds_path is not None
            else f"a shuffle seeded {split.seed} into {split.num_folds} folds, fold {split.fold}"
        )
    test_ids: set[str] = set()
    if split.test_fold is not None and not (split.train or split.val):
        # A test set no fold ever sees: out of the training and the held-out cases alike.
        test_ids = _fold_ids(folds_path, split.test_fold, split, by_id, problems, "test_fold")
        source += f", without the test fold {split.test_fold}"
    train = tuple(c for c in cases if c.case_id not in val_ids | test_ids)
    val = tuple(c for c in cases if c.case_id in val_ids)
    if split.train:
        train = tuple(by_id[i] for i in split.train if i in by_id)
    if not problems:
        for name, part in (("training", train), ("held-out", val)):
            if not part:
                problems.append(f"data.split: the {name} split is empty ({len(cases)} cases)")
    if problems:
        raise DataError(list(dict.fromkeys(problems)))  # a folds file read twice says it once
    return Split(train, val, source)


def _folds_path(data: DataConfig) -> Path | None:
    """``data.split.folds_file``, else nnU-Net's ``splits_final.json`` when the root has one."""
    if not data.split.folds_file:
        path = dataset_root(data) / SPLITS_FINAL
        if not path.is_file():
            return None
        # Said aloud: the file, not the seeded shuffle, now decides what is held out.
        log.info("split: fold %d of %s (data.split.folds_file is unset)", data.split.fold, path)
        return path
    path = Path(data.split.folds_file).expanduser()
    return path if path.is_absolute() else dataset_root(data) / path  # root or an alternative


def _is_nnunet_splits(path: Path) -> bool:
    """nnU-Net's splits are a JSON list of folds; anything else is read as segnet's format."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), list)
    except (OSError, ValueError):
        return False  # _fold_from_file names the problem


def _fold_from_nnunet_splits(
    path: Path, fold: int, by_id: dict[str, CaseFiles], problems: list[str]
) -> set[str]:
    """The ``val`` ids of fold ``fold`` of nnU-Net's ``[{"train": [...], "val": [...]}, ...]``,
    whose ``train`` must be every other case of the dataset."""
    folds = json.loads(path.read_text(encoding="utf-8"))
    if fold >= len(folds):
        problems.append(f"data.split.fold: fold {fold} is not in {path} (it has {len(folds)})")
        return set()
    parts = folds[fold] if isinstance(folds[fold], dict) else {}
    train, val = _id_set(parts.get("train")), _id_set(parts.get("val"))
    if train is None or val is None:
        problems.append(
            f'{path}: fold {fold} must be {{"train": [case ids], "val": [case ids]}} '
            "(nnU-Net's splits_final.json)"
        )
        return set()
    problems += _nnunet_fold_problems(path, fold, train, val, set(by_id))
    return val


def _id_set(value: Any) -> set[str] | None:
    """A JSON list of case ids as a set; None for anything else."""
    if isinstance(value, list) and all(isinstance(i, str) for i in value):
        return set(value)
    return None


def _nnunet_fold_problems(
    path: Path, fold: int, train: set[str], val: set[str], dataset: set[str]
) -> list[str]:
    """A fold that names unknown cases, holds one out and trains on it, or forgets one."""
    where = f"{path}: fold {fold}"
    problems = [
        f"{where} '{key}' has {len(ids - dataset)} case ids not in the dataset: "
        f"{sorted(ids - dataset)[:10]}"
        for key, ids in (("train", train), ("val", val))
        if ids - dataset
    ]
    if train & val:
        problems.append(f"{where}: case ids in both 'train' and 'val': {sorted(train & val)[:10]}")
    if dataset - train - val:
        problems.append(
            f"{where}: {len(dataset - train - val)} cases of the dataset are in neither 'train' "
            f"nor 'val': {sorted(dataset - train - val)[:10]}"
        )
    if problems:
        problems[-1] += (
            f"; {path.name} does not fit this dataset: regenerate it, or choose the split with "
            "data.split.folds_file or data.split.train/val"
        )
    return problems


def _fold_ids(
    folds_path: Path | None,
    fold: int,
    split: SplitConfig,
    by_id: dict[str, CaseFiles],
    problems: list[str],
    key: str = "fold",
) -> set[str]:
    """The case ids of one fold, from the folds file or the seeded shuffle."""
    found: list[str] = []
    if folds_path is not None and _is_nnunet_splits(folds_path):
        ids = _fold_from_nnunet_splits(folds_path, fold, by_id, found)
    elif folds_path is not None:
        ids = _fold_from_file(folds_path, fold, by_id, found)
    elif not 0 <= fold < split.num_folds:
        found.append(f"data.split.fold: must be in 0..{split.num_folds - 1}, got {fold}")
        ids = set()
    else:
        ids = _fold_from_shuffle(sorted(by_id), dataclasses.replace(split, fold=fold), found)
    problems += [p.replace("data.split.fold:", f"data.split.{key}:") for p in found]
    return ids


def available_folds(data: DataConfig) -> list[int]:
    """The folds a cross-validation can run: those of the folds file (or of the seeded
    shuffle), less ``data.split.test_fold``.

    Raises:
        DataError: the folds file cannot be read.
    """
    path = _folds_path(data)
    if path is None:
        folds = list(range(data.split.num_folds))
    else:
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            keys = range(len(content)) if isinstance(content, list) else content["folds"]
            folds = sorted(int(k) for k in keys)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError([f"{path}: cannot list its folds ({exc!r})"]) from None
    return [f for f in folds if f != data.split.test_fold]


def _explicit_val(split: SplitConfig, by_id: dict[str, CaseFiles], problems: list[str]) -> set[str]:
    for name in ("train", "val"):
        unknown = [i for i in getattr(split, name) if i not in by_id]
        if unknown:
            problems.append(f"data.split.{name}: case ids not in the dataset: {unknown[:10]}")
    if split.val:
        return set(split.val)
    return set(by_id) - set(split.train)


def _fold_from_file(
    path: Path, fold: int, by_id: dict[str, CaseFiles], problems: list[str]
) -> set[str]:
    try:
        folds = json.loads(path.read_text(encoding="utf-8"))["folds"]
        folds = {str(k): [str(i) for i in v] for k, v in folds.items()}
    except FileNotFoundError:
        problems.append(f"data.split.folds_file: not found: {path}")
        return set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.append(f'{path}: expected {{"folds": {{"0": [case ids], ...}}}} ({exc!r})')
        return set()
    if str(fold) not in folds:
        problems.append(
            f"data.split.fold: fold {fold} is not in {path} (it has folds "
            f"{sorted(folds, key=lambda k: (len(k), k))})"
        )
        return set()
    unknown = sorted({i for ids in folds.values() for i in ids} - set(by_id))
    if unknown:
        problems.append(f"{path}: {len(unknown)} case ids not in the dataset: {unknown[:10]}")
    problems += _cases_in_several_folds(path, folds)
    return set(folds[str(fold)])


def _cases_in_several_folds(path: Path, folds: dict[str, list[str]]) -> list[str]:
    """A case held out by one fold must train in every other: listed twice, it leaks."""
    homes: dict[str, list[str]] = {}
    for name, ids in folds.items():
        for case_id in dict.fromkeys(ids):
            homes.setdefault(case_id, []).append(name)
    shared = {case_id: names for case_id, names in homes.items() if len(names) > 1}
    if not shared:
        return []
    listing = shortened([f"{c} (folds {', '.join(n)})" for c, n in shared.items()], 10)
    return [
        f"{path}: {len(shared)} case ids are in more than one fold: {listing}; each case "
        "must be in exactly one fold, else a held-out case is also trained on"
    ]


def _fold_from_shuffle(ids: list[str], split: SplitConfig, problems: list[str]) -> set[str]:
    if len(ids) < split.num_folds:
        problems.append(
            f"data.split.num_folds: {split.num_folds} folds need at least as many "
            f"cases, the dataset has {len(ids)}"
        )
        return set()
    order = np.random.default_rng(split.seed).permutation(len(ids))
    return {ids[i] for i in order[split.fold :: split.num_folds]}


def load_split(data: DataConfig) -> Split:
    """Describes the labelled cases of ``data`` and splits them: the usual entry point."""
    return split_cases(describe_dataset(data, "train"), data)
