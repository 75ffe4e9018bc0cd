"""Tests for segnet.training.distribute, and training under MirroredStrategy and multi-worker.

The distributed runs happen in subprocesses: logical CPU devices and collective ops can only
be configured before TensorFlow's runtime starts.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import child_env, experiment

from segnet.config import build_config
from segnet.errors import ConfigError
from segnet.training.distribute import (
    WriteDir,
    build_strategy,
    per_replica_batch,
    synchronize_batchnorm,
)


@pytest.mark.parametrize(("batch", "replicas", "expected"), [(4, 2, 2), (2, 1, 2), (8, 8, 1)])
def test_per_replica_batch(batch: int, replicas: int, expected: int) -> None:
    config = build_config({"train": {"batch_size": batch}})
    assert per_replica_batch(config, replicas) == expected


def test_batch_that_does_not_divide_suggests_sizes() -> None:
    config = build_config({"train": {"batch_size": 3}})
    with pytest.raises(ConfigError, match=r"train\.batch_size: 3 .* 2 replicas .* use 2 or 4"):
        per_replica_batch(config, 2)


@pytest.mark.parametrize("strategy", ["auto", "default"])
def test_single_device_strategies_on_a_cpu(strategy: str) -> None:
    cluster = build_strategy(build_config({"runtime": {"strategy": strategy}}))
    assert cluster.replicas == 1 and cluster.is_chief and cluster.worker_index == 0


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not valid"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"index": 3}}', "task index 3"),
    ],
)
def test_multi_worker_needs_a_valid_tf_config(
    monkeypatch: pytest.MonkeyPatch, tf_config: str | None, message: str
) -> None:
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=message):
        build_strategy(build_config({"runtime": {"strategy": "multi_worker"}}))


@pytest.mark.parametrize("is_chief", [True, False])
def test_write_dir(tmp_path: Path, is_chief: bool) -> None:
    real = tmp_path / "run"
    with WriteDir(real, is_chief, worker_index=1) as write_dir:
        path = write_dir.path
        path.mkdir(parents=True)
    assert (path == real) == is_chief
    assert path.exists() == is_chief  # the non-chief's temporary copy is removed


def test_synchronize_batchnorm_reaches_nested_models() -> None:
    image = keras.Input((8, 8, 8, 1))
    inner = keras.Sequential([keras.layers.Conv3D(2, 3), keras.layers.BatchNormalization()])
    x = keras.layers.BatchNormalization()(inner(image))
    model = keras.Model(image, keras.layers.GroupNormalization(groups=2)(x))
    assert synchronize_batchnorm(model) == 2
    assert all(layer.synchronized for layer in [inner.layers[1], model.layers[2]])


# --- Distributed training (subprocesses) --------------------------------------------------

_MIRRORED = """
import json, sys
import segnet
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from pathlib import Path
from segnet.config import build_config
from segnet.training.trainer import train
data, out = json.loads(sys.argv[1]), Path(sys.argv[2])
weights = {}
for strategy in ("default", "mirrored"):
    config = build_config(data, [f"runtime.strategy={strategy}"])
    result = train(config, run_dir=out / strategy, quiet=True)
    weights[strategy] = result.model.get_weights()
    assert result.step == 4, result.step
diffs = [float(np.max(np.abs(a - b))) for a, b in zip(weights["default"], weights["mirrored"])]
print(json.dumps({"max_diff": max(diffs), "n": len(diffs)}))
"""


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device(tiny_root: Path, tmp_path: Path) -> None:
    # Global batch 4 = 2 per replica. SegNet with synchronised batch norm, per-sample Dice and
    # the per-voxel cross-entropy make the replicas' means the global batch's means, so only the
    # order of summation differs from one device.
    data = experiment(
        tiny_root,
        tmp_path / "cache",
        model={"name": "segnet", "segnet": {"filters": 4, "depth": 2, "norm": "batch"}},
        train={"epochs": 1, "steps_per_epoch": 4, "batch_size": 4},
        runtime={"sync_batchnorm": True},
    )
    script = tmp_path / "mirrored.py"
    script.write_text(textwrap.dedent(_MIRRORED))
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] > 4 and result["max_diff"] < 1e-5
    assert (tmp_path / "mirrored" / "export" / "saved_model").is_dir()


_WORKER = """
import json, sys
import segnet
import numpy as np
from pathlib import Path
from segnet.config import build_config
from segnet.training.trainer import train
config = build_config(json.loads(sys.argv[1]), ["runtime.strategy=multi_worker"])
result = train(config, run_dir=Path(sys.argv[2]), quiet=True)
np.savez(sys.argv[3], *result.model.get_weights())
"""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tiny_root: Path, tmp_path: Path) -> None:
    data = experiment(
        tiny_root,
        tmp_path / "cache",
        train={"epochs": 1, "steps_per_epoch": 3, "batch_size": 4, "val_every": 0},
    )
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    run_dir = tmp_path / "run"
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    json.dumps(data),
                    str(run_dir),
                    f"{tmp_path}/w{index}",
                ],
                env=child_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:  # never leave a worker waiting on a collective
            p.kill()
    # Every worker's own log, not only the first failing one's: when one worker dies, the
    # other reports only that its peer stopped sending heartbeats, and the cause is in the
    # dead worker's output (or its return code, for a signal).
    failures = [
        f"worker {index} exited with {p.returncode}:\n{output[-3000:]}"
        for index, (p, output) in enumerate(zip(processes, outputs))
        if p.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)
    chief, other = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert chief.files and all(np.array_equal(chief[k], other[k]) for k in chief.files)
    # Only the chief wrote the run directory.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-3.index"
    ]
    assert (run_dir / "export" / "model.keras").is_file()
