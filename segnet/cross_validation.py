"""Cross-validation in one command: a run per fold, out-of-fold predictions, post-processing.

``python scripts/train.py --config X --folds all`` (or ``--folds 1,2,3``) trains one ordinary
run per fold under one parent directory, then evaluates each fold's run on its own held-out
fold (the out-of-fold predictions, scored with the ``latest`` checkpoint, since those cases
picked ``best``), summarises the folds, and chooses the post-processing on those predictions::

    runs/NAME/                     the parent (--run-dir), marked .segnet-cross-validation
      fold_1/ fold_2/ ...          one run directory per fold; evaluation/latest/ inside holds
                                   the fold's out-of-fold predictions and metrics
      cross_validation.json        per fold and over all out-of-fold cases: per-class Dice
                                   (mean, std), the foreground mean
      postprocessing.json          per class: keep only the largest component, or not, with the
                                   Dice with and without it that decided

Every fold is an ordinary run: it resumes exactly, so the whole command resumes fold by fold
after any stop (a finished fold only checks that nothing is left to train). ``data.split.
test_fold`` keeps one fold out of every run, a test set no fold sees; ``all`` crosses the rest.
Post-processing is chosen on validation predictions only, never on test data.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from segnet.config import ExperimentConfig
from segnet.data.datasets import available_folds, load_split
from segnet.data.volumes import read_volume
from segnet.errors import ConfigError, RunDirError
from segnet.evaluation.evaluate import evaluate_run
from segnet.files import FolderLock, atomic_write_text
from segnet.inference.postprocessing import choose_largest_component_classes
from segnet.metrics import ClassMetrics, summarize
from segnet.run_dir import MARKER_NAME, CrossValidationLayout, RunLayout, default_run_dir
from segnet.training.trainer import train

log = logging.getLogger("segnet")


@dataclass(frozen=True)
class CrossValidationResult:
    """How a call to :func:`cross_validate` ended.

    Attributes:
        parent: the parent directory.
        folds: the folds run, in order.
        interrupted: a fold was stopped by a signal (run the same command again to resume).
        summary: the content of ``cross_validation.json`` (None when interrupted).
        postprocessing: the content of ``postprocessing.json`` (None when interrupted).
    """

    parent: Path
    folds: tuple[int, ...]
    interrupted: bool
    summary: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None


def parse_folds(text: str, config: ExperimentConfig) -> list[int]:
    """``all`` (every fold but ``data.split.test_fold``) or a comma-separated list.

    Raises:
        ConfigError: a fold that is not a number, is the test fold, or is not in the split.
    """
    available = available_folds(config.data)
    if text.strip() == "all":
        return available
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError([f"--folds {text}: expected 'all' or numbers such as 1,2,3"]) from None
    wrong = [f for f in folds if f not in available]
    if wrong or not folds:
        test = config.data.split.test_fold
        why = f" (fold {test} is data.split.test_fold)" if test in wrong else ""
        raise ConfigError(
            [
                f"--folds {text}: folds {wrong or folds} are not available{why}; choose from {available}"
            ]
        )
    return list(dict.fromkeys(folds))


def fold_config(config: ExperimentConfig, fold: int) -> ExperimentConfig:
    """The experiment of one fold: the same, with ``fold`` held out and the fingerprint taken
    over every fold (as nnU-Net does), so that all folds preprocess a scan alike and form an
    ensemble."""
    split = replace(config.data.split, fold=fold)
    pre = replace(config.preprocessing, fingerprint_cases="all_folds")
    data = replace(config.data, split=split)
    return replace(config, name=f"{config.name}_fold{fold}", data=data, preprocessing=pre)


def cross_validate(
    config: ExperimentConfig,
    folds: Sequence[int],
    parent: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> CrossValidationResult:
    """Trains every fold, evaluates each on its held-out fold, summarises, picks post-processing.

    Raises:
        UserError: the parent is not a cross-validation folder of segnet's or is busy, or a
            fold's data, run directory or training fails as a single run would.
    """
    parent = Path(parent) if parent is not None else default_run_dir(config)
    _check_parent(parent)
    with FolderLock(
        parent,
        busy=f"--run-dir {parent}: another cross-validation (pid {{pid}}) "
        "is running here; wait for it to finish",
    ):
        layout = CrossValidationLayout(parent)
        marker = layout.marker
        if not marker.is_file():
            atomic_write_text(marker, json.dumps({"folds": list(folds)}) + "\n")
        for fold in folds:
            log.info(
                "cross-validation: fold %d (%d of %d)", fold, folds.index(fold) + 1, len(folds)
            )
            result = train(fold_config(config, fold), fold_dir(parent, fold), force, quiet)
            if result.interrupted:
                log.warning(
                    "cross-validation stopped in fold %d; resume with: %s",
                    fold,
                    _resume_command(parent, folds),
                )
                return CrossValidationResult(parent, tuple(folds), interrupted=True)
        documents = {
            fold: evaluate_run(fold_dir(parent, fold), checkpoint="latest", quiet=quiet)["latest"]
            for fold in folds
        }
        summary = _summary(documents)
        atomic_write_text(layout.summary, json.dumps(summary, indent=1) + "\n")
        postprocessing = _choose_postprocessing(config, parent, folds)
        atomic_write_text(layout.postprocessing, json.dumps(postprocessing, indent=1) + "\n")
    log.info("cross-validation of folds %s: %s", list(folds), _headline(summary))
    return CrossValidationResult(parent, tuple(folds), False, summary, postprocessing)


def fold_dir(parent: Path, fold: int) -> Path:
    return CrossValidationLayout(parent).fold(fold)


def _check_parent(parent: Path) -> None:
    """Refuses a folder that holds something else: a run, or files that are not segnet's."""
    if parent.exists() and not parent.is_dir():
        raise RunDirError(f"--run-dir {parent} is a file, not a directory; choose another path")
    if not parent.is_dir() or CrossValidationLayout(parent).marker.is_file():
        return
    if (parent / MARKER_NAME).is_file() or RunLayout(parent).config.is_file():
        raise RunDirError(
            f"--run-dir {parent}: this is a single run's directory; a cross-validation needs its "
            "own parent folder: choose another --run-dir"
        )
    if any(parent.iterdir()):
        raise RunDirError(
            f"--run-dir {parent}: not a segnet cross-validation folder (no "
            f"{CrossValidationLayout(parent).marker.name}) and "
            "not empty; choose a new or empty folder"
        )


def _resume_command(parent: Path, folds: Sequence[int]) -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "scripts/train.py"
    config = shlex.quote(str(RunLayout(fold_dir(parent, folds[0])).config))
    return (
        f"python {shlex.quote(script)} --config {config} --folds "
        f"{','.join(map(str, folds))} --run-dir {shlex.quote(str(parent))}"
    )


# ---------------------------------------------------------------------------------------------
# Summary and post-processing
# ---------------------------------------------------------------------------------------------
def _class_metrics(per_case: dict[str, dict[str, dict[str, Any]]]) -> list[dict[int, ClassMetrics]]:
    """metrics.json's per-case values back as ClassMetrics."""
    names = set(ClassMetrics.keys()) - {"both_empty"}
    return [
        {
            int(label): ClassMetrics(**{k: v for k, v in m.items() if k in names})
            for label, m in c.items()
        }
        for c in per_case.values()
    ]


def _dice_table(summary: dict[str, Any]) -> dict[str, Any]:
    per_class = {
        str(label): {
            "mean": table["dice"]["mean"],
            "std": table["dice"]["std"],
            "cases": table["counted"],
        }
        for label, table in summary["per_class"].items()
        if int(label) != 0
    }
    return {"dice": per_class, "foreground_dice": summary["foreground_mean"].get("dice")}


def _summary(documents: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per fold, then over every out-of-fold case: per-class Dice mean and std."""
    every_case = [
        m for document in documents.values() for m in _class_metrics(document["per_case"])
    ]
    return {
        "folds": {
            str(fold): {"cases": document["num_cases"], **_dice_table(document["summary"])}
            for fold, document in documents.items()
        },
        "all_folds": {"cases": len(every_case), **_dice_table(summarize(every_case))},
        "checkpoint": "latest (each fold's validation cases chose its best)",
    }


def _choose_postprocessing(
    config: ExperimentConfig, parent: Path, folds: Sequence[int]
) -> dict[str, Any]:
    """Keep-largest-component per class, decided on the out-of-fold predictions."""
    pairs = []
    for fold in folds:
        predictions = RunLayout(fold_dir(parent, fold)).evaluation / "latest" / "predictions"
        for case in load_split(fold_config(config, fold).data).val:
            if case.label is None:
                continue
            prediction = np.asarray(read_volume(predictions / f"{case.case_id}.nii.gz")[0])
            reference = np.rint(read_volume(case.label)[0])
            pairs.append((prediction.astype(np.int32), reference.astype(np.int32)))
    choice = choose_largest_component_classes(pairs, config.data.num_classes)
    return {
        "keep_largest_component": [label for label, c in choice.items() if c["chosen"]],
        "per_class": {str(label): c for label, c in choice.items()},
        "chosen_on": f"out-of-fold predictions of folds {list(folds)} ({len(pairs)} cases)",
    }


def _headline(summary: dict[str, Any]) -> str:
    overall = summary["all_folds"]

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    per_class = ", ".join(f"{c}: {number(d['mean'])}" for c, d in overall["dice"].items())
    return f"Dice {number(overall['foreground_dice'])} over {overall['cases']} cases ({per_class})"
