"""Evaluation end to end on a run trained by the real trainer (two steps: plumbing, not skill).

The dataset encodes each label in the image (channel 0 is ``label + 1`` inside the body and 0
outside), so an oracle model, the one-hot of ``round(channel 0) - 1``, is perfect. Swapped in
for the trained weights it must score Dice 1 and HD95 0 mm on every class: any error in the
preprocessing inverse, the grid the prediction is written on, or the metric plumbing would cost
voxels there.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from segnet.cli import evaluate_main
from segnet.config import ExperimentConfig, build_config
from segnet.data.volumes import make_geometry, write_volume
from segnet.errors import ConfigError, DataError, RunDirError
from segnet.evaluation import montage
from segnet.evaluation.evaluate import evaluate_case, evaluate_run, recover_interrupted
from segnet.inference import loading, sliding_window
from segnet.precision import choose_inference_precision
from segnet.training.trainer import train

NUM_CLASSES = 3
SHAPES = [(17, 18, 19), (19, 16, 21), (15, 20, 17), (18, 19, 16), (21, 17, 18), (16, 21, 20)]
HELD_OUT = ["case_4", "case_5"]


def case_volumes(index: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image (D, H, W, 2), label): a sphere of class 1 holding a smaller one of class 2."""
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    centre = np.array(shape) / 2.0 + (index % 3 - 1)
    radius = np.linalg.norm(grid - centre, axis=-1)
    label = np.where(radius < 2.5, 2, np.where(radius < 5.0, 1, 0)).astype(np.uint8)
    body = np.zeros(shape, bool)
    body[1:-1, 2:-1, 1:-2] = True
    assert body[label > 0].all(), "the oracle can only see labels inside the body"
    channel0 = np.where(body, label + 1.0, 0.0)
    noise = np.random.default_rng(index).normal(50.0, 5.0, shape) * body
    return np.stack([channel0, noise], axis=-1).astype(np.float32), label


def write_dataset(root: Path) -> Path:
    """nnU-Net folders (imagesTr/<case>_000c, labelsTr/<case>) on oblique LPS grids."""
    for index, shape in enumerate(SHAPES):
        angle = np.deg2rad(10.0 * index)
        affine = np.eye(4)
        affine[:3, :3] = np.array(
            [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
        ) @ np.diag([-0.9, -1.3, 2.2])
        geometry = make_geometry(affine, shape, np.float32, qform_code=1, sform_code=2)
        image, label = case_volumes(index, shape)
        for channel in range(2):
            write_volume(
                root / "imagesTr" / f"case_{index}_{channel:04d}.nii.gz",
                image[..., channel],
                geometry,
            )
        # Float label files with integer values, as some public datasets ship them.
        write_volume(root / "labelsTr" / f"case_{index}.nii.gz", label.astype(np.float32), geometry)
    return root


def experiment(root: Path, cache: Path, **split: object) -> ExperimentConfig:
    return build_config(
        {
            "name": "oracle",
            "data": {
                "root": str(root),
                "num_classes": NUM_CLASSES,
                "num_channels": 2,
                "patch_size": [8, 8, 8],
                "cache_dir": str(cache),
                "split": split or {"val": HELD_OUT},
            },
            "preprocessing": {"normalization": "none"},
            "model": {"segnet": {"depth": 1, "filters": 2, "convs_per_level": 1}},
            "train": {"epochs": 2, "steps_per_epoch": 1, "batch_size": 1},
            "augmentation": {"enabled": False},
            "evaluation": {"overlap": 0.25},
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 2 epochs of 1 step: checkpoints ckpt-1, ckpt-2 and best."""
    root = tmp_path_factory.mktemp("runs")
    train(experiment(dataset, root / "cache"), run_dir=root / "run", quiet=True)
    return root / "run"


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, so each test's evaluation folder starts empty."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def oracle_model(
    config: ExperimentConfig, ref: loading.CheckpointRef, policy: str = "float32"
) -> keras.Model:
    def logits(batch: tf.Tensor) -> tf.Tensor:
        labels = tf.clip_by_value(tf.round(batch[..., 0]) - 1.0, 0.0, NUM_CLASSES - 1.0)
        return 20.0 * tf.one_hot(tf.cast(labels, tf.int32), NUM_CLASSES)

    image = keras.Input((None, None, None, config.data.num_channels))
    return keras.Model(image, keras.layers.Lambda(logits)(image))


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_model", oracle_model)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------
def test_oracle_scores_dice_1_and_hd95_0_for_every_class(run: Path, dataset: Path, oracle):
    results = evaluate_run(run, "best", quiet=True)
    document = results["best"]
    assert document["num_cases"] == len(HELD_OUT)
    for label in ("1", "2"):
        stats = document["summary"]["per_class"][label]
        assert stats["dice"]["min"] == 1.0 and stats["iou"]["min"] == 1.0
        assert stats["hd95_mm"]["max"] == 0.0 and stats["assd_mm"]["max"] == 0.0
        assert stats["nsd"]["min"] == 1.0 and stats["volume_diff_mm3"]["max"] == 0.0
    out = run / "evaluation" / "best"
    for case_id in HELD_OUT:
        reference = nib.load(str(dataset / "labelsTr" / f"{case_id}.nii.gz"))
        predicted = nib.load(str(out / "predictions" / f"{case_id}.nii.gz"))
        np.testing.assert_array_equal(predicted.affine, reference.affine)
        assert int(predicted.header["sform_code"]) == 2 and int(predicted.header["qform_code"]) == 1
        np.testing.assert_array_equal(np.asarray(predicted.dataobj), np.asarray(reference.dataobj))


def test_metrics_files_hold_config_checkpoint_cases_and_policy(run: Path, oracle):
    evaluate_run(run, "latest", overrides=["evaluation.nsd_tolerance_mm=2.5"], quiet=True)
    out = run / "evaluation" / "latest"
    document = json.loads((out / "metrics.json").read_text())
    assert document["checkpoint"].endswith("checkpoints/ckpt-2")
    assert document["config"]["evaluation"]["nsd_tolerance_mm"] == 2.5
    assert sorted(document["per_case"]) == HELD_OUT
    assert set(document["summary"]["per_class"]["1"]["dice"]) >= {"mean", "median", "std"}
    assert "Both masks empty" in document["edge_case_policy"]
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["class"]) for r in rows] == [(c, k) for c in HELD_OUT for k in ("1", "2")]
    assert all(float(r["dice"]) == 1.0 for r in rows)


# ---------------------------------------------------------------------------------------------
# Checkpoints, data sources, montages
# ---------------------------------------------------------------------------------------------
def test_checkpoint_all_ranks_every_checkpoint(run: Path, capsys: pytest.CaptureFixture):
    assert evaluate_main(["--run", str(run), "--checkpoint", "all", "--quiet"]) == 0
    printed = capsys.readouterr().out
    ranking = (run / "evaluation" / "ranking.txt").read_text()
    assert "checkpoints ranked by mean foreground Dice" in printed and ranking in printed + "\n"
    ranked = [line.split()[1] for line in ranking.splitlines()[2:]]
    assert sorted(ranked) == ["best", "ckpt-1", "ckpt-2"]
    dice = [float(line.split()[2]) for line in ranking.splitlines()[2:]]
    assert dice == sorted(dice, reverse=True)
    for name in ranked:
        assert (run / "evaluation" / name / "metrics.json").is_file()
    assert "Dice" in printed and "HD95 mm" in printed and "median" in printed


def test_montage_per_case_decodes_to_the_axial_layout_size(run: Path, dataset: Path, oracle):
    evaluate_run(run, "best", quiet=True)
    for case_id in HELD_OUT:
        scan = nib.load(str(dataset / "labelsTr" / f"{case_id}.nii.gz"))
        view = montage.axial_view(np.zeros(scan.shape), nib.aff2axcodes(scan.affine))
        png = run / "evaluation" / "best" / "montages" / f"{case_id}.png"
        decoded = tf.io.decode_png(png.read_bytes(), channels=3)
        zoom = montage.zoom_factor(*view.shape[1:])
        layout = (3 * zoom * view.shape[1], 3 * zoom * view.shape[2])
        frame = montage.montage_frame(*layout, ["1", "2"])  # the oracle's classes, unnamed
        assert tuple(decoded.shape) == (frame.height, frame.width, 3)


def test_data_folder_evaluates_every_labelled_case(run: Path, dataset: Path, oracle):
    document = evaluate_run(run, "best", data=str(dataset), quiet=True)["best"]
    assert document["num_cases"] == len(SHAPES)
    assert document["summary"]["foreground_mean"]["dice"] == 1.0


def test_other_data_gets_its_own_folder_and_leaves_the_held_out_results(
    run: Path, dataset: Path, oracle
):
    evaluate_run(run, "best", quiet=True)
    held_out = run / "evaluation" / "best"
    before = {p: p.read_bytes() for p in held_out.rglob("*") if p.is_file()}
    evaluate_run(run, "best", data=str(dataset), quiet=True)
    other = run / "evaluation" / f"best-on-{dataset.name}"
    assert sorted(p.name for p in (other / "predictions").iterdir()) == [
        f"case_{i}.nii.gz" for i in range(len(SHAPES))
    ]
    assert {p: p.read_bytes() for p in held_out.rglob("*") if p.is_file()} == before


def test_outputs_of_cases_no_longer_evaluated_are_removed(run: Path, oracle):
    out = run / "evaluation" / "best"
    evaluate_run(run, "best", quiet=True)
    ghosts = [out / "predictions" / "gone.nii.gz", out / "montages" / "gone.png"]
    ghosts.append(out / "predictions" / f"{HELD_OUT[0]}_probabilities.nii.gz")  # not asked for
    for ghost in ghosts:
        ghost.write_bytes(b"from an earlier evaluation")
    notes = out / "predictions" / "notes.txt"  # not a file evaluation writes: left alone
    notes.write_text("mine")
    evaluate_run(run, "best", quiet=True)
    assert not any(ghost.exists() for ghost in ghosts)
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in HELD_OUT
    ]
    assert sorted(p.name for p in (out / "montages").iterdir()) == [f"{c}.png" for c in HELD_OUT]


def test_data_yaml_uses_its_held_out_split(run: Path, dataset: Path, tmp_path: Path, oracle):
    config = tmp_path / "other.yaml"
    data = {
        "root": str(dataset),
        "num_classes": NUM_CLASSES,
        "num_channels": 2,
        "split": {"val": ["case_0"]},
    }
    config.write_text(yaml.safe_dump({"data": data}))
    document = evaluate_run(run, "best", data=str(config), quiet=True)["best"]
    assert list(document["per_case"]) == ["case_0"]
    config.write_text(yaml.safe_dump({"data": {**data, "num_classes": 5}}))
    with pytest.raises(ConfigError, match="num_classes is 5 but the model was trained with 3"):
        evaluate_run(run, "best", data=str(config), quiet=True)


def test_data_yaml_chooses_cases_not_the_window(
    run: Path, dataset: Path, tmp_path: Path, oracle, monkeypatch: pytest.MonkeyPatch
):
    """A --data YAML written for another experiment (64^3 patches) must not resize the windows
    of a model trained on 8^3 patches: the windows are the run's, or evaluation.window."""
    windows: list[tuple[int, ...]] = []
    real = sliding_window.sliding_window_inference

    def recording(volume, predict_fn, window, **kwargs):
        windows.append(tuple(window))
        return real(volume, predict_fn, window, **kwargs)

    monkeypatch.setattr(sliding_window, "sliding_window_inference", recording)
    config = tmp_path / "other.yaml"
    data = {
        "root": str(dataset),
        "num_classes": NUM_CLASSES,
        "num_channels": 2,
        "patch_size": [64, 64, 64],
        "split": {"val": ["case_0", "case_1"]},
    }
    config.write_text(yaml.safe_dump({"data": data}))
    document = evaluate_run(run, "best", data=str(config), quiet=True)["best"]
    assert sorted(document["per_case"]) == ["case_0", "case_1"]  # the file's cases
    assert set(windows) == {(8, 8, 8)}, windows
    windows.clear()
    evaluate_run(
        run, "best", data=str(config), quiet=True, overrides=["evaluation.window=[8,12,8]"]
    )
    assert set(windows) == {(8, 12, 8)}, windows


def test_unusable_held_out_case_is_named_or_skipped(
    run: Path, dataset: Path, tmp_path: Path, oracle
):
    broken = Path(shutil.copytree(dataset, tmp_path / "broken"))
    label = broken / "labelsTr" / "case_3.nii.gz"
    geometry = make_geometry(nib.load(str(label)).affine, SHAPES[3])
    write_volume(label, np.full(SHAPES[3], 7, np.uint8), geometry)  # label 7 of 3 classes
    with pytest.raises(DataError, match=r"case_3.nii.gz: label values \[7\] outside 0..2"):
        evaluate_run(run, "best", data=str(broken), quiet=True)
    skipped = evaluate_run(
        run, "best", data=str(broken), quiet=True, overrides=["data.skip_bad_cases=true"]
    )["best"]
    assert "case_3" not in skipped["per_case"] and skipped["num_cases"] == len(SHAPES) - 1
    (failure,) = skipped["failures"]  # the left-out case is recorded, not only logged
    assert failure.startswith("case_3: left out") and "label values [7]" in failure


def _label_beyond_the_classes(dataset: Path, copy: Path) -> Path:
    broken = Path(shutil.copytree(dataset, copy))
    label = broken / "labelsTr" / "case_4.nii.gz"
    geometry = make_geometry(nib.load(str(label)).affine, SHAPES[4])
    write_volume(label, np.full(SHAPES[4], 3, np.uint8), geometry)  # label 3 of 3 classes
    return broken


def test_bad_data_hints_are_ones_evaluate_accepts(
    run: Path, dataset: Path, tmp_path: Path, oracle, capsys: pytest.CaptureFixture
):
    broken = _label_beyond_the_classes(dataset, tmp_path / "broken")
    status = evaluate_main(["--run", str(run), "--data", str(broken), "--quiet"])
    error = capsys.readouterr().err
    assert status == 2 and "case_4.nii.gz: label values [3] outside 0..2" in error
    assert "the model predicts classes 0..2" in error and "--set data.skip_bad_cases=true" in error
    assert "data.num_classes is" not in error and "data.skip_bad_cases: true" not in error
    config = tmp_path / "broken.yaml"
    data = {"root": str(broken), "num_classes": NUM_CLASSES, "num_channels": 2}
    config.write_text(yaml.safe_dump({"data": {**data, "split": {"val": HELD_OUT}}}))
    for where in (str(broken), str(config)):  # the hint works with a folder and with a YAML
        args = ["--run", str(run), "--data", where, "--quiet"]
        assert evaluate_main([*args, "--set", "data.skip_bad_cases=true"]) == 0, where


def test_a_yaml_made_for_another_model_names_the_setting_to_change(
    run: Path, dataset: Path, tmp_path: Path
):
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(dataset), "num_channels": 1}}))
    with pytest.raises(ConfigError) as info:
        evaluate_run(run, "best", data=str(config), quiet=True)
    assert "set data.num_channels: 2 in other.yaml" in str(info.value)
    assert "set data.num_classes: 3 in other.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("remove", "checkpoint", "message"),
    [
        ("checkpoints/best", "best", "no best checkpoint .* use --checkpoint latest"),
        ("checkpoints", "latest", "no checkpoint in .*checkpoints: train first with"),
        ("config.yaml", "best", "not a segnet run directory"),
    ],
)
def test_missing_pieces_of_a_run_are_named(run: Path, remove: str, checkpoint: str, message: str):
    target = run / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(RunDirError, match=message):
        evaluate_run(run, checkpoint, quiet=True)


# ---------------------------------------------------------------------------------------------
# An evaluation killed half way never mixes with the previous one
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
# The child evaluates the run and SIGKILLs itself at one exact point of the write: a fault hook
# of the test's own, so segnet runs unchanged.
KILLED_EVALUATION = """
import os, signal, sys
import segnet.evaluation.evaluate as evaluate
from segnet.cli import evaluate_main

point, real_rename, real_write_json = sys.argv[2], os.rename, evaluate.report.write_json
renames = []

def write_json(path, document):  # metrics.json is written last: every prediction is out
    if point == "before-metrics":
        os.kill(os.getpid(), signal.SIGKILL)
    real_write_json(path, document)

def rename(source, destination):  # the swap's second rename puts the new folder in place
    renames.append(destination)
    if point == "mid-swap" and len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(source, destination)

evaluate.report.write_json, evaluate.os.rename = write_json, rename
evaluate_main(["--run", sys.argv[1], "--checkpoint", "latest", "--quiet"])
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-metrics", "mid-swap"])
def test_a_sigkilled_evaluation_leaves_the_previous_one_whole(run: Path, point: str):
    evaluate_run(run, "latest", quiet=True)
    evaluation = run / "evaluation"
    before = _files(evaluation / "latest")
    assert "metrics.json" in before and "predictions/case_4.nii.gz" in before
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_EVALUATION, str(run), point],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert recover_interrupted(evaluation)  # says what it repaired
    assert _files(evaluation / "latest") == before
    assert sorted(p.name for p in evaluation.iterdir()) == ["latest"]  # no hidden leftovers


def test_a_failed_evaluation_keeps_the_old_folder_and_the_users_files(
    run: Path, oracle, monkeypatch: pytest.MonkeyPatch
):
    evaluate_run(run, "best", quiet=True)
    out = run / "evaluation" / "best"
    (out / "my-notes.txt").write_text("mine")
    before = _files(out)
    calls = []

    def failing_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return evaluate_case(*args, **kwargs)

    monkeypatch.setattr("segnet.evaluation.evaluate.evaluate_case", failing_case)
    with pytest.raises(OSError, match="No space"):
        evaluate_run(run, "best", quiet=True)
    assert _files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["best"]
    monkeypatch.undo()
    evaluate_run(run, "best", quiet=True)  # a complete one replaces it and keeps the notes
    assert (out / "my-notes.txt").read_text() == "mine"


def test_a_truncated_checkpoint_is_named_with_the_fix(run: Path, capsys: pytest.CaptureFixture):
    for data in (run / "checkpoints").glob("ckpt-2.data-*"):
        data.write_bytes(data.read_bytes()[:100])
    status = evaluate_main(["--run", str(run), "--checkpoint", "latest"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert "Traceback" not in error and "ckpt-2" in error and "--checkpoint" in error


# ---------------------------------------------------------------------------------------------
# The default checkpoint is never scored on the cases that chose it
# ---------------------------------------------------------------------------------------------
def test_default_is_latest_on_the_cases_that_chose_best(run: Path, oracle):
    results = evaluate_run(run, quiet=True)
    assert list(results) == ["latest"]
    stored = json.loads((run / "evaluation" / "latest" / "metrics.json").read_text())
    assert stored["checkpoint_selection"].startswith("latest by default")
    assert "2 of these 2 cases chose the best checkpoint" in stored["checkpoint_selection"]
    assert stored["cases_that_chose_best"] == HELD_OUT
    expected = choose_inference_precision("auto").name.removeprefix("mixed_")
    assert stored["inference_precision"] == expected  # what auto resolved to on this machine


def test_default_is_best_on_cases_that_did_not_choose_it(
    run: Path, dataset: Path, tmp_path: Path, oracle
):
    config = tmp_path / "other.yaml"
    data = {"root": str(dataset), "num_classes": NUM_CLASSES, "num_channels": 2}
    config.write_text(yaml.safe_dump({"data": {**data, "split": {"val": ["case_0", "case_1"]}}}))
    results = evaluate_run(run, data=str(config), quiet=True)
    assert list(results) == ["best"]
    assert results["best"]["checkpoint_selection"].startswith("best by default")


def test_asking_for_best_on_its_own_cases_is_scored_with_a_warning(
    run: Path, oracle, caplog: pytest.LogCaptureFixture
):
    document = evaluate_run(run, "best", quiet=True)["best"]
    assert "optimistic" in document["checkpoint_selection"]
    assert any("optimistic" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Ensembles: their evaluation belongs to no single run
# ---------------------------------------------------------------------------------------------
def predictions(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.name: np.asarray(nib.load(str(p)).dataobj)
        for p in sorted((folder / "predictions").iterdir())
    }


def test_an_ensemble_of_a_run_and_its_copy_scores_exactly_as_the_run(run: Path, tmp_path: Path):
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    single = evaluate_run(run, "best", quiet=True)["best"]
    results = evaluate_run([run, copy], "best", quiet=True)
    assert list(results) == ["ensemble-run+copy-best"]
    folder = tmp_path / "evaluation" / "ensemble-run+copy-best"  # beside the runs
    stored = json.loads((folder / "metrics.json").read_text())
    assert json.dumps(stored["per_case"], sort_keys=True) == json.dumps(
        single["per_case"], sort_keys=True
    )
    ensemble, alone = predictions(folder), predictions(run / "evaluation" / "best")
    assert list(ensemble) == [f"{case}.nii.gz" for case in HELD_OUT]
    for name, labels in alone.items():
        np.testing.assert_array_equal(ensemble[name], labels)
    assert [member["run"] for member in stored["runs"]] == [str(run), str(copy)]
    assert stored["checkpoint"] == [member["checkpoint"] for member in stored["runs"]]
    assert stored["checkpoint"][1].startswith(str(copy / "checkpoints" / "best"))
    assert not (copy / "evaluation").exists()


def test_each_member_picks_its_checkpoint_and_says_which_cases_it_trained_on(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    other = Path(shutil.copytree(run, tmp_path / "other"))
    stored = yaml.safe_load((other / "config.yaml").read_text())
    stored["data"]["split"]["val"] = ["case_0", "case_1"]  # it trained on case_4 and case_5
    (other / "config.yaml").write_text(yaml.safe_dump(stored))
    results = evaluate_run([run, other], quiet=True)
    assert list(results) == ["ensemble-run+other-latest+best"]
    first, second = results["ensemble-run+other-latest+best"]["runs"]
    assert (first["cases_that_chose_best"], first["cases_trained_on"]) == (HELD_OUT, [])
    assert (second["cases_that_chose_best"], second["cases_trained_on"]) == ([], HELD_OUT)
    assert second["checkpoint_selection"].startswith("best by default")
    assert any(str(other) in r.message and "optimistic" in r.message for r in caplog.records)


def test_an_ensemble_of_runs_in_different_folders_needs_output_dir(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    copy = Path(shutil.copytree(run, tmp_path / "elsewhere" / "copy"))
    assert evaluate_main(["--run", str(run), str(copy), "--checkpoint", "best", "--quiet"]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert not (tmp_path / "evaluation").exists()
    results = tmp_path / "results"
    argv = ["--run", str(run), str(copy), "--checkpoint", "best", "--output-dir", str(results)]
    assert evaluate_main([*argv, "--quiet"]) == 0
    assert (results / "ensemble-run+copy-best" / "metrics.json").is_file()


def test_checkpoint_all_is_refused_for_an_ensemble(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    assert evaluate_main(["--run", str(run), str(copy), "--checkpoint", "all", "--quiet"]) == 2
    assert "--checkpoint all" in capsys.readouterr().err
    assert not (tmp_path / "evaluation").exists()
