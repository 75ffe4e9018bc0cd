"""Distribution strategies: one device, several GPUs (or CPUs) in one process, several workers.

``runtime.strategy``:

* ``auto``: ``MirroredStrategy`` when more than one GPU is visible, else the default strategy.
* ``default``: one device, no replication.
* ``mirrored``: one process, a replica per GPU; on a machine without GPUs, a replica per
  logical CPU device (useful only to test the distributed code path).
* ``multi_worker``: ``MultiWorkerMirroredStrategy``; the cluster comes from ``TF_CONFIG``
  (``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}``).
  Every worker runs the same command; worker 0 (the chief) writes the run directory, the
  others write their checkpoints to a temporary directory that is deleted afterwards, as
  TensorFlow requires every worker to take part in a save.

``train.batch_size`` is the global batch: each replica gets ``batch_size / replicas`` samples,
so the batch size must divide by the number of replicas.

``runtime.sync_batchnorm``: BatchNormalization normalises with the statistics of the replica's
share of the batch, a noisy estimate when that share is one or two patches. Synchronised, it
all-reduces the sums and so uses the global batch, as a single device would.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from segnet.config import ExperimentConfig
from segnet.errors import ConfigError


@dataclass(frozen=True)
class Cluster:
    """Where this process stands in the run.

    Attributes:
        strategy: the distribution strategy.
        replicas: replicas in sync over all workers.
        is_chief: whether this process writes the run directory.
        worker_index: this worker's index (0 in a single process).
    """

    strategy: tf.distribute.Strategy
    replicas: int
    is_chief: bool
    worker_index: int

    @property
    def description(self) -> str:
        """How the work is spread, in plain words (no class names)."""
        replicas = f"{self.replicas} replica{'s' if self.replicas > 1 else ''}"
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            workers = self.strategy.cluster_resolver.cluster_spec().num_tasks("worker")
            return f"{replicas} on {workers} machines, gradients summed across all of them"
        if isinstance(self.strategy, tf.distribute.MirroredStrategy):
            return f"{replicas} on this machine, one per device, gradients summed across them"
        return f"{replicas}, one device, no distribution"


def build_strategy(config: ExperimentConfig) -> Cluster:
    """The strategy named by ``runtime.strategy`` and this process's role in it.

    Raises:
        ConfigError: ``multi_worker`` without a usable ``TF_CONFIG``, or a global batch size
            that does not divide by the number of replicas.
    """
    choice = config.runtime.strategy
    if choice == "multi_worker":
        # Before anything else touches TensorFlow's runtime: collective ops are configured
        # once, when the runtime starts (listing devices would start it).
        cluster = _multi_worker()
        per_replica_batch(config, cluster.replicas)
        return cluster
    gpus = tf.config.list_logical_devices("GPU")
    if choice == "mirrored" or (choice == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        cluster = Cluster(tf.distribute.MirroredStrategy(devices), len(devices), True, 0)
    else:
        cluster = Cluster(tf.distribute.get_strategy(), 1, True, 0)
    per_replica_batch(config, cluster.replicas)
    return cluster


def per_replica_batch(config: ExperimentConfig, replicas: int) -> int:
    """``train.batch_size / replicas``; ConfigError when it does not divide."""
    batch = config.train.batch_size
    if batch % replicas:
        low = max(replicas, batch // replicas * replicas)
        raise ConfigError(
            [
                f"train.batch_size: {batch} is the global batch and must divide by the "
                f"{replicas} replicas of runtime.strategy {config.runtime.strategy!r}; "
                f"use {low} or {low + replicas}"
            ]
        )
    return batch // replicas


def _multi_worker() -> Cluster:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            [
                "runtime.strategy: 'multi_worker' needs the TF_CONFIG environment variable, "
                'e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
                '"task": {"type": "worker", "index": 0}}, set on every worker'
            ]
        )
    try:
        tf_config = json.loads(raw)
        workers = list(tf_config["cluster"]["worker"])
        index = int(tf_config["task"]["index"])
        if not 0 <= index < len(workers):
            raise ValueError(f"task index {index} but {len(workers)} workers")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            [f"TF_CONFIG is not valid ({exc.__class__.__name__}: {exc}); see runtime.strategy"]
        ) from None
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # Only worker 0 is the chief here: segnet does not use a separate "chief" task type.
    is_chief = index == 0
    return Cluster(strategy, strategy.num_replicas_in_sync, is_chief, index)


class WriteDir:
    """The directory this worker writes to: the real one on the chief, a temporary one elsewhere.

    Use as a context manager so the non-chief's temporary copy is removed at the end.
    """

    def __init__(self, real: Path, is_chief: bool, worker_index: int) -> None:
        self.real = real
        self._temp = None if is_chief else Path(tempfile.mkdtemp(prefix=f"worker{worker_index}-"))
        self.path = real if self._temp is None else self._temp / real.name

    def __enter__(self) -> WriteDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)


def synchronize_batchnorm(model: keras.Model) -> int:
    """Makes every BatchNormalization layer of ``model`` (nested models too) synchronised.

    Keras reads ``synchronized`` when the layer is called, so switching it on after the model
    is built, before the training step is traced, is enough. Returns the number of layers.
    """
    count = 0
    pending = list(model.layers)
    while pending:
        layer = pending.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
        pending.extend(getattr(layer, "layers", ()))
    return count
