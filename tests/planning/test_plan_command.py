"""``segnet-plan`` end to end on tiny datasets: the plan is an ordinary config, and bad input
gets one message and exit status 2. The step timer is replaced (``fake_timer``) except in the
one test that times a real step of a tiny network."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
from pathlib import Path

import numpy as np
import pytest
import yaml

from segnet import __version__
from segnet.cli import plan_main, train_main
from segnet.config import ExperimentConfig, build_config, load_config
from segnet.data.synthetic import SyntheticSpec, write_synthetic_dataset
from segnet.data.volumes import make_geometry, write_volume
from segnet.planning import rules, timing
from segnet.planning.rules import Hardware
from segnet.planning.timing import StepTiming
from segnet.planning.writer import MARK

CPU = Hardware(gpu=False, name="a test CPU (2 cores)")


class FakeTimer:
    """Stands in for ``timing.time_training_steps``: a step of a network with ``f`` first-level
    filters takes ``seconds[f]`` (50 ms if unset); ``timed`` holds the configs timed."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.timed: list[ExperimentConfig] = []

    def __call__(self, config: ExperimentConfig) -> StepTiming:
        self.timed.append(config)
        seconds = self.seconds.get(config.model.selected.filters, 0.05)  # type: ignore[union-attr]
        return StepTiming(seconds, 3, "float32", "a test", CPU.name)


@pytest.fixture
def fake_timer(monkeypatch: pytest.MonkeyPatch) -> FakeTimer:
    timer = FakeTimer()
    monkeypatch.setattr(timing, "time_training_steps", timer)
    monkeypatch.setattr(timing, "detect_hardware", lambda: CPU)
    return timer


def plan(*args: str | Path) -> int:
    return plan_main([str(a) for a in args])


def test_a_plan_is_an_ordinary_config(tiny_dataset: Path, tmp_path: Path, fake_timer, capsys):
    out = tmp_path / "configs" / "tiny.yaml"
    assert plan(tiny_dataset, "--out", out, "--budget", "10m") == 0
    printed = capsys.readouterr().out
    assert "measured 50 ms per training step" in printed and "a test CPU" in printed
    assert "data.patch_size = [" in printed  # every choice printed with its reason
    text = out.read_text()
    first = text.splitlines()[0]
    assert MARK in first and f"segnet {__version__}" in first
    assert f"python scripts/train.py --config {out}" in text
    assert "#   class 1 (" in text  # the fingerprint's summary
    config = load_config(out)  # the strict checks
    assert config.data.root == str(tiny_dataset) and config.data.num_classes == 4
    assert config.runtime.precision == "auto"
    assert config.train.epochs * config.train.steps_per_epoch <= 10 * 60 / 0.05
    printed_config = print_config(out, capsys, "--set", "train.epochs=1")
    assert printed_config["train"]["epochs"] == 1
    assert printed_config["model"]["unet3d"]["pool_sizes"] == [
        list(p) for p in config.model.unet3d.level_pools
    ]


def print_config(path: Path, capsys, *extra: str) -> dict:
    assert train_main(["--config", str(path), "--print-config", *extra]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_an_anisotropic_dataset_keeps_its_thick_axis_unpooled(tmp_path: Path, fake_timer):
    spec = SyntheticSpec(num_cases=4, shape=(48, 48, 48), num_folds=2, anisotropic=True)
    root = write_synthetic_dataset(tmp_path / "aniso", spec)
    out = tmp_path / "aniso.yaml"
    assert plan(root, "--out", out) == 0
    config = load_config(out)
    unet = config.model.unet3d
    assert unet.level_pools[0] == (2, 2, 1) and unet.level_kernels[0] == (3, 3, 1)
    assert config.augmentation.coarse_axis is None  # 2.5x: within nnU-Net's ratio of 3


def test_segnet_plans_argmax_pools_per_axis(tiny_dataset: Path, tmp_path: Path, fake_timer):
    out = tmp_path / "segnet.yaml"
    assert plan(tiny_dataset, "--out", out, "--model", "segnet") == 0
    config = load_config(out)
    assert config.model.name == "segnet" and config.model.segnet.pool_sizes is not None
    assert len(config.model.segnet.pool_sizes) == config.model.segnet.depth


def test_few_affordable_steps_fall_back_to_the_smallest_network(
    tiny_dataset: Path, tmp_path: Path, fake_timer
):
    fake_timer.seconds = {16: 10.0, 8: 0.2}  # the full network, the smallest
    out = tmp_path / "small.yaml"
    assert plan(tiny_dataset, "--out", out, "--budget", "60m") == 0
    config = load_config(out)
    assert config.model.unet3d.filters == rules.SMALLEST_FILTERS
    assert "the smallest network" in out.read_text()
    assert fake_timer.timed[-1].model.unet3d.filters == rules.SMALLEST_FILTERS


def test_a_budget_too_small_for_one_epoch_is_refused(
    tiny_dataset: Path, tmp_path: Path, fake_timer, capsys
):
    fake_timer.seconds = {16: 2.0, 8: 1.0}
    out = tmp_path / "never.yaml"
    assert plan(tiny_dataset, "--out", out, "--budget", "30s") == 2
    error = capsys.readouterr().err
    assert "--budget" in error and "smallest network" in error and "Traceback" not in error
    assert not out.exists()


def test_an_empty_folder_is_refused(tmp_path: Path, fake_timer, capsys):
    (tmp_path / "empty").mkdir()
    assert plan(tmp_path / "empty", "--out", tmp_path / "x.yaml") == 2
    error = capsys.readouterr().err
    assert "imagesTr" in error and "Traceback" not in error
    assert not fake_timer.timed and not (tmp_path / "x.yaml").exists()


def test_a_missing_folder_is_refused(tmp_path: Path, capsys):
    assert plan(tmp_path / "nowhere") == 2
    assert "nowhere" in capsys.readouterr().err


def write_case(root: Path, case: str, channels: int) -> None:
    geometry = make_geometry(np.eye(4), (12, 12, 12))
    rng = np.random.default_rng(len(case))
    for c in range(channels):
        image = rng.normal(size=(12, 12, 12)).astype(np.float32)
        write_volume(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image, geometry)
    label = np.zeros((12, 12, 12), np.uint8)
    label[3:8, 3:8, 3:8] = 1
    write_volume(root / "labelsTr" / f"{case}.nii.gz", label, geometry)


def test_cases_that_disagree_on_their_channels_are_refused(tmp_path: Path, fake_timer, capsys):
    root = tmp_path / "mixed"
    write_case(root, "two", channels=2)
    write_case(root, "one", channels=1)
    assert plan(root, "--out", tmp_path / "x.yaml") == 2
    error = capsys.readouterr().err
    assert "'one'" in error and "one_0001" in error and "Traceback" not in error


def test_a_folders_dataset_takes_its_classes_from_the_labels(tmp_path: Path, fake_timer):
    root = tmp_path / "folders"
    for case in ("a", "b", "c"):
        write_case(root, case, channels=2)
    out = tmp_path / "folders.yaml"
    assert plan(root, "--out", out) == 0
    config = load_config(out)
    assert (config.data.num_channels, config.data.num_classes) == (2, 2)
    assert config.data.split.num_folds == 5  # no folds file: the seeded shuffle


def test_a_file_segnet_plan_did_not_write_is_not_overwritten(
    tiny_dataset: Path, tmp_path: Path, fake_timer, capsys
):
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my own experiment\nname: mine\n")
    assert plan(tiny_dataset, "--out", mine) == 2
    assert "--out" in capsys.readouterr().err
    assert mine.read_text() == "# my own experiment\nname: mine\n"
    planned = tmp_path / "planned.yaml"
    assert plan(tiny_dataset, "--out", planned) == 0
    assert plan(tiny_dataset, "--out", planned, "--budget", "20m") == 0  # a plan is replaced


def test_a_bad_budget_is_refused(tiny_dataset: Path, tmp_path: Path, capsys):
    assert plan(tiny_dataset, "--budget", "soon") == 2
    assert "--budget" in capsys.readouterr().err


def test_timing_runs_real_steps_of_the_network():
    config = build_config(
        {
            "data": {"num_classes": 2, "patch_size": [8, 8, 8]},
            "model": {"name": "unet3d", "unet3d": {"depth": 1, "filters": 2}},
            "train": {"batch_size": 1},
            "runtime": {"precision": "auto"},
        }
    )
    measured = timing.time_training_steps(config, steps=1, warmup=1)
    assert measured.seconds > 0 and measured.steps == 1
    assert measured.precision in ("float32", "mixed_bfloat16", "mixed_float16")
    assert measured.device
