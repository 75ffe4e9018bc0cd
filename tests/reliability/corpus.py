"""The bad-input corpus: broken configs, datasets, run directories and inference inputs.

Each :class:`BadInput` breaks one thing in a fresh :class:`Workspace` and returns the command
line to run on it; ``test_bad_inputs.py`` runs every entry and checks the contract: exit
status 2, the class of the error the command reported (for entries run in-process), a single
message that names what ``names`` lists (the file, key or flag, and the offending value where
that is the point), no traceback, and nothing written into a new run directory or changed in
an existing one. Entries assert names, not wording: rephrasing a message breaks no entry.

Categories: ``config`` (YAML syntax, unknown keys at every level, wrong types, out-of-range
and non-finite values, wrong choices, ``--set`` overrides, missing data paths), ``dataset``
(unreadable, truncated, wrong-dimensional or mismatched volumes, bad voxels and labels,
broken dataset descriptions), ``run_dir`` (unwritable, foreign or damaged run directories, a
full disk) and ``inference`` (``segnet-evaluate`` and ``segnet-predict`` on bad runs/inputs).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from helpers import SPEC, write_yaml

from segnet.config import ExperimentConfig
from segnet.errors import ConfigError, DataError, RunDirError, UserError
from segnet.files import FolderBusyError

IMAGE = "imagesTr/case_000_0000.nii.gz"
LABEL = "labelsTr/case_000.nii.gz"
SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "name")


@dataclass
class Workspace:
    """Where one entry breaks things.

    Attributes:
        tmp: the test's own folder.
        root: a private copy of the tiny dataset.
        data: the experiment as plain data (the trained run's own, for existing runs).
        run: the run directory the command uses (a copy of a trained run, or not yet there).
        out: the output folder of ``segnet-predict``.
    """

    tmp: Path
    root: Path
    data: dict[str, Any]
    run: Path
    out: Path
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.tmp / "experiment.yaml"

    def train_args(self, *extra: str) -> list[str]:
        """Writes ``data`` as the config; ``--config ... --run-dir ...`` plus ``extra``."""
        write_yaml(self.config, self.data)
        return ["--config", str(self.config), "--run-dir", str(self.run), *extra]

    def fields(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "root": str(self.root), "run": str(self.run)} | {
            "config": str(self.config),
            "out": str(self.out),
        }


Make = Callable[[Workspace], list[str]]
Fault = Callable[[pytest.MonkeyPatch, Workspace], None]


@dataclass(frozen=True)
class BadInput:
    """One malformed input, the error it must raise and what its message must name.

    Attributes:
        id: the test id.
        category: ``config``, ``dataset``, ``run_dir`` or ``inference``.
        make: breaks something in the workspace; returns the command's arguments.
        error: the exact class of the error the CLI reports (``segnet.cli.last_error``; checked
            for in-process entries); None where nothing is raised because the command reports
            the inputs it could not use one line each (``segnet-predict``).
        names: substrings of the message: files, dotted keys, flags and offending values
            (``{root}``, ``{run}``... name workspace paths).
        program: ``train``, ``evaluate`` or ``predict``.
        existing_run: the workspace's run directory is a trained run that must stay as it is.
        forced: runs with ``--force`` and gets as far as training, which replaces the stored
            config by design (only the checkpoints and outputs must stay). A forced config
            that does not fit the checkpoints fails before writing, so it leaves ``forced`` off.
        fault: installed in-process before the command (e.g. a full disk).
        subprocess: run through ``scripts/<program>.py`` rather than in-process.
        known_defect: why the entry fails today (reported; marked xfail, strict).
    """

    id: str
    category: str
    make: Make
    error: type[Exception] | None
    names: tuple[str, ...]
    program: str = "train"
    existing_run: bool = False
    forced: bool = False
    fault: Fault | None = None
    subprocess: bool = False
    known_defect: str = ""


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def change(*extra: str, **sections: Any) -> Make:
    """The experiment with ``sections`` merged in (nested mappings merge key by key)."""

    def make(ws: Workspace) -> list[str]:
        _merge(ws.data, sections)
        return ws.train_args(*extra)

    return make


def config_text(text: str | bytes) -> Make:
    """A config file with exactly this content."""

    def make(ws: Workspace) -> list[str]:
        ws.config.write_bytes(text.encode() if isinstance(text, str) else text)
        return ["--config", str(ws.config), "--run-dir", str(ws.run)]

    return make


def fifo_config(ws: Workspace) -> list[str]:
    """A FIFO where the config should be: opening it for reading waits for a writer."""
    os.mkfifo(ws.config)
    return ["--config", str(ws.config), "--run-dir", str(ws.run)]


def dataset(edit: Callable[[Path], None], **sections: Any) -> Make:
    """The dataset copy edited by ``edit(root)``, and ``sections`` merged into the config."""

    def make(ws: Workspace) -> list[str]:
        edit(ws.root)
        return change(**sections)(ws)

    return make


def rewrite(rel: str, transform: Callable[[np.ndarray], np.ndarray], affine_shift: float = 0.0):
    """Rewrites a volume of the dataset with ``transform(array)`` (dtype kept unless changed)."""

    def edit(root: Path) -> None:
        image = nib.load(root / rel)
        array = transform(np.asanyarray(image.dataobj))
        affine = image.affine.copy()
        affine[0, 3] += affine_shift
        header = image.header.copy()
        header.set_data_dtype(array.dtype)
        nib.save(nib.Nifti1Image(array, affine, header), root / rel)

    return edit


def truncate(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return edit


def replace_bytes(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(content)


def edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


def _set_item(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def nnunet_v2(**changes: Any) -> Callable[[Path], None]:
    """The dataset described by an nnU-Net v2 ``dataset.json`` (``changes`` merged in)."""

    def apply(root: Path) -> None:
        labels = {"background": 0, "first": 1, "second": 2}
        description = {
            "channel_names": {"0": "MR"},
            "labels": labels,
            "numTraining": SPEC.num_cases,
        }
        description["file_ending"] = ".nii.gz"
        (root / "dataset.json").write_text(json.dumps({**description, **changes}))

    return apply


def folders(edit: Callable[[Path], None] = lambda root: None) -> Callable[[Path], None]:
    """The nnU-Net folder layout alone (dataset.json removed), then ``edit``."""

    def apply(root: Path) -> None:
        (root / "dataset.json").unlink()
        edit(root)

    return apply


def _empty_folders(root: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(root / sub)
        (root / sub).mkdir()


def _wipe(root: Path) -> None:
    shutil.rmtree(root)
    root.mkdir()


def _label_as_directory(root: Path) -> None:
    (root / LABEL).unlink()
    (root / LABEL).mkdir()


# ---------------------------------------------------------------------------------------------
# Run directories and full disks
# ---------------------------------------------------------------------------------------------
def run_dir_at(place: Callable[[Workspace], Path]) -> Make:
    def make(ws: Workspace) -> list[str]:
        ws.run = place(ws)
        return ws.train_args()

    return make


def _file_at(path: Path) -> Path:
    path.write_text("not a directory\n")
    return path


def _users_folder(ws: Workspace) -> Path:
    """A folder of the user's own results, which segnet once rewrote and deleted."""
    folder = ws.tmp / "my-results"
    (folder / "export" / "saved_model").mkdir(parents=True)
    (folder / "export" / "saved_model" / "saved_model.pb").write_bytes(b"the user's model")
    (folder / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    return folder


def _run_dir_held_by_another_process(monkeypatch: pytest.MonkeyPatch, ws: Workspace) -> None:
    """Another process holds the run directory's lock (the real two-process case is in
    test_concurrency.py; here flock says so, as it does then)."""
    import fcntl

    def flock(fd: int, operation: int) -> None:
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def existing(edit: Callable[[Workspace], None], *extra: str, **sections: Any) -> Make:
    """The trained run, edited by ``edit``, resumed with ``sections`` merged into its config."""

    def make(ws: Workspace) -> list[str]:
        edit(ws)
        return change(*extra, **sections)(ws)

    return make


def _truncate_checkpoints(ws: Workspace) -> None:
    for data in (ws.run / "checkpoints").glob("ckpt-*.data-*"):
        data.write_bytes(data.read_bytes()[:100])


def _trained_in_float16_under_auto(ws: Workspace) -> None:
    """The run as a Volta GPU leaves it: started with ``runtime.precision: auto``, which chose
    mixed_float16 there, so its checkpoints hold a loss-scaled optimizer."""
    from segnet.config import build_config
    from segnet.models.registry import build_model
    from segnet.precision import precision_policy
    from segnet.training.checkpoints import Checkpoints, TrainState, build_checkpoint
    from segnet.training.optimizers import build_optimizer

    _merge(ws.data, {"runtime": {"precision": "mixed_float16"}})
    float16 = build_config(ws.data)
    ws.data["runtime"]["precision"] = "auto"
    write_yaml(ws.run / "config.yaml", ws.data)
    with precision_policy("mixed_float16"):
        model = build_model(float16)
        optimizer = build_optimizer(float16)
        optimizer.build(model.trainable_variables)
    checkpoints = ws.run / "checkpoints"
    shutil.rmtree(checkpoints)
    checkpoint = build_checkpoint(model, optimizer, TrainState.create())
    Checkpoints(checkpoint, checkpoints, checkpoints, keep=2).save(2)


def _no_space(where: str) -> Exception:
    import tensorflow as tf

    # The exception and text TensorFlow gives for ENOSPC (seen on a full tmpfs).
    return tf.errors.ResourceExhaustedError(None, None, f"{where}; No space left on device")


def _full_disk_in_shards(monkeypatch: pytest.MonkeyPatch, ws: Workspace) -> None:
    """The first checkpoint shard write runs out of space (the shard is half written)."""
    from tensorflow.python.ops import io_ops

    real = io_ops.save_v2

    def save_v2(prefix: Any, *args: Any, **kwargs: Any) -> Any:
        real(prefix, *args, **kwargs)
        raise _no_space(f"{_text(prefix)}.data-00000-of-00001")

    monkeypatch.setattr(io_ops, "save_v2", save_v2)


def _full_disk_in_merge(monkeypatch: pytest.MonkeyPatch, ws: Workspace) -> None:
    """Space runs out while merging a checkpoint's index, as on a real full disk: the data
    file is already in place and the index half written."""
    from tensorflow.python.ops import gen_io_ops

    real = gen_io_ops.merge_v2_checkpoints

    def merge(prefixes: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
        real(prefixes, destination, *args, **kwargs)
        index = Path(f"{_text(destination)}.index")
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
        raise _no_space(str(index))

    monkeypatch.setattr(gen_io_ops, "merge_v2_checkpoints", merge)


def _full_disk_in_run_dir(monkeypatch: pytest.MonkeyPatch, ws: Workspace) -> None:
    """Flushing any file inside the run directory fails with ENOSPC."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(ws.run)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _text(value: Any) -> str:
    raw = value.numpy() if hasattr(value, "numpy") else value
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ---------------------------------------------------------------------------------------------
# Inference inputs
# ---------------------------------------------------------------------------------------------
def evaluate(*args: str, run: Callable[[Workspace], Path] = lambda ws: ws.run) -> Make:
    return lambda ws: ["--run", str(run(ws)), *(a.format(**ws.fields()) for a in args)]


def predict(
    write_input: Callable[[Workspace], Path], output: Callable[[Workspace], Path] | None = None
) -> Make:
    def make(ws: Workspace) -> list[str]:
        target = ws.out if output is None else output(ws)
        inputs = ["--input", str(write_input(ws)), "--output", str(target)]
        return ["--run", str(ws.run), *inputs, "--quiet"]  # quiet: the failures alone

    return make


def _scan(ws: Workspace, array: np.ndarray | None = None, name: str = "scan.nii.gz") -> Path:
    source = nib.load(ws.root / IMAGE)
    data = np.asanyarray(source.dataobj) if array is None else array
    path = ws.tmp / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), source.affine), path)
    return path


def _nan_scan(ws: Workspace) -> Path:
    image = np.asanyarray(nib.load(ws.root / IMAGE).dataobj).astype(np.float32)
    image[3, 4, 5] = np.nan
    return _scan(ws, image)


def _not_nifti(ws: Workspace) -> Path:
    path = ws.tmp / "inputs" / "scan.nii.gz"
    path.parent.mkdir(exist_ok=True)
    path.write_text("a text file with a NIfTI name\n")
    return path


def _scan_pair_in_output(ws: Workspace) -> Path:
    """``scan.nii`` and ``scan.nii.gz`` in the folder that is also ``--output``: the prediction
    of one would be written over the other."""
    ws.out.mkdir()
    first = _scan(ws, name="scan.nii")
    second = _scan(ws, name="scan.nii.gz")
    for path in (first, second):
        path.rename(ws.out / path.name)
    return ws.out


def _evaluate_truncated_checkpoint(ws: Workspace) -> list[str]:
    _truncate_checkpoints(ws)
    return evaluate("--checkpoint", "latest")(ws)


def _truncated_copy(ws: Workspace) -> str:
    truncate(LABEL)(ws.root)
    return str(ws.root)


def _evaluate_on_truncated_labels(ws: Workspace) -> list[str]:
    truncate(LABEL)(ws.root)
    return evaluate("--data", "{root}", "--checkpoint", "latest")(ws)


def _evaluate_on_labels_beyond_the_classes(ws: Workspace) -> list[str]:
    rewrite(LABEL, lambda a: np.where(a == 1, 3, a).astype(np.uint8))(ws.root)
    return evaluate("--data", "{root}", "--checkpoint", "latest")(ws)


def _rgb(array: np.ndarray) -> np.ndarray:
    """The volume as NIfTI's RGB24 voxels (a grey colour photo of it)."""
    grey = np.clip(array, 0, 255).astype(np.uint8)
    rgb = np.empty(grey.shape, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    for channel in "RGB":
        rgb[channel] = grey
    return rgb


def _rgb_beside_a_good_scan(ws: Workspace) -> Path:
    good = _scan(ws)
    source = nib.load(good)
    nib.save(
        nib.Nifti1Image(_rgb(np.asanyarray(source.dataobj)), source.affine),
        good.parent / "photo.nii.gz",
    )
    return good.parent


_LIST_CASES = {"format": "list", "split": {"folds_file": None, "val": ["case_001"]}}
_CASE = {"id": "case_000", "images": [IMAGE], "label": LABEL}
_UNKNOWN_EVERYWHERE = {name: {"bogus": 1} for name in SECTIONS}
_DEEP = "[" * 5000 + "]" * 5000  # PyYAML's recursive composer gave up near 1000 levels

# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------
# fmt: off
CONFIG = [
    BadInput("yaml-unclosed-bracket", "config", config_text("train:\n  epochs: [1, 2\nmodel: {}\n"), ConfigError, ("{config}", "line 3"), subprocess=True),
    BadInput("yaml-tab-indentation", "config", config_text("train:\n\tepochs: 3\n"), ConfigError, ("{config}", "line 2")),
    BadInput("yaml-top-level-list", "config", config_text("- data\n- model\n"), ConfigError, ("{config}",)),
    BadInput("yaml-not-utf8", "config", config_text(b"name: caf\xe9\n"), ConfigError, ("{config}",)),
    BadInput("config-file-missing", "config", lambda ws: ["--config", str(ws.tmp / "missing.yaml")], ConfigError, ("{tmp}/missing.yaml",)),
    BadInput("config-is-a-directory", "config", lambda ws: ["--config", str(ws.root)], ConfigError, ("{root}",)),
    BadInput("config-is-a-fifo", "config", fifo_config, ConfigError, ("{config}",), subprocess=True),
    BadInput("config-empty", "config", config_text("# settings to come\n"), ConfigError, ("{config}",)),
    BadInput("yaml-duplicate-key", "config", config_text("train:\n  epochs: 2\n  batch_size: 1\n  epochs: 3\n"), ConfigError, ("{config}", "train.epochs")),
    BadInput("yaml-deeply-nested", "config", config_text(f"name: x\ndata:\n  patch_size: {_DEEP}\n"), ConfigError, ("{config}", "line 3")),
    BadInput("name-parent-folder", "config", change(name=".."), ConfigError, ("name:", "'..'")),
    BadInput("name-with-nul", "config", change(name="run\x00one"), ConfigError, ("name:",)),
    BadInput("name-too-long", "config", change(name="r" * 300), ConfigError, ("name:", "300")),
    BadInput("unknown-top-level-key", "config", change(trian={"epochs": 2}), ConfigError, ("trian:", "'train'")),
    BadInput("unknown-data-key", "config", change(data={"rooot": "x"}), ConfigError, ("data.rooot", "'root'")),
    BadInput("unknown-split-key", "config", change(data={"split": {"folds": 3}}), ConfigError, ("data.split.folds",)),
    BadInput("unknown-model-key", "config", change(model={"segnet": {"filterz": 8}}), ConfigError, ("model.segnet.filterz", "'filters'")),
    BadInput("unknown-cascade-stage-key", "config", change(model={"unet3d_cascade": {"low": {"depht": 2}}}), ConfigError, ("model.unet3d_cascade.low.depht", "'depth'")),
    BadInput("unknown-case-entry-key", "config", change(data={**_LIST_CASES, "cases": [{**_CASE, "imgs": []}]}), ConfigError, ("data.cases[0].imgs",)),
    BadInput("unknown-key-in-every-section", "config", change(**_UNKNOWN_EVERYWHERE), ConfigError, tuple(f"{s}.bogus" for s in SECTIONS)),
    BadInput("not-an-integer", "config", change(train={"epochs": "ten"}), ConfigError, ("train.epochs", "'ten'")),
    BadInput("not-a-boolean", "config", change(train={"deterministic": "yes"}), ConfigError, ("train.deterministic", "'yes'")),
    BadInput("not-a-list", "config", change(data={"patch_size": 16}), ConfigError, ("data.patch_size",)),
    BadInput("section-not-a-mapping", "config", change(model=5), ConfigError, ("model:",)),
    BadInput("list-too-short", "config", change(data={"patch_size": [16, 16]}), ConfigError, ("data.patch_size",)),
    BadInput("bad-list-item", "config", change(data={"patch_size": [16, "x", 16]}), ConfigError, ("data.patch_size[1]",)),
    BadInput("nan-learning-rate", "config", change(optimizer={"learning_rate": float("nan")}), ConfigError, ("optimizer.learning_rate", "nan")),
    BadInput("infinite-clip-norm", "config", change(optimizer={"clip_norm": float("inf")}), ConfigError, ("optimizer.clip_norm", "inf")),
    BadInput("float-beyond-double-range", "config", change(optimizer={"weight_decay": 10**400}), ConfigError, ("optimizer.weight_decay",)),
    BadInput("negative-learning-rate", "config", change(optimizer={"learning_rate": -1}), ConfigError, ("optimizer.learning_rate", "-1")),
    BadInput("probability-above-one", "config", change(augmentation={"flip_prob": 2}), ConfigError, ("augmentation.flip_prob",)),
    BadInput("zero-epochs", "config", change(train={"epochs": 0}), ConfigError, ("train.epochs",)),
    BadInput("fold-out-of-range", "config", change(data={"split": {"folds_file": None, "fold": 9}}), ConfigError, ("data.split.fold",)),
    BadInput("train-seed-negative", "config", change(train={"seed": -1}), ConfigError, ("train.seed",)),
    BadInput("train-seed-too-large", "config", change(train={"seed": 2**40}), ConfigError, ("train.seed",)),
    BadInput("split-seed-negative", "config", change(data={"split": {"folds_file": None, "seed": -1}}), ConfigError, ("data.split.seed",)),
    BadInput("unknown-optimizer", "config", change(optimizer={"name": "adam"}), ConfigError, ("optimizer.name", "'adam'")),
    BadInput("unknown-model", "config", change(model={"name": "segnett"}), ConfigError, ("model.name", "'segnett'", "'segnet'")),
    BadInput("bad-int-choice", "config", change(model={"unet3d": {"input_downsample": 3}}), ConfigError, ("model.unet3d.input_downsample",)),
    BadInput("patch-not-divisible", "config", change(model={"name": "unet3d", "unet3d": {"depth": 2}}, data={"patch_size": [17, 16, 16]}), ConfigError, ("data.patch_size",)),
    BadInput("class-weights-length", "config", change(loss={"class_weights": [1.0, 2.0]}), ConfigError, ("loss.class_weights", "data.num_classes")),
    BadInput("set-unknown-key", "config", change("--set", "train.epohcs=3"), ConfigError, ("train.epohcs", "'epochs'")),
    BadInput("set-without-equals", "config", change("--set", "trainepochs"), ConfigError, ("--set", "trainepochs")),
    BadInput("set-invalid-yaml-value", "config", change("--set", "train.epochs=[1"), ConfigError, ("--set train.epochs",)),
    BadInput("set-deeply-nested-value", "config", change("--set", f"data.patch_size={_DEEP}"), ConfigError, ("--set data.patch_size",)),
    BadInput("data-root-missing", "config", lambda ws: change(data={"root": str(ws.tmp / "no-such-dataset")})(ws), DataError, ("data.root", "{tmp}/no-such-dataset")),
    BadInput("folds-file-missing", "config", change(data={"split": {"folds_file": "nope.json"}}), DataError, ("data.split.folds_file", "{root}/nope.json")),
    BadInput("case-list-file-missing", "config", change(data={**_LIST_CASES, "cases": [{**_CASE, "images": ["imagesTr/ghost.nii.gz"]}]}), DataError, ("data.cases[0]", "{root}/imagesTr/ghost.nii.gz")),
    BadInput("split-val-unknown-ids", "config", change(data={"split": {"folds_file": None, "val": ["nope"]}}), DataError, ("data.split.val", "'nope'")),
    BadInput("fold-not-in-folds-file", "config", change(data={"split": {"fold": 7}}), DataError, ("data.split.fold", "{root}/folds.json")),
]

DATASET = [
    BadInput("label-truncated", "dataset", dataset(truncate(LABEL)), DataError, ("{root}/" + LABEL,), subprocess=True),
    BadInput("image-truncated", "dataset", dataset(truncate(IMAGE)), DataError, ("{root}/" + IMAGE,)),
    BadInput("image-not-nifti", "dataset", dataset(replace_bytes(IMAGE, b"just text\n")), DataError, ("{root}/" + IMAGE,)),
    BadInput("label-gzip-of-garbage", "dataset", dataset(replace_bytes(LABEL, gzip.compress(b"garbage" * 99))), DataError, ("{root}/" + LABEL,)),
    BadInput("label-empty-file", "dataset", dataset(replace_bytes(LABEL, b"")), DataError, ("{root}/" + LABEL,)),
    BadInput("label-is-a-directory", "dataset", dataset(_label_as_directory), DataError, ("{root}/" + LABEL,)),
    BadInput("image-2d", "dataset", dataset(rewrite(IMAGE, lambda a: a[:, :, 9])), DataError, ("{root}/" + IMAGE,)),
    BadInput("label-4d", "dataset", dataset(rewrite(LABEL, lambda a: np.stack([a, a], -1))), DataError, ("{root}/" + LABEL,)),
    BadInput("image-two-channels", "dataset", dataset(rewrite(IMAGE, lambda a: np.stack([a, a], -1))), DataError, ("case_000", "data.num_channels")),
    BadInput("label-shape-mismatch", "dataset", dataset(rewrite(LABEL, lambda a: a[:, :, :-1])), DataError, ("{root}/" + LABEL, "(17, 18, 18)")),
    BadInput("label-affine-mismatch", "dataset", dataset(rewrite(LABEL, lambda a: a, affine_shift=2.0)), DataError, ("{root}/" + LABEL,)),
    BadInput("image-nan-voxels", "dataset", dataset(rewrite(IMAGE, lambda a: np.where(a > a.mean(), np.nan, a))), DataError, ("{root}/" + IMAGE,)),
    BadInput("image-inf-voxel", "dataset", dataset(rewrite(IMAGE, lambda a: np.where(a == a.max(), np.inf, a))), DataError, ("{root}/" + IMAGE,)),
    BadInput("label-nan-voxels", "dataset", dataset(rewrite(LABEL, lambda a: np.where(a == 1, np.nan, a).astype(np.float32))), DataError, ("{root}/" + LABEL,)),
    BadInput("label-fractional", "dataset", dataset(rewrite(LABEL, lambda a: np.where(a == 1, 0.5, a).astype(np.float32))), DataError, ("{root}/" + LABEL, "[0.5]")),
    BadInput("label-beyond-num-classes", "dataset", dataset(rewrite(LABEL, lambda a: np.where(a == 1, 7, a).astype(np.uint8))), DataError, ("{root}/" + LABEL, "[7]")),
    BadInput("label-negative", "dataset", dataset(rewrite(LABEL, lambda a: np.where(a == 1, -1, a.astype(np.int16)))), DataError, ("{root}/" + LABEL, "[-1]")),
    BadInput("channel-file-missing", "dataset", dataset(folders(), data={"format": "folders", "num_channels": 2}), DataError, ("{root}/imagesTr", "case_000_0001")),
    BadInput("channel-file-extra", "dataset", dataset(folders(lambda r: shutil.copy(r / IMAGE, r / "imagesTr/case_000_0001.nii.gz"))), DataError, ("{root}/imagesTr", "case_000", "data.num_channels")),
    BadInput("label-file-missing", "dataset", dataset(folders(lambda r: (r / LABEL).unlink())), DataError, ("{root}/labelsTr", "case_000")),
    BadInput("label-without-image", "dataset", dataset(folders(lambda r: shutil.copy(r / LABEL, r / "labelsTr/orphan.nii.gz"))), DataError, ("{root}/labelsTr/orphan",)),
    BadInput("image-without-channel-suffix", "dataset", dataset(folders(lambda r: shutil.copy(r / IMAGE, r / "imagesTr/case_009.nii.gz"))), DataError, ("{root}/imagesTr/case_009.nii.gz", "_0000")),
    BadInput("empty-folders", "dataset", dataset(folders(_empty_folders)), DataError, ("{root}",)),
    BadInput("empty-dataset-root", "dataset", dataset(_wipe), DataError, ("{root}/imagesTr",)),
    BadInput("duplicate-case-ids", "dataset", dataset(edit_json("dataset.json", lambda d: _set_item(d, ("training", 1), d["training"][0]))), DataError, ("{root}", "case_000")),
    BadInput("nnunet-v2-region-labels", "dataset", dataset(nnunet_v2(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])), DataError, ("{root}/dataset.json", "'labels'", "'whole'"), subprocess=True),
    BadInput("nnunet-v2-file-ending-mha", "dataset", dataset(nnunet_v2(file_ending=".mha")), DataError, ("{root}/dataset.json", "'file_ending'", ".mha")),
    BadInput("dataset-json-missing-label", "dataset", dataset(edit_json("dataset.json", lambda d: _set_item(d, ("training", 0, "label"), "./labelsTr/gone.nii.gz"))), DataError, ("dataset.json training[0]", "{root}/labelsTr/gone.nii.gz")),
    BadInput("dataset-json-missing-image", "dataset", dataset(edit_json("dataset.json", lambda d: _set_item(d, ("training", 2, "image"), "./imagesTr/gone.nii.gz"))), DataError, ("dataset.json training[2]", "{root}/imagesTr/gone.nii.gz")),
    BadInput("dataset-json-invalid", "dataset", dataset(replace_bytes("dataset.json", b'{"training": [')), DataError, ("{root}/dataset.json",)),
    BadInput("dataset-json-not-an-object", "dataset", dataset(replace_bytes("dataset.json", b"[1, 2]")), DataError, ("{root}/dataset.json",)),
    BadInput("dataset-json-label-count", "dataset", dataset(edit_json("dataset.json", lambda d: _set_item(d, ("labels", "3"), "extra"))), DataError, ("{root}/dataset.json", "'labels'", "data.num_classes")),
    BadInput("folds-json-malformed", "dataset", dataset(replace_bytes("folds.json", b'{"fold": []}')), DataError, ("{root}/folds.json",)),
    BadInput("folds-json-unknown-ids", "dataset", dataset(edit_json("folds.json", lambda d: _set_item(d, ("folds", "1", 0), "case_999"))), DataError, ("{root}/folds.json", "'case_999'")),
    BadInput("image-rgb", "dataset", dataset(rewrite(IMAGE, _rgb)), DataError, ("{root}/" + IMAGE,)),
    BadInput("image-complex", "dataset", dataset(rewrite(IMAGE, lambda a: a.astype(np.complex64))), DataError, ("{root}/" + IMAGE,)),
    BadInput("folds-json-case-in-two-folds", "dataset", dataset(edit_json("folds.json", lambda d: _set_item(d, ("folds", "1"), [*d["folds"]["1"], d["folds"]["0"][0]]))), DataError, ("{root}/folds.json", "case_002")),
    BadInput("volume-smaller-than-patch", "dataset", dataset(lambda r: None, data={"patch_size": [32, 32, 32], "pad_small_volumes": False}), DataError, ("{root}/" + IMAGE, "data.patch_size")),
]

RUN_DIR = [
    BadInput("run-dir-is-a-file", "run_dir", run_dir_at(lambda ws: _file_at(ws.tmp / "run-file")), RunDirError, ("--run-dir {tmp}/run-file",)),
    BadInput("run-dir-under-a-file", "run_dir", run_dir_at(lambda ws: _file_at(ws.tmp / "plain-file") / "run"), RunDirError, ("--run-dir {tmp}/plain-file/run",), subprocess=True),
    BadInput("run-dir-in-proc", "run_dir", run_dir_at(lambda ws: Path("/proc/segnet-reliability/run")), RunDirError, ("/proc/segnet-reliability/run",)),
    BadInput("run-dir-holds-users-files", "run_dir", run_dir_at(_users_folder), RunDirError, ("--run-dir {tmp}/my-results", "metrics.csv"), subprocess=True),
    BadInput("run-dir-in-use", "run_dir", existing(lambda ws: None), FolderBusyError, ("--run-dir {run}",), existing_run=True, fault=_run_dir_held_by_another_process),
    BadInput("different-experiment", "run_dir", existing(lambda ws: None, train={"seed": 5}), RunDirError, ("{run}/config.yaml", "train.seed", "--force"), existing_run=True),
    BadInput("config-not-a-segnet-config", "run_dir", existing(lambda ws: (ws.run / "config.yaml").write_text("- a list\n")), RunDirError, ("{run}/config.yaml",), existing_run=True),
    BadInput("every-checkpoint-unreadable", "run_dir", existing(_truncate_checkpoints), RunDirError, ("{run}/checkpoints",), existing_run=True),
    BadInput("checkpoint-of-another-model", "run_dir", existing(lambda ws: None, "--force", model={"segnet": {"filters": 8}}), RunDirError, ("{run}/checkpoints/ckpt-",), existing_run=True),
    BadInput("float16-checkpoint-on-a-cpu", "run_dir", existing(_trained_in_float16_under_auto), RunDirError, ("{run}/checkpoints", "mixed_float16"), existing_run=True),
    BadInput("precision-across-the-float16-line", "run_dir", existing(lambda ws: None, "--force", runtime={"precision": "mixed_float16"}), RunDirError, ("{run}/checkpoints", "runtime.precision"), existing_run=True),
    BadInput("disk-full-writing-config", "run_dir", change(), RunDirError, ("{run}",), fault=_full_disk_in_run_dir),
    BadInput("disk-full-in-checkpoint-shards", "run_dir", existing(lambda ws: None, "--force", train={"epochs": 2}), RunDirError, ("{run}/checkpoints",), existing_run=True, forced=True, fault=_full_disk_in_shards),
    BadInput("disk-full-in-checkpoint-merge", "run_dir", existing(lambda ws: None, "--force", train={"epochs": 2}), RunDirError, ("{run}/checkpoints",), existing_run=True, forced=True, fault=_full_disk_in_merge),
]

INFERENCE = [
    BadInput("evaluate-run-missing", "inference", evaluate(run=lambda ws: ws.tmp / "no-run"), RunDirError, ("--run {tmp}/no-run",), program="evaluate"),
    BadInput("evaluate-not-a-run", "inference", evaluate(run=lambda ws: ws.root), RunDirError, ("--run {root}",), program="evaluate"),
    BadInput("evaluate-unknown-checkpoint", "inference", evaluate("--checkpoint", "ckpt-999"), RunDirError, ("--checkpoint ckpt-999",), program="evaluate", existing_run=True, subprocess=True),
    BadInput("evaluate-checkpoint-truncated", "inference", _evaluate_truncated_checkpoint, RunDirError, ("{run}/checkpoints/ckpt-", "--checkpoint"), program="evaluate", existing_run=True, subprocess=True),
    BadInput("evaluate-set-training-key", "inference", evaluate("--set", "train.epochs=3"), ConfigError, ("--set train.epochs",), program="evaluate", existing_run=True),
    BadInput("evaluate-set-unknown-precision", "inference", evaluate("--set", "evaluation.precision=half"), ConfigError, ("evaluation.precision", "bfloat16"), program="evaluate", existing_run=True),
    BadInput("evaluate-data-truncated-label", "inference", _evaluate_on_truncated_labels, DataError, ("{root}/" + LABEL,), program="evaluate", existing_run=True),
    BadInput("predict-input-missing", "inference", predict(lambda ws: ws.tmp / "absent.nii.gz"), None, ("{tmp}/absent.nii.gz",), program="predict", existing_run=True),
    BadInput("predict-input-not-nifti", "inference", predict(_not_nifti), None, ("{tmp}/inputs/scan.nii.gz",), program="predict", existing_run=True, subprocess=True),
    BadInput("predict-input-2d", "inference", predict(lambda ws: _scan(ws, np.zeros((17, 18), np.float32))), None, ("{tmp}/inputs/scan.nii.gz",), program="predict", existing_run=True),
    BadInput("predict-input-nan", "inference", predict(_nan_scan), None, ("scan.nii.gz",), program="predict", existing_run=True),
    BadInput("predict-output-would-replace-an-input", "inference", predict(_scan_pair_in_output), UserError, ("--output {out}", "{out}/scan.nii.gz"), program="predict", existing_run=True, subprocess=True),
    BadInput("predict-rgb-beside-a-good-scan", "inference", predict(_rgb_beside_a_good_scan, lambda ws: ws.tmp / "predictions"), None, ("{tmp}/inputs/photo.nii.gz",), program="predict", existing_run=True),
    BadInput("evaluate-data-label-beyond-classes", "inference", _evaluate_on_labels_beyond_the_classes, DataError, ("{root}/" + LABEL, "[3]", "data.skip_bad_cases"), program="evaluate", existing_run=True),
    BadInput("predict-output-is-a-file", "inference", predict(_scan, lambda ws: _file_at(ws.tmp / "out-file")), UserError, ("--output {tmp}/out-file",), program="predict", existing_run=True),
    BadInput("predict-output-under-a-file", "inference", predict(_scan, lambda ws: _file_at(ws.tmp / "out-file") / "out"), UserError, ("--output {tmp}/out-file/out",), program="predict", existing_run=True),
]
# fmt: on

CORPUS = CONFIG + DATASET + RUN_DIR + INFERENCE
CATEGORIES = {"config": CONFIG, "dataset": DATASET, "run_dir": RUN_DIR, "inference": INFERENCE}
