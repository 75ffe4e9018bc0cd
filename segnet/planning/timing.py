"""Time real training steps of a planned network on this machine.

The step is the trainer's own (``make_train_step`` with its model, loss and optimizer), built
in the precision ``runtime.precision`` resolves to here (``auto``: what the hardware runs
natively), on a random batch of the planned shape: a step's cost does not depend on the
values. The first steps trace and compile the graph, so they are run and not counted.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig
from segnet.data.pipeline import training_patch_size
from segnet.losses import build_loss
from segnet.models.registry import build_model
from segnet.planning.rules import Hardware
from segnet.precision import choose_precision, precision_policy
from segnet.training.optimizers import build_optimizer
from segnet.training.step import make_train_step

WARMUP_STEPS = 2  # tracing and oneDNN's first-call setup: not what a step costs
TIMED_STEPS = 5  # the median: a shared machine's other jobs slow some steps


@dataclass(frozen=True)
class StepTiming:
    """How long one training step of a config took here.

    Attributes:
        seconds: median wall time of the timed steps.
        steps: how many steps were timed.
        precision: the Keras dtype policy they ran in.
        precision_reason: why ``runtime.precision`` resolved to it.
        device: the CPU or GPU, e.g. ``Intel(R) Xeon(R) Processor (2 cores)``.
    """

    seconds: float
    steps: int
    precision: str
    precision_reason: str
    device: str


def random_batch(config: ExperimentConfig, rng: np.random.Generator) -> tuple:
    """(images, labels) of the config's batch and training sample shape."""
    shape = (config.train.batch_size, *training_patch_size(config, config.spatial_dims))
    images = tf.constant(rng.normal(size=(*shape, config.data.num_channels)), tf.float32)
    labels = tf.constant(rng.integers(0, config.data.num_classes, size=shape), tf.uint8)
    return images, labels


def step_for(config: ExperimentConfig, precision: str, batch: tuple) -> Callable[[], tf.Tensor]:
    """One training step of ``config``'s model built under ``precision``, as the trainer runs it."""
    with precision_policy(precision):
        keras.utils.set_random_seed(0)
        model = build_model(config)
        optimizer = build_optimizer(config)
        optimizer.build(model.trainable_variables)
    train_step = make_train_step(
        model,
        optimizer,
        build_loss(config, model),
        tf.distribute.get_strategy(),
        num_classes=config.data.num_classes,
        clip_norm=config.optimizer.clip_norm,
        jit_compile=config.runtime.jit_compile,
        jit_compile_loss=config.runtime.jit_compile_loss,
    )
    stop = tf.constant(0.0)
    return lambda: train_step(batch, stop).loss


def time_training_steps(
    config: ExperimentConfig, steps: int = TIMED_STEPS, warmup: int = WARMUP_STEPS
) -> StepTiming:
    """Median wall seconds of a training step of ``config`` on this machine."""
    choice = choose_precision(config.runtime.precision)
    step = step_for(config, choice.name, random_batch(config, np.random.default_rng(0)))
    for _ in range(warmup):
        step().numpy()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step().numpy()  # .numpy() waits for the result
        seconds.append(time.perf_counter() - start)
    return StepTiming(
        float(np.median(seconds)), steps, choice.name, choice.reason, detect_hardware().name
    )


def detect_hardware() -> Hardware:
    """The GPUs TensorFlow sees, else this CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return Hardware(True, f"{len(gpus)} x {details.get('device_name', gpus[0].name)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Hardware(False, f"{cpu_model()} ({cores} cores)")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, as the kernel reports it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "an unnamed CPU"
