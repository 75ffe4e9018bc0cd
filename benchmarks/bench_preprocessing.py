"""Benchmark: validation and preprocessing-cache times on a real dataset, cold and warm.

    python benchmarks/bench_preprocessing.py                       # ../shared/.../hippocampus
    python benchmarks/bench_preprocessing.py --data ../shared/datasets/brats-sample \
        --num-classes 5 --num-channels 2 --num-folds 2

Measured on the 2-core development machine (shared, so noisy), hippocampus, 208 cases:
validation about 1 s, prepare_cases cold 1.5-2.5 s, warm 0.02-0.04 s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnet.config import ExperimentConfig, build_config
from segnet.data.cache import load_or_compute_fingerprint, prepare_cases
from segnet.data.checks import problems_by_case
from segnet.data.datasets import load_split


def all_problems(cases, config) -> list[str]:
    """Every problem of every case, in order (what check_cases would report)."""
    return [p for problems in problems_by_case(cases, config).values() for p in problems]


DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "hippocampus"
T = TypeVar("T")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--num-channels", type=int, default=1)
    parser.add_argument("--num-folds", type=int, default=4, help="seeded folds if no folds.json")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. preprocessing.resample=true",
    )
    return parser.parse_args()


def make_config(args: argparse.Namespace, cache_dir: Path) -> ExperimentConfig:
    split = (
        {"folds_file": "folds.json"}
        if (args.data / "folds.json").is_file()
        else {"num_folds": args.num_folds}
    )
    data = {
        "root": str(args.data),
        "num_classes": args.num_classes,
        "num_channels": args.num_channels,
        "cache_dir": str(cache_dir),
        "split": split,
    }
    return build_config({"data": data}, args.overrides)


def timed(label: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = work()
    print(f"{label:<34} {time.perf_counter() - start:7.2f} s")
    return result


def main() -> int:
    args = parse_args()
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-preprocessing-"))
    try:
        config = make_config(args, cache_dir)
        split = timed("describe + split", lambda: load_split(config.data))
        cases = [*split.train, *split.val]
        problems = timed(f"validate {len(cases)} cases", lambda: all_problems(cases, config))
        print(f"  problems: {len(problems)}", *problems[:5], sep="\n  ")
        for run in ("cold", "warm"):
            fingerprint = timed(
                f"fingerprint ({run})", lambda: load_or_compute_fingerprint(config, split.train)
            )
            timed(f"prepare_cases ({run})", partial(prepare_cases, config, cases, fingerprint))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
