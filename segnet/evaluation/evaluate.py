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
Each evaluation is written aside, into a hidden ``.<name>.partial-*`` folder, and swapped in
only when complete (``metrics.json`` last), so a folder always matches its ``metrics.json``: a
kill mid-evaluation leaves the previous complete evaluation in place (or restores it, on the
next run, when the kill fell between the two renames of the swap) and the next evaluation says
so. One evaluation process at a time writes a run's ``evaluation/`` folder (training may run
meanwhile). A summary table is printed; with
``--checkpoint all`` a ranking by mean foreground Dice is printed too and kept in
``<run>/evaluation/ranking.txt`` (``ranking-on-<data name>.txt``). ``--output-dir`` puts all of
this in another folder instead of ``<run>/evaluation/``.

Several runs are evaluated as one ensemble (:func:`evaluate_ensemble`): the mean of their
softmaxes is scored, and the results, which belong to no single run, go to
``evaluation/ensemble-<run names>-<checkpoint names>/`` beside the runs, or ``--output-dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segnet.config import ExperimentConfig, SplitConfig, config_to_dict, load_config
from segnet.console import progress_bar
from segnet.data.checks import EVALUATE_FIXES, check_cases
from segnet.data.datasets import CaseFiles, dataset_class_names, describe_dataset, load_split
from segnet.data.volumes import read_volume
from segnet.errors import ConfigError, UserError
from segnet.evaluation import report
from segnet.evaluation.montage import write_montage
from segnet.files import FolderLock, atomic_write_text, ensure_writable_dir
from segnet.inference import loading
from segnet.inference.predict import (
    Predictor,
    load_ensemble,
    load_predictor,
    log_postprocessing,
    read_case,
    write_segmentation,
)
from segnet.metrics import ClassMetrics, compute_case_metrics, summarize
from segnet.run_dir import RunLayout

log = logging.getLogger("segnet")
# The hidden folders of an evaluation being written (partial) or being replaced (old).
_STAGED = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-\d+-[0-9a-f]+")
_MAX_NAMES = 120  # characters of run names in an ensemble's folder name


def evaluate_run(
    run_dir: Path | Sequence[Path],
    checkpoint: str | None = None,
    data: str | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    quiet: bool = False,
    output_dir: Path | None = None,
) -> dict:
    """Predicts and scores the held-out cases with one or every checkpoint of a run.

    Args:
        run_dir: the run directory; several (or folders of runs) evaluate their ensemble
            (:func:`evaluate_ensemble`).
        checkpoint: ``best``, ``latest``, ``all`` or a path (``segnet.inference.loading``);
            None picks one (:func:`_pick_checkpoint`).
        data: None for the run's held-out split, a config YAML, or a dataset folder.
        overrides: ``key=value`` changes to ``evaluation.*`` and other inference settings.
        quiet: no progress bars.
        output_dir: the folder that receives the evaluation folders, instead of
            ``<run>/evaluation``.

    Returns:
        ``{checkpoint name: metrics document}``, each as written to its ``metrics.json``.

    Raises:
        UserError: the run, checkpoint, data or overrides are unusable, or cases are bad.
    """
    runs = loading.load_runs(run_dir, overrides)
    if len(runs) > 1:
        return evaluate_ensemble(runs, checkpoint, data, quiet, output_dir, run_dir)
    run_dir, config = runs[0].directory, runs[0].config
    run_config = config
    config, cases, failures = evaluation_cases(config, data)
    chose_best = cases_that_chose_best(run_config, cases)
    checkpoint, selection = _pick_checkpoint(run_dir, checkpoint, chose_best, len(cases))
    log.info("checkpoint: %s", selection)
    provenance = {
        "checkpoint_selection": selection,
        "cases_that_chose_best": chose_best,
        "failures": failures,
    }
    refs = loading.resolve_checkpoints(run_dir, checkpoint, allow_all=True)
    evaluation_dir = _evaluation_dir(output_dir or RunLayout(run_dir).evaluation, output_dir)
    class_names = dataset_class_names(config.data)
    results: dict[str, Any] = {}
    with _hold(evaluation_dir):
        recover_interrupted(evaluation_dir)
        for ref in refs:
            folder = evaluation_dir / evaluation_folder_name(ref.name, data)
            document = evaluate_checkpoint(
                run_dir, config, ref, cases, class_names, quiet, folder, provenance
            )
            results[ref.name] = document
            print(f"\n{ref.name} ({ref.path}), {len(cases)} cases; {selection}:")
            print(report.summary_table(document["summary"], class_names))
    if len(refs) > 1:
        ranking = report.ranking_table({name: doc["summary"] for name, doc in results.items()})
        ranking_file = evaluation_folder_name("ranking", data) + ".txt"
        atomic_write_text(evaluation_dir / ranking_file, ranking + "\n")
        print(f"\ncheckpoints ranked by mean foreground Dice:\n{ranking}")
    return results


def evaluate_ensemble(
    runs: Sequence[loading.Run],
    checkpoint: str | None = None,
    data: str | None = None,
    quiet: bool = False,
    output_dir: Path | None = None,
    named: Path | Sequence[Path] = (),
) -> dict:
    """Predicts and scores the held-out cases with the mean softmax of several runs.

    ``named`` are the paths ``--run`` gave: a cross-validation's parent among them brings its
    post-processing choice (``loading.chosen_postprocessing``).

    The cases, preprocessing and sliding-window settings are the first run's (``data`` as for
    :func:`evaluate_run`); the checkpoint is chosen per run (:func:`_pick_checkpoint`). The
    results belong to no single run: they go to ``output_dir``, by default the ``evaluation``
    folder beside the runs (they must then share a parent folder), in
    ``ensemble-<run names>-<checkpoint names>`` (``-on-<data name>`` with ``data``).
    ``metrics.json`` lists each run with its checkpoint, why it was chosen, and the evaluated
    cases that chose its best checkpoint or that it trained on (a warning says so too).

    Returns:
        ``{evaluation folder name: metrics document}``.

    Raises:
        UserError: as :func:`evaluate_run`; ``--checkpoint all``; runs in different folders
            without ``output_dir``.
    """
    if checkpoint == "all":
        raise UserError(
            "--checkpoint all ranks the checkpoints of one run; an ensemble takes one per run: "
            "pass best, latest or a path, or leave --checkpoint out"
        )
    root = output_dir or _beside(runs)
    config, cases, failures = evaluation_cases(runs[0].config, data)
    members = [_ensemble_member(run, checkpoint, cases) for run in runs]
    refs = [ref for ref, _ in members]
    records = [record for _, record in members]
    name = evaluation_folder_name(ensemble_name(runs, refs), data)
    evaluation_dir = _evaluation_dir(root, output_dir)
    class_names = dataset_class_names(config.data)
    with _hold(evaluation_dir):
        recover_interrupted(evaluation_dir)
        choice = loading.chosen_postprocessing(named)
        chosen = log_postprocessing(choice)
        predictor = load_ensemble(
            [dataclasses.replace(runs[0], config=config), *runs[1:]], refs, chosen
        )
        provenance: dict[str, Any] = {"runs": records, "failures": failures}
        if choice is not None:
            provenance["postprocessing"] = {
                "keep_largest_component": chosen,
                "from": str(choice[1]),
            }
        document = evaluate_predictor(
            predictor, name, [ref.path for ref in refs], cases, class_names, quiet,
            evaluation_dir / name, provenance,
        )  # fmt: skip
    print(f"\nensemble of {len(runs)} runs, {len(cases)} cases:")
    for record in records:
        print(f"  {record['run']}: {record['checkpoint']} ({record['checkpoint_selection']})")
    print(report.summary_table(document["summary"], class_names))
    return {name: document}


def _ensemble_member(
    run: loading.Run, requested: str | None, cases: list[CaseFiles]
) -> tuple[loading.CheckpointRef, dict[str, Any]]:
    """One run's checkpoint, and what metrics.json says about it."""
    chose_best = cases_that_chose_best(run.config, cases)
    spec, selection = _pick_checkpoint(run.directory, requested, chose_best, len(cases))
    ref = loading.resolve_checkpoints(run.directory, spec)[0]
    trained_on = _cases_in(load_split_part(run.config, "train"), cases)
    if trained_on:
        log.warning(
            "%s trained on %d of these %d cases: the ensemble's score on them is optimistic; "
            "--data with cases none of the runs trained on gives a fair one",
            run.directory,
            len(trained_on),
            len(cases),
        )
    record = {
        "run": str(run.directory),
        "checkpoint": ref.path,
        "checkpoint_selection": selection,
        "cases_that_chose_best": chose_best,
        "cases_trained_on": trained_on,
    }
    return ref, record


def ensemble_name(runs: Sequence[loading.Run], refs: Sequence[loading.CheckpointRef]) -> str:
    """``ensemble-a+b-best``; ``ensemble-a+b-best+latest`` when the runs' checkpoints differ
    (in run order); with many long names, their count and a digest instead."""
    names = "+".join(run.directory.absolute().name for run in runs)
    checkpoints = [ref.name for ref in refs]
    which = checkpoints[0] if len(set(checkpoints)) == 1 else "+".join(checkpoints)
    if len(names) > _MAX_NAMES:  # a folder name has at most 255 bytes
        digest = hashlib.sha1(names.encode("utf-8")).hexdigest()[:8]
        names = f"{len(runs)}-runs-{digest}"
    return f"ensemble-{names}-{which}"


def _beside(runs: Sequence[loading.Run]) -> Path:
    """The default home of an ensemble's evaluations: ``evaluation/`` in the runs' folder."""
    parents = sorted({str(run.directory.absolute().parent) for run in runs})
    if len(parents) > 1:
        raise UserError(
            f"--run: the runs are in different folders ({', '.join(parents)}), so their "
            "ensemble's evaluation has no default place; name a folder with --output-dir"
        )
    return Path(parents[0]) / "evaluation"


def _evaluation_dir(path: Path, output_dir: Path | None) -> Path:
    if output_dir is not None:
        return ensure_writable_dir(path, "--output-dir", "fix its permissions or choose another")
    return ensure_writable_dir(
        path, "evaluation folder", "fix the permissions of the run directory"
    )


def evaluate_checkpoint(
    run_dir: Path,
    config: ExperimentConfig,
    ref: loading.CheckpointRef,
    cases: list[CaseFiles],
    class_names: dict[int, str] | None = None,
    quiet: bool = False,
    out_dir: Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predicts and scores ``cases`` with one checkpoint; writes its evaluation folder.

    Args:
        out_dir: the folder (default ``<run_dir>/evaluation/<checkpoint name>``). It is written
            aside and swapped in when complete, replacing an earlier evaluation as a whole.
        provenance: how the checkpoint was chosen (``checkpoint_selection``) and which of the
            cases chose the best checkpoint (``cases_that_chose_best``), kept in
            ``metrics.json`` beside the per-case results.

    Returns:
        The metrics document (see ``report.metrics_document``).
    """
    out_dir = out_dir or RunLayout(run_dir).evaluation / ref.name
    predictor = load_predictor(run_dir, config, ref)
    return evaluate_predictor(
        predictor, ref.name, ref.path, cases, class_names, quiet, out_dir, provenance
    )


def evaluate_predictor(
    predictor: Predictor,
    name: str,
    checkpoint: str | list[str],
    cases: list[CaseFiles],
    class_names: dict[int, str] | None,
    quiet: bool,
    out_dir: Path,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """Predicts and scores ``cases``; writes ``out_dir`` aside and swaps it in when complete.

    Args:
        name: what the progress bar calls the model.
        checkpoint: the checkpoint path (the paths of an ensemble's), for ``metrics.json``.
        The others: as for :func:`evaluate_checkpoint`.
    """
    config = predictor.config
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        per_case: dict[str, dict[int, ClassMetrics]] = {}
        bar = progress_bar(cases, desc=f"Evaluating {name}", unit="case", quiet=quiet)
        for case in bar:
            per_case[case.case_id] = evaluate_case(predictor, case, staging, class_names)
        document = report.metrics_document(
            config=config_to_dict(config),
            checkpoint=checkpoint,
            summary=summarize(list(per_case.values())),
            per_case=per_case,
            class_names=class_names,
        )
        document.update(provenance or {})
        document["inference_precision"] = predictor.precision  # what auto resolved to here
        report.write_per_case_csv(staging / "per_case.csv", per_case)
        report.write_json(staging / "metrics.json", document)  # last: the folder is complete
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap
    log.info("wrote %s", out_dir / "metrics.json")
    return document


def _hold(evaluation_dir: Path) -> FolderLock:
    return FolderLock(
        evaluation_dir,
        busy=f"{evaluation_dir}: another evaluation (pid {{pid}}) is writing here; wait for it "
        "to finish",
    )


def _swap_in(staging: Path, final: Path) -> None:
    """Replaces ``final`` by the complete ``staging`` folder: two renames, then the old one is
    deleted. A kill between the renames is repaired by :func:`recover_interrupted`. Files of the
    user's in the old folder (anything evaluation does not write) are linked into the new one
    first, so replacing the folder never loses them."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        _keep_foreign_files(final, staging)
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


_OWN_FILES = re.compile(
    r"metrics\.json|per_case\.csv|predictions/[^/]+\.nii\.gz|montages/[^/]+\.png"
)


def _keep_foreign_files(old: Path, new: Path) -> None:
    for path in old.rglob("*"):
        relative = path.relative_to(old)
        if path.is_dir() or _OWN_FILES.fullmatch(relative.as_posix()):
            continue
        target = new / relative
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)  # a second name: the old folder keeps its own until deleted
        except OSError:
            shutil.copy2(path, target)


def recover_interrupted(evaluation_dir: Path) -> list[str]:
    """Cleans up after evaluations that were killed; call it holding the folder's lock.

    A partial folder is deleted (it was never complete). An old folder whose replacement is
    missing (the kill fell between the two renames of a swap) is put back: it is the last
    complete evaluation. Each repair is logged as a warning.

    Returns:
        One line per repair.
    """
    repairs = []
    for path in sorted(evaluation_dir.iterdir()):
        match = _STAGED.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        final = evaluation_dir / match["name"]
        if match["kind"] == "old" and not final.exists():
            os.rename(path, final)
            repairs.append(f"{final}: restored the previous evaluation (the last one was killed)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            if match["kind"] == "partial":
                repairs.append(f"{final}: removed an evaluation that was killed before it ended")
    for line in repairs:
        log.warning("%s", line)
    return repairs


def cases_that_chose_best(config: ExperimentConfig, cases: list[CaseFiles]) -> list[str]:
    """The evaluated cases among those whose validation Dice picked the run's best checkpoint
    (the held-out split of the run's own config), matched by their image files."""
    if config.train.val_every == 0:
        return []
    return _cases_in(load_split_part(config, "val"), cases)


def load_split_part(config: ExperimentConfig, part: str) -> tuple[CaseFiles, ...]:
    """The ``train`` or ``val`` cases of the run's own split; none when they cannot be read."""
    try:
        return getattr(load_split(config.data), part)
    except UserError:  # the training data moved away: nothing to compare with
        return ()


def _cases_in(split_cases: Sequence[CaseFiles], cases: list[CaseFiles]) -> list[str]:
    """The ids of ``cases`` among ``split_cases``, matched by their image files."""
    files = {p.resolve() for case in split_cases for p in case.images}
    return [case.case_id for case in cases if any(p.resolve() in files for p in case.images)]


def _pick_checkpoint(
    run_dir: Path, requested: str | None, chose_best: list[str], num_cases: int
) -> tuple[str, str]:
    """The checkpoint to score and one phrase saying why, for the output and metrics.json.

    ``best`` was picked by the validation Dice of some held-out cases: scored on those same
    cases it looks better than it is. So the default is ``latest`` when they are evaluated.
    """
    overlap = f"{len(chose_best)} of these {num_cases} cases chose the best checkpoint"
    if requested is not None:
        if requested in ("best", "all") and chose_best:
            log.warning(
                "%s: its score on them is optimistic; --checkpoint latest gives a fair one",
                overlap,
            )
        return requested, f"--checkpoint {requested} as asked" + (
            f" ({overlap}: optimistic for best)" if chose_best and requested != "latest" else ""
        )
    if chose_best:
        return "latest", f"latest by default, because {overlap}"
    if not RunLayout(run_dir).best_checkpoints.is_dir():
        return "latest", "latest by default: the run kept no best checkpoint"
    return "best", "best by default: none of these cases chose it"


def evaluation_folder_name(checkpoint_name: str, data: str | None) -> str:
    """``best`` for the run's held-out split; ``best-on-<name>`` for ``--data``, so that
    evaluating on other data never replaces the held-out results."""
    if data is None:
        return checkpoint_name
    name = Path(data).expanduser().resolve().name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return f"{checkpoint_name}-on-{name}"


def evaluate_case(
    predictor: Predictor,
    case: CaseFiles,
    out_dir: Path,
    class_names: dict[int, str] | None = None,
) -> dict[int, ClassMetrics]:
    """Predicts one labelled case, writes its prediction and montage, and scores it.

    ``class_names`` label the montage's legend.

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
        write_montage(montage, image, segmentation.labels, label, geometry.orientation, class_names)
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
) -> tuple[ExperimentConfig, list[CaseFiles], list[str]]:
    """The config with the data section evaluated on, its checked labelled cases, and one line
    per case left out as unusable (with ``data.skip_bad_cases``).

    Raises:
        UserError: ``data`` is neither a YAML file nor a folder, describes other channels or
            classes than the model's, or its cases are unusable.
    """
    if data is None:
        cases = _held_out(config)
    else:
        path = Path(data).expanduser()
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            config = dataclasses.replace(config, data=_data_from_yaml(path, config))
            cases = _held_out(config)
        elif path.is_dir():
            config = dataclasses.replace(config, data=_data_from_folder(path, config))
            cases = describe_dataset(config.data, "train")
            log.info("cases: every labelled case of %s (%d)", path, len(cases))
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
    checked = check_cases(cases, padded, EVALUATE_FIXES)
    return (
        config,
        checked.cases,
        [
            f"{case_id}: left out (data.skip_bad_cases): {'; '.join(problems)}"
            for case_id, problems in checked.skipped.items()
        ],
    )


def _held_out(config: ExperimentConfig) -> list[CaseFiles]:
    split = load_split(config.data)
    log.info("cases: the %d held out by %s", len(split.val), split.source)
    return list(split.val)


# The data settings a --data YAML contributes: where its cases are and how they are split.
_WHICH_CASES = ("root", "root_alternatives", "format", "cases", "synthetic", "split", "cache_dir")


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
    # The file says which cases to score; everything else in its data section describes how
    # its own model would be trained. The patch size above all must stay the run's: it is the
    # sliding window, and a model with instance norm that sees windows of another size, padded
    # where the volume is smaller, predicts worse (a hippocampus model trained on 32x48x32
    # patches scored 0.818 / 0.829 on 40x56x40 windows against 0.854 / 0.837 on its own).
    if other.patch_size != config.data.patch_size:
        log.info(
            "%s: its data.patch_size %s is not used; windows stay the run's %s "
            "(evaluation.window sets another)",
            path,
            "x".join(map(str, other.patch_size)),
            "x".join(map(str, config.data.patch_size)),
        )
    # --set data.skip_bad_cases=true (the fix check_cases names on evaluate) must still work.
    return dataclasses.replace(
        config.data,
        **{name: getattr(other, name) for name in _WHICH_CASES},
        skip_bad_cases=other.skip_bad_cases or config.data.skip_bad_cases,
    )


def _data_from_folder(path: Path, config: ExperimentConfig) -> Any:
    return dataclasses.replace(
        config.data,
        root=str(path.absolute()),
        format="auto",
        cases=(),
        synthetic=False,
        split=SplitConfig(),
    )
