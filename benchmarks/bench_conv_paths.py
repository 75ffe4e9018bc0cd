"""Benchmark: the two places where segnet's convolutions leave TensorFlow's default path.

    python benchmarks/bench_conv_paths.py [--repeats 10] [--configs configs/acdc_unet.yaml,...]

1. **The image's convolution in float32** (``blocks.FLOAT32_MAX_INPUT_CHANNELS``): under mixed
   precision a 3D convolution reading at most 3 channels computes in float32, because
   oneDNN's bfloat16 kernels for one input channel are slow.
2. **In-plane kernels trained through 2D kernels** (``segnet.models.in_plane``): a 3D kernel
   flat along one axis (3x3x1, the planner's choice on anisotropic grids) keeps TensorFlow's
   forward pass, and its gradients fold the flat axis into the batch and run as 2D.

Three tables, each measured side by side in one run, taking turns so that load from other jobs
hits both alike:

* the image's convolution alone (16 filters, batch 2, 1-16 input channels): forward pass and
  kernel gradient (the image needs no gradient), bfloat16 against float32;
* an in-plane convolution alone: forward and both gradients, TensorFlow's 3D path against
  segnet's, in float32 and bfloat16;
* the trainer's whole compiled step (``segnet.planning.timing.step_for``, what segnet-plan
  times) of each config, built with neither path, with the first, and with both, each in a
  worker process of its own (in one process the model built first timed fastest), the
  workers taking turns for ``--rounds`` rounds.

The float32 rule only matters where bfloat16 runs natively (AMX or AVX512-BF16), where
``runtime.precision: auto`` trains in it; the in-plane path is timed in both precisions.
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
import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig, build_config, load_config
from segnet.models import blocks, in_plane
from segnet.planning.timing import random_batch, step_for
from segnet.precision import choose_precision, read_cpu_flags

WARMUP = 3
BENCH_NET = "bench_vs_monai's U-Net (64^3, 3x3x3)"
IMAGE_CASES = {  # label: (batch + spatial shape, kernel size)
    "64^3, 3x3x3": ((2, 64, 64, 64), (3, 3, 3)),
    "160x192x8, 3x3x1 (ACDC)": ((2, 160, 192, 8), (3, 3, 1)),
}
IN_PLANE_CASES = {  # label: (batch + spatial shape, kernel size, channels in, channels out)
    "160x192x8, 3x3x1, 16 -> 16": ((2, 160, 192, 8), (3, 3, 1), 16, 16),
    "160x192x8, 3x3x1, 32 -> 16": ((2, 160, 192, 8), (3, 3, 1), 32, 16),
    "80x96x8, 3x3x1, 32 -> 32": ((2, 80, 96, 8), (3, 3, 1), 32, 32),
    "8x160x192, 1x3x3, 16 -> 16": ((2, 8, 160, 192), (1, 3, 3), 16, 16),
}


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each run, timed in turns after ``WARMUP`` calls of each."""
    for run in runs.values():
        for _ in range(WARMUP):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


@contextlib.contextmanager
def paths(float32_image: bool, in_plane_gradients: bool) -> Iterator[None]:
    """Builds (and traces) with the two paths on or off; the defaults have both on."""
    saved = blocks.FLOAT32_MAX_INPUT_CHANNELS, in_plane.ENABLED
    blocks.FLOAT32_MAX_INPUT_CHANNELS = saved[0] if float32_image else 0
    in_plane.ENABLED = in_plane_gradients
    try:
        yield
    finally:
        blocks.FLOAT32_MAX_INPUT_CHANNELS, in_plane.ENABLED = saved


def image_table(repeats: int) -> None:
    print("\n1. the image's convolution alone, 16 filters, batch 2 (ms; ratio = bfloat16 time /"
          " float32 time)")  # fmt: skip
    print(f"{'input':<26} {'ch':>3} {'forward bf16':>13} {'f32':>7} {'ratio':>6}"
          f" {'kernel grad bf16':>17} {'f32':>7} {'ratio':>6}")  # fmt: skip
    rng = np.random.default_rng(0)
    for label, (shape, kernel) in IMAGE_CASES.items():
        for channels in (1, 2, 3, 4, 8, 16):
            runs = {}
            for name, dtype in (("bf16", tf.bfloat16), ("f32", tf.float32)):
                x = tf.constant(rng.normal(size=(*shape, channels)), dtype)
                w = tf.Variable(rng.normal(size=(*kernel, channels, 16)).astype(np.float32))
                dy = tf.constant(rng.normal(size=(*shape, 16)), dtype)
                runs[f"forward {name}"] = _forward(x, w, dtype)
                runs[f"gradient {name}"] = _kernel_gradient(x, w, dy, dtype)
            ms = interleaved(runs, repeats)
            print(
                f"{label:<26} {channels:>3} {ms['forward bf16']:>13.1f} {ms['forward f32']:>7.1f}"
                f" {ms['forward bf16'] / ms['forward f32']:>5.2f}x"
                f" {ms['gradient bf16']:>17.1f} {ms['gradient f32']:>7.1f}"
                f" {ms['gradient bf16'] / ms['gradient f32']:>5.2f}x",
                flush=True,
            )


def _forward(x: tf.Tensor, w: tf.Variable, dtype: tf.DType) -> Callable[[], object]:
    @tf.function
    def forward() -> tf.Tensor:
        return tf.reduce_sum(tf.nn.conv3d(x, tf.cast(w, dtype), [1] * 5, "SAME")[0, 0, 0])

    return lambda: forward().numpy()


def _kernel_gradient(
    x: tf.Tensor, w: tf.Variable, dy: tf.Tensor, dtype: tf.DType
) -> Callable[[], object]:
    @tf.function
    def kernel_gradient() -> tf.Tensor:
        with tf.GradientTape() as tape:
            y = tf.nn.conv3d(x, tf.cast(w, dtype), [1] * 5, "SAME")
        return tape.gradient(y, w, output_gradients=dy)

    return lambda: kernel_gradient().numpy()


def in_plane_table(repeats: int) -> None:
    print("\n2. an in-plane convolution alone, batch 2: forward + both gradients (ms; speed-up ="
          " TensorFlow's 3D backward time / segnet's 2D one)")  # fmt: skip
    print(f"{'convolution':<28} {'dtype':<9} {'TensorFlow 3D':>14} {'segnet 2D':>10}"
          f" {'speed-up':>9}")  # fmt: skip
    rng = np.random.default_rng(0)
    for label, (shape, kernel, channels, filters) in IN_PLANE_CASES.items():
        for dtype in (tf.float32, tf.bfloat16):
            x = tf.constant(rng.normal(size=(*shape, channels)), dtype)
            w = tf.Variable(rng.normal(size=(*kernel, channels, filters)).astype(np.float32))
            dy = tf.constant(rng.normal(size=(*shape, filters)), dtype)
            runs = {}
            for name, on in (("3d", False), ("2d", True)):
                with paths(float32_image=True, in_plane_gradients=on):
                    runs[name] = _both_gradients(x, w, dy, dtype, kernel)
            ms = interleaved(runs, repeats)
            print(f"{label:<28} {dtype.name:<9} {ms['3d']:>14.1f} {ms['2d']:>10.1f}"
                  f" {ms['3d'] / ms['2d']:>8.2f}x", flush=True)  # fmt: skip


def _both_gradients(
    x: tf.Tensor, w: tf.Variable, dy: tf.Tensor, dtype: tf.DType, kernel: tuple
) -> Callable[[], object]:
    axis = in_plane.flat_axis(kernel, (1, 1, 1), (1, 1, 1), "same", "channels_last")

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            weights = tf.cast(w, dtype)
            if axis is None:
                y = tf.nn.conv3d(x, weights, [1] * 5, "SAME")
            else:
                y = in_plane.conv3d(x, weights, axis, "same")
        dx, dw = tape.gradient(y, [x, w], output_gradients=dy)
        return tf.reduce_sum(tf.cast(dx[0, 0, 0], tf.float32)) + tf.reduce_sum(dw)

    step()  # traced now, while ``paths`` holds
    return lambda: step().numpy()


def bench_net_config() -> ExperimentConfig:
    return build_config(
        {
            "data": {"root": "unused", "num_classes": 3, "num_channels": 1,
                     "patch_size": [64, 64, 64]},
            "model": {"name": "unet3d", "unet3d": {"depth": 3, "filters": 16, "norm": "batch",
                                                   "activation": "relu"}},
            "loss": {"name": "dice_ce"},
            "optimizer": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.99},
            "train": {"batch_size": 2},
        }
    )  # fmt: skip


VARIANTS = {  # name: (float32 image convolution, in-plane gradients through 2D)
    "neither": (False, False),
    "image": (True, False),
    "both": (True, True),
}


def step_worker(config_path: str, variant: str, repeats: int) -> None:
    """Times one variant's step in this process and prints its median seconds as JSON.

    One process per variant: timing several large models in one process measured whichever
    was built first as the fastest (oneDNN's primitive caches), whatever its path.
    """
    config = bench_net_config() if config_path == BENCH_NET else load_config(config_path)
    batch = random_batch(config, np.random.default_rng(0))
    image, planar = VARIANTS[variant]
    with paths(float32_image=image, in_plane_gradients=planar):
        step = step_for(config, choose_precision("auto").name, batch)
        step().numpy()  # traced now, while ``paths`` holds
    ms = interleaved({variant: lambda: step().numpy()}, repeats)[variant]
    print(json.dumps({"seconds": ms / 1000}))


def run_step_worker(config_path: str, variant: str, repeats: int) -> float:
    command = [
        sys.executable, __file__, "--worker", variant, "--configs", config_path,
        "--repeats", str(repeats),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{variant} worker for {config_path} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(lines[-1])["seconds"])


def step_table(config_paths: list[str], repeats: int, rounds: int) -> None:
    precision = choose_precision("auto").name
    print(f"\n3. the trainer's step in {precision} (auto on this CPU), one worker process per"
          f" variant, taking turns for {rounds} rounds: median seconds, and speed-up over"
          " neither path")  # fmt: skip
    print(f"{'config':<38} {'neither':>9} {'+ float32 image':>16} {'+ in-plane 2D':>16}")
    for config_path in [BENCH_NET, *config_paths]:
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name in VARIANTS:
                seconds[name].append(run_step_worker(config_path, name, repeats))
        s = {name: statistics.median(values) for name, values in seconds.items()}
        print(
            f"{config_path:<38} {s['neither']:>8.3f}s"
            f" {s['image']:>8.3f}s {s['neither'] / s['image']:>5.2f}x"
            f" {s['both']:>8.3f}s {s['neither'] / s['both']:>5.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each (median)")
    parser.add_argument(
        "--configs",
        default="configs/hippocampus_unet3d.yaml,configs/acdc_unet.yaml",
        help="comma-separated configs whose steps to time (besides bench_vs_monai's net)",
    )
    parser.add_argument(
        "--tables", default="1,2,3", help="which tables to print, e.g. 3 for the steps alone"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns per variant (table 3)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        step_worker(args.configs, args.worker, args.repeats)
        return
    flags = sorted(read_cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512f", "avx2"})
    print(f"CPU flags: {', '.join(flags) or 'none of amx_bf16, avx512_bf16, avx512f, avx2'};"
          f" TensorFlow {tf.__version__}")  # fmt: skip
    tables = set(args.tables.split(","))
    if "1" in tables:
        image_table(args.repeats)
    if "2" in tables:
        in_plane_table(args.repeats)
    if "3" in tables:
        step_table([p for p in args.configs.split(",") if p], args.repeats, args.rounds)


if __name__ == "__main__":
    main()
