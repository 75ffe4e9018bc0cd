"""Benchmark: the trainer's step under recipe variants, side by side, to see what buys steps.

    python benchmarks/bench_recipes.py [--config configs/hippocampus_unet3d.yaml]
        [--set model.unet3d.deep_supervision=true]
        --variant "data.patch_size=[32,48,32]" --variant "model.unet3d.filters=12"
        [--repeats 10]

Each ``--variant`` is one or more ``key=value`` overrides separated by ``;``, applied on top of
the config and the shared ``--set`` overrides; the unchanged config is always timed first as
the baseline. Every variant gets the trainer's model, loss, optimizer and compiled step
(``bench_precision.step_for``) in the precision ``runtime.precision: auto`` picks here, and
the steps are timed in turn on random batches of their own shapes, so load from other jobs
hits all alike. Printed per variant: ms per step, the step rate against the baseline, and
the voxel rate against the baseline (a smaller patch or batch runs more steps but each sees
less). How the extra steps trade against context is a question for a training run; this
benchmark only says what each variant costs on this CPU.
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
import math
import os

import numpy as np
import tensorflow as tf
from bench_precision import cpu_flags, random_batch, step_for, time_interleaved

from segnet import _tf_env
from segnet.config import build_config, read_yaml
from segnet.errors import ConfigError
from segnet.precision import choose_precision

BASELINE = "baseline"


def parse_variant(text: str) -> list[str]:
    """``"a=1; b=[1,2]"`` -> ``["a=1", "b=[1,2]"]``."""
    overrides = [part.strip() for part in text.split(";") if part.strip()]
    if not overrides:
        raise SystemExit(f"--variant {text!r}: expected key=value overrides separated by ';'")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hippocampus_unet3d.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="'K=V[; K=V]'", help="repeatable"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (median reported)")
    args = parser.parse_args()

    raw = read_yaml(args.config)
    variants = {BASELINE: []} | {text: parse_variant(text) for text in args.variant}
    try:
        configs = {
            name: build_config(raw, [*args.overrides, *extra], source=args.config)
            for name, extra in variants.items()
        }
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None

    precision = choose_precision("auto")
    rng = np.random.default_rng(0)
    steps = {}
    voxels = {}
    for name, config in configs.items():
        steps[name] = step_for(config, precision.name, random_batch(config, rng))
        voxels[name] = config.train.batch_size * math.prod(config.data.patch_size)

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} cores; {_tf_env.onednn_status()}")
    print(f"CPU flags: {cpu_flags()}")
    print(f"precision {precision.name} ({precision.reason}); median of {args.repeats} steps")
    base = configs[BASELINE]
    print(
        f"{args.config} {' '.join(args.overrides)}: model {base.model.name}, "
        f"batch {base.train.batch_size} x {list(base.data.patch_size)}"
    )
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    timings = time_interleaved(steps, args.repeats)
    print("load average after:  {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    width = max(len(name) for name in timings)
    print(f"{'variant':{width}s}  ms/step  step rate  voxel rate")
    for name, seconds in timings.items():
        step_rate = timings[BASELINE] / seconds
        voxel_rate = step_rate * voxels[name] / voxels[BASELINE]
        print(f"{name:{width}s} {seconds * 1e3:8.1f} {step_rate:9.2f}x {voxel_rate:10.2f}x")


if __name__ == "__main__":
    main()
