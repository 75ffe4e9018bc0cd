"""The case checks find every defect, names the file and reason, and reports them all at once."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from segnet.config import DataConfig, build_config
from segnet.data.checks import EVALUATE_FIXES, check_cases, problems_by_case
from segnet.data.datasets import CaseFiles, describe_dataset
from segnet.data.volumes import make_geometry, read_geometry, write_volume
from segnet.errors import DataError


def all_problems(cases, config) -> list[str]:
    """Every problem of every case, in order (what check_cases would report)."""
    return [p for problems in problems_by_case(cases, config).values() for p in problems]


SHAPE = (17, 18, 19)


def config(**data: Any) -> DataConfig:
    settings = {"num_classes": 3, "patch_size": [16, 16, 16], **data}
    return build_config({"data": settings}).data


def make_case(
    root: Path,
    name: str,
    image: np.ndarray | None = None,
    label: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    label_affine: np.ndarray | None = None,
    extra: np.ndarray | None = None,
) -> CaseFiles:
    """A case with a float32 image and uint8 label on SHAPE (overridable parts)."""
    rng = np.random.default_rng(len(name))
    image = rng.normal(100, 10, SHAPE).astype(np.float32) if image is None else image
    label = rng.integers(0, 3, SHAPE).astype(np.uint8) if label is None else label
    affine = np.eye(4) if affine is None else affine
    images = [
        write_volume(root / f"{name}_0000.nii.gz", image, make_geometry(affine, image.shape[:3]))
    ]
    if extra is not None:
        images.append(
            write_volume(
                root / f"{name}_0001.nii.gz", extra, make_geometry(affine, extra.shape[:3])
            )
        )
    lab_geometry = make_geometry(affine if label_affine is None else label_affine, label.shape)
    label_path = write_volume(root / f"{name}.nii.gz", label, lab_geometry)
    return CaseFiles(name, tuple(images), label_path)


def _shift(mm: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 3] = mm
    return affine


def _truncate(case: CaseFiles) -> CaseFiles:
    data = case.images[0].read_bytes()
    case.images[0].write_bytes(data[: len(data) // 2])
    return case


def _not_nifti(case: CaseFiles) -> CaseFiles:
    assert case.label is not None
    case.label.write_bytes(b"label map, honest\n" * 30)
    return case


def _two_d(root: Path) -> CaseFiles:
    case = make_case(root, "flat")
    nib.save(nib.Nifti1Image(np.zeros((17, 18), np.float32), np.eye(4)), case.images[0])
    return case


def _with_nan(root: Path) -> CaseFiles:
    image = np.full(SHAPE, 5.0, np.float32)
    image[3, 4, 5] = np.nan
    image[6, 7, 8] = np.inf
    return make_case(root, "nan", image=image)


def _label(values: dict[tuple[int, int, int], float], dtype: type = np.float32) -> np.ndarray:
    label = np.zeros(SHAPE, dtype)
    for index, value in values.items():
        label[index] = value
    return label


Make = Callable[[Path], CaseFiles]
# name, builds a defective case in a folder, data settings, text the problem must contain
DEFECTS: list[tuple[str, Make, dict[str, Any], str]] = [
    ("truncated_image", lambda r: _truncate(make_case(r, "trunc")), {}, "truncated"),
    ("label_not_nifti", lambda r: _not_nifti(make_case(r, "junk")), {}, "not a readable NIfTI"),
    (
        "label_shape",
        lambda r: make_case(r, "shp", label=np.zeros((17, 18, 20), np.uint8)),
        {},
        r"shape \(17, 18, 20\) differs",
    ),
    (
        "label_affine",
        lambda r: make_case(r, "aff", label_affine=_shift(0.01)),
        {},
        "affine differs",
    ),
    (
        "channel_shape",
        lambda r: make_case(r, "ch", extra=np.zeros((17, 18, 18), np.float32)),
        {"num_channels": 2},
        "ch_0001.nii.gz: shape",
    ),
    ("non_finite_image", _with_nan, {}, "2 voxels are NaN or infinite"),
    (
        "label_out_of_range",
        lambda r: make_case(r, "big", label=_label({(1, 2, 3): 7}, np.uint8)),
        {},
        r"label values \[7\] outside 0..2",
    ),
    (
        "negative_label",
        lambda r: make_case(r, "neg", label=_label({(1, 2, 3): -1}, np.int16)),
        {},
        r"label values \[-1\] outside",
    ),
    (
        "fractional_label",
        lambda r: make_case(r, "half", label=_label({(1, 2, 3): 0.5})),
        {},
        r"non-integer label values, e.g. \[0.5\]",
    ),
    (
        "nan_label",
        lambda r: make_case(r, "nanl", label=_label({(1, 1, 1): np.nan})),
        {},
        "label voxels are NaN",
    ),
    (
        "smaller_than_patch",
        lambda r: make_case(r, "small"),
        {"pad_small_volumes": False, "patch_size": [16, 32, 16]},
        "smaller than data.patch_size",
    ),
    ("wrong_channel_count", lambda r: make_case(r, "one"), {"num_channels": 2}, "1 image channels"),
    ("two_d_image", _two_d, {}, "expected a 3D volume"),
]


@pytest.mark.parametrize(
    ("name", "make", "settings", "message"), DEFECTS, ids=[d[0] for d in DEFECTS]
)
def test_each_defect_is_found(tmp_path: Path, name, make, settings, message) -> None:
    case = make(tmp_path)
    problems = all_problems([case], config(**settings))
    assert len(problems) == 1, problems
    assert re.search(message, problems[0]), problems


# name, builds a case that must pass, data settings
ACCEPTED: list[tuple[str, Make, dict[str, Any]]] = [
    ("plain", lambda r: make_case(r, "ok"), {}),
    (
        "float_label_with_integer_values",
        lambda r: make_case(r, "flt", label=_label({(1, 2, 3): 2.0, (4, 5, 6): 1.0})),
        {},
    ),
    ("affine_within_tolerance", lambda r: make_case(r, "tol", label_affine=_shift(1e-4)), {}),
    (
        "small_volume_padded",
        lambda r: make_case(r, "pad"),
        {"pad_small_volumes": True, "patch_size": [32, 32, 32]},
    ),
    (
        "two_channels",
        lambda r: make_case(r, "two", extra=np.ones(SHAPE, np.float32)),
        {"num_channels": 2},
    ),
    (
        "four_d_image",
        lambda r: make_case(r, "four", image=np.ones((*SHAPE, 2), np.float32)),
        {"num_channels": 2},
    ),
]


@pytest.mark.parametrize(("name", "make", "settings"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_usable_cases_pass(tmp_path: Path, name, make, settings) -> None:
    assert all_problems([make(tmp_path)], config(**settings)) == []


def three_bad_two_good(root: Path) -> list[CaseFiles]:
    return [
        make_case(root, "good_a"),
        _truncate(make_case(root, "bad_truncated")),
        make_case(root, "bad_range", label=_label({(0, 0, 0): 9}, np.uint8)),
        make_case(root, "good_b"),
        make_case(root, "bad_grid", label_affine=_shift(2.0)),
    ]


def test_three_defects_are_reported_together(tmp_path: Path) -> None:
    cases = three_bad_two_good(tmp_path)
    problems = all_problems(cases, config())
    assert len(problems) == 3
    for name, reason in (
        ("bad_truncated_0000", "truncated"),
        ("bad_range", "outside 0..2"),
        ("bad_grid", "affine differs"),
    ):
        assert any(name in p and reason in p for p in problems), (name, problems)
    with pytest.raises(DataError) as info:
        check_cases(cases, config())
    assert len(info.value.problems) == 3 and "skip_bad_cases" in str(info.value)


def test_skip_bad_cases_drops_them_with_a_report(tmp_path: Path, caplog) -> None:
    cases = three_bad_two_good(tmp_path)
    with caplog.at_level(logging.WARNING, logger="segnet"):
        kept = check_cases(cases, config(skip_bad_cases=True)).cases
    assert [c.case_id for c in kept] == ["good_a", "good_b"]
    assert "Skipping 3 of 5 cases" in caplog.text and "bad_grid" in caplog.text


def test_skipping_every_case_still_fails(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="No usable case"):
        check_cases([_truncate(make_case(tmp_path, "only"))], config(skip_bad_cases=True))


def test_evaluation_phrases_the_fixes_evaluate_accepts(tmp_path: Path) -> None:
    cases = [make_case(tmp_path, "big", label=_label({(1, 2, 3): 3}, np.uint8))]
    with pytest.raises(DataError) as info:
        check_cases(cases, config(), EVALUATE_FIXES)
    message = str(info.value)
    assert "the model predicts classes 0..2" in message and "data.num_classes" not in message
    assert "--set data.skip_bad_cases=true" in message
    with pytest.raises(DataError, match="the model takes 2 channels"):
        check_cases([make_case(tmp_path, "one")], config(num_channels=2), EVALUATE_FIXES)


def _warnings(cases: list[CaseFiles], training: list[str] | None = None, **data: Any) -> list[str]:
    settings = config(**data)
    checked = check_cases(cases, settings)
    ids = [c.case_id for c in cases] if training is None else training
    return checked.warnings(ids, settings.num_classes)


def test_clean_data_gives_no_warning(tmp_path: Path) -> None:
    assert _warnings([make_case(tmp_path, "a"), make_case(tmp_path, "b")]) == []


def test_classes_no_training_label_holds_are_one_warning(tmp_path: Path) -> None:
    cases = [make_case(tmp_path, "a"), make_case(tmp_path, "b")]  # labels 0..2
    warnings = _warnings(cases, num_classes=6)
    assert len(warnings) == 1
    assert "[3, 4, 5] never occur" in warnings[0] and "data.num_classes" in warnings[0]
    held_out = make_case(tmp_path, "val", label=_label({(1, 2, 3): 3}, np.uint8))
    only_held_out = _warnings([*cases, held_out], training=["a", "b"], num_classes=4)
    assert len(only_held_out) == 1 and "[3] never occur" in only_held_out[0]


def test_all_background_labels_are_one_compact_warning(tmp_path: Path) -> None:
    empty = np.zeros(SHAPE, np.uint8)
    cases = [make_case(tmp_path, f"bg_{i:02d}", label=empty) for i in range(14)]
    cases.append(make_case(tmp_path, "fg"))
    warnings = _warnings(cases)
    assert len(warnings) == 1, warnings
    assert "14 of the 15 cases" in warnings[0] and "all-background" in warnings[0]
    assert "bg_00, bg_01" in warnings[0] and "and 4 more" in warnings[0]
    assert "bg_13" not in warnings[0] and "fg" not in warnings[0]


def test_an_all_zero_image_with_foreground_is_warned_about(tmp_path: Path) -> None:
    blank = np.zeros(SHAPE, np.float32)
    one_channel = [
        make_case(tmp_path, "blank", image=blank),
        make_case(tmp_path, "blank_bg", image=blank, label=np.zeros(SHAPE, np.uint8)),
        make_case(tmp_path, "ok"),
    ]
    two_channels = [
        make_case(tmp_path, "both_blank", image=blank, extra=blank),
        make_case(tmp_path, "one_blank", extra=blank),  # its first channel is not blank
    ]
    warnings = _warnings(one_channel) + _warnings(two_channels, num_channels=2)
    blank_warnings = [w for w in warnings if "all-zero image" in w]
    assert len(blank_warnings) == 2, warnings
    assert "in 1 case;" in blank_warnings[0] and blank_warnings[0].endswith(": blank")
    assert blank_warnings[1].endswith(": both_blank")


@pytest.mark.shared_data
def test_hippocampus_passes_quickly(shared_datasets: Path) -> None:
    root = shared_datasets / "hippocampus"
    data = build_config({"data": {"root": str(root), "num_classes": 3}}).data
    cases = describe_dataset(data)
    float_labels = [c for c in cases if read_geometry(c.label)[0].dtype == np.float32]
    start = time.perf_counter()
    assert all_problems(cases, data) == []
    elapsed = time.perf_counter() - start
    # SOURCE.md says two labels are float32; in the 208 cases here one is (hippocampus_003).
    assert len(cases) == 208 and float_labels
    assert elapsed < 20, f"validation of 208 cases took {elapsed:.1f}s"
