"""Benchmark: forward + backward of argmax pooling + unpooling on a (2, 64, 64, 64, 16) volume.

    python benchmarks/bench_argmax_pooling.py [--repeats 20]

Compares, on the CPU, the median time of one forward + backward pass (the gradient w.r.t. the
input for a fixed upstream gradient) of:

* ours: ``MaxPoolingWithArgmax`` + ``MaxUnpoolingWithArgmax`` in a ``tf.function``, with their
  XLA kernels (the default), without them (plain TensorFlow ops), and inside a whole-step
  ``tf.function(jit_compile=True)``;
* (a) the widely copied scatter unpooling: argmax of the reshaped windows, flat int64 indices
  ``((b*D + z)*H + y)*W + x)*C + c``, and ``tf.scatter_nd`` into a flat zero tensor;
* (b) ``keras.layers.MaxPooling3D`` + ``keras.layers.UpSampling3D`` (no argmax), the floor.

Targets: ours at least 5x faster than (a) and no slower than (b).
"""

from __future__ import annotations

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
) -> dict[str, list[float]]:
    """Milliseconds per run of each step, taking turns so other load hits every step alike."""
    for step in steps.values():
        for _ in range(WARMUP):
            step(x).numpy()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x).numpy()  # .numpy() waits for the result.
            times[name].append(1000 * (time.perf_counter() - start))
    return times


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

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=SHAPE), tf.float32)
    upstream = tf.constant(rng.normal(size=SHAPE), tf.float32)
    cases = {
        "ours, XLA kernels (default), tf.function": (ours(True), False),
        "ours, plain TF ops, tf.function": (ours(False), False),
        "ours, whole step jit_compile=True": (ours(True), True),
        "(a) argmax + tf.scatter_nd, tf.function": (scatter_nd_unpool, False),
        "(b) MaxPooling3D + UpSampling3D, tf.function": (pool_upsample, False),
        "(b) MaxPooling3D + UpSampling3D, jit_compile=True": (pool_upsample, True),
    }
    steps = {name: forward_backward(fn, upstream, jit) for name, (fn, jit) in cases.items()}
    times = time_interleaved(steps, x, args.repeats)
    ms = {name: float(np.median(t)) for name, t in times.items()}
    scatter = ms["(a) argmax + tf.scatter_nd, tf.function"]
    floor = ms["(b) MaxPooling3D + UpSampling3D, tf.function"]
    print(
        f"\n{'forward + backward':50s} {'median ms':>9s} {'min ms':>7s} {'(a)/this':>9s} {'this/(b)':>9s}"
    )
    for name, t in ms.items():
        print(f"{name:50s} {t:9.1f} {min(times[name]):7.1f} {scatter / t:8.1f}x {t / floor:8.2f}x")
    print(
        "\n(a)/this: speed-up over the scatter_nd unpooling (target >= 5); this/(b): time "
        "relative to MaxPooling3D + UpSampling3D (target <= 1). Ratios use the medians."
    )


if __name__ == "__main__":
    main()
