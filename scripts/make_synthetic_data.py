#!/usr/bin/env python
"""Generate the synthetic phantom dataset (MSD / nnU-Net layout).

    python scripts/make_synthetic_data.py                      # 40 cases of 64^3 in data/synthetic
    python scripts/make_synthetic_data.py --out /tmp/ph --num-cases 8 --anisotropic

Takes about 10 s for the default set on one core. Does nothing if the folder already holds a
dataset; --force regenerates it.
"""

import argparse
import logging
import shutil
import sys
from pathlib import Path

# Lets a plain clone run the script without `pip install`; an installed segnet works the same.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnet.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, is_synthetic_dataset
from segnet.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", "--output", type=Path, default=Path("data/synthetic"), help="dataset folder"
    )
    parser.add_argument("--num-cases", type=int, default=defaults.num_cases)
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(defaults.shape),
        metavar="N",
        help="voxels per axis (axis 2 shrinks with --anisotropic)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=defaults.num_classes, help="classes including background"
    )
    parser.add_argument("--num-channels", type=int, default=defaults.num_channels)
    parser.add_argument("--num-folds", type=int, default=defaults.num_folds)
    parser.add_argument("--anisotropic", action="store_true", help="1 x 1 x 2.5 mm voxels")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--force", action="store_true", help="replace a synthetic dataset generated earlier"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = SyntheticSpec(
        num_cases=args.num_cases,
        shape=tuple(args.shape),
        num_classes=args.num_classes,
        num_channels=args.num_channels,
        anisotropic=args.anisotropic,
        seed=args.seed,
        num_folds=args.num_folds,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.force and (args.out / "dataset.json").is_file():
        if not is_synthetic_dataset(args.out):  # a real dataset: never ours to delete
            print(
                f"make_synthetic_data: error: --force: {args.out} holds a dataset that this "
                "script did not generate; it is left as it is: choose another --out",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(args.out)
    try:
        root = ensure_synthetic_dataset(args.out, spec)
    except UserError as exc:
        print(f"make_synthetic_data: error: {exc}", file=sys.stderr)
        return 2
    print(f"synthetic dataset in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
