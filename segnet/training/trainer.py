"""The training loop: ``train(config)`` takes a config to an exported model in a run directory.

Read top to bottom, :func:`train` does:

1. Load the dataset, check every case (every problem reported at once, DataError) and
   preprocess it into the cache. Nothing is written into the run directory before this passes.
2. Check the run directory (a different experiment there is refused), store the config and the
   dataset fingerprint.
3. Build the model, optimizer and loss under the distribution strategy and restore the newest
   readable checkpoint, if any: the model, the optimizer, the step and the best score.
4. Start the data stream at the restored step, so a resumed run sees exactly the batches an
   uninterrupted one would.
5. Train epoch by epoch; at each epoch's end validate on whole held-out volumes (every
   ``train.val_every`` epochs and at the last), keep the best checkpoint, save the latest,
   write metrics.csv, progress.png and TensorBoard.
6. Export ``model.keras`` and a SavedModel.

With ``train.ema_decay`` validation and the export use the averaged weights
(:mod:`segnet.training.ema`).

Besides ``train.log``, the chief records each milestone (restored, started, checkpoint saved,
best saved, epoch end, stopped, exported) as a JSON line in ``events.jsonl``
(:mod:`segnet.training.events`), for monitoring tools and tests to follow.

Stopping: SIGINT/SIGTERM save a checkpoint at the next step boundary and return normally with
a resume hint. A non-finite loss stops without saving the bad state; out of memory and a full
disk stop with one sentence saying what to change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from segnet._tf_env import log_onednn_status
from segnet.config import ExperimentConfig
from segnet.console import is_interactive
from segnet.data.cache import load_or_compute_fingerprint, prepare_cases
from segnet.data.case import PreprocessedCase
from segnet.data.checks import check_cases
from segnet.data.datasets import dataset_class_names, load_split
from segnet.data.pipeline import build_dataset, check_training_cases, describe_pipeline
from segnet.data.preprocessing import DatasetFingerprint
from segnet.errors import UserError
from segnet.files import atomic_write_text
from segnet.inference.sliding_window import make_predict_fn
from segnet.losses import build_loss
from segnet.models.registry import build_model
from segnet.precision import (
    Precision,
    choose_precision,
    precision_for_resume,
    precision_policy,
)
from segnet.run_dir import (
    SPLIT_NAME,
    RunLayout,
    check_run_dir,
    default_run_dir,
    explain_os_error,
    hold_run_dir,
    initialise_run_dir,
    stored_config,
)
from segnet.training.checkpoints import (
    NO_SCORE,
    Checkpoints,
    TrainState,
    build_checkpoint,
    checkpoint_has_loss_scale,
)
from segnet.training.distribute import Cluster, WriteDir, build_strategy, synchronize_batchnorm
from segnet.training.ema import WeightAverage
from segnet.training.events import EventLog
from segnet.training.export import export_model
from segnet.training.held_out import ValidationResult, validate
from segnet.training.optimizers import build_optimizer
from segnet.training.preemption import StopRequest
from segnet.training.progress import EpochStats, Reporter, overlay_panel
from segnet.training.stage1 import load_stage1_weights
from segnet.training.step import make_train_step

log = logging.getLogger("segnet")


class OutOfMemoryError(UserError):
    """A training or validation step did not fit in memory."""


class DivergedError(UserError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    """How a call to :func:`train` ended.

    Attributes:
        run_dir: the run directory.
        step: optimizer steps done in total.
        epochs_done: finished epochs.
        best_score: best mean foreground validation Dice, or None before any validation.
        interrupted: stopped by SIGINT/SIGTERM (a checkpoint was saved; run again to resume).
        model: the trained model; with ``train.ema_decay``, its averaged weights (as exported)
            unless interrupted.
    """

    run_dir: Path
    step: int
    epochs_done: int
    best_score: float | None
    interrupted: bool
    model: keras.Model


@dataclass(frozen=True)
class TrainingData:
    """Preprocessed training and validation cases and the fingerprint they were made with.

    ``warnings`` are about data that trains but cannot teach what it should (a class no label
    holds, all-background labels, all-zero images); :func:`train` logs them into train.log.
    ``split`` lists the case ids of each part, as written to ``split.json``.
    """

    train: list[PreprocessedCase]
    val: list[PreprocessedCase]
    fingerprint: DatasetFingerprint
    warnings: tuple[str, ...] = ()
    split: dict[str, Any] = field(default_factory=dict)


def train(
    config: ExperimentConfig,
    run_dir: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Trains ``config`` in ``run_dir`` (default ``runs/<name>``), resuming what is there.

    Args:
        config: the experiment.
        run_dir: the run directory.
        force: continue a run directory whose stored config differs.
        quiet: no progress bars.

    Returns:
        How training ended; ``interrupted`` runs resume with the same call.

    Raises:
        UserError: a problem the user can fix (data, run directory, memory, divergence, disk).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    layout = RunLayout(run_dir)
    # Read-only, and before the data: a folder that can never hold this run costs a second.
    check_run_dir(run_dir, config, force)
    log_onednn_status(log)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    cluster = build_strategy(config)
    data = load_training_data(config)
    check_training_cases(config, data.train, config.spatial_dims)
    with contextlib.ExitStack() as stack:
        if cluster.is_chief:  # the other workers write only into temporary folders
            try:
                stack.enter_context(hold_run_dir(run_dir))
            except OSError as exc:
                raise explain_os_error(exc, run_dir) from None
        # Again, now that no other process can be writing the run directory.
        resuming = check_run_dir(run_dir, config, force)
        _log_extension(stored_config(run_dir), config)
        precision = _session_precision(config, cluster, layout.checkpoints)
        stored = config  # the run directory keeps "auto" as written; the session uses the choice
        config = replace(config, runtime=replace(config.runtime, precision=precision))
        stack.enter_context(precision_policy(precision))
        write_dir = stack.enter_context(WriteDir(run_dir, cluster.is_chief, cluster.worker_index))
        stop = stack.enter_context(StopRequest())
        # Building the model restores the checkpoints, which fails when a --force'd config no
        # longer fits them; nothing is written before that, so the stored config stays true.
        session = _Session(config, cluster, data, run_dir, write_dir.path, stop)
        if cluster.is_chief:
            initialise_run_dir(run_dir, stored)
            _write_json(layout.fingerprint, data.fingerprint.to_dict())
            _write_json(layout.split, data.split)
            stack.enter_context(_log_file(layout.train_log))
        events = EventLog(layout.events if cluster.is_chief else None)
        log.info("%s %s", "resuming" if resuming else "starting", run_dir)
        log.info("%s", describe_split(data.split))  # the data was read before train.log opened
        for warning in data.warnings:  # checked before the run directory existed: log them now
            log.warning("%s", warning)
        return session.run(quiet, events)


def describe_split(split: dict[str, Any]) -> str:
    """One line naming where the split came from and the size of each part."""
    skipped = f"; {len(split['skipped'])} unusable cases skipped" if split["skipped"] else ""
    return (
        f"split from {split['source']}: {len(split['train'])} training cases, "
        f"{len(split['held_out'])} held out ({len(split['validation'])} validated during "
        f"training: they pick the best checkpoint){skipped}; case ids in {SPLIT_NAME}"
    )


def _log_extension(previous: ExperimentConfig | None, config: ExperimentConfig) -> None:
    if previous is not None and previous.train.epochs < config.train.epochs:
        log.info(
            "training longer: train.epochs %d -> %d; the learning-rate schedule now spans %d "
            "epochs, so it continues from where the longer schedule is at the resumed step",
            previous.train.epochs,
            config.train.epochs,
            config.train.epochs,
        )


def _session_precision(
    config: ExperimentConfig, cluster: Cluster, checkpoint_dir: Path
) -> Precision:
    """The precision this session trains in (``auto`` resolved, kept to the checkpoints' side
    of the float16 line), logged with its reason."""
    precision = precision_for_resume(
        choose_precision(config.runtime.precision),
        config.runtime.precision,
        checkpoint_has_loss_scale(checkpoint_dir),
        checkpoint_dir,
    )
    if precision.warning:
        log.warning(precision.warning)
    log.info("devices: %s", cluster.description)
    log.info("precision: %s, %s", precision.name, precision.reason)
    log.info("XLA: %s", "on (runtime.jit_compile)" if config.runtime.jit_compile else "off")
    return precision.name


def load_training_data(config: ExperimentConfig) -> TrainingData:
    """Reads, checks and preprocesses the training cases and the validation cases used.

    Raises:
        DataError: listing every unusable case (unless ``data.skip_bad_cases``).
    """
    split = load_split(config.data)
    checked = check_cases([*split.train, *split.val], config)
    usable = {c.case_id for c in checked.cases}
    train_files = [c for c in split.train if c.case_id in usable]
    val_files = sorted(
        (c for c in split.val if c.case_id in usable and c.label is not None),
        key=lambda c: c.case_id,
    )
    if config.train.val_every == 0:
        val_files = []
    elif config.train.val_max_cases > 0:
        val_files = val_files[: config.train.val_max_cases]
    fingerprint_files = train_files
    if config.preprocessing.fingerprint_cases == "all_folds":  # the folds must preprocess alike
        fingerprint_files = [c for c in [*split.train, *split.val] if c.case_id in usable]
    fingerprint = load_or_compute_fingerprint(config, fingerprint_files)
    train_cases = prepare_cases(config, train_files, fingerprint)
    val_cases = prepare_cases(config, val_files, fingerprint) if val_files else []
    split_record = {
        "source": split.source,
        "train": [c.case_id for c in train_files],
        "validation": [c.case_id for c in val_files],
        "held_out": [c.case_id for c in split.val if c.case_id in usable],
        "skipped": sorted({c.case_id for c in [*split.train, *split.val]} - usable),
    }
    warnings = checked.warnings([c.case_id for c in train_files], config.data.num_classes)
    return TrainingData(train_cases, val_cases, fingerprint, tuple(warnings), split_record)


def resume_command(run_dir: Path) -> str:
    """The command that resumes ``run_dir`` (its stored config, so nothing can differ)."""
    script = sys.argv[0] if sys.argv else ""
    program = f"python {shlex.quote(script)}" if script.endswith(".py") else "segnet-train"
    config_path = shlex.quote(str(RunLayout(run_dir).config))
    return f"{program} --config {config_path} --run-dir {shlex.quote(str(run_dir))}"


class _Session:
    """One call of :func:`train` after the checks: the objects the loop works on."""

    def __init__(
        self,
        config: ExperimentConfig,
        cluster: Cluster,
        data: TrainingData,
        run_dir: Path,
        write_dir: Path,
        stop: StopRequest,
    ) -> None:
        self.config, self.cluster, self.data = config, cluster, data
        self.run_dir, self.stop = run_dir, stop
        self.spatial_dims = config.spatial_dims
        keras.utils.set_random_seed(config.train.seed)  # weights, dropout: same every run
        self.state = TrainState.create()
        with cluster.strategy.scope():
            self.model = build_model(config)
            self.optimizer = build_optimizer(config)
            self.optimizer.build(self.model.trainable_variables)
            decay = config.train.ema_decay
            self.average = WeightAverage(self.model, decay) if decay else None
        self.synchronised_batchnorms = (
            synchronize_batchnorm(self.model) if config.runtime.sync_batchnorm else 0
        )
        checkpoint = build_checkpoint(self.model, self.optimizer, self.state, self.average)
        self.checkpoints = Checkpoints(
            checkpoint,
            RunLayout(run_dir).checkpoints,
            RunLayout(write_dir).checkpoints,
            config.checkpoint.keep,
        )
        self.restored = self.checkpoints.restore()
        self.last_saved = self.step if self.restored else -1
        # A resumed run has stage 1 in its own checkpoint; only a fresh one copies it in.
        self.stage1_source = None if self.restored else load_stage1_weights(self.model, config)
        if self.stage1_source and self.average is not None:
            self.average.reset()  # average from the copied-in weights, not the random ones
        self.train_step = make_train_step(
            self.model,
            self.optimizer,
            build_loss(config, self.model),
            cluster.strategy,
            num_classes=config.data.num_classes,
            clip_norm=config.optimizer.clip_norm,
            jit_compile=config.runtime.jit_compile,
            jit_compile_loss=config.runtime.jit_compile_loss,
            average=self.average,
        )
        self.predict_fn = make_predict_fn(self.model)
        self.events = EventLog(None)  # run() gives the run's, once the directory exists

    @property
    def step(self) -> int:
        return int(self.state.step.numpy())

    def _batches(self) -> Iterator:
        dataset = build_dataset(
            self.config, self.data.train, start_step=self.step, spatial_dims=self.spatial_dims
        )
        log.info(
            describe_pipeline(
                self.config, self.data.train, start_step=self.step, spatial_dims=self.spatial_dims
            )
        )
        return iter(self.cluster.strategy.experimental_distribute_dataset(dataset))

    # --- The loop ----------------------------------------------------------------------------
    def run(self, quiet: bool, events: EventLog) -> TrainResult:
        """Trains to the configured length; the run directory is initialised by now."""
        self.events = events
        if self.synchronised_batchnorms:
            log.info(
                "BatchNorm synchronised across replicas in %d layers", self.synchronised_batchnorms
            )
        if self.restored:
            log.info("restored %s (step %d)", self.restored, self.step)
            events.emit("restored", self.step, path=self.restored)
        if self.stage1_source:
            log.info("stage 1 weights from %s", self.stage1_source)
        self.batches = self._batches()
        events.emit("started", self.step)
        self.reporter = Reporter(
            self.run_dir if self.cluster.is_chief else None,
            self.config.data.num_classes,
            first_epoch=int(self.state.epochs_done),
            log_every=self.config.runtime.log_every_steps,
            show_bars=is_interactive(quiet) and self.cluster.is_chief,
            class_names=dataset_class_names(self.config.data),
        )
        train = self.config.train
        first_step = self.step
        try:
            for epoch in range(int(self.state.epochs_done), train.epochs):
                done = self.step - epoch * train.steps_per_epoch  # > 0 when resuming mid-epoch
                stats = self.reporter.start_epoch(epoch, train.epochs, train.steps_per_epoch, done)
                for _ in range(done, train.steps_per_epoch):
                    if self._train_one_step(stats):
                        return self._stop_here()
                self._end_epoch(epoch, stats)
                if self.stop.requested:  # asked during validation: the epoch's save is done
                    return self._stop_here()
        finally:
            self.reporter.close()
        if self.average is not None:  # trained and saved: the model is now the averaged one
            self.average.copy_to_model()
        layout = RunLayout(self.run_dir)
        if first_step == self.step and layout.saved_model.exists():
            log.info("nothing left to train: %d epochs done", train.epochs)
        elif self.cluster.is_chief:
            keras_path, saved_path = export_model(
                self.model, layout.exported_keras, layout.saved_model
            )
            log.info("exported %s and %s", keras_path, saved_path)
            events.emit("exported", self.step, path=str(layout.export))
        return self._result(interrupted=False)

    def _train_one_step(self, stats: EpochStats) -> bool:
        """Runs one step; returns whether the run must stop after it (a signal arrived)."""
        started = time.perf_counter()
        batch = next(self.batches)
        fetched = time.perf_counter()
        stop_flag = tf.constant(1.0 if self.stop.requested else 0.0)
        try:
            out = self.train_step(batch, stop_flag)
            loss = float(out.loss)  # waits for the step; the finite check needs the value
        except tf.errors.ResourceExhaustedError:
            raise self._out_of_memory("a training step") from None
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as exc:
            raise _missing_kernel(exc, self.config) from None
        step = int(self.state.step.assign_add(1))
        if not math.isfinite(loss):
            raise self._diverged(loss, step)
        stats.add(loss, out.counts.numpy(), fetched - started, time.perf_counter() - started)
        scalars = {
            "train/loss": loss,
            "train/learning_rate": self._learning_rate(),
            "train/grad_norm": float(out.grad_norm),
        }
        self.reporter.step(step, stats, scalars)
        every = self.config.checkpoint.every_steps
        if every and step % every == 0 and step % self.config.train.steps_per_epoch:
            self._save()  # epoch ends save after validation instead
        return bool(out.stop)

    def _end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Validation, best checkpoint, metrics row, then the latest checkpoint."""
        self.reporter.close_bar()
        validation = self._validate(epoch)
        if validation is not None and validation.mean > float(self.state.best_score):
            self.state.best_score.assign(validation.mean)
            if self.config.checkpoint.keep_best:
                path = self.checkpoints.save_best(self.step)
                log.info("new best validation dice %.4f: %s", validation.mean, path)
                self.events.emit("best_saved", self.step, path=path, score=float(validation.mean))
        row = validation.as_row() if validation is not None else None
        self.reporter.end_epoch(
            epoch, self.config.train.epochs, self.step, stats, row, self._learning_rate()
        )
        if validation is not None and validation.example is not None:
            overlay = overlay_panel(*validation.example)
            self.reporter.summaries.image(self.step, "val/overlay", overlay)
        self.state.epochs_done.assign(epoch + 1)
        self._save()
        self.events.emit("epoch_end", self.step, epoch=epoch + 1)

    def _validate(self, epoch: int) -> ValidationResult | None:
        train = self.config.train
        due = train.val_every > 0 and (
            (epoch + 1) % train.val_every == 0 or epoch + 1 == train.epochs
        )
        if not due or not self.data.val:
            return None
        averaged = self.average.swapped_in() if self.average else contextlib.nullcontext()
        try:
            with averaged:
                return validate(self.predict_fn, self.data.val, self.config, self.spatial_dims)
        except tf.errors.ResourceExhaustedError:
            raise self._out_of_memory("validation") from None

    # --- Saving and stopping -------------------------------------------------------------------
    def _save(self) -> None:
        if self.last_saved == self.step:
            return
        path = self.checkpoints.save(self.step)
        self.last_saved = self.step
        log.info("checkpoint saved: %s", path)
        self.events.emit("checkpoint_saved", self.step, path=path)

    def _stop_here(self) -> TrainResult:
        self.reporter.close_bar()
        self._save()
        command = resume_command(self.run_dir)
        log.warning(
            "stopped at step %d (%s); resume with: %s",
            self.step,
            self.stop.signal_name or "stop requested by another worker",
            command,
        )
        self.events.emit("stopped", self.step, signal=self.stop.signal_name, resume=command)
        return self._result(interrupted=True)

    def _result(self, interrupted: bool) -> TrainResult:
        best = float(self.state.best_score)
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            epochs_done=int(self.state.epochs_done),
            best_score=None if best == NO_SCORE else best,
            interrupted=interrupted,
            model=self.model,
        )

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    # --- Errors --------------------------------------------------------------------------------
    def _out_of_memory(self, where: str) -> OutOfMemoryError:
        config = self.config
        patch = "x".join(map(str, config.data.patch_size))
        if where == "validation":
            fix = "lower evaluation.batch_size or set evaluation.accumulate_on_cpu: true"
        else:
            fix = (
                f"lower train.batch_size ({config.train.batch_size}) or data.patch_size "
                f"({patch}), use fewer model filters, or set runtime.precision: mixed_bfloat16 "
                "(or mixed_float16 on GPUs)"
            )
        return OutOfMemoryError(f"out of memory in {where} at step {self.step}; {fix}")

    def _diverged(self, loss: float, step: int) -> DivergedError:
        opt = self.config.optimizer
        saved = f"ckpt-{self.last_saved}" if self.last_saved >= 0 else "none yet"
        fix = f"lower optimizer.learning_rate (now {opt.learning_rate:g})"
        if opt.clip_norm is None:
            fix += " or enable clipping with optimizer.clip_norm: 12"
        return DivergedError(
            f"the loss became {loss} at step {step}; training stopped without saving that state "
            f"(last checkpoint: {saved}); {fix}, then run again with --force to resume from the "
            "last checkpoint"
        )


def _missing_kernel(exc: tf.errors.OpError, config: ExperimentConfig) -> Exception:
    """A UserError for a dtype the device has no kernel for (float16 on CPUs), else ``exc``."""
    text = str(exc)
    match = re.search(r"No registered '(\w+)' OpKernel", text) or re.search(
        r"No OpKernel was registered to support Op '(\w+)'", text
    )
    if match is None:
        return exc
    return UserError(
        f"runtime.precision: {config.runtime.precision}: this device has no kernel for "
        f"{match.group(1)} in that precision (TensorFlow's CPU kernels lack most float16 "
        "ops); use auto or float32 on CPUs (mixed_bfloat16 where they have AMX or "
        "AVX512-BF16), mixed_float16 on GPUs"
    )


def _write_json(path: Path, document: dict[str, Any]) -> None:
    try:
        atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    except OSError as exc:
        raise explain_os_error(exc, path) from None


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """Copies the ``segnet`` log at INFO into ``train.log``, appending across resumes.

    The file gets INFO even when the console shows warnings only (``--quiet``, or a library
    caller that never configured logging): the logger is lowered to INFO for the run, and what
    it passes on to the console handlers is held back to the level the console had.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console_level = log.getEffectiveLevel()
    saved = (log.level, log.propagate)
    forward = _ForwardToParent(console_level) if console_level > logging.INFO else None
    log.addHandler(handler)
    if forward is not None:
        log.propagate = False
        log.addHandler(forward)
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        if forward is not None:
            log.removeHandler(forward)
        log.setLevel(saved[0])  # setLevel, not assignment: it clears the level cache
        log.propagate = saved[1]


class _ForwardToParent(logging.Handler):
    """Passes the records at or above its level on to the parent logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if log.parent is not None:
            log.parent.handle(record)
