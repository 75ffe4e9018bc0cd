"""Shared fixtures: a tiny synthetic NIfTI dataset, a config that uses it, the shared datasets."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before anything loads TensorFlow)

# isort: split
from pathlib import Path

import pytest

from segnet.config import ExperimentConfig, build_config
from segnet.data.synthetic import SyntheticSpec, write_synthetic_dataset

SHARED_DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
# 6 cases of odd size 19x20x21, 4 classes (data.num_classes default), 1 channel, 3 folds.
TINY_SPEC = SyntheticSpec(num_cases=6, shape=(19, 20, 21), num_classes=4, num_folds=3)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Root of a fresh 6-case synthetic dataset (MSD dataset.json, imagesTr/labelsTr, folds.json).

    Case ids ``case_000`` .. ``case_005``; images float32 ``imagesTr/case_XXX_0000.nii.gz``,
    labels uint8 0..3 ``labelsTr/case_XXX.nii.gz``; 1 mm RAS grid of 19x20x21 voxels.
    """
    return write_synthetic_dataset(tmp_path / "tiny_dataset", TINY_SPEC)


@pytest.fixture
def tiny_data_config(tiny_dataset: Path, tmp_path: Path) -> ExperimentConfig:
    """Defaults, except data on ``tiny_dataset`` (fold 0 of folds.json: 4 train, 2 held out),
    patches of 16^3, a cache in tmp_path, and 1 epoch of 2 steps."""
    return build_config(
        {
            "data": {
                "root": str(tiny_dataset),
                "num_classes": 4,
                "patch_size": [16, 16, 16],
                "cache_dir": str(tmp_path / "cache"),
                "split": {"folds_file": "folds.json", "fold": 0},
            },
            "train": {"epochs": 1, "steps_per_epoch": 2},
        }
    )


@pytest.fixture
def shared_datasets() -> Path:
    """``../shared/datasets`` beside the repository; skips the test where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"../shared/datasets not found: {SHARED_DATASETS.resolve()}")
    return SHARED_DATASETS.resolve()
