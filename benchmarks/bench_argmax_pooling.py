"""Benchmark: forward + backward of argmax pooling + unpooling on a (2, 64, 64, 64, 16) volume.

    python benchmarks/bench_argmax_pooling.py [--repeats 20]    # after pip install -e .

Compares, on the CPU, the median wall-clock and CPU time of one forward + backward pass (the
gradient w.r.t. the input for a fixed upstream gradient), runs taking turns, of:

* ours: ``MaxPoolingWithArgmax`` + ``MaxUnpoolingWithArgmax`` in a ``tf.function``, with their
  XLA kernels (the default), without them (plain TensorFlow ops), and inside a whole-step
  ``tf.function(jit_compile=True)``;
* (a) the widely copied scatter unpooling: argmax of the reshaped windows, flat int64 indices
  ``(((b*D + z)*H + y)*W + x)*C + c``, and ``tf.scatter_nd`` into a flat zero tensor;
* (b) ``keras.layers.MaxPooling3D`` + ``keras.layers.UpSampling3D`` (no argmax), the floor.

Targets: ours at least 5x faster than (a) and no slower than (b).
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
import os
import platform
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from segnet.models.argmax_pooling import MaxPoolingWithArgmax, MaxUnpoolingWithArgmax

SHAPE = (2, 64, 64, 64, 16)
WARMUP = 3
SCATTER = "(a) argmax + tf.scatter_nd, tf.function"
FLOOR = "(b) MaxPooling3D + UpSampling3D, tf.function"


def ours(jit_kernels: bool) -> Callable[[tf.Tensor], tf.Tensor]:
    pool = MaxPoolingWithArgmax(2, jit_compile=jit_kernels)
    unpool = MaxUnpoolingWithArgmax(2, jit_compile=jit_kernels)

    def forward(x: tf.Tensor) -> tf.Tensor:
        pooled, argmax = pool(x)
        return unpool([pooled, argmax, x])

    return forward


def scatter_nd_unpool(x: tf.Tensor) -> tf.Tensor:
    """(a): the common recipe, since TensorFlow has no 3D max_pool_with_argmax."""
    b, d, h, w, c = x.shape
    windows = tf.reshape(x, (b, d // 2, 2, h // 2, 2, w // 2, 2, c))
    windows = tf.reshape(tf.transpose(windows, (0, 1, 3, 5, 7, 2, 4, 6)), (-1, 8))
    pooled, local = tf.reduce_max(windows, -1), tf.argmax(windows, -1)
    # Flat index of each window's maximum in the (b, d, h, w, c) input.
    bi, zi, yi, xi, ci = np.indices((b, d // 2, h // 2, w // 2, c)).reshape(5, -1)
    z, y = 2 * zi + tf.cast(local // 4, tf.int64), 2 * yi + tf.cast(local // 2 % 2, tf.int64)
    xx = 2 * xi + tf.cast(local % 2, tf.int64)
    flat = (((bi * d + z) * h + y) * w + xx) * c + ci
    unpooled = tf.scatter_nd(flat[:, None], pooled, (b * d * h * w * c,))
    return tf.reshape(unpooled, x.shape)


def pool_upsample(x: tf.Tensor) -> tf.Tensor:
    """(b): no argmax; every pooled value is copied to its whole window."""
    return keras.layers.UpSampling3D(2)(keras.layers.MaxPooling3D(2, padding="same")(x))


def forward_backward(
    forward: Callable[[tf.Tensor], tf.Tensor], upstream: tf.Tensor, jit_compile: bool
) -> Callable[[tf.Tensor], tf.Tensor]:
    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = forward(x)
        return tape.gradient(out, x, output_gradients=upstream)

    return tf.function(step, jit_compile=jit_compile)


def time_interleaved(
    steps: dict[str, Callable[[tf.Tensor], tf.Tensor]], x: tf.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds per run of each step, taking turns so load hits all alike.

    CPU time (all of this process's threads) is the cross-check on a shared machine: it does
    not count the time spent waiting for a core that another job holds.
    """
    for step in steps.values():
        for _ in range(WARMUP):
            step(x).numpy()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(x).numpy()  # .numpy() waits for the result.
            wall[name].append(1000 * (time.perf_counter() - start))
            cpu[name].append(1000 * (time.process_time() - start_cpu))
    return wall, cpu


def print_table(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """One row per step: medians, and ratios against (a) and (b) for wall and CPU time."""
    wall_ms = {name: float(np.median(t)) for name, t in wall.items()}
    cpu_ms = {name: float(np.median(t)) for name, t in cpu.items()}
    print(
        f"\n{'forward + backward, median of runs':50s} {'wall ms':>8s} {'(a)/this':>8s} "
        f"{'this/(b)':>8s} {'CPU ms':>8s} {'(a)/this':>8s} {'this/(b)':>8s}"
    )
    for name in wall:
        cells = []
        for ms in (wall_ms, cpu_ms):
            t = ms[name]
            cells.append(f"{t:8.1f} {ms[SCATTER] / t:7.1f}x {t / ms[FLOOR]:7.2f}x")
        print(f"{name:50s} {' '.join(cells)}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs (median reported)")
    args = parser.parse_args()
    print(
        f"{cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}; input {SHAPE} float32; median of {args.repeats} runs"
    )
    # Other jobs on a shared machine move every number; the ratios (interleaved runs) less so.
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=SHAPE), tf.float32)
    upstream = tf.constant(rng.normal(size=SHAPE), tf.float32)
    cases = {
        "ours, XLA kernels (default), tf.function": (ours(True), False),
        "ours, plain TF ops, tf.function": (ours(False), False),
        "ours, whole step jit_compile=True": (ours(True), True),
        SCATTER: (scatter_nd_unpool, False),
        FLOOR: (pool_upsample, False),
        "(b) MaxPooling3D + UpSampling3D, jit_compile=True": (pool_upsample, True),
    }
    steps = {name: forward_backward(fn, upstream, jit) for name, (fn, jit) in cases.items()}
    print_table(*time_interleaved(steps, x, args.repeats))
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        "\n(a)/this: speed-up over the scatter_nd unpooling (target >= 5); this/(b): time "
        "relative to MaxPooling3D + UpSampling3D (target <= 1)."
    )


if __name__ == "__main__":
    main()
