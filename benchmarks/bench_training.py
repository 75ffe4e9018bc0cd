"""Benchmark: the trainer's own step on hippocampus, fed by the real pipeline vs a constant batch.

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --configs configs/hippocampus_unet3d.yaml --steps 30

For each config (default: the hippocampus U-Net and SegNet, whose data is
``../shared/datasets/hippocampus``), in one process:

1. the training cases are read, checked and preprocessed with segnet's data modules (the cache
   in ``data.cache_dir`` makes a second run start at once);
2. the model, optimizer, loss and replicated train step are built exactly as
   ``segnet.training.trainer`` builds them;
3. timing blocks take turns, so load from other jobs on the machine hits both alike: ``--steps``
   steps fed from the tf.data pipeline (``next(iterator)`` and the step, as the trainer's loop
   does), then the same number of steps on one constant batch taken from that pipeline.

Printed per model: ms per step both ways, the pipeline's cost ratio ``fed / constant - 1`` in
wall-clock time and in process CPU time (target <= 5% on 2 CPU cores; on a shared machine the
CPU figure is the steadier one), the share of the fed step spent blocked on ``next``, and GFLOP/s
from an analytic count of the convolutions: ``2 * K^3 * Cin * Cout`` per output voxel (per input
voxel of a transposed convolution), times 3 for forward + backward, read from the traced graph
so that any architecture, 2D or 3D, is counted the same way. Pooling, normalisation and
activations are not counted: the figure is a lower bound on the work done.
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
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig, load_config
from segnet.data.pipeline import build_dataset, training_patch_size
from segnet.losses import build_loss
from segnet.models.registry import build_model
from segnet.training.optimizers import build_optimizer
from segnet.training.step import make_train_step
from segnet.training.trainer import load_training_data

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    REPO / "configs" / "hippocampus_unet3d.yaml",
    REPO / "configs" / "hippocampus_segnet.yaml",
]
WARMUP_STEPS = 3
CONV_OPS = {"Conv2D", "Conv3D"}  # FLOPs per output voxel
TRANSPOSED_CONV_OPS = {"Conv2DBackpropInput", "Conv3DBackpropInputV2"}  # per input voxel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing block")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks (median)")
    return parser.parse_args()


def conv_flops(model: keras.Model, batch_shape: tuple[int, ...]) -> float:
    """Forward + backward convolution FLOPs of one training step on a batch of this shape."""
    forward = tf.function(lambda x: model(x, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec(batch_shape, tf.float32)).graph
    total = 0.0
    for op in graph.get_operations():
        if op.type in CONV_OPS:
            voxels = math.prod(op.outputs[0].shape[:-1])
        elif op.type in TRANSPOSED_CONV_OPS:
            voxels = math.prod(op.inputs[2].shape[:-1])  # the gradient-like input it spreads
        else:
            continue
        total += 2.0 * math.prod(op.inputs[1].shape) * voxels
    return 3.0 * total


@dataclass
class Bench:
    """One model's step, its data stream and the FLOPs of a step."""

    name: str
    step: Callable[[Any, tf.Tensor], Any]
    batches: Iterator
    constant: Any
    flops: float


def build_bench(config: ExperimentConfig) -> Bench:
    """Data, model and step as the trainer builds them (default strategy, one device)."""
    data = load_training_data(config)
    spatial_dims = config.spatial_dims
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(config)
    optimizer = build_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = make_train_step(
        model,
        optimizer,
        build_loss(config, model),
        strategy,
        num_classes=config.data.num_classes,
        clip_norm=config.optimizer.clip_norm,
        jit_compile=config.runtime.jit_compile,
    )
    dataset = build_dataset(config, data.train, spatial_dims=spatial_dims)
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    batch_shape = (
        config.train.batch_size,
        *training_patch_size(config, spatial_dims),
        config.data.num_channels,
    )
    return Bench(config.name, step, batches, next(batches), conv_flops(model, batch_shape))


def time_fed(bench: Bench, steps: int) -> tuple[float, float, float]:
    """Per step over ``steps`` steps fed by the pipeline: (wall s, CPU s, share blocked)."""
    no_stop = tf.constant(0.0)
    waited = 0.0
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(bench.batches)
        waited += time.perf_counter() - before
        float(bench.step(batch, no_stop).loss)  # waits for the step, as the trainer does
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return elapsed / steps, cpu / steps, waited / elapsed


def time_constant(bench: Bench, steps: int) -> tuple[float, float]:
    """Per step on the one constant batch: (wall s, CPU s)."""
    no_stop = tf.constant(0.0)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        float(bench.step(bench.constant, no_stop).loss)
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


def measure(bench: Bench, steps: int, rounds: int) -> dict[str, float]:
    """Medians over alternating blocks of fed and constant-batch steps.

    The wall-clock ratio is what a user waits; the CPU ratio (all threads of this process,
    the loader's included) hardly moves when other jobs share the machine.
    """
    time_fed(bench, WARMUP_STEPS)
    time_constant(bench, WARMUP_STEPS)
    rows = []
    for _ in range(rounds):
        fed_wall, fed_cpu, blocked = time_fed(bench, steps)
        const_wall, const_cpu = time_constant(bench, steps)
        rows.append(
            (fed_wall, const_wall, fed_wall / const_wall - 1, fed_cpu / const_cpu - 1, blocked)
        )
    fed_wall, const_wall, wall_cost, cpu_cost, blocked = np.median(np.array(rows), axis=0)
    return {
        "fed_ms": 1e3 * fed_wall,
        "constant_ms": 1e3 * const_wall,
        "wall_cost": wall_cost,
        "cpu_cost": cpu_cost,
        "blocked": blocked,
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"{len(args.configs)} configs, {args.rounds} rounds of {args.steps} steps each way")
    header = (
        f"{'model':20s} {'GFLOP/step':>10s} {'fed ms':>7s} {'const ms':>8s} "
        f"{'wall +':>7s} {'CPU +':>7s} {'blocked':>7s} {'GFLOP/s':>7s}"
    )
    rows = []
    for path in args.configs:
        config = load_config(path, [*args.overrides, "train.val_every=0"])
        bench = build_bench(config)
        result = measure(bench, args.steps, args.rounds)
        rate = bench.flops / (result["constant_ms"] / 1e3) / 1e9
        rows.append(
            f"{bench.name:20s} {bench.flops / 1e9:10.1f} {result['fed_ms']:7.0f} "
            f"{result['constant_ms']:8.0f} {result['wall_cost']:+7.1%} "
            f"{result['cpu_cost']:+7.1%} {result['blocked']:7.1%} {rate:7.1f}"
        )
    print(header)
    print("\n".join(rows))
    print(
        "wall + / CPU + = fed / constant - 1 in wall-clock / process CPU time: the pipeline's "
        "cost (target <= +5%); blocked = share of the fed step waiting on next(); GFLOP/s on "
        "the constant batch"
    )


if __name__ == "__main__":
    main()
