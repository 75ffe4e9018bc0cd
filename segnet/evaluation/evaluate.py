"""Evaluation of a trained run on labelled held-out volumes, in millimetres.

``evaluate_run`` predicts every held-out case with :class:`segnet.inference.predict.Predictor`
(the training preprocessing, sliding-window inference, then the inverse preprocessing), so each
prediction is scored on its scan's original grid against the original label, with the original
voxel spacing: Dice, IoU, HD95, ASSD, NSD (tolerance ``evaluation.nsd_tolerance_mm``) and the
volume difference, per foreground class (``segnet.metrics``).

Which cases (``--data``):

* default: the run's held-out split (``data.split`` of its stored config);
* a config YAML: the held-out split of that file's ``data`` section;
* a dataset folder (MSD ``dataset.json`` or nnU-Net ``imagesTr``/``labelsTr``): every labelled
  case in it, all of them unseen by the model.

Every case is checked before any prediction (unreadable files, labels off the image grid or
outside ``0..num_classes-1``); problems stop the evaluation listing them all, unless
``data.skip_bad_cases`` leaves those cases out with a warning.

Output, per checkpoint, in ``<run>/evaluation/<checkpoint name>/`` (``<checkpoint
name>-on-<data name>/`` with ``--data``, so other data never replaces the held-out results):
``metrics.json`` (config, checkpoint, per-class summary, per-case values, the empty-mask
policy), ``per_case.csv``, ``predictions/<case>.nii.gz`` (plus probabilities with
``evaluation.save_probabilities``) and ``montages/<case>.png`` (with ``evaluation.montage``).
Predictions and montages an earlier evaluation left in the folder for cases not evaluated now
are removed, so the folder matches its ``metrics.json``. A summary table is printed; with
``--checkpoint all`` a ranking by mean foreground Dice is printed too and kept in
``<run>/evaluation/ranking.txt`` (``ranking-on-<data name>.txt``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segnet.config import ExperimentConfig, SplitConfig, config_to_dict, load_config
from segnet.data.datasets import CaseFiles, dataset_root, describe_dataset, load_split
from segnet.data.validation import EVALUATE_FIXES, check_cases
from segnet.data.volumes import read_volume
from segnet.errors import ConfigError, UserError
from segnet.evaluation import report
from segnet.evaluation.montage import write_montage
from segnet.files import atomic_write_text, ensure_writable_dir
from segnet.inference import loading
from segnet.inference.predict import (
    PROBABILITIES_SUFFIX,
    Predictor,
    load_predictor,
    read_case,
    write_segmentation,
)
from segnet.metrics import ClassMetrics, compute_case_metrics, summarize
from segnet.training.progress import is_interactive

log = logging.getLogger("segnet")
EVALUATION_DIR = "evaluation"


def evaluate_run(
    run_dir: Path,
    checkpoint: str = "best",
    data: str | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    quiet: bool = False,
) -> dict:
    """Predicts and scores the held-out cases with one or every checkpoint of a run.

    Args:
        run_dir: the run directory.
        checkpoint: ``best``, ``latest``, ``all`` or a path (``segnet.inference.loading``).
        data: None for the run's held-out split, a config YAML, or a dataset folder.
        overrides: ``key=value`` changes to ``evaluation.*`` and other inference settings.
        quiet: no progress bars.

    Returns:
        ``{checkpoint name: metrics document}``, each as written to its ``metrics.json``.

    Raises:
        UserError: the run, checkpoint, data or overrides are unusable, or cases are bad.
    """
    run_dir = Path(run_dir)
    config = loading.load_run_config(run_dir, overrides)
    refs = loading.resolve_checkpoints(run_dir, checkpoint, allow_all=True)
    ensure_writable_dir(
        run_dir / EVALUATION_DIR, "evaluation folder", "fix the permissions of the run directory"
    )
    config, cases = evaluation_cases(config, data)
    class_names = dataset_class_names(config)
    results: dict[str, Any] = {}
    for ref in refs:
        folder = run_dir / EVALUATION_DIR / evaluation_folder_name(ref.name, data)
        document = evaluate_checkpoint(run_dir, config, ref, cases, class_names, quiet, folder)
        results[ref.name] = document
        print(f"\n{ref.name} ({ref.path}), {len(cases)} cases:")
        print(report.summary_table(document["summary"], class_names))
    if len(refs) > 1:
        ranking = report.ranking_table({name: doc["summary"] for name, doc in results.items()})
        ranking_file = evaluation_folder_name("ranking", data) + ".txt"
        atomic_write_text(run_dir / EVALUATION_DIR / ranking_file, ranking + "\n")
        print(f"\ncheckpoints ranked by mean foreground Dice:\n{ranking}")
    return results


def evaluate_checkpoint(
    run_dir: Path,
    config: ExperimentConfig,
    ref: loading.CheckpointRef,
    cases: list[CaseFiles],
    class_names: dict[int, str] | None = None,
    quiet: bool = False,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Predicts and scores ``cases`` with one checkpoint; writes its evaluation folder.

    Args:
        out_dir: the folder (default ``<run_dir>/evaluation/<checkpoint name>``). Predictions
            and montages an earlier evaluation left there for other cases are removed at the
            end, so the folder always matches its ``metrics.json``.

    Returns:
        The metrics document (see ``report.metrics_document``).
    """
    out_dir = out_dir or run_dir / EVALUATION_DIR / ref.name
    predictor = load_predictor(run_dir, config, ref)
    per_case: dict[str, dict[int, ClassMetrics]] = {}
    bar = tqdm(cases, desc=f"Evaluating {ref.name}", unit="case", disable=not is_interactive(quiet))
    for case in bar:
        per_case[case.case_id] = evaluate_case(predictor, case, out_dir)
    document = report.metrics_document(
        config=config_to_dict(config),
        checkpoint=ref.path,
        summary=summarize(list(per_case.values())),
        per_case=per_case,
        class_names=class_names,
    )
    report.write_json(out_dir / "metrics.json", document)
    report.write_per_case_csv(out_dir / "per_case.csv", per_case)
    log.info("wrote %s", out_dir / "metrics.json")
    _remove_stale_outputs(out_dir, [case.case_id for case in cases], config)
    return document


def evaluation_folder_name(checkpoint_name: str, data: str | None) -> str:
    """``best`` for the run's held-out split; ``best-on-<name>`` for ``--data``, so that
    evaluating on other data never replaces the held-out results."""
    if data is None:
        return checkpoint_name
    name = Path(data).expanduser().resolve().name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return f"{checkpoint_name}-on-{name}"


def _remove_stale_outputs(out_dir: Path, case_ids: list[str], config: ExperimentConfig) -> None:
    """Deletes the predictions and montages in ``out_dir`` that this evaluation did not write
    (cases of an earlier evaluation, probability maps no longer asked for)."""
    expected = {f"predictions/{c}.nii.gz" for c in case_ids}
    if config.evaluation.save_probabilities:
        expected |= {f"predictions/{c}{PROBABILITIES_SUFFIX}" for c in case_ids}
    if config.evaluation.montage:
        expected |= {f"montages/{c}.png" for c in case_ids}
    ours = [*out_dir.glob("predictions/*.nii.gz"), *out_dir.glob("montages/*.png")]
    stale = [p for p in ours if p.relative_to(out_dir).as_posix() not in expected]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d outputs of an earlier evaluation from %s", len(stale), out_dir)


def evaluate_case(predictor: Predictor, case: CaseFiles, out_dir: Path) -> dict[int, ClassMetrics]:
    """Predicts one labelled case, writes its prediction and montage, and scores it.

    Returns:
        ``{foreground class: ClassMetrics}`` on the original grid, in mm.
    """
    config = predictor.config
    assert case.label is not None, "evaluation cases are labelled"
    image, geometry = read_case(case, config.data.num_channels)
    label = np.rint(read_volume(case.label)[0]).astype(np.uint8)  # values checked up front
    segmentation = predictor.segment(image, geometry, config.evaluation.save_probabilities)
    write_segmentation(out_dir / "predictions", case.case_id, segmentation, geometry)
    if config.evaluation.montage:
        montage = out_dir / "montages" / f"{case.case_id}.png"
        write_montage(montage, image, segmentation.labels, label, geometry.orientation)
    return compute_case_metrics(
        segmentation.labels,
        label,
        geometry.spacing,
        config.data.num_classes,
        config.evaluation.nsd_tolerance_mm,
    )


# ---------------------------------------------------------------------------------------------
# Which cases
# ---------------------------------------------------------------------------------------------
def evaluation_cases(
    config: ExperimentConfig, data: str | None
) -> tuple[ExperimentConfig, list[CaseFiles]]:
    """The config with the data section evaluated on, and its checked labelled cases.

    Raises:
        UserError: ``data`` is neither a YAML file nor a folder, describes other channels or
            classes than the model's, or its cases are unusable.
    """
    if data is None:
        cases = list(load_split(config.data).val)
    else:
        path = Path(data).expanduser()
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            config = dataclasses.replace(config, data=_data_from_yaml(path, config))
            cases = list(load_split(config.data).val)
        elif path.is_dir():
            config = dataclasses.replace(config, data=_data_from_folder(path, config))
            cases = describe_dataset(config.data, "train")
        else:
            raise UserError(
                f"--data {data}: neither a config .yaml file nor a dataset folder; pass an "
                "experiment YAML or a folder with dataset.json or imagesTr/ and labelsTr/"
            )
    cases = [c for c in cases if c.label is not None]
    if not cases:
        raise UserError(f"no labelled cases to evaluate in {config.data.root}")
    # Inference pads volumes smaller than the window, so that training-only check is off.
    padded = dataclasses.replace(config.data, pad_small_volumes=True)
    return config, check_cases(cases, padded, EVALUATE_FIXES).cases


def _data_from_yaml(path: Path, config: ExperimentConfig) -> Any:
    other = load_config(path).data
    mismatched = [
        f"{path}: data.{name} is {getattr(other, name)} but the model was trained with "
        f"{getattr(config.data, name)}; the data must match the model: set data.{name}: "
        f"{getattr(config.data, name)} in {path.name} if it does, else evaluate other data"
        for name in ("num_channels", "num_classes")
        if getattr(other, name) != getattr(config.data, name)
    ]
    if mismatched:
        raise ConfigError(mismatched)
    # The file's data section replaces the run's, but --set data.skip_bad_cases=true (the fix
    # check_cases names on evaluate) must still work.
    skip = other.skip_bad_cases or config.data.skip_bad_cases
    return dataclasses.replace(other, skip_bad_cases=skip)


def _data_from_folder(path: Path, config: ExperimentConfig) -> Any:
    return dataclasses.replace(
        config.data,
        root=str(path.absolute()),
        format="auto",
        cases=(),
        synthetic=False,
        split=SplitConfig(),
    )


def dataset_class_names(config: ExperimentConfig) -> dict[int, str]:
    """Label names from the dataset's ``dataset.json`` (MSD or nnU-Net v2 style), if any."""
    try:
        info = json.loads((dataset_root(config.data) / "dataset.json").read_text("utf-8"))
        labels = info.get("labels") or {}
        pairs = [(v, k) if isinstance(v, int) else (k, v) for k, v in labels.items()]
        return {int(label): str(name) for label, name in pairs}
    except (OSError, ValueError, TypeError, AttributeError, UserError):
        return {}  # names only decorate the tables
