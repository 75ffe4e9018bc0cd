"""Synthetic phantoms: deterministic, learnable but not threshold-segmentable, written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segnet.data import synthetic
from segnet.data.synthetic import (
    SyntheticSpec,
    ensure_synthetic_dataset,
    make_phantom,
    write_synthetic_dataset,
)
from segnet.data.volumes import read_volume
from segnet.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def best_single_threshold_dice(image: np.ndarray, foreground: np.ndarray) -> float:
    """Foreground Dice of the best rule ``image > t`` or ``image < t`` inside the body."""
    body = image > 0
    best = 0.0
    for t in np.percentile(image[body], np.linspace(1, 99, 50)):
        for predicted in (image > t, (image < t) & body):
            overlap = np.count_nonzero(predicted & foreground)
            best = max(best, 2 * overlap / (predicted.sum() + foreground.sum()))
    return best


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_threshold_cannot_segment_the_default_phantom(index: int) -> None:
    spec = SyntheticSpec()
    image, label = make_phantom(spec, np.random.default_rng([spec.seed, index]))
    assert image.shape == (64, 64, 64, 1) and label.shape == (64, 64, 64)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert 0.01 < (label > 0).mean() < 0.15  # enough foreground to learn from
    assert best_single_threshold_dice(image[..., 0], label > 0) < 0.7


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (SyntheticSpec(shape=(19, 20, 21)), (19, 20, 21)),
        (SyntheticSpec(shape=(32, 30, 40), anisotropic=True), (32, 30, 16)),
        (SyntheticSpec(shape=(24, 24, 24), num_classes=6, num_channels=2), (24, 24, 24)),
    ],
)
def test_phantom_shapes_classes_and_channels(spec: SyntheticSpec, shape) -> None:
    image, label = make_phantom(spec, np.random.default_rng(0))
    assert image.shape == (*shape, spec.num_channels) and image.dtype == np.float32
    assert label.dtype == np.uint8 and label.max() == spec.num_classes - 1
    assert (image[label > 0] > 0).all()  # structures lie inside the non-zero body
    if spec.num_channels == 2:
        assert not np.allclose(image[..., 0], image[..., 1])


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_cases=3, shape=(12, 13, 14), num_folds=3)
    a = write_synthetic_dataset(tmp_path / "a", spec)
    b = write_synthetic_dataset(tmp_path / "b", spec)
    c = write_synthetic_dataset(
        tmp_path / "c", SyntheticSpec(num_cases=3, shape=(12, 13, 14), num_folds=3, seed=1)
    )
    for name in ("imagesTr/case_002_0000.nii.gz", "labelsTr/case_002.nii.gz"):
        np.testing.assert_array_equal(read_volume(a / name)[0], read_volume(b / name)[0])
    assert not np.array_equal(
        read_volume(a / "imagesTr/case_002_0000.nii.gz")[0],
        read_volume(c / "imagesTr/case_002_0000.nii.gz")[0],
    )


def test_layout_dataset_json_and_folds(tiny_dataset: Path) -> None:
    info = json.loads((tiny_dataset / "dataset.json").read_text())
    folds = json.loads((tiny_dataset / "folds.json").read_text())["folds"]
    assert info["numTraining"] == 6 and len(info["labels"]) == 4
    assert info["training"][0] == {
        "image": "./imagesTr/case_000.nii.gz",
        "label": "./labelsTr/case_000.nii.gz",
    }
    assert sorted(i for ids in folds.values() for i in ids) == [f"case_{i:03d}" for i in range(6)]
    image, geometry = read_volume(tiny_dataset / "imagesTr" / "case_000_0000.nii.gz")
    assert image.dtype == np.float32 and geometry.spacing == (1.0, 1.0, 1.0)
    label, label_geometry = read_volume(tiny_dataset / "labelsTr" / "case_000.nii.gz")
    assert label.dtype == np.uint8 and label_geometry.same_grid(geometry)


def test_ensure_generates_once(tmp_path: Path, monkeypatch) -> None:
    spec = SyntheticSpec(num_cases=2, shape=(10, 11, 12), num_folds=2)
    root = ensure_synthetic_dataset(tmp_path / "ds", spec)
    monkeypatch.setattr(
        synthetic, "write_synthetic_dataset", lambda *a: pytest.fail("generated twice")
    )
    assert ensure_synthetic_dataset(root, spec) == root


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    written: list[Path] = []
    real = synthetic.write_volume

    def dies_on_the_third_file(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(real(path, *args))
        return written[-1]

    monkeypatch.setattr(synthetic, "write_volume", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(
            tmp_path / "ds", SyntheticSpec(num_cases=3, shape=(9, 9, 9), num_folds=2)
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "spec", "message"),
    [
        (
            lambda root: (root.mkdir(), (root / "notes.txt").write_text("mine")),
            SyntheticSpec(num_cases=2, shape=(9, 9, 9), num_folds=2),
            "not a dataset",
        ),
        (lambda root: None, SyntheticSpec(num_cases=1), "num_cases must be at least 2"),
        (lambda root: None, SyntheticSpec(shape=(4, 64, 64)), "at least 8 voxels"),
    ],
)
def test_user_errors(tmp_path: Path, setup, spec, message) -> None:
    setup(tmp_path / "ds")
    with pytest.raises(UserError, match=message):
        ensure_synthetic_dataset(tmp_path / "ds", spec)


@pytest.mark.parametrize(
    ("args", "status", "output"),
    [
        (
            ["--num-cases", "2", "--shape", "9", "10", "11", "--num-folds", "2"],
            0,
            "synthetic dataset in",
        ),
        (["--num-cases", "1"], 2, "num_cases must be at least 2"),
    ],
)
def test_script(tmp_path: Path, args: list[str], status: int, output: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_synthetic_data.py"),
            "--out",
            str(tmp_path / "ds"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == status, result.stderr
    assert output in result.stdout + result.stderr
    assert (tmp_path / "ds" / "dataset.json").is_file() == (status == 0)
