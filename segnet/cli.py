"""Command-line entry points: ``segnet-train``, ``segnet-evaluate``, ``segnet-predict``,
``segnet-plan``, ``segnet-compare``.

``scripts/*.py`` call the same functions. Each parses its flags, then makes one call into the
library. A user-fixable problem (``UserError``) is printed as one message on stderr with exit
status 2 and no traceback; ``--debug`` shows the traceback instead. The exception so reported
stays in :data:`last_error`, for in-process callers (the tests) that need its class rather
than its wording.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from segnet._tf_env import native_log_filter
from segnet.errors import UserError
from segnet.files import WRITE_ERRORS, describe_write_error

EXIT_USAGE = 2
log = logging.getLogger("segnet")
# The UserError (or failed write) the last command in this process printed; None if it printed
# none. Only a record: the message on stderr and the exit status are the interface.
last_error: Exception | None = None


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus the usage) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _override_flag(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example}",
    )


def _run_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        type=Path,
        nargs="+",
        required=True,
        help="run directory; several, or a folder of runs (e.g. the folds of a "
        "cross-validation), average their models' softmax",
    )


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and TF logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if debug and "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # Keras and absl are chatty at INFO; our own logger carries what the user needs.
    for name in ("absl", "tensorflow", "keras"):
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.ERROR)


def _run(
    prog: str,
    body: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    args = parser.parse_args(argv)
    with _logging_restored():
        _setup_logging(args.quiet, args.debug)
        with native_log_filter(enabled=not args.debug):
            return _report_user_errors(prog, body, args)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """A command called in-process (a test, a notebook) leaves logging as it found it: its
    handlers write to the stderr of the moment, which may be gone after the call."""
    root = logging.getLogger()
    names = ("absl", "tensorflow", "keras")
    saved = list(root.handlers), root.level, [logging.getLogger(n).level for n in names]
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in zip(names, saved[2]):
            logging.getLogger(name).setLevel(level)


def _report_user_errors(
    prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    global last_error
    last_error = None
    try:
        return body(args)
    except KeyboardInterrupt:
        # Training handles SIGINT itself at step boundaries; this is Ctrl-C anywhere else
        # (start-up, preprocessing, inference), where nothing half-written is kept.
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        last_error = exc
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        last_error = exc
        if args.debug:
            traceback.print_exc()
        where = exc.filename or "a file"
        print(
            f"{prog}: error: {describe_write_error(exc, where, 'another directory')}",
            file=sys.stderr,
        )
        return EXIT_USAGE


# --------------------------------------------------------------------------------------------
# segnet-train
# --------------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segnet-train", description="Train (or resume) a segmentation model.")
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<name>)")
    _override_flag(parser, "train.epochs=5")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved config as YAML and exit",
    )
    parser.add_argument(
        "--force", action="store_true", help="continue a run directory whose stored config differs"
    )
    parser.add_argument(
        "--folds",
        metavar="all|1,2,3",
        help="cross-validate: one run per fold under --run-dir (default runs/<name>), then the "
        "out-of-fold evaluation and the post-processing choice",
    )
    _common_flags(parser)
    return parser


def _train(args: argparse.Namespace) -> int:
    from segnet.config import config_to_yaml, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(config_to_yaml(config))
        return 0
    if args.folds:
        from segnet.cross_validation import cross_validate, parse_folds

        folds = parse_folds(args.folds, config)
        cross_validate(config, folds, args.run_dir, force=args.force, quiet=args.quiet)
        return 0
    from segnet.training.trainer import train  # imports TensorFlow: only once config is valid

    train(config, run_dir=args.run_dir, force=args.force, quiet=args.quiet)
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    return _run("segnet-train", _train, train_parser(), argv)


# --------------------------------------------------------------------------------------------
# segnet-evaluate
# --------------------------------------------------------------------------------------------
def evaluate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segnet-evaluate", description="Predict the held-out cases of a run and score them."
    )
    _run_flag(parser)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best | latest | all | a checkpoint path (default: latest when the evaluated "
        "cases are the ones that chose best, else best; chosen per run for several)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a config YAML or a dataset directory to evaluate on instead of "
        "the run's held-out split",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="the folder for the evaluation folders (default: the run's evaluation/; for "
        "several runs, evaluation/ in the folder that holds them)",
    )
    _override_flag(parser, "evaluation.overlap=0.25")
    _common_flags(parser)
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    from segnet.evaluation.evaluate import evaluate_run

    evaluate_run(
        args.run,
        checkpoint=args.checkpoint,
        data=args.data,
        overrides=args.overrides,
        quiet=args.quiet,
        output_dir=args.output_dir,
    )
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    return _run("segnet-evaluate", _evaluate, evaluate_parser(), argv)


# --------------------------------------------------------------------------------------------
# segnet-predict
# --------------------------------------------------------------------------------------------
def predict_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segnet-predict", description="Segment NIfTI volumes with a trained run.")
    _run_flag(parser)
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best | latest | a checkpoint path, for every run (default: best)",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        help="image files or directories (nnU-Net channel suffixes _0000...)",
    )
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    _override_flag(parser, "evaluation.mirror_axes=[0,1,2]")
    _common_flags(parser)
    return parser


def _predict(args: argparse.Namespace) -> int:
    from segnet.inference.predict import predict_files

    failures = predict_files(
        args.run,
        inputs=args.input,
        output_dir=args.output,
        checkpoint=args.checkpoint,
        overrides=args.overrides,
        quiet=args.quiet,
    )
    return EXIT_USAGE if failures else 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    return _run("segnet-predict", _predict, predict_parser(), argv)


# --------------------------------------------------------------------------------------------
# segnet-plan
# --------------------------------------------------------------------------------------------
def plan_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segnet-plan",
        description="Configure an experiment from a dataset: a commented YAML that says why.",
    )
    parser.add_argument("dataset", help="dataset folder (MSD, nnU-Net v2, imagesTr/labelsTr)")
    parser.add_argument(
        "--out", type=Path, help="the config to write (default: configs/<dataset>_<model>.yaml)"
    )
    parser.add_argument(
        "--budget", default="60m", help="training time to fit, e.g. 60m, 1h30m (default: 60m)"
    )
    parser.add_argument("--model", choices=("unet3d", "segnet"), default="unet3d")
    _common_flags(parser)
    return parser


def _plan(args: argparse.Namespace) -> int:
    from segnet.planning.planner import plan_dataset  # imports TensorFlow

    say = (lambda line: None) if args.quiet else print
    plan_dataset(args.dataset, args.out, args.budget, args.model, say=say)
    return 0


def plan_main(argv: Sequence[str] | None = None) -> int:
    return _run("segnet-plan", _plan, plan_parser(), argv)


# --------------------------------------------------------------------------------------------
# segnet-compare
# --------------------------------------------------------------------------------------------
def compare_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segnet-compare",
        description="Compare two evaluations of the same cases, case by case.",
    )
    parser.add_argument("baseline", type=Path, help="evaluation folder (or its per_case.csv)")
    parser.add_argument("candidate", type=Path, help="evaluation folder (or its per_case.csv)")
    parser.add_argument(
        "--metric",
        action="append",
        help="per-case metric, repeatable: dice, iou, nsd, hd95_mm, assd_mm "
        "(default: dice and hd95_mm)",
    )
    _common_flags(parser)
    return parser


def _compare(args: argparse.Namespace) -> int:
    from segnet.evaluation import compare  # numpy and scipy only: no TensorFlow

    baseline = compare.read_scores(args.baseline)
    candidate = compare.read_scores(args.candidate)
    differences = compare.compare(baseline, candidate, args.metric or compare.DEFAULT_METRICS)
    print(f"baseline:  {compare.evaluation_csv(args.baseline)}")
    print(f"candidate: {compare.evaluation_csv(args.candidate)}")
    print(compare.format_table(differences, compare.read_class_names(args.baseline)))
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    return _run("segnet-compare", _compare, compare_parser(), argv)
