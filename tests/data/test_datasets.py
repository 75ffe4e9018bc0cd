"""Dataset description (MSD, folders, list) and splits; every problem listed in one DataError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segnet.config import DataConfig, build_config
from segnet.data.datasets import describe_dataset, load_split, split_cases
from segnet.data.volumes import make_geometry, write_volume
from segnet.errors import DataError

IDS = [f"case_{i:03d}" for i in range(6)]


def data_config(root: Path, **data: Any) -> DataConfig:
    return build_config({"data": {"root": str(root), **data}}).data


@pytest.mark.parametrize("fmt", ["auto", "msd", "folders"])
def test_formats_describe_the_same_cases(tiny_dataset: Path, fmt: str) -> None:
    cases = describe_dataset(data_config(tiny_dataset, format=fmt))
    assert [c.case_id for c in cases] == IDS
    first = cases[0]
    assert first.images == (tiny_dataset / "imagesTr" / "case_000_0000.nii.gz",)
    assert first.label == tiny_dataset / "labelsTr" / "case_000.nii.gz"


def test_auto_falls_back_to_folders(tiny_dataset: Path) -> None:
    (tiny_dataset / "dataset.json").unlink()
    assert len(describe_dataset(data_config(tiny_dataset))) == len(IDS)


def test_list_format_and_unlabelled_cases(tiny_dataset: Path) -> None:
    cases = [
        {"id": "a", "images": ["imagesTr/case_001_0000.nii.gz"]},
        {
            "id": "b",
            "images": ["imagesTr/case_002_0000.nii.gz"],
            "label": "labelsTr/case_002.nii.gz",
        },
    ]
    described = describe_dataset(data_config(tiny_dataset, format="list", cases=cases))
    assert [(c.case_id, c.label is None) for c in described] == [("a", True), ("b", False)]


def test_images_ts_are_the_unlabelled_test_subset(tiny_dataset: Path) -> None:
    (tiny_dataset / "imagesTs").mkdir()
    shutil.copy(
        tiny_dataset / "imagesTr" / "case_003_0000.nii.gz",
        tiny_dataset / "imagesTs" / "new_0000.nii.gz",
    )
    cases = describe_dataset(data_config(tiny_dataset, format="folders"), subset="test")
    assert [(c.case_id, c.label) for c in cases] == [("new", None)]


def _write_msd(root: Path, entries: list[dict[str, Any]], channels: int = 2) -> None:
    info = {
        "modality": {str(c): f"m{c}" for c in range(channels)},
        "labels": {"0": "bg", "1": "fg"},
        "training": entries,
    }
    (root / "dataset.json").write_text(json.dumps(info))


def test_msd_4d_image_and_per_channel_files(tmp_path: Path) -> None:
    geometry = make_geometry(np.eye(4), (5, 6, 7))
    write_volume(tmp_path / "imagesTr" / "four.nii.gz", np.zeros((5, 6, 7, 2)), geometry)
    for c in range(2):
        write_volume(tmp_path / "imagesTr" / f"split_{c:04d}.nii.gz", np.zeros((5, 6, 7)), geometry)
    for name in ("four", "split"):
        write_volume(tmp_path / "labelsTr" / f"{name}.nii.gz", np.zeros((5, 6, 7)), geometry)
    _write_msd(
        tmp_path,
        [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
            for n in ("four", "split")
        ],
    )
    cases = {
        c.case_id: c for c in describe_dataset(data_config(tmp_path, num_channels=2, num_classes=2))
    }
    assert [p.name for p in cases["four"].images] == ["four.nii.gz"]
    assert [p.name for p in cases["split"].images] == ["split_0000.nii.gz", "split_0001.nii.gz"]


def _drop(path: str):
    return lambda root: (root / path).unlink()


def _duplicate_list(root: Path) -> dict[str, Any]:
    entry = {"id": "same", "images": ["imagesTr/case_000_0000.nii.gz"]}
    return {"format": "list", "cases": [entry, entry]}


def _second_channel_but_one(root: Path) -> dict[str, Any]:
    for case in IDS:
        if case != "case_002":
            shutil.copy(
                root / "imagesTr" / f"{case}_0000.nii.gz", root / "imagesTr" / f"{case}_0001.nii.gz"
            )
    return {"format": "folders", "num_channels": 2}


def _unknown_fold_id(root: Path) -> dict[str, Any]:
    folds = json.loads((root / "folds.json").read_text())
    folds["folds"]["1"].append("case_999")
    (root / "folds.json").write_text(json.dumps(folds))
    return {"split": {"folds_file": "folds.json"}}


def _case_in_two_folds(root: Path) -> dict[str, Any]:
    folds = json.loads((root / "folds.json").read_text())
    folds["folds"]["2"].append(folds["folds"]["0"][0])  # held out by fold 0, trained on there
    (root / "folds.json").write_text(json.dumps(folds))
    return {"split": {"folds_file": "folds.json", "fold": 1}}


# name, change to the dataset (may return extra data settings), message expected in the error
DEFECTS = [
    ("missing_root", lambda root: shutil.rmtree(root), "data.synthetic: true"),
    ("msd_points_to_missing_label", _drop("labelsTr/case_002.nii.gz"), "label file not found"),
    ("msd_points_to_missing_image", _drop("imagesTr/case_004_0000.nii.gz"), "case_004_0000"),
    ("duplicate_ids", _duplicate_list, "'same' appears 2 times"),
    ("missing_channel_file", _second_channel_but_one, "missing channel files \\['case_002_0001"),
    (
        "label_without_image",
        lambda root: (_drop("imagesTr/case_001_0000.nii.gz")(root), {"format": "folders"})[1],
        "label without image files",
    ),
    ("fold_id_not_in_dataset", _unknown_fold_id, "case_999"),
    (
        "case_in_two_folds",
        _case_in_two_folds,
        r"folds\.json: 1 case ids are in more than one fold: case_\d+ \(folds 0, 2\)",
    ),
    (
        "fold_not_in_file",
        lambda root: {"split": {"folds_file": "folds.json", "fold": 7}},
        "fold 7 is not in",
    ),
    ("missing_folds_file", lambda root: {"split": {"folds_file": "nope.json"}}, "nope.json"),
    ("empty_validation_split", lambda root: {"split": {"train": IDS}}, "held-out split is empty"),
    ("unknown_explicit_id", lambda root: {"split": {"val": ["ghost"]}}, "ghost"),
    ("too_many_folds", lambda root: {"split": {"num_folds": 7}}, "7 folds need"),
    ("wrong_num_classes", lambda root: {"num_classes": 5}, "set data.num_classes: 4"),
]


@pytest.mark.parametrize(("name", "damage", "message"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_problem_is_a_data_error(tiny_dataset: Path, name, damage, message) -> None:
    settings = damage(tiny_dataset) or {}
    with pytest.raises(DataError, match=message):
        load_split(data_config(tiny_dataset, **settings))


def test_all_problems_are_listed_together(tiny_dataset: Path) -> None:
    for path in (
        "labelsTr/case_001.nii.gz",
        "labelsTr/case_003.nii.gz",
        "imagesTr/case_005_0000.nii.gz",
    ):
        (tiny_dataset / path).unlink()
    with pytest.raises(DataError) as info:
        describe_dataset(data_config(tiny_dataset))
    assert len(info.value.problems) == 3
    assert all(name in str(info.value) for name in ("case_001", "case_003", "case_005"))


def test_folds_file_holds_out_fold_k(tiny_dataset: Path) -> None:
    folds = json.loads((tiny_dataset / "folds.json").read_text())["folds"]
    for k, held_out in folds.items():
        split = load_split(
            data_config(tiny_dataset, split={"folds_file": "folds.json", "fold": int(k)})
        )
        assert [c.case_id for c in split.val] == sorted(held_out)
        assert sorted(c.case_id for c in split.train) == sorted(set(IDS) - set(held_out))


def test_seeded_shuffle_is_a_partition_and_reproducible(tiny_dataset: Path) -> None:
    cases = describe_dataset(data_config(tiny_dataset))
    held_out = []
    for fold in range(3):
        data = data_config(tiny_dataset, split={"num_folds": 3, "fold": fold, "seed": 4})
        split = split_cases(cases, data)
        assert split_cases(cases, data) == split
        assert not {c.case_id for c in split.train} & {c.case_id for c in split.val}
        held_out += [c.case_id for c in split.val]
    assert sorted(held_out) == IDS
    other_seed = split_cases(cases, data_config(tiny_dataset, split={"num_folds": 3, "seed": 5}))
    first_seed = split_cases(cases, data_config(tiny_dataset, split={"num_folds": 3, "seed": 4}))
    assert [c.case_id for c in other_seed.val] != [c.case_id for c in first_seed.val]


@pytest.mark.parametrize(
    ("train", "val", "expected_train", "expected_val"),
    [
        (["case_000", "case_001"], [], ["case_000", "case_001"], IDS[2:]),
        ([], ["case_005"], IDS[:5], ["case_005"]),
        (["case_002"], ["case_004"], ["case_002"], ["case_004"]),
    ],
)
def test_explicit_lists(tiny_dataset: Path, train, val, expected_train, expected_val) -> None:
    split = load_split(data_config(tiny_dataset, split={"train": train, "val": val}))
    assert [c.case_id for c in split.train] == expected_train
    assert [c.case_id for c in split.val] == expected_val


def test_root_alternative_is_used_with_its_folds_file(tiny_dataset: Path, tmp_path: Path) -> None:
    data = data_config(
        tmp_path / "absent",
        root_alternatives=[str(tiny_dataset)],
        split={"folds_file": "folds.json", "fold": 1},
    )
    split = load_split(data)
    assert len(split.val) == 2 and split.val[0].label.parent.parent == tiny_dataset


def test_synthetic_root_is_generated_on_first_use(tmp_path: Path, monkeypatch) -> None:
    from segnet.data import synthetic

    small = synthetic.SyntheticSpec(num_cases=5, shape=(12, 13, 14))
    monkeypatch.setattr(synthetic, "SyntheticSpec", lambda **kw: small)
    split = load_split(data_config(tmp_path / "generated", synthetic=True))
    assert len(split.train) + len(split.val) == 5
