"""Dataset description (MSD, nnU-Net v2, folders, list) and splits; problems in one DataError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from segnet.config import DataConfig, build_config
from segnet.data.datasets import available_folds, describe_dataset, load_split, split_cases
from segnet.data.volumes import make_geometry, write_volume
from segnet.errors import ConfigError, DataError

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


@pytest.mark.parametrize("split", [{"folds_file": "folds.json"}, {"num_folds": 3, "seed": 4}])
def test_a_test_fold_is_seen_by_no_fold(tiny_dataset: Path, split: dict) -> None:
    test = load_split(data_config(tiny_dataset, split={**split, "fold": 0})).val
    test_ids = {c.case_id for c in test}
    cross_validated = set()
    for fold in available_folds(data_config(tiny_dataset, split={**split, "test_fold": 0})):
        assert fold != 0
        part = load_split(data_config(tiny_dataset, split={**split, "fold": fold, "test_fold": 0}))
        seen = {c.case_id for c in (*part.train, *part.val)}
        assert not seen & test_ids and "without the test fold 0" in part.source
        assert not {c.case_id for c in part.train} & {c.case_id for c in part.val}
        cross_validated |= {c.case_id for c in part.val}
    assert cross_validated == set(IDS) - test_ids  # every other case is held out exactly once


def test_a_test_fold_must_exist_and_go_with_folds(tiny_dataset: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.split\.test_fold: works with folds"):
        data_config(tiny_dataset, split={"val": ["case_001"], "test_fold": 1})
    with pytest.raises(DataError, match=r"data\.split\.test_fold"):
        load_split(data_config(tiny_dataset, split={"folds_file": "folds.json", "test_fold": 7}))


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


# ---------------------------------------------------------------------------------------------
# nnU-Net v2: a raw dataset folder as nnU-Net lays it out, with a copied splits_final.json
# ---------------------------------------------------------------------------------------------
NNUNET_IDS = [f"PROSTATE_{i:03d}" for i in range(5)]
NNUNET_JSON = {
    "channel_names": {"0": "T2", "1": "ADC"},
    "labels": {"background": 0, "PZ": 1, "TZ": 2},
    "numTraining": len(NNUNET_IDS),
    "file_ending": ".nii.gz",
    "name": "Dataset005_Prostate",
}
# nnU-Net's splits_final.json: a list of folds, each {"train": [...], "val": [...]}.
NNUNET_SPLITS = [
    {"train": [i for i in NNUNET_IDS if i != held_out], "val": [held_out]}
    for held_out in NNUNET_IDS
]


def write_nnunet_v2(root: Path, shape: tuple[int, int, int] = (17, 18, 19)) -> Path:
    """nnUNet_raw/Dataset005_Prostate as nnU-Net v2 wants it: 2 channels ``_0000``/``_0001``,
    labels 0..2, ``imagesTs/`` with one unlabelled case, and splits_final.json beside it."""
    rng = np.random.default_rng(0)
    affine = np.diag([0.6, 0.6, 3.0, 1.0])
    affine[:3, 3] = (-40.0, -35.0, 10.0)
    for case in [*NNUNET_IDS, "PROSTATE_100"]:
        folder = "imagesTs" if case == "PROSTATE_100" else "imagesTr"
        label = np.zeros(shape, np.uint8)
        label[3:9, 4:10, 5:11] = 1
        label[9:14, 8:15, 9:16] = 2
        for channel in range(2):
            image = (rng.normal(100.0, 10.0, shape) + 50.0 * label).astype(np.float32)
            _save_nifti(root / folder / f"{case}_{channel:04d}.nii.gz", image, affine)
        if folder == "imagesTr":
            _save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)
    (root / "dataset.json").write_text(json.dumps(NNUNET_JSON, indent=4))
    (root / "splits_final.json").write_text(json.dumps(NNUNET_SPLITS, indent=4))
    return root


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def nnunet_config(root: Path, **data: Any) -> DataConfig:
    return data_config(root, **{"num_classes": 3, "num_channels": 2, **data})


@pytest.fixture
def nnunet_root(tmp_path: Path) -> Path:
    return write_nnunet_v2(tmp_path / "Dataset005_Prostate")


@pytest.mark.parametrize("fmt", ["auto", "nnunetv2"])
def test_nnunet_v2_cases_are_read_from_its_files(nnunet_root: Path, fmt: str) -> None:
    cases = describe_dataset(nnunet_config(nnunet_root, format=fmt))
    assert [c.case_id for c in cases] == NNUNET_IDS
    images = nnunet_root / "imagesTr"
    assert cases[0].images == (
        images / "PROSTATE_000_0000.nii.gz",
        images / "PROSTATE_000_0001.nii.gz",
    )
    assert cases[0].label == nnunet_root / "labelsTr" / "PROSTATE_000.nii.gz"
    test = describe_dataset(nnunet_config(nnunet_root, format=fmt), subset="test")
    assert [(c.case_id, len(c.images), c.label) for c in test] == [("PROSTATE_100", 2, None)]


@pytest.mark.parametrize("fold", [0, 3])
def test_splits_final_in_the_root_is_the_split(nnunet_root: Path, fold: int) -> None:
    split = load_split(nnunet_config(nnunet_root, split={"fold": fold}))
    assert [c.case_id for c in split.val] == NNUNET_SPLITS[fold]["val"]
    assert [c.case_id for c in split.train] == NNUNET_SPLITS[fold]["train"]


def test_splits_final_is_recognised_by_content_in_folds_file(nnunet_root: Path) -> None:
    (nnunet_root / "splits_final.json").rename(nnunet_root / "nnunet_folds.json")
    split = load_split(nnunet_config(nnunet_root, split={"folds_file": "nnunet_folds.json"}))
    assert [c.case_id for c in split.val] == NNUNET_SPLITS[0]["val"]


def test_nnunet_v2_dataset_mapping_lists_the_cases(nnunet_root: Path) -> None:
    info = dict(NNUNET_JSON, numTraining=2)
    info["dataset"] = {
        name: {
            "images": [
                f"imagesTr/PROSTATE_00{i}_0000.nii.gz",
                f"imagesTr/PROSTATE_00{i}_0001.nii.gz",
            ],
            "label": f"labelsTr/PROSTATE_00{i}.nii.gz",
        }
        for i, name in ((1, "first"), (3, "second"))
    }
    (nnunet_root / "dataset.json").write_text(json.dumps(info))
    cases = describe_dataset(nnunet_config(nnunet_root))
    assert [(c.case_id, c.label.name) for c in cases] == [
        ("first", "PROSTATE_001.nii.gz"),
        ("second", "PROSTATE_003.nii.gz"),
    ]


def _edit_json(name: str, edit: Any) -> Any:
    """A damage that rewrites ``root/name`` with ``edit(contents)``."""

    def damage(root: Path) -> None:
        path = root / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return damage


def _labels(labels: dict[str, Any], **extra: Any) -> Any:
    return _edit_json("dataset.json", lambda info: {**info, "labels": labels, **extra})


BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
# name, damage, data settings, the file and the key (and problem) the error must name
NNUNET_DEFECTS = [
    (
        "region_labels",
        _labels(BRATS, regions_class_order=[1, 2, 3]),
        {},
        ("dataset.json", "'labels'", "region"),
    ),
    (
        "ignore_label",
        _labels({"background": 0, "PZ": 1, "TZ": 2, "ignore": 3}),
        {},
        ("dataset.json", "'ignore'"),
    ),
    (
        "mha_file_ending",
        _edit_json("dataset.json", lambda d: {**d, "file_ending": ".mha"}),
        {},
        ("dataset.json", "'file_ending'", ".mha"),
    ),
    (
        "png_file_ending",
        _edit_json("dataset.json", lambda d: {**d, "file_ending": ".png"}),
        {},
        ("dataset.json", "'file_ending'", ".png"),
    ),
    (
        "num_classes_mismatch",
        lambda root: None,
        {"num_classes": 4},
        ("dataset.json", "'labels'", "data.num_classes: 3"),
    ),
    (
        "num_channels_mismatch",
        lambda root: None,
        {"num_channels": 1},
        ("dataset.json", "'channel_names'", "data.num_channels: 2"),
    ),
    (
        "labels_not_0_to_n",
        _labels({"background": 0, "PZ": 1, "TZ": 5}),
        {},
        ("dataset.json", "'labels'", "0..2"),
    ),
    (
        "missing_file_ending",
        _edit_json("dataset.json", lambda d: {k: v for k, v in d.items() if k != "file_ending"}),
        {},
        ("dataset.json", "'file_ending'"),
    ),
    (
        "num_training_mismatch",
        _edit_json("dataset.json", lambda d: {**d, "numTraining": 32}),
        {},
        ("dataset.json", "'numTraining'"),
    ),
    (
        "splits_unknown_ids",
        _edit_json(
            "splits_final.json",
            lambda s: [{"train": f["train"] + ["ghost_7"], "val": f["val"]} for f in s],
        ),
        {},
        ("splits_final.json", "'train'", "ghost_7"),
    ),
    (
        "splits_train_val_overlap",
        _edit_json(
            "splits_final.json", lambda s: [{"train": NNUNET_IDS, "val": f["val"]} for f in s]
        ),
        {},
        ("splits_final.json", "'train' and 'val'", "PROSTATE_000"),
    ),
    (
        "splits_forget_a_case",
        _edit_json(
            "splits_final.json", lambda s: [{"train": f["train"][1:], "val": f["val"]} for f in s]
        ),
        {},
        ("splits_final.json", "neither", "PROSTATE_001"),
    ),
    (
        "splits_fold_missing",
        lambda root: None,
        {"split": {"folds_file": "splits_final.json", "fold": 7}},
        ("splits_final.json", "data.split.fold"),
    ),
    (
        "splits_fold_not_an_object",
        _edit_json("splits_final.json", lambda s: [["PROSTATE_000"]] * 5),
        {},
        ("splits_final.json", "fold 0", '"val"'),
    ),
    (
        "msd_format_on_v2_json",
        lambda root: None,
        {"format": "msd"},
        ("dataset.json", "'training'", "data.format: nnunetv2"),
    ),
]


@pytest.mark.parametrize(
    ("name", "damage", "settings", "named"), NNUNET_DEFECTS, ids=[d[0] for d in NNUNET_DEFECTS]
)
def test_each_nnunet_problem_names_its_file_and_key(
    nnunet_root: Path, name: str, damage: Any, settings: dict[str, Any], named: tuple[str, ...]
) -> None:
    damage(nnunet_root)
    with pytest.raises(DataError) as info:
        load_split(nnunet_config(nnunet_root, **settings))
    assert all(text in str(info.value) for text in named), str(info.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda root: (root / "dataset.json").write_text(json.dumps({"name": "mine"})),
        lambda root: shutil.rmtree(root / "imagesTr") or (root / "dataset.json").unlink(),
    ],
    ids=["dataset_json_of_neither_kind", "nothing_to_read"],
)
def test_a_failed_detection_names_the_layouts_tried(nnunet_root: Path, damage: Any) -> None:
    damage(nnunet_root)
    with pytest.raises(DataError) as info:
        describe_dataset(nnunet_config(nnunet_root))
    message = str(info.value)
    assert "data.format: auto" in message
    assert all(layout in message for layout in ("msd", "nnunetv2", "folders", "list"))


@pytest.mark.slow
def test_training_runs_on_an_nnunet_v2_dataset(nnunet_root: Path, tmp_path: Path) -> None:
    from segnet.training.trainer import train

    config = build_config(
        {
            "data": {
                "root": str(nnunet_root),
                "num_classes": 3,
                "num_channels": 2,
                "patch_size": [16, 16, 16],
                "cache_dir": str(tmp_path / "cache"),
                "split": {"fold": 2},
            },
            "model": {"name": "unet3d", "unet3d": {"filters": 4, "depth": 2}},
            "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 1},
            "evaluation": {"batch_size": 2, "montage": False},
        }
    )
    result = train(config, run_dir=tmp_path / "run", quiet=True)
    assert (result.epochs_done, result.step) == (1, 2)
    assert result.best_score is not None  # validated on the held-out fold of splits_final.json
