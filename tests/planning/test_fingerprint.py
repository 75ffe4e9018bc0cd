"""The planner's fingerprint of a real (tiny, synthetic) dataset: what it reads from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segnet.data.synthetic import SyntheticSpec, write_synthetic_dataset
from segnet.data.volumes import read_volume, write_volume
from segnet.inference.postprocessing import pieces_per_class
from segnet.planning.fingerprint import fingerprint_dataset


def test_fingerprint_of_a_synthetic_dataset(tiny_dataset: Path):
    data, fp = fingerprint_dataset(tiny_dataset)
    assert (data.num_channels, data.num_classes) == (1, 4)
    assert fp.layout == "msd" and fp.num_cases == 6 and fp.folds_file == "folds.json"
    assert fp.spacings == ((1.0, 1.0, 1.0),) * 6 and fp.shapes == ((19, 20, 21),) * 6
    assert len(fp.intensity) == 1 and fp.intensity[0].low < fp.intensity[0].high
    assert len(fp.classes) == 3 and fp.class_names[0] == "background"
    # Class 1's presence and median volume, counted here from the label files (1 mm voxels).
    volumes = []
    for label in sorted((tiny_dataset / "labelsTr").glob("*.nii.gz")):
        voxels = int(np.count_nonzero(read_volume(label)[0] == 1))
        volumes += [voxels / 1000.0] if voxels else []
    assert fp.classes[0].cases == len(volumes)
    assert np.isclose(fp.classes[0].median_ml, np.median(volumes))


def test_fingerprint_counts_the_labels_in_one_piece(tmp_path: Path):
    root = write_synthetic_dataset(
        tmp_path / "pieces", SyntheticSpec(num_cases=4, shape=(20, 20, 20), num_folds=2)
    )
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    label, geometry = read_volume(labels[0])
    label[0, 0, 0] = 1  # a second piece of class 1 in one case, far from the first
    write_volume(labels[0], label.astype(np.uint8), geometry)
    _, fp = fingerprint_dataset(root)
    for k, stats in enumerate(fp.classes, start=1):
        pieces = [pieces_per_class(read_volume(p)[0].astype(np.int64)).get(k) for p in labels]
        assert stats.one_piece == sum(n == 1 for n in pieces)
    assert fp.classes[0].one_piece < fp.classes[0].cases


def test_an_anisotropic_dataset_shows_its_thick_axis(tmp_path: Path):
    spec = SyntheticSpec(num_cases=3, shape=(24, 24, 24), num_folds=3, anisotropic=True)
    _, fp = fingerprint_dataset(write_synthetic_dataset(tmp_path / "aniso", spec))
    assert fp.median_spacing == spec.spacing
    assert fp.shapes[0] == spec.voxel_shape
