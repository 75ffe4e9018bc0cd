"""Tests for segnet.training.trainer, in process: a tiny run end to end, resume, failures."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import errno
import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_same_checkpoints, tiny_config

from segnet.checkpoint_files import AVERAGE
from segnet.errors import DataError, RunDirError, UserError
from segnet.inference import loading
from segnet.training import progress_plot, trainer
from segnet.training.checkpoints import checkpoint_candidates
from segnet.training.events import read_events
from segnet.training.preemption import StopRequest
from segnet.training.trainer import DivergedError, OutOfMemoryError, TrainResult, train

EVERY_STEPS = "checkpoint.every_steps=2"
EMA = "train.ema_decay=0.5"  # low, so that 6 steps leave averages far from the weights


@pytest.fixture(scope="module")
def reference_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The tiny U-Net trained without interruption: 2 epochs of 3 steps."""
    tmp = tmp_path_factory.mktemp("reference")
    return train(tiny_config(tiny_root, tmp, EVERY_STEPS), run_dir=tmp / "run", quiet=True)


class EmaRun(NamedTuple):
    result: TrainResult
    validated: list[list[np.ndarray]]  # the model's trainable weights at each validation


@pytest.fixture(scope="module")
def ema_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> EmaRun:
    """The reference run with ``train.ema_decay`` on, and the weights each validation saw."""
    tmp = tmp_path_factory.mktemp("ema")
    models: list[keras.Model] = []
    validated: list[list[np.ndarray]] = []
    make_predict_fn, validate = trainer.make_predict_fn, trainer.validate

    def remember_model(model: keras.Model):
        models.append(model)
        return make_predict_fn(model)

    def validate_and_remember(*args, **kwargs):
        validated.append([v.numpy() for v in models[-1].trainable_variables])
        return validate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "make_predict_fn", remember_model)
        patch.setattr(trainer, "validate", validate_and_remember)
        config = tiny_config(tiny_root, tmp, EVERY_STEPS, EMA)
        result = train(config, run_dir=tmp / "run", quiet=True)
    return EmaRun(result, validated)


def test_a_run_writes_a_self_describing_directory(reference_run: TrainResult) -> None:
    run = reference_run.run_dir
    assert (reference_run.step, reference_run.epochs_done) == (6, 2)
    assert not reference_run.interrupted and reference_run.best_score is not None
    for name in ("config.yaml", "fingerprint.json", "train.log", "export/model.keras"):
        assert (run / name).is_file(), name
    assert (run / "export" / "saved_model" / "saved_model.pb").is_file()
    assert [Path(p).name for p in checkpoint_candidates(run / "checkpoints")] == [
        "ckpt-6",
        "ckpt-4",
        "ckpt-3",
    ]
    assert len(checkpoint_candidates(run / "checkpoints" / "best")) == 1
    assert list((run / "logs").glob("events.out.tfevents.*"))
    exported = [e for e in read_events(run / "events.jsonl") if e["event"] == "exported"]
    assert [e["path"] for e in exported] == [str(run / "export")]
    progress = tf.io.decode_png((run / "progress.png").read_bytes(), channels=3)
    assert tuple(progress.shape) == (progress_plot.HEIGHT, progress_plot.WIDTH, 3)


def test_events_jsonl_records_each_milestone(reference_run: TrainResult) -> None:
    run = reference_run.run_dir
    events = read_events(run / "events.jsonl")
    assert [(e["event"], e["step"]) for e in events if e["event"] != "best_saved"] == [
        ("started", 0),
        ("checkpoint_saved", 2),  # checkpoint.every_steps=2
        ("checkpoint_saved", 3),
        ("epoch_end", 3),
        ("checkpoint_saved", 4),
        ("checkpoint_saved", 6),  # not twice at step 6, which is both
        ("epoch_end", 6),
        ("exported", 6),
    ]
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert [Path(e["path"]).parent for e in saved] == [run / "checkpoints"] * 4
    assert [Path(e["path"]).name for e in saved] == ["ckpt-2", "ckpt-3", "ckpt-4", "ckpt-6"]
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [1, 2]
    best = [e for e in events if e["event"] == "best_saved"]
    assert best[0]["step"] == 3 and {e["step"] for e in best} <= {3, 6}
    assert best[-1]["score"] == pytest.approx(reference_run.best_score)
    assert Path(best[-1]["path"]).parent == run / "checkpoints" / "best"


def test_tensorboard_logs_match_metrics_csv(reference_run: TrainResult) -> None:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    run = reference_run.run_dir
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    logged = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("val/dice")}
    assert logged == pytest.approx({int(r["step"]): float(r["val_dice"]) for r in rows}, rel=1e-4)
    assert [e.step for e in events.Tensors("val/overlay")] == [3, 6]
    assert len(events.Tensors("train/loss")) == 6  # log_every_steps: 1


def test_the_split_is_written_and_logged(reference_run: TrainResult, tiny_root: Path) -> None:
    import json

    split = json.loads((reference_run.run_dir / "split.json").read_text())
    folds = json.loads((tiny_root / "folds.json").read_text())["folds"]
    assert split["source"].endswith("folds.json, fold 0")
    assert split["held_out"] == sorted(folds["0"]) and split["validation"] == split["held_out"]
    assert sorted(split["train"]) == sorted(i for f, ids in folds.items() if f != "0" for i in ids)
    assert not set(split["train"]) & set(split["held_out"]) and split["skipped"] == []
    log = (reference_run.run_dir / "train.log").read_text()
    assert f"{len(split['train'])} training cases, {len(split['held_out'])} held out" in log


def test_metrics_csv_has_one_row_per_epoch(reference_run: TrainResult) -> None:
    with (reference_run.run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("2", "6")]
    for row in rows:
        for key in ("loss", "train_dice", "val_dice", "val_dice_1", "val_dice_2"):
            assert np.isfinite(float(row[key])), key
    best = max(float(r["val_dice"]) for r in rows)
    assert best == pytest.approx(reference_run.best_score, rel=1e-5)


def test_running_again_on_a_finished_run_changes_nothing(
    reference_run: TrainResult, tiny_root: Path, tmp_path: Path
) -> None:
    run = reference_run.run_dir
    metrics = (run / "metrics.csv").read_text()
    exported = (run / "export" / "model.keras").stat().st_mtime_ns
    config = tiny_config(tiny_root, run.parent, EVERY_STEPS)
    again = train(config, run_dir=run, quiet=True)
    assert (again.step, again.epochs_done, again.interrupted) == (6, 2, False)
    assert again.best_score == reference_run.best_score
    assert (run / "metrics.csv").read_text() == metrics
    assert (run / "export" / "model.keras").stat().st_mtime_ns == exported


def test_a_finished_run_continues_for_more_epochs(
    reference_run: TrainResult, tiny_root: Path, tmp_path: Path
) -> None:
    import shutil

    run = Path(shutil.copytree(reference_run.run_dir, tmp_path / "run"))
    offset = (run / "events.jsonl").stat().st_size
    longer = tiny_config(tiny_root, reference_run.run_dir.parent, EVERY_STEPS, "train.epochs=3")
    result = train(longer, run_dir=run, quiet=True)  # no --force: training longer is allowed
    assert (result.step, result.epochs_done, result.interrupted) == (9, 3, False)
    with (run / "metrics.csv").open() as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2", "3"]
    assert "epochs: 3" in (run / "config.yaml").read_text()
    (before,) = run.glob("config.before-*.yaml")
    assert "epochs: 2" in before.read_text()
    restored = read_events(run / "events.jsonl", offset)
    assert [(e["event"], e["step"]) for e in restored][:2] == [("restored", 6), ("started", 6)]


_LOAD_WITHOUT_SEGNET = """
import sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serve"]
(logits,) = serve(tf.constant(np.load(sys.argv[2]))).values()
assert not [m for m in sys.modules if m.split(".")[0] == "segnet"], "segnet was imported"
np.save(sys.argv[3], logits.numpy())
"""


@pytest.mark.slow
def test_exports_reload_and_predict_like_the_trained_model(
    reference_run: TrainResult, tmp_path: Path
) -> None:
    window = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    expected = np.asarray(reference_run.model(window, training=False))
    export = reference_run.run_dir / "export"
    reloaded = keras.saving.load_model(export / "model.keras")
    np.testing.assert_allclose(np.asarray(reloaded(window, training=False)), expected, atol=1e-5)

    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_SEGNET)
    np.save(tmp_path / "window.npy", window)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(export / "saved_model"),
            str(tmp_path / "window.npy"),
            str(tmp_path / "logits.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5)


class _StopAfter(StopRequest):
    """Says "stop" from its ``n``-th question on (0-based), as if a signal came then.

    The loop asks once before each step and once after each epoch's end.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self._questions = itertools.count()
        self._n = n

    @property
    def requested(self) -> bool:
        return next(self._questions) >= self._n


@pytest.mark.parametrize("averaged", [False, True], ids=["plain", "ema"])
def test_stop_then_resume_ends_exactly_like_the_uninterrupted_run(
    averaged: bool,
    request: pytest.FixtureRequest,
    tiny_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Validation after epoch 1 comes before the stop, so with ema it swaps the averages in and
    # out in both runs, and the resumed run continues the averages from ckpt-5.
    reference_run = (
        request.getfixturevalue("ema_run").result
        if averaged
        else (request.getfixturevalue("reference_run"))
    )
    extra = [EMA] if averaged else []
    config = tiny_config(tiny_root, reference_run.run_dir.parent, EVERY_STEPS, *extra)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        # Questions 0-2: steps 1-3; 3: after epoch 1; 4: step 4; 5: step 5, which stops.
        patch.setattr(trainer, "StopRequest", lambda: _StopAfter(5))
        stopped = train(config, run_dir=run, quiet=True)
    assert stopped.interrupted and stopped.step == 5 and stopped.epochs_done == 1
    assert Path(checkpoint_candidates(run / "checkpoints")[0]).name == "ckpt-5"
    resumed = train(config, run_dir=run, quiet=True)
    assert (resumed.step, resumed.epochs_done, resumed.interrupted) == (6, 2, False)
    assert_same_checkpoints(
        checkpoint_candidates(run / "checkpoints")[0],
        checkpoint_candidates(reference_run.run_dir / "checkpoints")[0],
        object_graph=False,  # both built in this process: their Keras names differ
    )
    with (run / "metrics.csv").open() as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2"]


def _latest(run: Path) -> str:
    return checkpoint_candidates(run / "checkpoints")[0]


def _averages(checkpoint: str) -> list[np.ndarray]:
    reader = tf.train.load_checkpoint(checkpoint)
    count = sum(1 for name in reader.get_variable_to_shape_map() if name.startswith(AVERAGE))
    return [reader.get_tensor(f"{AVERAGE}/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(count)]


def _assert_equal_weights(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_validation_export_and_inference_use_the_weight_averages(ema_run: EmaRun) -> None:
    run = ema_run.result.run_dir
    config = loading.load_run_config(run)
    assert config.train.ema_decay == 0.5
    (latest,) = loading.resolve_checkpoints(run, "latest")
    averages = _averages(latest.path)  # ckpt-6, saved right after the last validation
    assert len(averages) == len(ema_run.result.model.trainable_variables)
    live = loading.load_model(replace(config, train=replace(config.train, ema_decay=None)), latest)
    assert not any(
        np.allclose(a, np.asarray(w)) for a, w in zip(averages, live.trainable_variables)
    )

    assert len(ema_run.validated) == 2  # once per epoch
    _assert_equal_weights(ema_run.validated[-1], averages)
    exported = keras.saving.load_model(run / "export" / "model.keras")
    _assert_equal_weights(exported.trainable_variables, averages)
    _assert_equal_weights(ema_run.result.model.trainable_variables, averages)
    # evaluate.py and predict.py load through loading.load_model
    _assert_equal_weights(loading.load_model(config, latest).trainable_variables, averages)


def test_validating_with_the_averages_leaves_training_unchanged(
    ema_run: EmaRun, tiny_root: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_root, tmp_path, EVERY_STEPS, EMA, "train.val_every=0")
    unvalidated = train(config, run_dir=tmp_path / "run", quiet=True)
    assert unvalidated.best_score is None
    assert_same_checkpoints(
        _latest(unvalidated.run_dir),
        _latest(ema_run.result.run_dir),
        object_graph=False,  # both built in this process: their Keras names differ
        ignore=("best_score",),
    )


def test_without_ema_decay_checkpoints_hold_no_averages(reference_run: TrainResult) -> None:
    assert _averages(_latest(reference_run.run_dir)) == []


def test_2d_segnet_trains_on_slices_and_validates_whole_volumes(
    tiny_root: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_root,
        tmp_path,
        "model.name=segnet",
        "model.segnet.spatial_dims=2",
        "train.epochs=1",
        "train.steps_per_epoch=2",
    )
    result = train(config, run_dir=tmp_path / "run", quiet=True)
    assert result.step == 2 and 0.0 <= result.best_score <= 1.0
    assert (tmp_path / "run" / "export" / "saved_model").is_dir()


def _zeroed(path: Path) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, image.get_data_dtype()), image.affine), path)


def test_data_warnings_are_written_into_train_log_once(tiny_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_root, tmp_path / "data"))
    (root / "dataset.json").unlink()  # its 3 labels would refuse num_classes 4 outright
    _zeroed(root / "labelsTr" / "case_000.nii.gz")  # case_002 is held out by fold 0
    _zeroed(root / "imagesTr" / "case_001_0000.nii.gz")
    config = tiny_config(root, tmp_path, "data.num_classes=4", "train.epochs=1")
    train(config, run_dir=tmp_path / "run", quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    for text, case in (("[3] never occur", ""), ("all-background", "case_000"), ("all-zero", "")):
        lines = [line for line in log.splitlines() if text in line]
        assert len(lines) == 1 and "WARNING" in lines[0] and case in lines[0], (text, log)
    assert "data.num_classes" in log and "all-zero image" in log and ": case_001" in log


def test_clean_data_logs_no_data_warning(reference_run: TrainResult) -> None:
    log = (reference_run.run_dir / "train.log").read_text()
    assert "WARNING" not in log, log


# --- Failures -----------------------------------------------------------------------------


def test_bad_data_stops_before_the_run_directory_exists(tiny_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_root.iterdir():
        (broken / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (broken / "labelsTr").unlink()
    (broken / "labelsTr").mkdir()
    for label in (tiny_root / "labelsTr").iterdir():
        (broken / "labelsTr" / label.name).write_bytes(label.read_bytes()[:100])  # truncated
    config = tiny_config(broken, tmp_path)
    with pytest.raises(DataError) as caught:
        train(config, run_dir=tmp_path / "run", quiet=True)
    message = str(caught.value)
    assert all(f"case_00{i}" in message for i in range(5))  # every case reported at once
    assert not (tmp_path / "run").exists()


def _nan_after(steps: int):
    real = trainer.build_loss

    def build_loss(config, model=None):
        loss = real(config, model)
        calls = tf.Variable(0)

        def poisoned(labels, outputs):
            calls.assign_add(1)
            return tf.where(calls > steps, float("nan"), loss(labels, outputs))

        return poisoned

    return build_loss


def test_nan_loss_stops_without_saving_the_bad_state(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer, "build_loss", _nan_after(2))
    config = tiny_config(
        tiny_root, tmp_path, "checkpoint.every_steps=1", "optimizer.clip_norm=null"
    )
    with pytest.raises(DivergedError) as caught:
        train(config, run_dir=tmp_path / "run", quiet=True)
    message = str(caught.value)
    assert "step 3" in message and "ckpt-2" in message
    assert "optimizer.learning_rate" in message and "optimizer.clip_norm" in message
    assert Path(checkpoint_candidates(tmp_path / "run" / "checkpoints")[0]).name == "ckpt-2"


def test_out_of_memory_names_what_to_change(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args, **kwargs):
        def step(batch, stop):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

        return step

    monkeypatch.setattr(trainer, "make_train_step", exhausted)
    with pytest.raises(
        OutOfMemoryError, match=r"out of memory .*train\.batch_size.*data\.patch_size"
    ):
        train(tiny_config(tiny_root, tmp_path), run_dir=tmp_path / "run", quiet=True)


def test_full_disk_is_one_sentence_and_keeps_earlier_checkpoints(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = tf.train.CheckpointManager.save
    saves = itertools.count()

    def save(self, *args, **kwargs):
        if next(saves) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    config = tiny_config(tiny_root, tmp_path, "checkpoint.every_steps=1")
    with pytest.raises(RunDirError, match="no space left on the device") as caught:
        train(config, run_dir=tmp_path / "run", quiet=True)
    assert "\n" not in str(caught.value)
    assert [Path(p).name for p in checkpoint_candidates(tmp_path / "run" / "checkpoints")] == [
        "ckpt-1"
    ]


def test_float16_on_a_cpu_without_kernels_is_a_user_error(tiny_root: Path, tmp_path: Path) -> None:
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU has the float16 kernels")
    config = tiny_config(tiny_root, tmp_path, "runtime.precision=mixed_float16")
    with pytest.raises(UserError, match="use auto or float32 on CPUs"):
        train(config, run_dir=tmp_path / "run", quiet=True)
