"""Benchmark: sliding-window inference against the bare forward passes it is made of.

    PYTHONPATH=. python benchmarks/bench_inference.py [--repeats 3] [--cases hippocampus,brats]

(from the repository root; ``PYTHONPATH=.`` is not needed once segnet is pip-installed).

For each case (a hippocampus-size 36x50x35 volume with a 40x56x40 window, a BraTS-size
240x240x155 volume with a 128^3 window; random intensities, since timing does not depend on
them) and a small 3D U-Net from ``segnet.models.registry`` (depth 3, 8 filters, instance norm),
it times, interleaved and in the same process:

* raw: the model alone, in a ``tf.function`` with the same fixed batch signature, on as many
  batches as sliding-window inference runs (``ceil(windows / batch_size)``);
* sliding window: ``sliding_window_inference`` with Gaussian weighting and overlap 0.5, summing
  windows with numpy (what a machine without GPU does) and, forced, with the tf.Variable
  accumulator that a GPU gets.

It prints the median seconds, the throughput in voxels/s and the overhead of windowing,
softmax, weighting and blending on top of the forward passes. Target: at most 10 %.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout, installed or not

import segnet

# isort: split
import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from segnet.config import DataConfig, ExperimentConfig, ModelConfig, UNet3DConfig
from segnet.inference import sliding_window
from segnet.inference.sliding_window import window_positions
from segnet.models.registry import build_model

OVERLAP = 0.5
BATCH_SIZE = 2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    channels: int
    classes: int


CASES = {
    "hippocampus": Case("hippocampus", (36, 50, 35), (40, 56, 40), 1, 3),
    "brats": Case("brats", (240, 240, 155), (128, 128, 128), 2, 4),
}


def small_unet(case: Case) -> keras.Model:
    """The registry's 3D U-Net, small enough for a CPU benchmark."""
    config = ExperimentConfig(
        data=DataConfig(
            num_channels=case.channels, num_classes=case.classes, patch_size=case.window
        ),
        model=ModelConfig(name="unet3d", unet3d=UNet3DConfig(depth=3, filters=8)),
    )
    return build_model(config)


def raw_forward(model: keras.Model, case: Case, batches: int) -> Callable[[], None]:
    """``batches`` forward passes of fixed-signature (BATCH_SIZE, *window, channels) batches."""
    spec = tf.TensorSpec((BATCH_SIZE, *case.window, case.channels), tf.float32)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    batch = np.random.default_rng(1).normal(size=spec.shape).astype(np.float32)

    def run() -> None:
        for _ in range(batches):
            forward(batch).numpy()  # .numpy() waits for the result, as inference does

    return run


def sliding(
    model: keras.Model, case: Case, volume: np.ndarray, variable_accumulator: bool
) -> Callable[[], None]:
    """Sliding-window inference; ``variable_accumulator`` forces the tf.Variable accumulator
    that only an accelerator gets (so its CPU cost can be seen here too)."""

    def predict_fn(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    def run() -> None:
        saved = sliding_window._accelerator_present
        sliding_window._accelerator_present = lambda: variable_accumulator
        try:
            sliding_window.sliding_window_inference(
                volume, predict_fn, case.window, num_classes=case.classes, overlap=OVERLAP,
                batch_size=BATCH_SIZE,
            )  # fmt: skip
        finally:
            sliding_window._accelerator_present = saved

    return run


def median_seconds(
    runs: dict[str, Callable[[], None]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each run, warmed up once and timed interleaved.

    Interleaving spreads the load of other jobs over all runs alike; the CPU time (all of this
    process's threads) is the steadier measure of work on a shared machine.
    """
    for run in runs.values():
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        for name, values in times.items()
    }


def bench(case: Case, repeats: int) -> None:
    model = small_unet(case)
    volume = np.random.default_rng(0).normal(size=(*case.shape, case.channels)).astype(np.float32)
    padded = [max(s, w) for s, w in zip(case.shape, case.window)]
    windows = len(window_positions(padded, case.window, OVERLAP))
    batches = math.ceil(windows / BATCH_SIZE)
    runs = {
        "raw forward": raw_forward(model, case, batches),
        "sliding window (numpy accumulator)": sliding(model, case, volume, False),
        "sliding window, tf.Variable accum.": sliding(model, case, volume, True),
    }
    seconds = median_seconds(runs, repeats)
    voxels = math.prod(case.shape)
    print(f"\n{case.name}: volume {'x'.join(map(str, case.shape))}, window "
          f"{'x'.join(map(str, case.window))}, {windows} windows in {batches} batches of "
          f"{BATCH_SIZE}, median of {repeats}")  # fmt: skip
    raw_wall, raw_cpu = seconds["raw forward"]
    print(f"  {'':36s} {'wall':>8s}    {'throughput':>13s}  {'CPU':>8s}    overhead wall / CPU")
    for name, (wall, cpu) in seconds.items():
        overhead = f"{100 * (wall / raw_wall - 1):+6.1f} % / {100 * (cpu / raw_cpu - 1):+6.1f} %"
        print(
            f"  {name:36s} {wall:8.3f} s  {voxels / wall / 1e6:7.2f} Mvox/s  {cpu:8.3f} s  "
            f"{'' if name == 'raw forward' else overhead}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases", default="hippocampus,brats", help="comma-separated: " + ",".join(CASES)
    )
    args = parser.parse_args()
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {segnet._tf_env.onednn_status()}"
    )
    for name in args.cases.split(","):
        bench(CASES[name], args.repeats)


if __name__ == "__main__":
    main()
