"""Segmenting scans with a trained run: NIfTI in, label maps out on each scan's own grid.

Per case, :class:`Predictor` runs exactly what training ran, then undoes it:

1. the training preprocessing (``config.preprocessing`` with the run's dataset fingerprint):
   crop to the non-zero box, normalise, resample;
2. sliding-window softmax with ``config.evaluation`` (window, overlap, Gaussian weighting,
   batch size, test-time mirroring);
3. the inverse of step 1: probabilities resampled back linearly and pasted into the uncropped
   grid (background outside the crop); then the argmax, and with
   ``evaluation.keep_largest_component`` only the largest connected component of each class.

Inputs (``--input``) are files or folders of ``.nii``/``.nii.gz`` files. Files are grouped into
cases by the nnU-Net channel suffix: ``case_0000.nii.gz`` and ``case_0001.nii.gz`` are the two
channels of case ``case``; a name without the ``_NNNN`` suffix, such as ``case.nii.gz``, is a
whole case (3D for one channel, or 4D channels-last).

Outputs, in ``--output``, each written atomically:

* ``<case>.nii.gz``: uint8 labels with the shape, affine and header (qform/sform and their
  codes) of the case's first channel file, so they overlay the input scan exactly;
* ``<case>_probabilities.nii.gz`` with ``evaluation.save_probabilities``: float32, 4D
  (i, j, k, class) on the same grid: the softmax of class ``c`` in volume ``c`` of the last
  axis, before post-processing.

Several runs (an ensemble, ``segnet.inference.loading.load_runs``) preprocess each scan once,
as the first run does, and every model predicts the same windows: step 2 blends the mean of
their softmaxes. Steps 1 and 3 and the outputs are those of one run.

A case that cannot be read or is malformed is reported in one line naming its file and the
reason, and skipped; the others are still written.

Every output path is checked before the first is written: none may be an input file, and an
existing file may only be replaced if segnet wrote it (its header's ``descrip`` starts with
``segnet``), so a user's own volume in the output folder is never overwritten.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from segnet.config import ExperimentConfig
from segnet.console import progress_bar
from segnet.data.datasets import CaseFiles
from segnet.data.preprocessing import DatasetFingerprint, preprocess, restore_to_original
from segnet.data.volumes import Geometry, header_description, read_channels, write_volume
from segnet.errors import DataError, UserError, shortened
from segnet.files import ensure_writable_dir
from segnet.inference import loading
from segnet.inference.postprocessing import keep_largest_component
from segnet.inference.sliding_window import (
    configured_sliding_window,
    make_predict_fn,
    probabilities_to_labels,
)
from segnet.precision import choose_inference_precision

log = logging.getLogger("segnet")
_NIFTI = re.compile(r"^(?P<stem>[^.].*?)\.nii(\.gz)?$")  # hidden files are temporaries
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
OUTPUT_DESCRIPTION = "segnet prediction"  # in every written header: marks files we may replace


class InferenceOutOfMemory(UserError):
    """A sliding-window batch did not fit in memory."""


@dataclass(frozen=True)
class Segmentation:
    """A prediction on the original scan's grid.

    Attributes:
        labels: uint8 (depth, height, width), after post-processing.
        probabilities: float32 (depth, height, width, num_classes) softmax before
            post-processing, or None when not asked for.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None


@dataclass(frozen=True)
class Predictor:
    """A trained model with everything needed to segment a scan on its own grid.

    Attributes:
        config: the run's experiment (``preprocessing``, ``evaluation``, ``data`` are read).
        fingerprint: the training set's fingerprint, when preprocessing needs it.
        predict_fn: ``logits = predict_fn(batch)``, (batch, *window, channels) ->
            (batch, *window, num_classes); (batch, height, width, ...) for 2D models. Keep one
            per model: sliding-window inference caches its compiled graph per function. A
            tuple of them is an ensemble: their softmaxes are averaged window by window.
        spatial_dims: 2 for a model that predicts axial slices, else 3.
        largest_component_classes: the classes that keep only their largest connected
            component, as a cross-validation chose them; None follows
            ``evaluation.keep_largest_component``.
        precision: what the models' convolutions compute in, ``float32`` or ``bfloat16``
            (``evaluation.precision`` resolved on this machine); the softmax and everything
            after it are float32.
    """

    config: ExperimentConfig
    fingerprint: DatasetFingerprint | None
    predict_fn: Callable[[Any], Any] | tuple[Callable[[Any], Any], ...]
    spatial_dims: int = 3
    largest_component_classes: tuple[int, ...] | None = None
    precision: str = "float32"

    def segment(
        self, image: np.ndarray, geometry: Geometry, keep_probabilities: bool = False
    ) -> Segmentation:
        """Labels (and optionally probabilities) for a scan, on the scan's own grid.

        Args:
            image: (depth, height, width, channels) raw intensities on ``geometry``'s grid.
            geometry: the scan's geometry, from ``read_channels``.
            keep_probabilities: also return the restored probabilities.

        Returns:
            The segmentation, spatial shape ``geometry.shape``.
        """
        probabilities = self.probabilities(image, geometry)
        labels = probabilities_to_labels(probabilities)
        if self.largest_component_classes is not None:  # a cross-validation's measured choice
            if self.largest_component_classes:
                labels = keep_largest_component(labels, self.largest_component_classes)
        elif (chosen := self.config.evaluation.keep_largest_component) is True:
            labels = keep_largest_component(labels)
        elif chosen:
            labels = keep_largest_component(labels, chosen)
        return Segmentation(labels, probabilities if keep_probabilities else None)

    def probabilities(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """float32 (depth, height, width, num_classes) softmax on ``geometry``'s grid."""
        pre = self.config.preprocessing
        prepared, _, info = preprocess(image, geometry, None, pre, self.fingerprint)
        probabilities = self._sliding_window(prepared)
        return restore_to_original(probabilities, info, order=1)

    def _sliding_window(self, image: np.ndarray) -> np.ndarray:
        try:
            return configured_sliding_window(
                image, self.predict_fn, self.config, spatial_dims=self.spatial_dims
            )
        except tf.errors.ResourceExhaustedError:
            raise InferenceOutOfMemory(
                f"out of memory predicting a {'x'.join(map(str, image.shape[:3]))} volume; lower "
                f"evaluation.batch_size ({self.config.evaluation.batch_size}) or set "
                "evaluation.accumulate_on_cpu=true (--set key=value)"
            ) from None


def load_predictor(
    run_dir: Path, config: ExperimentConfig, ref: loading.CheckpointRef
) -> Predictor:
    """The predictor of one checkpoint of a run."""
    fingerprint = loading.load_fingerprint(run_dir, config)
    return load_ensemble([loading.Run(run_dir, config, fingerprint)], [ref])


def load_ensemble(
    runs: Sequence[loading.Run],
    refs: Sequence[loading.CheckpointRef],
    largest_component_classes: tuple[int, ...] | None = None,
) -> Predictor:
    """The predictor averaging the softmaxes of ``refs[i]`` of ``runs[i]`` (one run: its model).

    Preprocessing, sliding-window settings and ``evaluation.precision`` are the first run's;
    ``loading.check_ensemble`` makes sure every model takes that input.
    ``largest_component_classes``, a cross-validation's choice
    (``loading.chosen_postprocessing``), replaces ``evaluation.keep_largest_component``.
    """
    config = runs[0].config
    precision = choose_inference_precision(config.evaluation.precision)
    if precision.warning:
        log.warning("%s", precision.warning)
    computes_in = precision.name.removeprefix("mixed_")  # mixed_bfloat16: convolutions in bf16
    log.info("inference precision: %s (%s)", computes_in, precision.reason)
    predict_fns = tuple(
        make_predict_fn(loading.load_model(run.config, ref, precision.name))
        for run, ref in zip(runs, refs, strict=True)
    )
    predict_fn = predict_fns[0] if len(predict_fns) == 1 else predict_fns
    return Predictor(
        config,
        runs[0].fingerprint,
        predict_fn,
        config.spatial_dims,
        largest_component_classes,
        computes_in,
    )


def log_postprocessing(choice: tuple[tuple[int, ...], Path] | None) -> tuple[int, ...] | None:
    """The classes of a cross-validation's post-processing choice, said once in the log."""
    if choice is None:
        return None
    classes, record = choice
    what = f"only the largest component of classes {list(classes)}" if classes else "no change"
    log.info("post-processing from %s: %s", record, what)
    return classes


def read_case(case: CaseFiles, num_channels: int) -> tuple[np.ndarray, Geometry]:
    """A case's channels as float32 (depth, height, width, channels), checked for use.

    Raises:
        DataError: a file is unreadable, the channel count is wrong, or voxels are not finite.
    """
    image, geometry = read_channels(case.images)
    names = ", ".join(p.name for p in case.images)
    if image.shape[-1] != num_channels:
        raise DataError(
            [
                f"{names}: {image.shape[-1]} image channels, but the model takes "
                f"{num_channels} (data.num_channels)"
            ]
        )
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise DataError([f"{names}: {bad} voxels are NaN or infinite"])
    return image, geometry


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------
def collect_cases(inputs: Sequence[Path], num_channels: int) -> tuple[list[CaseFiles], list[str]]:
    """Groups input files and folders into cases (rules in the module docstring).

    Args:
        inputs: files, or folders whose ``.nii``/``.nii.gz`` files are all taken.
        num_channels: the channels the model takes; suffixed cases need ``_0000`` to
            ``_{num_channels - 1:04d}``.

    Returns:
        ``(cases sorted by id, problems)``: one line per input that cannot form a case.
    """
    problems: list[str] = []
    groups: dict[str, dict[int | None, Path]] = {}
    for path in _expand(inputs, problems):
        stem = _NIFTI.match(path.name).group("stem")  # type: ignore[union-attr]
        match = _CHANNEL.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, None)
        files = groups.setdefault(case_id, {})
        if channel in files or (files and (channel is None) != (None in files)):
            other = next(iter(files.values()))
            problems.append(f"{path}: case '{case_id}' is also given by {other}; rename one")
            continue
        files[channel] = path
    cases = []
    for case_id, files in sorted(groups.items()):
        problem = _channel_problem(case_id, files, num_channels)
        if problem:
            problems.append(problem)
        else:
            images = tuple(files[c] for c in sorted(files, key=lambda c: c or 0))
            cases.append(CaseFiles(case_id, images, None))
    return cases, problems


def _expand(inputs: Sequence[Path], problems: list[str]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _NIFTI.match(p.name))
            if not found:
                problems.append(f"{path}: no .nii or .nii.gz files in this folder")
            files += found
        elif not path.exists():
            problems.append(f"{path}: not found")
        elif not _NIFTI.match(path.name):
            problems.append(f"{path}: not a .nii or .nii.gz file")
        else:
            files.append(path)
    return list(dict.fromkeys(files))  # the same file given twice is one input


def _channel_problem(case_id: str, files: dict[int | None, Path], num_channels: int) -> str | None:
    if None in files:
        return None  # a whole case in one file: its channel count is checked when read
    expected = set(range(num_channels))
    if set(files) == expected:
        return None
    missing = [f"{case_id}_{c:04d}" for c in sorted(expected - set(files))]
    extra = [files[c].name for c in sorted(set(files) - expected)]  # type: ignore[type-var]
    found = "; ".join(
        f"{what} {names}" for what, names in (("missing", missing), ("unexpected", extra)) if names
    )
    return (
        f"{next(iter(files.values())).parent}: case '{case_id}' needs channel files _0000 to "
        f"_{num_channels - 1:04d} (data.num_channels={num_channels}); {found}"
    )


def write_segmentation(
    output_dir: Path, case_id: str, segmentation: Segmentation, geometry: Geometry
) -> Path:
    """Writes ``<case>.nii.gz`` (and the probabilities when present); returns the label path."""
    labels, probabilities = output_paths(output_dir, case_id)
    write_volume(labels, segmentation.labels, geometry, np.uint8, OUTPUT_DESCRIPTION)
    if segmentation.probabilities is not None:
        write_volume(
            probabilities, segmentation.probabilities, geometry, np.float32, OUTPUT_DESCRIPTION
        )
    return labels


def output_paths(output_dir: Path, case_id: str) -> tuple[Path, Path]:
    """Where a case's label map and probabilities go."""
    return output_dir / f"{case_id}.nii.gz", output_dir / f"{case_id}{PROBABILITIES_SUFFIX}"


def check_outputs(
    cases: Sequence[CaseFiles], inputs: Sequence[Path], output_dir: Path, probabilities: bool
) -> None:
    """Refuses, before anything is written, any output that would replace an input file or a
    file segnet did not write.

    Args:
        cases: the cases to be written.
        inputs: every input file given, including those that formed no case (a ``scan.nii``
            beside ``scan.nii.gz`` is one case, yet both are the user's scans).
        output_dir: the output folder.
        probabilities: whether probability maps will be written too.

    Raises:
        UserError: listing every clash.
    """
    given = {_identity(p) for p in inputs} - {None}
    clashes = []
    for case in cases:
        labels, probability_map = output_paths(output_dir, case.case_id)
        for path in (labels, probability_map) if probabilities else (labels,):
            if _identity(path) in given:
                clashes.append(f"{path} is an input scan")
            elif path.exists() and not (header_description(path) or "").startswith("segnet"):
                clashes.append(f"{path} exists and was not written by segnet")
    if clashes:
        shown = shortened(clashes, 5, "; ")
        raise UserError(
            f"--output {output_dir}: writing the predictions would replace files that are not "
            f"segnet's ({shown}); nothing was written: choose another --output folder"
        )


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode): the same file under any name, symbolic or hard link."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def predict_files(
    run_dir: Path | Sequence[Path],
    inputs: list[Path],
    output_dir: Path,
    checkpoint: str = "best",
    overrides: list[str] = (),  # type: ignore[assignment]
    quiet: bool = False,
) -> list[str]:
    """Segments every case of ``inputs`` with a run's checkpoint into ``output_dir``.

    Args:
        run_dir: the run directory (``config.yaml``, ``fingerprint.json``, ``checkpoints/``),
            or several, or folders of runs (``loading.expand_runs``): an ensemble, whose
            softmaxes are averaged (``loading.check_ensemble`` says which runs can form one).
        inputs: files and folders (grouping in the module docstring).
        output_dir: created if missing; must be writable.
        checkpoint: ``best``, ``latest`` or a path (see ``segnet.inference.loading``), for
            every run.
        overrides: ``key=value`` changes to ``evaluation.*`` settings (see
            ``loading.OVERRIDABLE``).
        quiet: no progress bar.

    Returns:
        One line per input that could not be segmented (file and reason); empty on success.

    Raises:
        UserError: the run, checkpoint, overrides or output folder are unusable (before any
            case is read), or no input file was found at all.
    """
    runs = loading.load_runs(run_dir, overrides)
    config = runs[0].config
    refs = [loading.resolve_checkpoints(run.directory, checkpoint)[0] for run in runs]
    output_dir = ensure_writable_dir(
        output_dir, "--output", "fix the permissions or choose another folder"
    )
    cases, failures = collect_cases(inputs, config.data.num_channels)
    if not cases and not failures:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no .nii or .nii.gz files found")
    keep_probabilities = config.evaluation.save_probabilities
    check_outputs(cases, _expand(inputs, []), output_dir, keep_probabilities)
    chosen = log_postprocessing(loading.chosen_postprocessing(run_dir))
    predictor = load_ensemble(runs, refs, chosen) if cases else None
    written = 0
    for case in progress_bar(cases, desc="Predicting", unit="case", quiet=quiet):
        try:
            _predict_one(predictor, case, output_dir, keep_probabilities)  # type: ignore[arg-type]
            written += 1
        except DataError as exc:
            failures += [f"skipped case '{case.case_id}': {p}" for p in exc.problems]
    for line in failures:
        log.error("%s", line)
    checkpoints = ", ".join(ref.path for ref in refs)
    log.info(
        "wrote %d of %d cases to %s (checkpoint %s)", written, len(cases), output_dir, checkpoints
    )
    return failures


def _predict_one(
    predictor: Predictor, case: CaseFiles, output_dir: Path, keep_probabilities: bool
) -> None:
    image, geometry = read_case(case, predictor.config.data.num_channels)
    segmentation = predictor.segment(image, geometry, keep_probabilities)
    write_segmentation(output_dir, case.case_id, segmentation, geometry)
