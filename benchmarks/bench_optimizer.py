"""Benchmark: segnet's one-kernel SGD momentum update against Keras's SGD, in one run.

    python benchmarks/bench_optimizer.py [--repeats 50]    # after pip install -e .

Keras 3 writes SGD's momentum update as about ten element-wise operations per variable;
segnet's ``SGD`` (same variables, same results, tested) hands each variable to TensorFlow's
``ResourceApplyKerasMomentum``, one kernel. Both optimizers update the trainable variables of
a shipped config's network with the same fixed gradients (Nesterov, momentum 0.99), each
``apply`` compiled in a ``tf.function``, taking turns. Printed: the median milliseconds per
update and the ratio Keras / segnet (above 1: segnet faster). The update is a small part of a
training step (about 2% of the 64^3 U-Net's bf16 step on the AMX Xeon), so this isolates it.
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
from segnet.config import load_config
from segnet.models.registry import build_model
from segnet.planning.timing import cpu_model
from segnet.training.optimizers import SGD

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/hippocampus_unet3d.yaml", "configs/acdc_unet.yaml")


def update_of(optimizer: keras.optimizers.Optimizer, model: keras.Model) -> Callable[[], tf.Tensor]:
    """One compiled ``apply`` of fixed gradients to ``model``'s trainable variables."""
    variables = model.trainable_variables
    optimizer.build(variables)
    grads = [
        tf.random.stateless_normal(v.shape, seed=(i, 7), stddev=1e-3)
        for i, v in enumerate(variables)
    ]

    @tf.function
    def run() -> tf.Tensor:
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed updates (median)")
    args = parser.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}; "
          f"{_tf_env.onednn_status()}")  # fmt: skip
    print(f"median of {args.repeats} updates, SGD with Nesterov momentum 0.99\n")
    print("| network | variables | parameters | Keras ms | segnet ms | Keras / segnet |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in CONFIGS:
        config = load_config(REPO / path)
        updates = {}
        for name, make in (("segnet", SGD), ("keras", keras.optimizers.SGD)):
            keras.utils.set_random_seed(0)
            model = build_model(config)  # one model each: both update their own copy
            updates[name] = update_of(make(0.01, momentum=0.99, nesterov=True), model)
        parameters = sum(int(v.numpy().size) for v in model.trainable_variables)
        seconds = time_interleaved(updates, args.repeats)
        ours_ms, keras_ms = 1000 * seconds["segnet"], 1000 * seconds["keras"]
        print(f"| `{path}` | {len(model.trainable_variables)} | {parameters:,} | "
              f"{keras_ms:.2f} | {ours_ms:.2f} | {keras_ms / ours_ms:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
