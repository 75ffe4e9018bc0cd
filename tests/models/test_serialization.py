"""Every architecture round-trips through get_config/from_config and through a .keras file.

The .keras files are loaded by a fresh Python process that imports ``segnet.models`` (which
registers the classes) and calls ``keras.saving.load_model`` without ``custom_objects``.
"""

from __future__ import annotations

import segnet

# isort: split
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from segnet.models.segnet import SegNet
from segnet.models.unet3d import UNet3D
from segnet.models.unet3d_cascade import UNet3DCascade

REPO = Path(segnet.__file__).resolve().parents[1]
TINY = {"depth": 2, "filters": 4}

# (id, constructor): one row per architecture and per option that changes the graph's shape.
MODELS: list[tuple[str, Callable[[], keras.Model]]] = [
    ("unet3d", lambda: UNet3D(2, 3, **TINY, norm="group", groups=2)),
    (
        "unet3d_low_ds",
        lambda: UNet3D(1, 3, **TINY, input_downsample=2, loss_at="low", deep_supervision=True),
    ),
    ("unet3d_learned", lambda: UNet3D(1, 2, **TINY, input_downsample=4, output_upsample="learned")),
    ("cascade_high", lambda: UNet3DCascade(1, 3, 2, low=TINY, high=TINY, train_stage="high")),
    ("cascade_low", lambda: UNet3DCascade(1, 3, 4, low=TINY, high=TINY, train_stage="low")),
    (
        "unet3d_per_axis",
        lambda: UNet3D(
            1,
            3,
            **TINY,
            pool_sizes=[[1, 2, 2], [2, 2, 2]],
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            input_downsample=[1, 2, 2],
            deep_supervision=True,
        ),
    ),
    ("segnet3d", lambda: SegNet(1, 3, **TINY)),
    ("segnet3d_per_axis", lambda: SegNet(1, 3, **TINY, pool_sizes=[[1, 2, 2], [2, 1, 2]])),
    ("segnet2d", lambda: SegNet(2, 3, spatial_dims=2, **TINY, norm="instance", dropout=0.1)),
]
ROW = pytest.mark.parametrize("make", [m[1] for m in MODELS], ids=[m[0] for m in MODELS])


def odd_input(model: keras.Model, seed: int = 0) -> np.ndarray:
    spatial = (17, 18, 19)[: len(model.input_shape) - 2]
    shape = (2, *spatial, model.input_shape[-1])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(model(x))]


@ROW
def test_config_round_trip_rebuilds_the_same_model(make: Callable[[], keras.Model]) -> None:
    model = make()
    config = json.loads(json.dumps(model.get_config()))  # what a .keras file stores
    clone = type(model).from_config(config)
    assert clone.get_config() == model.get_config()
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    assert len(clone.trainable_weights) == len(model.trainable_weights)
    clone.set_weights(model.get_weights())
    x = odd_input(model)
    for expected, actual in zip(outputs(model, x), outputs(clone, x)):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import segnet.models  # registers the segnet layers and models
    import keras

    report = {}
    for name in sys.argv[2:]:
        model = keras.saving.load_model(f"{sys.argv[1]}/{name}.keras")
        x = np.load(f"{sys.argv[1]}/{name}.x.npy")
        expected = np.load(f"{sys.argv[1]}/{name}.y.npz")
        got = [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(model(x))]
        report[name] = {
            "class": type(model).__name__,
            "max_error": max(float(np.abs(g - e).max()) for g, e in zip(got, expected.values())),
            "trainable_weights": len(model.trainable_weights),
        }
    print(json.dumps(report))
    """
)


def test_keras_files_load_in_a_fresh_process_without_custom_objects(tmp_path: Path) -> None:
    expected = {}
    for name, make in MODELS:
        model = make()
        x = odd_input(model, seed=1)
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}.x.npy", x)
        np.savez(tmp_path / f"{name}.y.npz", *outputs(model, x))
        expected[name] = {
            "class": type(model).__name__,
            "trainable_weights": len(model.trainable_weights),
        }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path), *expected],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, facts in expected.items():
        assert {k: report[name][k] for k in facts} == facts, name
        assert report[name]["max_error"] < 1e-5, name
