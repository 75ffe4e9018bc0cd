"""Time real training steps of a planned network on this machine.

The step is the trainer's own (``make_train_step`` with its model, loss and optimizer), built
in the precision ``runtime.precision`` resolves to here (``auto``: what the hardware runs
natively), and fed as in training: by the trainer's input pipeline (``build_dataset``), whose
patch sampling and augmentation run on the same CPU, over stand-in cases a quarter larger than
the patch (a step's cost does not depend on the values, the pipeline's barely on the volume's
size). Timed on a constant batch, the ACDC plan's step read 573 ms on the 2-core Xeon and took
700 ms in training (2026-12-07), and the plan overran its budget by that much. A step costs the
longer of the two: the step fed by the pipeline (whose work then competes for the CPU), or the
pipeline's own time per batch (when it cannot keep up, the step waits). The first steps trace
and compile the graph, so they are run and not counted.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig
from segnet.data.case import PreprocessedCase
from segnet.data.pipeline import build_dataset, training_patch_size
from segnet.data.preprocessing import sample_foreground
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


def train_step_for(config: ExperimentConfig, precision: str) -> Callable[[tuple], tf.Tensor]:
    """The trainer's step for ``config``'s model built under ``precision``: batch -> loss."""
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
    return lambda batch: train_step(batch, stop).loss


def step_for(config: ExperimentConfig, precision: str, batch: tuple) -> Callable[[], tf.Tensor]:
    """One training step of ``config``'s model built under ``precision`` on a fixed ``batch``
    (the benchmarks' way: the convolutions alone, no input pipeline)."""
    train = train_step_for(config, precision)
    return lambda: train(batch)


def time_training_steps(
    config: ExperimentConfig, steps: int = TIMED_STEPS, warmup: int = WARMUP_STEPS
) -> StepTiming:
    """Median wall seconds of a training step of ``config`` on this machine, its batches
    drawn by the trainer's input pipeline from stand-in cases (the module's docstring)."""
    choice = choose_precision(config.runtime.precision)
    train = train_step_for(config, choice.name)
    with tempfile.TemporaryDirectory(prefix="segnet-plan-") as folder:
        # The pipeline (and its threads) ends with the call, before the cases are deleted.
        drawing, stepping = _time_fed_steps(config, train, Path(folder), steps, warmup)
    seconds = max(float(np.median(stepping)), float(np.median(drawing)))
    return StepTiming(seconds, steps, choice.name, choice.reason, detect_hardware().name)


def _time_fed_steps(
    config: ExperimentConfig,
    train: Callable[[tuple], tf.Tensor],
    folder: Path,
    steps: int,
    warmup: int,
) -> tuple[list[float], list[float]]:
    """Seconds per batch of the pipeline alone, and per step fed by it."""
    cases = stand_in_cases(config, folder)
    batches = iter(build_dataset(config, cases, spatial_dims=config.spatial_dims))
    # The pipeline alone first, from empty buffers: a step can go no faster than this.
    drawing = [_seconds(lambda: next(batches)) for _ in range(PIPELINE_BATCHES + 1)][1:]
    for _ in range(warmup):
        train(next(batches)).numpy()
    # Then steps fed by it, the pipeline refilling its buffers on the same CPU meanwhile.
    stepping = [_seconds(lambda: train(next(batches)).numpy()) for _ in range(steps)]
    return drawing, stepping


PIPELINE_BATCHES = 4  # batches drawn from the pipeline alone (after its first)


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


STAND_IN_CASES = 2


def stand_in_cases(config: ExperimentConfig, folder: Path) -> list[PreprocessedCase]:
    """Preprocessed-looking cases under ``folder`` for the input pipeline to sample: volumes a
    quarter larger than the patch, random intensities, every class in a slab of its own."""
    rng = np.random.default_rng(0)
    depth, height, width = config.data.patch_size
    if config.spatial_dims == 2:
        depth = 1
    shape = (depth + depth // 4 + 1, height + height // 4 + 1, width + width // 4 + 1)
    classes = config.data.num_classes
    label = (np.arange(shape[2]) * classes // shape[2]).astype(np.uint8)
    label = np.broadcast_to(label, shape).copy()
    sampled = sample_foreground(label, classes, seed=0)  # as the cache stores them
    foreground: dict[str, Any] = {f"class_{c}": v for c, v in sampled.items()}
    cases = []
    for index in range(STAND_IN_CASES):
        case_dir = folder / f"case_{index}"
        case_dir.mkdir()
        image = rng.normal(size=(*shape, config.data.num_channels)).astype(np.float32)
        np.save(case_dir / "image.npy", image)
        np.save(case_dir / "label.npy", label)
        np.savez(case_dir / "foreground.npz", **foreground)
        case = PreprocessedCase(
            f"stand_in_{index}", case_dir / "image.npy", case_dir / "label.npy",
            case_dir / "foreground.npz", shape,
        )  # fmt: skip
        cases.append(case)
    return cases


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
