"""Benchmark: is the tf.data patch pipeline ever the bottleneck of a training step?

    python benchmarks/bench_data_pipeline.py --data ../shared/datasets/hippocampus

Prepares the training cases of fold 0 with segnet's preprocessing cache (in a temporary
folder unless ``--cache-dir`` is given), then measures, in one process:

1. patches per second of the pipeline alone: augmentation off, the defaults, and every
   transform on every patch (the worst case);
2. the training step of a small 3D U-Net (segnet's model registry) on one constant batch;
3. the same step fed from the pipeline (default augmentation): the time spent blocked on the
   next batch, as a share of the fed step, and the fed / constant step-time ratio (which also
   counts the CPU the loader takes from the step while it prefetches);
4. the loader's CPU time per batch as a share of the step's CPU time, which, unlike the
   wall-clock figures, hardly changes when other jobs share the machine.

Target: waiting for data < 5% of the step on 2 CPU cores. Default patch 40x56x40 and batch 2
are nnU-Net's 3D full-resolution settings for this dataset.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout, installed or not

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from segnet.config import AugmentationConfig, ExperimentConfig, build_config
from segnet.data.cache import load_or_compute_fingerprint, prepare_cases
from segnet.data.case import PreprocessedCase
from segnet.data.datasets import load_split
from segnet.data.pipeline import build_dataset, describe_pipeline
from segnet.models.registry import build_model

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "hippocampus"
Step = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD dataset folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40], metavar="N")
    parser.add_argument("--batch", type=int, default=2, help="global batch size")
    parser.add_argument("--filters", type=int, default=16, help="U-Net filters at level 1")
    parser.add_argument("--depth", type=int, default=3, help="U-Net poolings")
    parser.add_argument("--batches", type=int, default=100, help="batches per loader timing")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing blocks")
    return parser.parse_args()


def make_config(args: argparse.Namespace, cache_dir: Path) -> ExperimentConfig:
    raw = {
        "name": "bench_data_pipeline",
        "data": {
            "root": str(args.data),
            "num_classes": 3,
            "patch_size": args.patch,
            "cache_dir": str(cache_dir),
            "split": {"folds_file": "folds.json", "fold": 0},
        },
        "model": {"name": "unet3d", "unet3d": {"depth": args.depth, "filters": args.filters}},
        "train": {"batch_size": args.batch},
    }
    return build_config(raw)


def prepare(config: ExperimentConfig) -> list[PreprocessedCase]:
    train = load_split(config.data).train
    return prepare_cases(config, train, load_or_compute_fingerprint(config, train))


def with_augmentation(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    return dataclasses.replace(
        config, augmentation=dataclasses.replace(config.augmentation, **changes)
    )


def every_transform(config: ExperimentConfig) -> ExperimentConfig:
    """Every transform on every patch: the loader's worst case."""
    names = [f.name for f in dataclasses.fields(AugmentationConfig) if f.name.endswith("_prob")]
    return with_augmentation(config, **{name: 1.0 for name in names})


def time_loader(
    config: ExperimentConfig, cases: list[PreprocessedCase], batches: int
) -> tuple[float, float]:
    """(patches per second, CPU seconds per patch) of the pipeline alone.

    CPU time barely depends on what else runs on the machine, so it gives the loader's cost
    even when wall-clock figures are noisy.
    """
    iterator = iter(build_dataset(config, cases))
    for _ in range(5):  # warm-up: tracing, opening the first memmaps, AUTOTUNE
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    patches = batches * config.train.batch_size
    return patches / (time.perf_counter() - start), (time.process_time() - cpu_start) / patches


def make_train_step(config: ExperimentConfig) -> Step:
    model = build_model(config)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.99, nesterov=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            loss = loss_fn(labels, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return step


def time_constant_batch(
    step: Step, batch: tuple[tf.Tensor, tf.Tensor], steps: int
) -> tuple[float, float]:
    """(seconds, CPU seconds) per step with the data already in memory."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(*batch).numpy()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def time_fed(step: Step, iterator, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per step blocked on the next batch) fed by ``iterator``."""
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(iterator)
        waited += time.perf_counter() - before
        step(*batch).numpy()  # .numpy() waits for the step, so the next wait is the loader's
    return (time.perf_counter() - start) / steps, waited / steps


def measure_steps(
    step: Step, dataset: tf.data.Dataset, steps: int, rounds: int
) -> tuple[float, float, float, float]:
    """Median (constant-batch step, its CPU time, fed step, wait per fed step) in seconds.

    Constant and fed blocks alternate so that load from other processes hits both alike.
    """
    iterator = iter(dataset)
    constant = next(iterator)
    for _ in range(3):  # warm-up: tracing and the loader's AUTOTUNE
        step(*constant).numpy()
        step(*next(iterator)).numpy()
    timings = []
    for _ in range(rounds):
        timings.append(
            (*time_constant_batch(step, constant, steps), *time_fed(step, iterator, steps))
        )
    compute, compute_cpu, fed, waited = np.median(np.array(timings), axis=0)
    return float(compute), float(compute_cpu), float(fed), float(waited)


def main() -> None:
    args = parse_args()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"{args.data}: no dataset.json; pass --data <MSD dataset folder>")
    with tempfile.TemporaryDirectory(prefix="segnet-bench-") as scratch:
        config = make_config(args, args.cache_dir or Path(scratch))
        start = time.perf_counter()
        cases = prepare(config)
        print(f"prepared {len(cases)} cases in {time.perf_counter() - start:.1f} s")
        print(describe_pipeline(config, cases))
        report(config, cases, args)


def report(config: ExperimentConfig, cases: list[PreprocessedCase], args) -> None:
    variants = {
        "augmentation off": with_augmentation(config, enabled=False),
        "augmentation defaults": config,
        "every transform, p=1": every_transform(config),
    }
    loader_cpu = {}
    for name, variant in variants.items():
        rate, loader_cpu[name] = time_loader(variant, cases, args.batches)
        print(
            f"loader alone, {name:24s}: {rate:7.1f} patches/s, "
            f"{loader_cpu[name] * 1000:6.2f} CPU ms/patch"
        )

    step = make_train_step(config)
    compute, compute_cpu, fed, waited = measure_steps(
        step, build_dataset(config, cases), args.steps, args.rounds
    )
    cpu_share = loader_cpu["augmentation defaults"] * args.batch / compute_cpu
    patch = "x".join(map(str, config.data.patch_size))
    print(f"U-Net depth {args.depth}, {args.filters} filters, batch {args.batch}x{patch}:")
    print(f"  step on a constant batch : {compute * 1000:8.1f} ms (median of {args.rounds} blocks)")
    print(f"  step fed by the pipeline : {fed * 1000:8.1f} ms (ratio {fed / compute:.3f})")
    share = waited / fed
    verdict = "OK (< 5%)" if share < 0.05 else "LOADER-BOUND (>= 5%)"
    print(
        f"  waiting for data         : {waited * 1000:8.1f} ms = {share:.1%} of a step, {verdict}"
    )
    print(
        f"  loader CPU per batch     : {cpu_share:.1%} of the step's CPU time "
        f"({compute_cpu * 1000:.0f} CPU ms), default augmentation"
    )


if __name__ == "__main__":
    main()
