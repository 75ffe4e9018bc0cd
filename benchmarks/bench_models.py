"""Benchmark: one training step of the 3D U-Net and of SegNet on the CPU, against matmul peak.

    python benchmarks/bench_models.py [--size 64] [--batch 2] [--repeats 5]

A step is forward + backward + an SGD update inside a ``tf.function`` (as the trainer runs it),
on a ``(batch, size, size, size, 1)`` float32 patch with 3 classes and the default
architectures (U-Net: depth 4, 16 filters, instance norm; SegNet: depth 4, 16 filters, batch
norm). Convolution FLOPs are counted analytically, ``2 * K^3 * Cin * Cout`` per output voxel
(per input voxel for transposed convolutions), times 3 for forward + backward (the input and
the weight gradients cost one forward each). Pooling, normalisation and the argmax kernels are
not counted, so the figure is a lower bound on the work done.

The machine's peak is a large float32 matmul measured in the same run, taking turns with the
steps so that load from other jobs hits both alike; the ratio of the two GFLOP/s is how much
of the CPU the convolutions use. Wall and CPU (all threads) times are both reported: on a
shared machine CPU time does not count waiting for a core another job holds.
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
import math
import os
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from segnet import _tf_env
from segnet.models.segnet import SegNet
from segnet.models.unet3d import UNet3D

CLASSES = 3
MATMUL_SIZE = 2048
WARMUP = 2


def conv_flops(model: keras.Model, x: tf.Tensor) -> float:
    """Forward + backward FLOPs of every convolution of ``model`` on the batch ``x``."""
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv3D | keras.layers.Conv3DTranspose)
    ]
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    total = 0.0
    for layer, output in zip(convs, probe(x)):
        voxels = math.prod(output.shape[:-1])
        if isinstance(layer, keras.layers.Conv3DTranspose):
            voxels //= math.prod(layer.strides)  # each input voxel scatters one kernel
        total += 2 * math.prod(layer.kernel.shape) * voxels
    return 3 * total


def training_step(model: keras.Model, x: tf.Tensor, labels: tf.Tensor) -> Callable[[], tf.Tensor]:
    optimizer = keras.optimizers.SGD(0.01, momentum=0.99, nesterov=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step


def matmul_step() -> Callable[[], tf.Tensor]:
    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.normal(size=(MATMUL_SIZE, MATMUL_SIZE)), tf.float32) for _ in range(2))
    return tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))


def time_interleaved(
    steps: dict[str, Callable[[], tf.Tensor]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) per run of each step, taking turns."""
    for step in steps.values():
        for _ in range(WARMUP):
            step().numpy()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step().numpy()  # .numpy() waits for the result.
            times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    return {name: tuple(np.median(np.array(t), axis=0)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="patch edge in voxels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    shape = (args.batch, args.size, args.size, args.size, 1)
    x = tf.random.normal(shape)
    labels = tf.cast(tf.random.uniform(shape[:-1]) * CLASSES, tf.int32)
    models = {"unet3d": UNet3D(1, CLASSES), "segnet": SegNet(1, CLASSES)}
    flops = {name: conv_flops(model, x) for name, model in models.items()}
    flops["matmul"] = 2.0 * MATMUL_SIZE**3
    steps = {name: training_step(model, x, labels) for name, model in models.items()}
    steps["matmul"] = matmul_step()

    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores; {_tf_env.onednn_status()}"
    )
    print(f"input {shape} float32, {CLASSES} classes, median of {args.repeats} interleaved runs")
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    timings = time_interleaved(steps, args.repeats)
    print("load average after:  {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    peak_wall, peak_cpu = (flops["matmul"] / t / 1e9 for t in timings["matmul"])
    print(
        f"\n{'step':8s} {'GFLOP':>8s} {'wall s':>8s} {'GFLOP/s':>8s} {'of peak':>8s} {'CPU s':>8s} {'GFLOP/CPU-s':>12s} {'of peak':>8s}"
    )
    for name, (wall, cpu) in timings.items():
        rate_wall, rate_cpu = flops[name] / wall / 1e9, flops[name] / cpu / 1e9
        print(
            f"{name:8s} {flops[name] / 1e9:8.1f} {wall:8.3f} {rate_wall:8.1f} {rate_wall / peak_wall:7.0%} "
            f"{cpu:8.3f} {rate_cpu:12.1f} {rate_cpu / peak_cpu:7.0%}"
        )
    print(
        f"\nmatmul: {MATMUL_SIZE}x{MATMUL_SIZE} float32, the peak the 'of peak' columns divide by."
    )


if __name__ == "__main__":
    main()
