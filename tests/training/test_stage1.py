"""Stage-wise cascade training: a 'high' run takes stage 1 from a finished 'low' run."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import experiment, write_yaml

from segnet.cli import train_main
from segnet.config import build_config
from segnet.errors import UserError
from segnet.inference import loading
from segnet.training.trainer import TrainResult, train

STAGE = {"depth": 2, "filters": 4}


def _cascade(root: Path, tmp: Path, low: dict[str, Any] | None = None, **cascade: Any) -> dict:
    model = {
        "name": "unet3d_cascade",
        "unet3d_cascade": {"low": low or STAGE, "high": STAGE, **cascade},
    }
    return experiment(root, tmp / "cache", model=model, train={"epochs": 1})


def _stage1_weights(run_dir: Path) -> list[np.ndarray]:
    config = loading.load_run_config(run_dir)
    (ref,) = loading.resolve_checkpoints(run_dir, "latest")
    return loading.load_model(config, ref).get_layer("stage1").get_weights()


@pytest.fixture(scope="module")
def low_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    tmp = tmp_path_factory.mktemp("low")
    config = build_config(_cascade(tiny_root, tmp, train_stage="low"))
    return train(config, run_dir=tmp / "low", quiet=True)


def test_a_high_run_starts_from_the_low_runs_stage1_and_keeps_it_frozen(
    low_run: TrainResult, tiny_root: Path, tmp_path: Path
) -> None:
    data = _cascade(tiny_root, tmp_path, train_stage="high", stage1_from=str(low_run.run_dir))
    high = train(build_config(data), run_dir=tmp_path / "high", quiet=True)
    assert high.step == 3
    low_weights, high_weights = _stage1_weights(low_run.run_dir), _stage1_weights(high.run_dir)
    assert len(low_weights) == len(high_weights) > 0
    for ours, theirs in zip(high_weights, low_weights, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert "stage 1 weights from" in (high.run_dir / "train.log").read_text()


def test_a_joint_run_is_warm_started_then_trains_stage1(
    low_run: TrainResult, tiny_root: Path, tmp_path: Path
) -> None:
    data = _cascade(tiny_root, tmp_path, train_stage="joint", stage1_from=str(low_run.run_dir))
    joint = train(build_config(data), run_dir=tmp_path / "joint", quiet=True)
    log = (joint.run_dir / "train.log").read_text()
    assert f"stage 1 weights from {low_run.run_dir}" in log
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            _stage1_weights(joint.run_dir), _stage1_weights(low_run.run_dir), strict=True
        )
    ]
    assert any(changed)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"low": {"depth": 2, "filters": 8}}, "model.unet3d_cascade.low is"),
        ({"downsample": 4}, "model.unet3d_cascade.downsample is 2 there but 4 here"),
    ],
)
def test_a_stage1_that_does_not_fit_is_refused_before_anything_is_written(
    low_run: TrainResult, tiny_root: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    data = _cascade(tiny_root, tmp_path, train_stage="high", stage1_from=str(low_run.run_dir))
    data["model"]["unet3d_cascade"].update(change)
    with pytest.raises(UserError, match=r"model\.unet3d_cascade\.stage1_from") as caught:
        train(build_config(data), run_dir=tmp_path / "high", quiet=True)
    assert expected in str(caught.value)
    assert not (tmp_path / "high").exists()


def test_the_cli_names_the_key_and_exits_2(
    low_run: TrainResult, tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "missing": (str(tmp_path / "nowhere"), "is not a directory"),
        "not-a-run": (str(tmp_path), "is not a segnet run directory"),
    }
    for name, (source, expected) in cases.items():
        data = _cascade(tiny_root, tmp_path, train_stage="high", stage1_from=source)
        config = write_yaml(tmp_path / f"{name}.yaml", data)
        status = train_main(["--config", str(config), "--run-dir", str(tmp_path / name), "--quiet"])
        err = capsys.readouterr().err
        assert status == 2, err
        assert f"model.unet3d_cascade.stage1_from: {source}" in err and expected in err, err
        assert "Traceback" not in err


def test_a_non_low_run_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    train(
        build_config(experiment(tiny_root, tmp_path / "cache", train={"epochs": 1})),
        plain,
        quiet=True,
    )
    data = _cascade(tiny_root, tmp_path, train_stage="high", stage1_from=str(plain))
    with pytest.raises(UserError, match="trained a unet3d model; stage 1 comes from"):
        train(build_config(data), run_dir=tmp_path / "high", quiet=True)
