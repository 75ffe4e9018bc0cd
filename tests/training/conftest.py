"""Training fixtures: a tiny synthetic dataset shared by the whole session."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
from pathlib import Path

import pytest
from training_helpers import SPEC

from segnet.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-case synthetic dataset written once per session (tests must not modify it)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", SPEC)
