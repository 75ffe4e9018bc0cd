"""Preprocessed cases on disk as uncompressed, memory-mappable ``.npy`` files.

Layout::

    <data.cache_dir>/<settings hash>/<case id>-<files hash>/
        image.npy        float32 (depth, height, width, channels)
        label.npy        uint8 (depth, height, width); absent for unlabelled cases
        foreground.npz   class_1, class_2, ...: int32 (n, 3) sampled voxel coordinates
        info.json        PreprocessInfo: how to map a prediction back to the scan
        complete.json    written last: its presence means the case is whole
    <data.cache_dir>/fingerprints/<hash>.json

The settings hash covers the preprocessing section, num_classes, num_channels and the parts of
the dataset fingerprint that change the output; the files hash covers each file's path, size
and modification time. A case is built in a private temporary folder and renamed into place,
so a reader never sees half a case and two runs filling the cache at once both end up with one
complete copy. The second run reads no NIfTI file: it checks each entry's files (the ``.npy``
headers and sizes, the small ``.npz`` and ``.json`` files) and rebuilds, with a warning, a case
whose files were truncated or damaged since (a full disk, a copy cut short).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from segnet.config import ExperimentConfig
from segnet.console import progress_bar
from segnet.data.case import PreprocessedCase, load_array, open_npz
from segnet.data.datasets import CaseFiles
from segnet.data.preprocessing import (
    DatasetFingerprint,
    PreprocessInfo,
    case_seed,
    compute_fingerprint,
    preprocess_case,
    sample_foreground,
)
from segnet.data.volumes import int3
from segnet.errors import UserError
from segnet.files import atomic_write_text, ensure_writable_dir

log = logging.getLogger("segnet")
CACHE_VERSION = 1  # bump when the stored format or the preprocessing code's output changes
_MARKER = "complete.json"
_WORKERS = 2  # scipy resampling and zlib release the GIL; each worker holds one case in RAM
# What numpy, zipfile and json raise for a truncated or corrupt file.
_DAMAGED = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_stats(paths: Sequence[Path]) -> list[list[Any]]:
    stats = []
    for path in paths:
        st = os.stat(path)
        stats.append([str(Path(path).absolute()), st.st_size, st.st_mtime_ns])
    return stats


def settings_hash(config: ExperimentConfig, fingerprint: DatasetFingerprint) -> str:
    """Hash of everything but the files that decides what a preprocessed case holds."""
    pre = config.preprocessing
    used: dict[str, Any] = {}  # only fingerprint parts that change the output, so that a new
    if pre.resample and pre.target_spacing is None:  # fold does not invalidate the cache
        used["spacing"] = fingerprint.spacing
    if pre.uses_ct:
        used["intensity"] = fingerprint.to_dict()["intensity"]
    settings = {k: v for k, v in dataclasses.asdict(pre).items() if k != "use_cache"}
    if not pre.channel_normalization:  # as before the key existed: existing caches stay valid
        del settings["channel_normalization"]
    return _digest(
        {
            "version": CACHE_VERSION,
            "preprocessing": settings,
            "fingerprint": used,
            "num_classes": config.data.num_classes,
            "num_channels": config.data.num_channels,
        }
    )


def _case_dir(root: Path, case: CaseFiles) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in case.case_id)
    files = _digest([case.case_id, _file_stats(case.files)])
    return root / f"{safe}-{files[:12]}"


def _cache_folder(path: Path) -> Path:
    return ensure_writable_dir(path, "cache folder", "set data.cache_dir to a writable folder")


def _remove_abandoned(root: Path, min_age_s: float = 3600.0) -> None:
    """Deletes temporary case folders of runs that were killed (an hour old: not in progress)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > min_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


def _temporary_root() -> Path:
    """For ``use_cache: false``: a folder of this process, removed when it exits."""
    path = Path(tempfile.mkdtemp(prefix="segnet-preprocessed-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
class _Damaged(Exception):
    """A file of a complete cache entry is truncated or corrupt."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _from_dir(case_dir: Path, num_channels: int) -> PreprocessedCase | None:
    """The stored case, checked file by file; None when it is absent or incomplete.

    Raises:
        _Damaged: the entry is complete but one of its files does not hold what it should.
    """
    marker_path = case_dir / _MARKER
    if not marker_path.is_file():
        return None
    with _reading(marker_path):
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        labelled, shape = bool(marker["labelled"]), int3(marker["shape"])
        case = PreprocessedCase(
            case_id=str(marker["case_id"]),
            image_path=case_dir / "image.npy",
            label_path=case_dir / "label.npy" if labelled else None,
            foreground_path=case_dir / "foreground.npz" if labelled else None,
            shape=shape,
        )
    _check_array(case.image_path, (*shape, num_channels), np.float32)
    if case.label_path is not None and case.foreground_path is not None:
        _check_array(case.label_path, shape, np.uint8)
        _check_foreground(case.foreground_path)
    info_path = case_dir / "info.json"
    with _reading(info_path):
        info = PreprocessInfo.from_dict(json.loads(info_path.read_text(encoding="utf-8")))
        if info.shape != shape:
            raise ValueError(f"shape {info.shape} differs from {shape} in {_MARKER}")
    return case


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns what a truncated or corrupt file raises into a _Damaged naming it."""
    try:
        yield
    except _DAMAGED as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _Damaged(path, reason) from None


def _check_array(path: Path, shape: tuple[int, ...], dtype: type) -> None:
    with _reading(path):
        array = load_array(path)  # reads the header, checks the size: no data
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}"
            )


def _check_foreground(path: Path) -> None:
    with _reading(path), open_npz(path) as data:
        for name in data.files:  # reading each member checks its CRC; they are small
            if data[name].ndim != 2 or data[name].shape[1] != 3:
                raise ValueError(f"{name} has shape {data[name].shape}, expected (n, 3)")


def _write_case(
    tmp: Path, case: CaseFiles, config: ExperimentConfig, fingerprint: DatasetFingerprint
) -> None:
    image, label, info = preprocess_case(case, config.preprocessing, fingerprint)
    tmp.mkdir(parents=True)
    np.save(tmp / "image.npy", image)
    if label is not None:
        np.save(tmp / "label.npy", label)
        foreground = sample_foreground(label, config.data.num_classes, case_seed(case.case_id))
        arrays: dict[str, Any] = {f"class_{c}": v for c, v in foreground.items()}
        np.savez(tmp / "foreground.npz", **arrays)
    (tmp / "info.json").write_text(json.dumps(info.to_dict()), encoding="utf-8")
    marker = {
        "case_id": case.case_id,
        "shape": list(info.shape),
        "labelled": label is not None,
        "sources": _file_stats(case.files),
    }
    (tmp / _MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def _prepare_one(
    root: Path, case: CaseFiles, config: ExperimentConfig, fingerprint: DatasetFingerprint
) -> PreprocessedCase:
    case_dir = _case_dir(root, case)
    channels = config.data.num_channels
    try:
        done = _from_dir(case_dir, channels)
    except _Damaged as damaged:
        log.warning(
            "cache: %s is damaged (%s); rebuilding case %s",
            damaged.path,
            damaged.reason,
            case.case_id,
        )
        _discard(root, case_dir, damaged)
    else:
        if done is not None:
            return done
        if case_dir.exists():  # left by an older, interrupted version of this code: rebuild it
            shutil.rmtree(case_dir, ignore_errors=True)
    tmp = _temporary_name(root, case_dir)
    try:
        _write_case(tmp, case, config, fingerprint)
        # Atomic: the case appears whole or not at all. If another run renamed its (identical)
        # copy first, the rename fails and that copy is kept.
        with contextlib.suppress(OSError):
            tmp.rename(case_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        done = _from_dir(case_dir, channels)
    except _Damaged as damaged:
        raise UserError(
            f"{damaged.path}: still damaged after rebuilding ({damaged.reason}); delete "
            f"{case_dir} and run again"
        ) from None
    if done is None:
        raise UserError(f"cache folder {case_dir} could not be completed; delete it and retry")
    return done


def _temporary_name(root: Path, case_dir: Path) -> Path:
    return root / f".tmp-{case_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _discard(root: Path, case_dir: Path, damaged: _Damaged) -> None:
    """Moves a damaged entry out of the way in one rename (no reader sees it half deleted),
    then deletes it; a leftover is an abandoned temporary folder, removed on a later run."""
    trash = _temporary_name(root, case_dir)
    try:
        case_dir.rename(trash)
    except FileNotFoundError:
        return  # another run discarded it first
    except OSError as exc:
        raise UserError(
            f"{damaged.path}: the cached copy of this case is damaged ({damaged.reason}) and "
            f"cannot be removed ({exc.strerror}); delete {case_dir} and run again"
        ) from None
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def prepare_cases(
    config: ExperimentConfig, case_files: Sequence[CaseFiles], fingerprint: DatasetFingerprint
) -> list[PreprocessedCase]:
    """Preprocessed, memory-mappable copies of the cases, computed only when not cached.

    Args:
        config: the experiment (preprocessing section, data.num_classes, data.cache_dir).
        case_files: the cases to prepare, in the order wanted back.
        fingerprint: dataset statistics from the training cases (see
            :func:`load_or_compute_fingerprint`).

    Returns:
        One PreprocessedCase per input case, in the same order. With
        ``preprocessing.use_cache: false`` the files live in a temporary folder removed when
        the process exits.

    Raises:
        UserError: the cache folder cannot be written.
        DataError: a case's files cannot be read.
    """
    if config.preprocessing.use_cache:
        root = _cache_folder(Path(config.data.cache_dir) / settings_hash(config, fingerprint))
        _remove_abandoned(root)
    else:
        root = _temporary_root()
    # No quiet flag reaches here: --quiet shows up as the log at warnings only.
    quiet = not log.isEnabledFor(logging.INFO)
    bar = progress_bar(
        total=len(case_files), desc="Preprocessing", unit="case", leave=False, quiet=quiet
    )
    with bar, ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = [
            pool.submit(_prepare_one, root, case, config, fingerprint) for case in case_files
        ]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # stop promptly on the first unreadable case or Ctrl-C
                future.cancel()
            raise


def load_or_compute_fingerprint(
    config: ExperimentConfig, train_cases: Sequence[CaseFiles]
) -> DatasetFingerprint:
    """The training cases' fingerprint, cached in ``data.cache_dir/fingerprints/``.

    Only ``ct`` normalisation makes the fingerprint read voxel data; caching it keeps a warm
    run free of NIfTI decompression in that case too.
    """
    pre = config.preprocessing
    if not pre.use_cache:
        return compute_fingerprint(train_cases, pre)
    key = _digest(
        {
            "version": CACHE_VERSION,
            "ct": pre.uses_ct,
            "percentiles": pre.ct_percentiles if pre.uses_ct else None,
            "files": [_file_stats(c.files) for c in train_cases],
        }
    )
    path = _cache_folder(Path(config.data.cache_dir) / "fingerprints") / f"{key}.json"
    try:
        return DatasetFingerprint.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, UserError):
        pass  # absent or damaged: compute it again
    fingerprint = compute_fingerprint(train_cases, pre)
    atomic_write_text(path, json.dumps(fingerprint.to_dict(), indent=1), fsync=False)
    return fingerprint
