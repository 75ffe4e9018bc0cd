"""Cross-validation end to end on the tiny dataset: a run per fold, out-of-fold evaluation, the
summary and the post-processing choice; a SIGKILL mid-fold resumes fold by fold."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from segnet.cli import train_main
from segnet.config import build_config
from segnet.cross_validation import cross_validate, parse_folds
from segnet.data.datasets import load_split
from segnet.errors import ConfigError, RunDirError
from segnet.inference.postprocessing import keep_largest_component
from segnet.inference.predict import predict_files

REPO = Path(__file__).resolve().parents[1]


def _experiment(root: Path, cache: Path) -> dict:
    """Tiny SegNet, 3 folds by the seeded shuffle with fold 0 the test fold; 1 epoch of 2 steps."""
    return {
        "name": "cv",
        "data": {
            "root": str(root),
            "patch_size": [16, 16, 16],
            "cache_dir": str(cache),
            "split": {"num_folds": 3, "seed": 1, "test_fold": 0},
        },
        "model": {"name": "segnet", "segnet": {"filters": 4, "depth": 2}},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 1, "deterministic": True},
        "evaluation": {"batch_size": 4, "montage": False},
    }


@pytest.mark.slow
def test_folds_train_evaluate_and_choose_postprocessing(tiny_dataset: Path, tmp_path: Path):
    config = build_config(_experiment(tiny_dataset, tmp_path / "cache"))
    folds = parse_folds("all", config)
    assert folds == [1, 2]
    result = cross_validate(config, folds, tmp_path / "cv", quiet=True)
    assert not result.interrupted
    parent = tmp_path / "cv"
    for fold in folds:
        stored = yaml.safe_load((parent / f"fold_{fold}" / "config.yaml").read_text())
        assert stored["data"]["split"]["fold"] == fold and stored["name"] == f"cv_fold{fold}"
        assert (parent / f"fold_{fold}" / "evaluation" / "latest" / "metrics.json").is_file()
    summary = json.loads((parent / "cross_validation.json").read_text())
    assert sorted(summary["folds"]) == ["1", "2"]
    assert summary["all_folds"]["cases"] == sum(f["cases"] for f in summary["folds"].values())
    assert summary == result.summary
    test_fold = build_config(_experiment(tiny_dataset, tmp_path / "cache"), ["data.split.fold=0"])
    test_ids = {
        c.case_id
        for c in load_split(
            replace(test_fold.data, split=replace(test_fold.data.split, test_fold=None))
        ).val
    }
    for fold in folds:  # the test fold's cases are in no fold's training, validation or summary
        split = json.loads((parent / f"fold_{fold}" / "split.json").read_text())
        assert test_ids and not test_ids & {*split["train"], *split["held_out"]}
        document = json.loads(
            (parent / f"fold_{fold}" / "evaluation" / "latest" / "metrics.json").read_text()
        )
        assert not test_ids & set(document["per_case"])
    chosen = json.loads((parent / "postprocessing.json").read_text())
    assert set(chosen["per_class"]) == {"1", "2", "3"}
    assert chosen["keep_largest_component"] == [
        int(c) for c, v in chosen["per_class"].items() if v["chosen"]
    ]
    # The parent is an ensemble of its folds, post-processed as the cross-validation chose:
    # here every class is made to keep its largest component, against the folds named alone.
    record = json.loads((parent / "postprocessing.json").read_text())
    record["keep_largest_component"] = [1, 2, 3]
    (parent / "postprocessing.json").write_text(json.dumps(record))
    scan = tiny_dataset / "imagesTr" / "case_000_0000.nii.gz"
    folds_alone = [parent / f"fold_{fold}" for fold in folds]
    assert predict_files(folds_alone, [scan], tmp_path / "plain", quiet=True) == []
    assert predict_files(parent, [scan], tmp_path / "chosen", quiet=True) == []
    plain = np.asarray(nib.load(tmp_path / "plain" / "case_000.nii.gz").dataobj)
    chosen_labels = np.asarray(nib.load(tmp_path / "chosen" / "case_000.nii.gz").dataobj)
    cleaned = keep_largest_component(plain, [1, 2, 3])
    assert not np.array_equal(plain, cleaned)  # an untrained model's islands: something to clean
    np.testing.assert_array_equal(chosen_labels, cleaned)
    # Again: every fold is finished, nothing is retrained, the summary is the same.
    before = (parent / "fold_1" / "metrics.csv").read_text()
    again = cross_validate(config, folds, parent, quiet=True)
    assert again.summary == summary and (parent / "fold_1" / "metrics.csv").read_text() == before


def test_bad_folds_and_parents_are_one_message(tiny_dataset: Path, tmp_path: Path, capsys):
    config = build_config(_experiment(tiny_dataset, tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"--folds 0: .*data\.split\.test_fold"):
        parse_folds("0", config)
    with pytest.raises(ConfigError, match="--folds one"):
        parse_folds("one", config)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(RunDirError, match="not a segnet cross-validation folder"):
        cross_validate(config, [1], tmp_path / "mine", quiet=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_experiment(tiny_dataset, tmp_path / "cache")))
    assert (
        train_main(["--config", str(path), "--folds", "7", "--run-dir", str(tmp_path / "x")]) == 2
    )
    assert "--folds 7" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sigkill_mid_fold_resumes_fold_by_fold(tiny_dataset: Path, tmp_path: Path):
    data = _experiment(tiny_dataset, tmp_path / "cache")
    data["train"].update(epochs=2, steps_per_epoch=3)
    data["checkpoint"] = {"every_steps": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    parent = tmp_path / "cv"
    args = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(path)]
    args += ["--folds", "all", "--run-dir", str(parent), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second_fold = parent / "fold_2" / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not second_fold.exists():  # fold 1 done, fold 2 has saved a checkpoint
        assert child.poll() is None and time.monotonic() < deadline, child.stderr
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    first = (parent / "fold_1" / "export" / "model.keras").stat().st_mtime_ns
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (parent / "fold_1" / "export" / "model.keras").stat().st_mtime_ns == first
    assert (parent / "cross_validation.json").is_file()
    assert "restored" in (parent / "fold_2" / "train.log").read_text()


def test_the_folds_share_one_fingerprint(tiny_dataset: Path, tmp_path: Path):
    from segnet.cross_validation import fold_config
    from segnet.training.trainer import load_training_data

    config = build_config(
        _experiment(tiny_dataset, tmp_path / "cache"), ["preprocessing.resample=true"]
    )
    # One case of fold 1 on a 2 mm grid: fold 2 trains on it, fold 1 does not.
    case = load_split(fold_config(config, 1).data).val[0]
    for path in (*case.images, case.label):
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine * [2, 2, 2, 1]), path)
    shared = [load_training_data(fold_config(config, f)).fingerprint for f in (1, 2)]
    assert shared[0] == shared[1]  # computed over both folds: the folds form an ensemble
    own = [
        load_training_data(
            build_config(
                _experiment(tiny_dataset, tmp_path / "cache"),
                ["preprocessing.resample=true", f"data.split.fold={f}"],
            )
        ).fingerprint
        for f in (1, 2)
    ]
    assert own[0] != own[1]  # each fold's own training cases: what an ensemble would refuse
