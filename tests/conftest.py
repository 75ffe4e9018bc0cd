"""Shared fixtures: the tiny synthetic datasets, a config that uses one, the shared datasets.

The helpers they build on are in ``tests/helpers.py``. Session fixtures are per process, so
each pytest-xdist worker writes its own copy.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before anything loads TensorFlow)

# isort: split
from pathlib import Path

import pytest
from helpers import DATA_SPEC, SPEC

from segnet.config import ExperimentConfig, build_config
from segnet.data.synthetic import write_synthetic_dataset

SHARED_DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The :data:`helpers.SPEC` dataset, written once per worker (tests must not modify it:
    copy it first)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", SPEC)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Root of a fresh :data:`helpers.DATA_SPEC` dataset (MSD dataset.json, imagesTr/labelsTr,
    folds.json), the test's own to edit.

    Case ids ``case_000`` .. ``case_005``; images float32 ``imagesTr/case_XXX_0000.nii.gz``,
    labels uint8 0..3 ``labelsTr/case_XXX.nii.gz``; 1 mm RAS grid of 19x20x21 voxels.
    """
    return write_synthetic_dataset(tmp_path / "tiny_dataset", DATA_SPEC)


@pytest.fixture
def tiny_data_config(tiny_dataset: Path, tmp_path: Path) -> ExperimentConfig:
    """Defaults, except data on ``tiny_dataset`` (fold 0 of folds.json: 4 train, 2 held out),
    patches of 16^3, a cache in tmp_path, and 1 epoch of 2 steps."""
    return build_config(
        {
            "data": {
                "root": str(tiny_dataset),
                "num_classes": DATA_SPEC.num_classes,
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
