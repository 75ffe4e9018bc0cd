"""Benchmark: segnet's normalisation layers against Keras's own, forward + backward, in one run.

    python benchmarks/bench_normalization.py [--repeats 20]    # after pip install -e .

segnet's ``FusedBatchNormalization`` and ``GroupNormalization`` (instance norm: one group per
channel) are Keras's layers computed by TensorFlow's fused batch-norm kernel, which oneDNN
runs for 4D inputs; Keras's layers chain element-wise ops on a float32 copy. Each pair is
timed on the same input in a ``tf.function`` (output, then the gradients with respect to the
input, gamma and beta for a fixed upstream gradient), taking turns, in float32 and, where the
CPU runs it natively, bfloat16. Shapes: the benchmark U-Net's finest level (2 x 64^3 x 16) and
the hippocampus config's (2 x 40x56x40 x 16). Printed: the median milliseconds of each and
the ratio Keras / segnet (above 1: segnet faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_precision, beside this file

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import argparse
import os
from collections.abc import Callable

import keras
import tensorflow as tf
from bench_precision import time_interleaved

from segnet import _tf_env
from segnet.models.blocks import FusedBatchNormalization, GroupNormalization
from segnet.planning.timing import cpu_model
from segnet.precision import choose_precision, precision_policy

SHAPES = {"2 x 64^3 x 16": (2, 64, 64, 64, 16), "2 x 40x56x40 x 16": (2, 40, 56, 40, 16)}


def pass_of(layer: keras.layers.Layer, x: tf.Tensor) -> Callable[[], tf.Tensor]:
    """Forward and backward of ``layer`` on ``x`` as one compiled call."""
    upstream = tf.random.stateless_normal(x.shape, seed=(1, 2), dtype=x.dtype)

    @tf.function
    def run() -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=upstream)
        return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    return run


def pairs(channels: int) -> dict[str, tuple[Callable[[], keras.layers.Layer], ...]]:
    """Name -> (segnet's layer, Keras's layer) factories."""
    return {
        "batch norm": (FusedBatchNormalization, keras.layers.BatchNormalization),
        "instance norm": (
            lambda: GroupNormalization(groups=channels),
            lambda: keras.layers.GroupNormalization(groups=channels),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes (median)")
    args = parser.parse_args()
    bf16 = choose_precision("auto").name == "mixed_bfloat16"  # where it runs natively
    policies = ["float32", "mixed_bfloat16"] if bf16 else ["float32"]
    print(f"{cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}; "
          f"{_tf_env.onednn_status()}")  # fmt: skip
    if not bf16:
        print("no native bfloat16 here: float32 only")
    print(f"median of {args.repeats}, forward + backward\n")
    print("| layer | shape | precision | Keras ms | segnet ms | Keras / segnet |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape_name, shape in SHAPES.items():
        for policy in policies:
            x = tf.random.stateless_normal(shape, seed=(3, 4))
            with precision_policy(policy):
                layers = {
                    name: (mine(), theirs()) for name, (mine, theirs) in pairs(shape[-1]).items()
                }
            x = tf.cast(x, keras.mixed_precision.Policy(policy).compute_dtype)
            for name, (mine, keras_own) in layers.items():
                for layer in (mine, keras_own):
                    layer.build(shape)
                seconds = time_interleaved(
                    {"segnet": pass_of(mine, x), "keras": pass_of(keras_own, x)}, args.repeats
                )
                ours_ms, keras_ms = 1000 * seconds["segnet"], 1000 * seconds["keras"]
                print(f"| {name} | {shape_name} | {policy.removeprefix('mixed_')} | "
                      f"{keras_ms:.2f} | {ours_ms:.2f} | {keras_ms / ours_ms:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
