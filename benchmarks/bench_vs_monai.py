"""Benchmark: segnet against MONAI (PyTorch) on the same 3D U-Net and the same CPU, in one run.

    pip install -e ".[bench]"    # CPU PyTorch and MONAI; the tests and CI never need them
    python benchmarks/bench_vs_monai.py [--rounds 3] [--steps 10] [--rows train,window,small]

The network on both sides: a 3D U-Net with 16/32/64/128 filters (three max pools of 2), two
3x3x3 convolution + batch norm + ReLU per level, 2x2x2 transposed convolutions up, a 1x1x1
head; one input channel, 3 classes. MONAI's side is built from MONAI's own blocks
(``monai.networks.blocks.Convolution``), trained with ``monai.losses.DiceCELoss`` (foreground
Dice + cross-entropy, as segnet's ``dice_ce``) and predicted with
``monai.inferers.sliding_window_inference``; segnet's side is the trainer's compiled step
(``segnet.planning.timing.step_for``) and segnet's sliding window. Both train with SGD,
Nesterov momentum 0.99, learning rate 0.01.

Rows (each side in the precision named, then in bfloat16 where the CPU runs it natively):

* ``train``: one training step on a batch of 2 x 64^3 (MONAI channels-last, its fastest;
  bfloat16 through ``torch.autocast``, against segnet's ``mixed_bfloat16``);
* ``window``: sliding-window inference of a BraTS-size 240x240x155 volume, 64^3 windows,
  batch 2, overlap 0.5, Gaussian weighting, softmax blended;
* ``small``: the same on one hippocampus-size 35x50x36 volume (one padded window): what a
  volume costs beyond its convolutions.

Each side runs in a worker subprocess of its own, since PyTorch and TensorFlow each bring their
own oneDNN and thread pools and would compete inside one process. Workers take turns (segnet,
MONAI, segnet, MONAI, ...) for ``--rounds`` rounds, so drift on a shared machine hits both;
each reports the median of its timed repetitions after warm-up, and the table shows the
median over rounds and the ratio ``MONAI seconds / segnet seconds`` (above 1: segnet faster).
Only the timed work is counted, never imports, graph tracing or model building.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout, installed or not

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from segnet.precision import NATIVE_BF16_CPU_FLAGS, read_cpu_flags  # no TensorFlow import

if TYPE_CHECKING:
    import torch

FILTERS = (16, 32, 64, 128)
NUM_CLASSES = 3
PATCH = (64, 64, 64)
BATCH = 2
LEARNING_RATE = 0.01
MOMENTUM = 0.99
OVERLAP = 0.5
LARGE_VOLUME = (240, 240, 155)  # BraTS
SMALL_VOLUME = (35, 50, 36)  # a hippocampus crop
WARMUP = 3
ROWS = ("train", "window", "small")
SIDES = ("segnet", "monai")


@dataclass(frozen=True)
class Work:
    """One cell of the table: a row's work in one precision."""

    row: str
    precision: str  # "float32" or "bfloat16"

    @property
    def label(self) -> str:
        what = {
            "train": f"training step, batch {BATCH} x {'x'.join(map(str, PATCH))}",
            "window": f"sliding window, {'x'.join(map(str, LARGE_VOLUME))}",
            "small": f"sliding window, {'x'.join(map(str, SMALL_VOLUME))}",
        }[self.row]
        return f"{what}, {self.precision}"

    @property
    def warmup(self) -> int:
        return 1 if self.row == "window" else WARMUP  # a large volume warms up in one pass

    def repeats(self, steps: int) -> int:
        return 1 if self.row == "window" else steps


# ---------------------------------------------------------------------------------------------
# Workers: each times one Work on one side and prints a JSON line
# ---------------------------------------------------------------------------------------------
def median_seconds(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trainable_parameters(model: object) -> int:
    return sum(int(weight.numpy().size) for weight in model.trainable_weights)  # type: ignore[attr-defined]


def segnet_worker(work: Work, steps: int) -> dict:
    import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

    # isort: split
    import keras
    import numpy as np
    import tensorflow as tf

    from segnet.config import build_config
    from segnet.inference.sliding_window import make_predict_fn, sliding_window_inference
    from segnet.models.registry import build_model
    from segnet.planning.timing import random_batch, step_for
    from segnet.precision import precision_policy

    config = build_config(
        {
            "name": "bench_vs_monai",
            "data": {
                "root": "unused",  # the benchmark feeds random tensors
                "num_classes": NUM_CLASSES,
                "num_channels": 1,
                "patch_size": list(PATCH),
            },
            "model": {
                "name": "unet3d",
                "unet3d": {
                    "depth": len(FILTERS) - 1,
                    "filters": FILTERS[0],
                    "norm": "batch",
                    "activation": "relu",
                    "upsampling": "transpose",
                },
            },
            "loss": {"name": "dice_ce"},
            "optimizer": {
                "name": "sgd",
                "learning_rate": LEARNING_RATE,
                "momentum": MOMENTUM,
                "nesterov": True,
            },
            "train": {"batch_size": BATCH},
        }
    )
    policy = "mixed_bfloat16" if work.precision == "bfloat16" else "float32"
    rng = np.random.default_rng(0)
    if work.row == "train":
        step = step_for(config, policy, random_batch(config, rng))
        seconds = median_seconds(lambda: step().numpy(), WARMUP, steps)
        with precision_policy(policy):
            parameters = trainable_parameters(build_model(config))
    else:
        with precision_policy(policy):
            keras.utils.set_random_seed(0)
            model = build_model(config)
        parameters = trainable_parameters(model)
        shape = LARGE_VOLUME if work.row == "window" else SMALL_VOLUME
        volume = rng.normal(size=(*shape, 1)).astype(np.float32)
        predict = make_predict_fn(model)

        def run() -> None:
            sliding_window_inference(
                volume, predict, PATCH, num_classes=NUM_CLASSES, overlap=OVERLAP,
                weighting="gaussian", batch_size=BATCH,
            )  # fmt: skip

        seconds = median_seconds(run, work.warmup, work.repeats(steps))
    return {
        "seconds": seconds,
        "parameters": parameters,
        "version": f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
    }


def monai_unet() -> torch.nn.Module:
    """The benchmark's U-Net from MONAI's convolution blocks (conv, batch norm, ReLU)."""
    import torch as _torch
    from monai.networks.blocks import Convolution

    nn = _torch.nn

    def two_convs(channels_in: int, channels_out: int) -> nn.Module:
        return nn.Sequential(
            Convolution(3, channels_in, channels_out, act="RELU", norm="BATCH", bias=False),
            Convolution(3, channels_out, channels_out, act="RELU", norm="BATCH", bias=False),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = list(FILTERS)
            self.encoder = nn.ModuleList(
                two_convs(a, b) for a, b in zip([1, *widths[:-1]], widths, strict=True)
            )
            self.pool = nn.MaxPool3d(2)
            self.up = nn.ModuleList(
                nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                for i in reversed(range(len(widths) - 1))
            )
            self.decoder = nn.ModuleList(
                two_convs(2 * widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
            )
            self.head = nn.Conv3d(widths[0], NUM_CLASSES, 1)

        def forward(self, x: _torch.Tensor) -> _torch.Tensor:
            skips = []
            for level, block in enumerate(self.encoder):
                x = block(x)
                if level < len(self.encoder) - 1:
                    skips.append(x)
                    x = self.pool(x)
            for up, block in zip(self.up, self.decoder, strict=True):
                x = block(_torch.cat([up(x), skips.pop()], dim=1))
            return self.head(x)

    return UNet()


def monai_worker(work: Work, steps: int) -> dict:
    import monai
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    bf16 = work.precision == "bfloat16"
    channels_last = torch.channels_last_3d
    model = monai_unet().to(memory_format=channels_last)
    parameters = sum(p.numel() for p in model.parameters())
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if work.row == "train":
        model.train()
        images = torch.randn(BATCH, 1, *PATCH).to(memory_format=channels_last)
        labels = torch.randint(0, NUM_CLASSES, (BATCH, 1, *PATCH))
        loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True
        )

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(images)
            loss = loss_fn(logits.float(), labels)
            loss.backward()
            optimizer.step()

        seconds = median_seconds(run, WARMUP, steps)
    else:
        model.eval()
        shape = LARGE_VOLUME if work.row == "window" else SMALL_VOLUME
        volume = torch.randn(1, 1, *shape).to(memory_format=channels_last)

        def softmax(batch: torch.Tensor) -> torch.Tensor:
            return torch.softmax(model(batch).float(), dim=1)

        def run() -> None:
            with torch.inference_mode(), autocast():
                sliding_window_inference(
                    volume, PATCH, BATCH, softmax, overlap=OVERLAP, mode="gaussian"
                )

        seconds = median_seconds(run, work.warmup, work.repeats(steps))
    return {
        "seconds": seconds,
        "parameters": parameters,
        "version": f"PyTorch {torch.__version__}, MONAI {monai.__version__}",
    }


def run_worker(side: str, work: Work, steps: int) -> dict:
    """One worker subprocess; its JSON result."""
    command = [
        sys.executable, __file__, "--worker", side, "--work", f"{work.row}:{work.precision}",
        "--steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} worker for {work.label} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def planned_work(rows: list[str], bf16_native: bool) -> list[Work]:
    precisions = ("float32", "bfloat16") if bf16_native else ("float32",)
    return [Work(row, precision) for row in rows for precision in precisions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns per side (median)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps or small volumes")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"any of {','.join(ROWS)}")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # a subprocess of the run below
        row, precision = args.work.split(":")
        worker = segnet_worker if args.worker == "segnet" else monai_worker
        print(json.dumps(worker(Work(row, precision), args.steps)))
        return

    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    missing = [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]
    if missing:  # found, not imported: the workers import them, each in its own process
        raise SystemExit(
            f"bench_vs_monai needs PyTorch and MONAI ({', '.join(missing)} missing): "
            "pip install -e '.[bench]'"
        )

    flags = read_cpu_flags()
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; bfloat16 units: {', '.join(native) or 'none'}"
    )
    if not native:
        print("bfloat16 rows skipped: this CPU would emulate bfloat16 on both sides")
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))

    results: dict[tuple[Work, str], list[float]] = {}
    details: dict[str, dict] = {}
    for work in planned_work(rows, bool(native)):
        for _ in range(args.rounds):
            for side in SIDES:
                result = run_worker(side, work, args.steps)
                results.setdefault((work, side), []).append(result["seconds"])
                details[side] = result
        monai_s = statistics.median(results[(work, "monai")])
        segnet_s = statistics.median(results[(work, "segnet")])
        print(
            f"{work.label:48s} MONAI {monai_s:8.3f} s  segnet {segnet_s:8.3f} s  "
            f"segnet / MONAI speed {monai_s / segnet_s:5.2f}x",
            flush=True,
        )
    for side in SIDES:
        if side in details:
            print(f"{side}: {details[side]['version']}, {details[side]['parameters']} parameters")
    print("load average after:  {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
