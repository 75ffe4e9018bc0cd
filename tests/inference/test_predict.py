"""Prediction: outputs land on the input's exact grid, bad inputs are skipped and reported.

Most tests use an oracle instead of a trained model: the phantom's image holds ``label + 1``
inside a body box and 0 outside it, and the oracle's logits are the one-hot of
``round(intensity) - 1``. With ``normalization: none`` every window, mirror and blend of the
sliding window gives back the label, so any voxel out of place is a bug in the plumbing
(preprocessing, its inverse, writing), not a weak model.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import json
import shutil
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml
from helpers import without_relu
from scipy import ndimage

from segnet.cli import predict_main
from segnet.config import ExperimentConfig, build_config
from segnet.data.preprocessing import DatasetFingerprint
from segnet.data.volumes import make_geometry, read_volume, write_volume
from segnet.errors import ConfigError, RunDirError, UserError
from segnet.inference import loading
from segnet.inference.predict import (
    Predictor,
    collect_cases,
    predict_files,
    write_segmentation,
)
from segnet.metrics import dice
from segnet.models import blocks
from segnet.models.registry import build_model
from segnet.precision import precision_policy
from segnet.run_dir import initialise_run_dir
from segnet.training.checkpoints import Checkpoints, TrainState, build_checkpoint
from segnet.training.optimizers import build_optimizer

NUM_CLASSES = 3
SHAPE = (17, 18, 19)


def oblique_lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel-to-world matrix: LPS axis flips, a 20-degree rotation, anisotropic spacing."""
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = (12.5, -30.0, 7.25)
    return affine


def phantom(shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image (D, H, W), label): classes 1 and 2 in a body box; image = label + 1 in the body."""
    label = np.zeros(shape, np.uint8)
    label[4:12, 5:13, 3:11] = 1
    label[7:10, 8:16, 9:15] = 2
    image = np.zeros(shape, np.float32)
    body = (slice(2, shape[0] - 2), slice(3, shape[1] - 1), slice(1, shape[2] - 3))
    image[body] = label[body] + 1.0
    return image, label


def oracle(batch: tf.Tensor) -> tf.Tensor:
    """Confident logits of the label the intensity encodes (see the module docstring)."""
    labels = tf.clip_by_value(tf.round(batch[..., 0]) - 1.0, 0.0, NUM_CLASSES - 1.0)
    return 20.0 * tf.one_hot(tf.cast(labels, tf.int32), NUM_CLASSES)


def make_config(
    preprocessing: dict | None = None, evaluation: dict | None = None, **data: object
) -> ExperimentConfig:
    return build_config(
        {
            "data": {"num_classes": NUM_CLASSES, "patch_size": [8, 8, 8], **data},
            "model": {"segnet": {"depth": 1, "filters": 2, "convs_per_level": 1}},
            "preprocessing": {"normalization": "none", **(preprocessing or {})},
            "evaluation": evaluation or {},
        }
    )


def write_scan(
    path: Path, image: np.ndarray, spacing=(0.8, 1.2, 2.5), qform_code=1, sform_code=2
) -> Path:
    geometry = make_geometry(
        oblique_lps_affine(spacing),
        image.shape[:3],
        np.float32,
        qform_code=qform_code,
        sform_code=sform_code,
    )
    return write_volume(path, image, geometry)


def assert_same_grid(written: Path, reference: Path) -> None:
    out, ref = nib.load(str(written)), nib.load(str(reference))
    assert out.shape[:3] == ref.shape[:3]
    np.testing.assert_array_equal(out.affine, ref.affine)
    for form in ("qform", "sform"):
        np.testing.assert_array_equal(
            getattr(out.header, f"get_{form}")(), getattr(ref.header, f"get_{form}")()
        )
        assert int(out.header[f"{form}_code"]) == int(ref.header[f"{form}_code"])
    assert out.header.get_zooms()[:3] == ref.header.get_zooms()[:3]


# ---------------------------------------------------------------------------------------------
# The restore is exact: the oracle's labels come back voxel for voxel on the input grid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preprocessing", "evaluation", "spatial_dims"),
    [
        ({"crop_to_nonzero": True}, {}, 3),
        ({"crop_to_nonzero": False}, {"overlap": 0.25, "weighting": "constant"}, 3),
        ({"crop_to_nonzero": True}, {"mirror_axes": [0, 1, 2], "batch_size": 3}, 3),
        ({"crop_to_nonzero": True}, {"window": [1, 8, 8]}, 2),  # a 2D model, slice by slice
    ],
)
def test_oracle_prediction_is_exact_on_an_oblique_lps_grid(
    tmp_path: Path, preprocessing: dict, evaluation: dict, spatial_dims: int
):
    image, label = phantom()
    scan = write_scan(tmp_path / "scan.nii.gz", image)
    volume, geometry = read_volume(scan)
    predictor = Predictor(make_config(preprocessing, evaluation), None, oracle, spatial_dims)
    segmentation = predictor.segment(volume[..., None], geometry)
    written = write_segmentation(tmp_path / "out", "scan", segmentation, geometry)
    assert_same_grid(written, scan)
    restored = np.asarray(nib.load(str(written)).dataobj)
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, label)


@pytest.mark.parametrize("target_spacing", [(1.0, 1.0, 1.0), (1.6, 0.9, 3.1), (2.0, 2.0, 2.0)])
def test_resampled_prediction_is_restored_onto_the_original_grid(
    tmp_path: Path, target_spacing: tuple[float, float, float]
):
    shape = (23, 22, 19)
    label = np.zeros(shape, np.uint8)
    label[6:17, 5:17, 5:14] = 1  # a box centred in the body: resampling cannot shift it
    image = np.zeros(shape, np.float32)
    image[2:21, 2:20, 2:17] = 1.0
    image[label == 1] = 2.0
    scan = write_scan(tmp_path / "scan.nii.gz", image)
    volume, geometry = read_volume(scan)
    config = make_config({"resample": True, "target_spacing": list(target_spacing)})
    segmentation = Predictor(config, None, oracle).segment(volume[..., None], geometry, True)
    written = write_segmentation(tmp_path / "out", "scan", segmentation, geometry)
    assert_same_grid(written, scan)
    restored = np.asarray(nib.load(str(written)).dataobj)
    # Down to 2 mm and back costs a rim of voxels, but a grid misaligned by even half a voxel
    # would move the centre of mass.
    assert dice(restored == 1, label == 1) > 0.85
    np.testing.assert_allclose(
        ndimage.center_of_mass(restored == 1), ndimage.center_of_mass(label == 1), atol=0.1
    )
    probabilities = nib.load(str(tmp_path / "out" / "scan_probabilities.nii.gz"))
    assert probabilities.shape == (*shape, NUM_CLASSES)
    assert probabilities.get_data_dtype() == np.float32
    np.testing.assert_array_equal(probabilities.affine, nib.load(str(scan)).affine)
    np.testing.assert_allclose(np.asarray(probabilities.dataobj).sum(-1), 1.0, atol=1e-5)


def test_keep_largest_component_removes_the_stray_blob(tmp_path: Path):
    image, label = phantom()
    image[14, 15, 2:4] = 2.0  # a stray two-voxel island of class 1, inside the body
    geometry = make_geometry(np.eye(4), SHAPE)
    for keep, expected_island in ((False, 1), (True, 0), ([1], 0), ([2], 1)):
        config = make_config(evaluation={"keep_largest_component": keep})
        labels = Predictor(config, None, oracle).segment(image[..., None], geometry).labels
        assert labels[14, 15, 2] == expected_island
        np.testing.assert_array_equal(labels[:12], label[:12])


# ---------------------------------------------------------------------------------------------
# Inputs: grouping by channel suffix
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("files", "channels", "cases", "problem"),
    [
        (
            ["a_0000.nii.gz", "a_0001.nii.gz", "b_0001.nii.gz", "b_0000.nii.gz"],
            2,
            {"a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b_0000.nii.gz", "b_0001.nii.gz"]},
            None,
        ),
        (["plain.nii.gz", "c_0000.nii"], 1, {"plain": ["plain.nii.gz"], "c": ["c_0000.nii"]}, None),
        (
            ["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"],
            2,
            {"b": ["b_0000.nii.gz", "b_0001.nii.gz"]},
            "missing ['a_0001']",
        ),
        (["a_0000.nii.gz", "a_0001.nii.gz"], 1, {}, "unexpected ['a_0001.nii.gz']"),
        (["a.nii.gz", "a_0000.nii.gz"], 1, {"a": ["a.nii.gz"]}, "also given by"),
        ([".a_0000.nii.gz.tmp", "readme.txt", "x_0000.nii.gz"], 1, {"x": ["x_0000.nii.gz"]}, None),
    ],
)
def test_collect_cases_groups_channel_files(
    tmp_path: Path, files: list[str], channels: int, cases: dict, problem: str | None
):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    found, problems = collect_cases([tmp_path], channels)
    assert {c.case_id: [p.name for p in c.images] for c in found} == cases
    assert all(c.label is None for c in found)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def test_collect_cases_reports_missing_and_foreign_inputs(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "scan.mha").write_bytes(b"")
    inputs = [tmp_path / "gone.nii.gz", tmp_path / "empty", tmp_path / "scan.mha"]
    found, problems = collect_cases(inputs, 1)
    assert found == []
    assert [p.split(": ")[1] for p in problems] == [
        "not found",
        "no .nii or .nii.gz files in this folder",
        "not a .nii or .nii.gz file",
    ]


# ---------------------------------------------------------------------------------------------
# The command, on a run directory in the trainer's layout
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_untrained_run(tmp_path_factory.mktemp("run") / "run")


def save_untrained_run(run: Path) -> Path:
    """An untrained 2-channel run saved with the trainer's own checkpoint code (latest + best);
    each call draws other initial weights."""
    config = make_config(num_channels=2)
    initialise_run_dir(run, config)
    fingerprint = DatasetFingerprint((1.0, 1.0, 1.0), SHAPE, 4)
    (run / "fingerprint.json").write_text(json.dumps(fingerprint.to_dict()))
    model = build_model(config)
    optimizer = build_optimizer(config)
    optimizer.build(model.trainable_variables)
    checkpoint = build_checkpoint(model, optimizer, TrainState.create())
    saver = Checkpoints(checkpoint, run / "checkpoints", run / "checkpoints", keep=2)
    saver.save(1)
    saver.save_best(1)
    (run / "export").mkdir()
    model.save(run / "export" / "model.keras")
    return run


def write_two_channel_case(folder: Path, case_id: str) -> Path:
    image, _ = phantom()
    write_scan(folder / f"{case_id}_0000.nii.gz", image)
    return write_scan(folder / f"{case_id}_0001.nii.gz", image * 2.0)


def test_unreadable_inputs_are_skipped_and_the_cli_exits_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    inputs = tmp_path / "in"
    good = write_two_channel_case(inputs, "good")
    write_two_channel_case(inputs, "truncated")
    whole = (inputs / "truncated_0001.nii.gz").read_bytes()
    (inputs / "truncated_0001.nii.gz").write_bytes(whole[: len(whole) // 2])
    (inputs / "lonely_0000.nii.gz").write_bytes(good.read_bytes())  # its _0001 is missing
    output = tmp_path / "out"
    status = predict_main(
        ["--run", str(run_dir), "--input", str(inputs), "--output", str(output), "--quiet"]
    )
    assert status == 2
    assert sorted(p.name for p in output.iterdir()) == ["good.nii.gz"]
    assert_same_grid(output / "good.nii.gz", good)
    errors = capsys.readouterr().err  # the CLI logs one line per skipped case to stderr
    assert "truncated_0001.nii.gz" in errors and "truncated or corrupt" in errors
    assert "lonely" in errors and "missing ['lonely_0001']" in errors


def test_an_rgb_scan_is_skipped_and_the_good_scan_beside_it_is_written(
    run_dir: Path, tmp_path: Path
):
    good = write_two_channel_case(tmp_path / "in", "good")
    rgb = np.zeros(SHAPE, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    photo = tmp_path / "in" / "photo.nii.gz"  # a whole case in one file
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), photo)
    failures = predict_files(run_dir, [tmp_path / "in"], tmp_path / "out", quiet=True)
    assert len(failures) == 1 and str(photo) in failures[0] and "RGB" in failures[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    assert_same_grid(tmp_path / "out" / "good.nii.gz", good)


@pytest.mark.parametrize("checkpoint", ["best", "latest", "export/model.keras", "checkpoints"])
def test_every_checkpoint_spec_predicts(run_dir: Path, tmp_path: Path, checkpoint: str):
    write_two_channel_case(tmp_path / "in", "case")
    failures = predict_files(
        run_dir,
        [tmp_path / "in"],
        tmp_path / "out",
        checkpoint,
        overrides=["evaluation.save_probabilities=true"],
        quiet=True,
    )
    assert failures == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case.nii.gz",
        "case_probabilities.nii.gz",
    ]


def test_a_4d_channels_last_file_is_one_case(run_dir: Path, tmp_path: Path):
    image, _ = phantom()
    scan = write_scan(tmp_path / "in" / "msd_case.nii.gz", np.stack([image, image * 2], -1))
    assert predict_files(run_dir, [scan], tmp_path / "out", quiet=True) == []
    written = tmp_path / "out" / "msd_case.nii.gz"
    assert nib.load(str(written)).ndim == 3
    assert_same_grid(written, scan)


@pytest.mark.parametrize(
    ("setup", "args", "error", "message"),
    [
        ("none", {"run_dir": "missing"}, RunDirError, "run directory not found"),
        ("none", {"checkpoint": "checkpoints/ckpt-99"}, RunDirError, "no checkpoint there"),
        ("none", {"overrides": ["model.segnet.filters=8"]}, ConfigError, "cannot change after"),
        ("none", {"overrides": ["evaluation.overlapp=0.2"]}, ConfigError, "did you mean 'overlap'"),
        ("none", {"overrides": ["evaluation.overlap=1.5"]}, ConfigError, "evaluation.overlap"),
        ("file", {"output_dir": "blocker"}, UserError, "is a file, not a folder"),
        ("file", {"output_dir": "blocker/sub"}, UserError, "cannot create the folder"),
    ],
)
def test_bad_setups_fail_before_any_work_with_one_message(
    run_dir: Path, tmp_path: Path, setup: str, args: dict, error: type, message: str
):
    if setup == "file":
        (tmp_path / "blocker").write_text("")
    kwargs = {
        "run_dir": run_dir,
        "output_dir": tmp_path / "out",
        "checkpoint": "best",
        "overrides": [],
    }
    kwargs.update(
        {k: tmp_path / v if k in ("run_dir", "output_dir") else v for k, v in args.items()}
    )
    kwargs["inputs"] = [write_two_channel_case(tmp_path / "in", "case").parent]
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        predict_files(**kwargs, quiet=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_without_checkpoints_says_train_first(tmp_path: Path):
    run = tmp_path / "run"
    initialise_run_dir(run, make_config())
    with pytest.raises(RunDirError, match=r"no checkpoint in .*checkpoints: train first"):
        predict_files(run, [tmp_path], tmp_path / "out", quiet=True)


# ---------------------------------------------------------------------------------------------
# Outputs never replace what the user had
# ---------------------------------------------------------------------------------------------
def _fingerprints(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_scan_nii_beside_scan_nii_gz_is_never_overwritten(run_dir: Path, tmp_path: Path):
    # The input folder is also the output: scan.nii.gz is the prediction's own name.
    folder = tmp_path / "in"
    write_two_channel_case(folder, "other")
    image, _ = phantom()
    write_scan(folder / "scan.nii", np.stack([image, image], -1))
    write_scan(folder / "scan.nii.gz", np.stack([image, image * 3], -1))
    before = _fingerprints(folder)
    with pytest.raises(UserError) as caught:
        predict_files(run_dir, [folder], folder, quiet=True)
    assert str(folder / "scan.nii.gz") in str(caught.value)
    assert _fingerprints(folder) == before  # not even the other cases were written


def test_a_users_file_under_an_output_name_is_refused(run_dir: Path, tmp_path: Path):
    write_two_channel_case(tmp_path / "in", "case")
    output = tmp_path / "out"
    image, _ = phantom()
    write_scan(output / "case.nii.gz", image)  # the user's own segmentation, same name
    before = _fingerprints(output)
    with pytest.raises(UserError, match="not written by segnet"):
        predict_files(run_dir, [tmp_path / "in"], output, quiet=True)
    assert _fingerprints(output) == before


def test_segnets_own_earlier_predictions_are_replaced(run_dir: Path, tmp_path: Path):
    write_two_channel_case(tmp_path / "in", "case")
    output = tmp_path / "out"
    assert predict_files(run_dir, [tmp_path / "in"], output, quiet=True) == []
    header = nib.load(str(output / "case.nii.gz")).header
    assert header["descrip"].item().startswith(b"segnet")
    assert predict_files(run_dir, [tmp_path / "in"], output, "latest", quiet=True) == []


# ---------------------------------------------------------------------------------------------
# Ensembles: several runs average their softmax
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_untrained_run(tmp_path_factory.mktemp("other") / "other")


def predicted_probabilities(runs: Path | list[Path], inputs: Path, output: Path) -> np.ndarray:
    overrides = ["evaluation.save_probabilities=true"]
    assert predict_files(runs, [inputs], output, overrides=overrides, quiet=True) == []
    return np.asarray(nib.load(str(output / "case_probabilities.nii.gz")).dataobj)


def edit_stored(run: Path, **changes: object) -> None:
    """Sets dotted keys (``section__key``) in a run's config.yaml."""
    stored = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        stored[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(stored))


def test_an_ensemble_of_a_run_and_its_copy_predicts_exactly_as_the_run(
    run_dir: Path, tmp_path: Path
):
    inputs = write_two_channel_case(tmp_path / "in", "case").parent
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    single = predicted_probabilities(run_dir, inputs, tmp_path / "single")
    ensemble = predicted_probabilities([run_dir, copy], inputs, tmp_path / "ensemble")
    np.testing.assert_array_equal(ensemble, single)
    labels = [
        nib.load(str(p / "case.nii.gz")) for p in (tmp_path / "single", tmp_path / "ensemble")
    ]
    np.testing.assert_array_equal(labels[1].dataobj, labels[0].dataobj)


def test_an_ensemble_averages_the_runs_softmax_on_the_scans_grid(
    run_dir: Path, other_run_dir: Path, tmp_path: Path
):
    scan = write_two_channel_case(tmp_path / "in", "case")
    first = predicted_probabilities(run_dir, scan.parent, tmp_path / "first")
    second = predicted_probabilities(other_run_dir, scan.parent, tmp_path / "second")
    output = tmp_path / "ensemble"
    ensemble = predicted_probabilities([run_dir, other_run_dir], scan.parent, output)
    assert np.abs(first - second).max() > 1e-3  # two models that do disagree
    np.testing.assert_allclose(ensemble, (first + second) / 2, rtol=1e-5, atol=1e-6)
    for written in (output / "case.nii.gz", output / "case_probabilities.nii.gz"):
        assert_same_grid(written, scan)
        assert nib.load(str(written)).header["descrip"].item() == b"segnet prediction"
    labels = np.asarray(nib.load(str(output / "case.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, np.argmax(ensemble, axis=-1))


def _differ_in_config(run: Path, other: Path) -> str:
    edit_stored(other, data__num_classes=4)
    return "data.num_classes"


def _differ_in_preprocessing(run: Path, other: Path) -> str:
    edit_stored(other, preprocessing__normalization="zscore")
    return "preprocessing.normalization"


def _differ_in_fingerprint(run: Path, other: Path) -> str:
    for each in (run, other):  # resampling to the fingerprint's median spacing
        edit_stored(each, preprocessing__resample=True)
    fingerprint = json.loads((other / "fingerprint.json").read_text())
    (other / "fingerprint.json").write_text(json.dumps({**fingerprint, "spacing": [1, 1, 2]}))
    return "fingerprint.json spacing"


@pytest.mark.parametrize(
    "differ", [_differ_in_config, _differ_in_preprocessing, _differ_in_fingerprint]
)
def test_runs_that_disagree_on_input_or_output_are_refused_naming_the_key(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, differ
):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    key = differ(run, other)
    inputs = write_two_channel_case(tmp_path / "in", "case").parent
    output = tmp_path / "out"
    argv = ["--run", str(run), str(other), "--input", str(inputs), "--output", str(output)]
    assert predict_main([*argv, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert key in error and str(other) in error and "Traceback" not in error
    assert not output.exists()


def test_a_folder_of_runs_stands_for_the_runs_inside(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    parent = tmp_path / "cv"
    for fold in ("fold_2", "fold_1"):
        shutil.copytree(run_dir, parent / fold)
    (parent / "notes").mkdir()  # neither a run nor a file: not a member
    (parent / "README.txt").write_text("five folds")
    assert loading.expand_runs([parent]) == [parent / "fold_1", parent / "fold_2"]
    assert loading.expand_runs([parent / "fold_2", run_dir]) == [parent / "fold_2", run_dir]
    with pytest.raises(RunDirError, match="given twice"):
        loading.expand_runs([parent, parent / "fold_1"])
    inputs = write_two_channel_case(tmp_path / "in", "case").parent
    argv = ["--run", str(parent), "--input", str(inputs), "--output", str(tmp_path / "out")]
    assert predict_main(argv) == 0
    checkpoints = [line for line in capsys.readouterr().err.splitlines() if "wrote 1 of 1" in line]
    assert len(checkpoints) == 1 and "fold_1" in checkpoints[0] and "fold_2" in checkpoints[0]


# ---------------------------------------------------------------------------------------------
# Inference precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint", ["latest", "export/model.keras"])
def test_a_bfloat16_model_computes_in_bfloat16_and_answers_in_float32(
    run_dir: Path, checkpoint: str
):
    config = loading.load_run_config(run_dir)
    ref = loading.resolve_checkpoints(run_dir, checkpoint)[0]
    exact = loading.load_model(config, ref)
    fast = loading.load_model(config, ref, "mixed_bfloat16")
    convolutions = [layer for layer in fast.layers if isinstance(layer, keras.layers.Conv3D)]
    # A convolution reading at most 3 channels computes in float32, where oneDNN is the faster
    # (blocks.py; in this small net that is all of them: the image's 2 channels, 2 filters);
    # the rest of the layers compute in bfloat16 (tests/models/test_first_convolution.py).
    assert convolutions
    for layer in convolutions[:-1]:
        few = layer.input.shape[-1] <= blocks.FLOAT32_MAX_INPUT_CHANNELS
        assert layer.compute_dtype == ("float32" if few else "bfloat16"), layer.name
    assert {layer.compute_dtype for layer in fast.layers if layer.name.endswith("norm0")} == {
        "bfloat16"
    }
    for mine, theirs in zip(fast.weights, exact.weights, strict=True):  # the same float32 weights
        assert mine.dtype == "float32"
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    batch = tf.random.stateless_normal((1, *SHAPE, 2), seed=(1, 2))
    logits = fast(batch, training=False)
    assert logits.dtype == tf.float32  # the head: softmax and blending stay float32
    error = np.abs(logits.numpy() - exact(batch, training=False).numpy())
    # This run is a SegNet: where bfloat16 rounding turns a near-tie in a pooling window into
    # another argmax, the unpooled value moves, so only the typical voxel is close.
    assert 0 < np.median(error) < 0.01 * np.abs(logits.numpy()).max()


def test_a_bfloat16_unet_stays_within_bfloat16_rounding_of_float32():
    config = build_config(
        {
            "data": {"num_classes": NUM_CLASSES, "patch_size": [16, 16, 16]},
            "model": {"name": "unet3d", "unet3d": {"depth": 2, "filters": 8}},
        }
    )
    keras.utils.set_random_seed(0)
    exact = build_model(config)
    with precision_policy("mixed_bfloat16"):
        fast = build_model(config)
    fast.set_weights(exact.get_weights())
    batch = tf.random.stateless_normal((2, 16, 16, 16, 1), seed=(3, 4))
    reference = exact(batch, training=False).numpy()
    error = np.abs(fast(batch, training=False).numpy() - reference)
    scale = np.abs(reference).max()
    # 8 bits of mantissa: about 0.4 % per rounding, through 12 layers and two normalisations.
    # The typical voxel and the 99th percentile are bounded, not the worst one: where the CPU
    # has no bfloat16 units, TensorFlow's emulated kernels round more often than oneDNN's, and
    # on an AVX2 EPYC a few voxels of 24,576 drifted 8-10 % (with these seeded weights: median
    # 0.58 %, 99th pct. 3.7 %).
    assert 0 < np.median(error) < 0.01 * scale
    assert np.percentile(error, 99) < 0.06 * scale


def test_bfloat16_and_float32_predictions_of_a_run_agree_on_the_scans_grid(
    run_dir: Path, tmp_path: Path
):
    inputs = write_two_channel_case(tmp_path / "in", "case").parent
    probabilities, labels = {}, {}
    for precision in ("float32", "bfloat16"):
        overrides = ["evaluation.save_probabilities=true", f"evaluation.precision={precision}"]
        output = tmp_path / precision
        assert predict_files(run_dir, [inputs], output, overrides=overrides, quiet=True) == []
        written = output / "case_probabilities.nii.gz"
        probabilities[precision] = np.asarray(nib.load(str(written)).dataobj)
        labels[precision] = np.asarray(nib.load(str(output / "case.nii.gz")).dataobj)
        assert_same_grid(output / "case.nii.gz", inputs / "case_0000.nii.gz")
    np.testing.assert_allclose(probabilities["bfloat16"].sum(axis=-1), 1.0, atol=1e-5)
    difference = np.abs(probabilities["bfloat16"] - probabilities["float32"])
    assert difference.max() > 0 and np.median(difference) < 0.01
    assert np.mean(labels["bfloat16"] == labels["float32"]) > 0.95


def test_an_export_from_before_the_fused_batch_norm_still_loads(tmp_path: Path, monkeypatch):
    # SegNet's batch norm became segnet's own class on 2026-11-30; a .keras file keys weights by
    # class name, so an export from before names keras.layers.BatchNormalization.
    from segnet.models import blocks

    config = build_config({"model": {"segnet": {"depth": 2, "filters": 4}}})  # norm: batch
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "FUSES_RELU", ())  # and its ReLU was a layer of its own
        patch.setattr(
            blocks, "FusedBatchNormalization", without_relu(keras.layers.BatchNormalization)
        )
        old = build_model(config)
    for variable in old.weights:
        variable.assign(
            tf.random.stateless_uniform(variable.shape, (1, len(variable.path)), 0.5, 2)
        )
    path = tmp_path / "model.keras"
    old.save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError):  # what Keras alone makes of it today
        keras.saving.load_model(path, compile=False)
    model = loading._load_keras_file(config, str(path))
    assert any(isinstance(layer, blocks.FusedBatchNormalization) for layer in model.layers)
    x = tf.random.stateless_normal((1, 16, 16, 16, 1), seed=(3, 4))
    np.testing.assert_allclose(model(x), old(x), rtol=1e-4, atol=1e-4)
    assert path.read_bytes() == before  # the user's file is read, never rewritten

    path.write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(RunDirError, match="cannot load the Keras model"):
        loading._load_keras_file(config, str(path))
