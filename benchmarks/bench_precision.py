"""Benchmark: the trainer's own step in float32 against mixed_bfloat16, side by side.

    python benchmarks/bench_precision.py [--config configs/hippocampus_unet3d.yaml] [--repeats 20]

Builds the config's model twice, once per ``runtime.precision``, with the trainer's loss,
optimizer and compiled step (``segnet.planning.timing.step_for``, what ``segnet-plan`` times),
and times one step of each in turn on the same random batch of ``data.patch_size`` (so load from other jobs hits
both alike). The ratio is what choosing ``mixed_bfloat16`` buys on this CPU: oneDNN runs bf16
convolutions on AMX tiles or AVX512-BF16 where the CPU has them, and emulates them (slower
than float32) where it does not. The printed CPU flags say which case this machine is.
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
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from segnet import _tf_env
from segnet.config import load_config
from segnet.planning.timing import random_batch, step_for  # the planner times the same step
from segnet.precision import choose_precision, read_cpu_flags

PRECISIONS = ("float32", "mixed_bfloat16")
WARMUP = 3
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx_vnni")


def cpu_flags() -> str:
    flags = read_cpu_flags()
    if not flags:
        return "unknown"
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)


def time_interleaved(steps: dict[str, Callable[[], tf.Tensor]], repeats: int) -> dict[str, float]:
    """Median wall seconds per step of each, taking turns."""
    for step in steps.values():
        for _ in range(WARMUP):
            step().numpy()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step().numpy()  # .numpy() waits for the result
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hippocampus_unet3d.yaml")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (median reported)")
    args = parser.parse_args()
    config = load_config(args.config)
    shape = (config.train.batch_size, *config.data.patch_size)
    batch = random_batch(config, np.random.default_rng(0))
    steps = {p: step_for(config, p, batch) for p in PRECISIONS}

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} cores; {_tf_env.onednn_status()}")
    print(f"CPU flags: {cpu_flags()}")
    auto = choose_precision("auto")
    print(f"runtime.precision: auto trains in {auto.name} here ({auto.reason})")
    print(f"{args.config}: model {config.model.name}, batch {shape}, median of {args.repeats}")
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    timings = time_interleaved(steps, args.repeats)
    print("load average after:  {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    for name, seconds in timings.items():
        print(f"{name:15s} {seconds * 1e3:8.1f} ms/step  {1 / seconds:6.2f} steps/s")
    ratio = timings["float32"] / timings["mixed_bfloat16"]
    print(f"mixed_bfloat16 runs {ratio:.2f}x the float32 step rate")


if __name__ == "__main__":
    main()
