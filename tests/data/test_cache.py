"""The preprocessing cache: warm runs read no NIfTI, changes invalidate, concurrent fills agree."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from segnet.config import ExperimentConfig
from segnet.data import cache, preprocessing
from segnet.data.cache import load_or_compute_fingerprint, prepare_cases
from segnet.data.case import PreprocessedCase
from segnet.data.datasets import CaseFiles, describe_dataset
from segnet.data.preprocessing import PreprocessInfo, preprocess_case, restore_to_original
from segnet.data.volumes import read_volume
from segnet.errors import UserError


def read_info(case: PreprocessedCase) -> PreprocessInfo:
    """How the cache says ``case`` was preprocessed (its ``info.json``)."""
    path = case.image_path.parent / "info.json"
    return PreprocessInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _with(config: ExperimentConfig, section: str, **changes) -> ExperimentConfig:
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **changes)}
    )


def _prepare(config: ExperimentConfig) -> tuple[list[CaseFiles], list[PreprocessedCase]]:
    cases = describe_dataset(config.data)
    return cases, prepare_cases(config, cases, load_or_compute_fingerprint(config, cases))


def _forbid_nifti(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a warm cache must not read NIfTI files")

    for module in (preprocessing, cache):
        for name in ("read_volume", "read_channels", "read_geometry", "preprocess_case"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


def _count_preprocessing(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(case, *args):
        calls.append(case.case_id)
        return preprocess_case(case, *args)

    monkeypatch.setattr(cache, "preprocess_case", counting)
    return calls


def test_cached_cases_are_complete_and_memory_mappable(tiny_data_config) -> None:
    cases, prepared = _prepare(tiny_data_config)
    assert [p.case_id for p in prepared] == [c.case_id for c in cases]
    for case, stored in zip(cases, prepared):
        image, label = stored.load_image(), stored.load_label()
        assert isinstance(image, np.memmap) and image.dtype == np.float32
        assert image.shape == (*stored.shape, 1) and image.flags.c_contiguous
        assert label is not None and label.dtype == np.uint8 and label.shape == stored.shape
        for cls, coords in stored.load_foreground().items():
            assert (label[tuple(coords.T)] == cls).all()
        original, _ = read_volume(case.label)
        np.testing.assert_array_equal(
            restore_to_original(np.asarray(label), read_info(stored)), original
        )


def test_second_run_reads_no_nifti(tiny_data_config, monkeypatch) -> None:
    _, first = _prepare(tiny_data_config)
    _forbid_nifti(monkeypatch)
    _, second = _prepare(tiny_data_config)
    assert second == first


@pytest.mark.parametrize(
    ("section", "changes"),
    [
        ("preprocessing", {"normalization": "range"}),
        ("preprocessing", {"crop_to_nonzero": False}),
        ("preprocessing", {"resample": True, "target_spacing": (1.5, 1.5, 1.5)}),
        ("data", {"num_classes": 5}),
    ],
)
def test_a_changed_setting_invalidates(tiny_data_config, monkeypatch, section, changes) -> None:
    _, first = _prepare(tiny_data_config)
    calls = _count_preprocessing(monkeypatch)
    changed = _with(tiny_data_config, section, **changes)
    if "num_classes" in changes:  # dataset.json declares 4 labels; describe with the old value
        cases = describe_dataset(tiny_data_config.data)
        second = prepare_cases(changed, cases, load_or_compute_fingerprint(changed, cases))
    else:
        _, second = _prepare(changed)
    assert len(calls) == len(first)
    assert {p.image_path.parent.parent for p in second}.isdisjoint(
        {p.image_path.parent.parent for p in first}
    )


def test_a_changed_file_recomputes_that_case_only(tiny_data_config, monkeypatch) -> None:
    cases, first = _prepare(tiny_data_config)
    label = cases[2].label
    stat = os.stat(label)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = _count_preprocessing(monkeypatch)
    _, second = _prepare(tiny_data_config)
    assert calls == [cases[2].case_id]
    assert second[2].image_path != first[2].image_path and second[0] == first[0]


def test_abandoned_temporary_folders_are_removed(tiny_data_config) -> None:
    _, first = _prepare(tiny_data_config)
    root = first[0].image_path.parent.parent
    old, recent = root / ".tmp-case_000-killed", root / ".tmp-case_001-running"
    for tmp in (old, recent):
        tmp.mkdir()
        (tmp / "image.npy").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    _prepare(tiny_data_config)
    assert not old.exists() and recent.exists()


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# the damaged file of case 1's entry, how it was damaged
DAMAGE = [
    ("image.npy", _cut),
    ("label.npy", lambda path: _cut(path, 0.9)),
    ("image.npy", lambda path: path.write_bytes(b"not an array at all")),
    ("label.npy", lambda path: np.save(path, np.zeros((2, 3, 4), np.uint8))),
    ("foreground.npz", _cut),
    ("info.json", _cut),
    ("complete.json", _cut),
]


@pytest.mark.parametrize(
    ("name", "damage"), DAMAGE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DAMAGE)]
)
def test_a_damaged_cache_file_is_rebuilt_with_one_warning(
    tiny_data_config, monkeypatch, caplog, name, damage
) -> None:
    _, first = _prepare(tiny_data_config)
    expected = first[1].load_image(mmap=False), first[1].load_label(mmap=False)
    damaged = first[1].image_path.parent / name
    damage(damaged)
    calls = _count_preprocessing(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="segnet"):
        _, second = _prepare(tiny_data_config)
    assert calls == [first[1].case_id]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(damaged) in warnings[0], warnings
    np.testing.assert_array_equal(second[1].load_image(), expected[0])
    np.testing.assert_array_equal(second[1].load_label(), expected[1])
    assert second[1].load_foreground().keys() == first[1].load_foreground().keys()
    assert read_info(second[1]).shape == second[1].shape
    assert not list(damaged.parent.parent.glob(".tmp-*")), "the damaged copy was left behind"


def test_a_damaged_entry_that_cannot_be_removed_is_a_user_error(
    tiny_data_config, monkeypatch
) -> None:
    _, first = _prepare(tiny_data_config)
    damaged = first[1].image_path
    _cut(damaged)
    real_rename = Path.rename

    def refuse(self: Path, target):
        if self == damaged.parent:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(UserError) as info:
        _prepare(tiny_data_config)
    message = str(info.value)
    assert str(damaged) in message and f"delete {damaged.parent}" in message


def test_fingerprint_change_invalidates_only_when_it_matters(tiny_data_config) -> None:
    cases = describe_dataset(tiny_data_config.data)
    fingerprint = load_or_compute_fingerprint(tiny_data_config, cases)
    moved = dataclasses.replace(fingerprint, spacing=(2.0, 2.0, 2.0), num_cases=1)
    resampling = _with(tiny_data_config, "preprocessing", resample=True)
    assert cache.settings_hash(tiny_data_config, moved) == cache.settings_hash(
        tiny_data_config, fingerprint
    )
    assert cache.settings_hash(resampling, moved) != cache.settings_hash(resampling, fingerprint)


def test_per_channel_normalization_is_part_of_the_cache_key(tiny_data_config) -> None:
    fingerprint = load_or_compute_fingerprint(
        tiny_data_config, describe_dataset(tiny_data_config.data)
    )
    per_channel = _with(tiny_data_config, "preprocessing", channel_normalization=("range",))
    assert cache.settings_hash(per_channel, fingerprint) != cache.settings_hash(
        tiny_data_config, fingerprint
    )


def test_fingerprint_is_cached(tiny_data_config, monkeypatch) -> None:
    cases = describe_dataset(tiny_data_config.data)
    ct = _with(tiny_data_config, "preprocessing", normalization="ct")
    first = load_or_compute_fingerprint(ct, cases)
    assert len(first.intensity) == 1
    monkeypatch.setattr(cache, "compute_fingerprint", lambda *a: pytest.fail("recomputed"))
    assert load_or_compute_fingerprint(ct, cases) == first


def test_use_cache_false_writes_elsewhere(tiny_data_config) -> None:
    config = _with(tiny_data_config, "preprocessing", use_cache=False)
    _, prepared = _prepare(config)
    assert not Path(config.data.cache_dir).exists()
    assert prepared[0].load_image().shape[:3] == prepared[0].shape


def test_unwritable_cache_dir_is_a_user_error(tiny_data_config, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file")
    config = _with(tiny_data_config, "data", cache_dir=str(tmp_path / "blocker" / "cache"))
    with pytest.raises(UserError, match=r"data\.cache_dir"):
        _prepare(config)


def _fill(config: ExperimentConfig, start: multiprocessing.synchronize.Event) -> None:
    start.wait(30)
    _prepare(config)


@pytest.mark.slow
def test_concurrent_fills_give_one_identical_valid_cache(tiny_data_config) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold TF
    start = context.Event()
    workers = [context.Process(target=_fill, args=(tiny_data_config, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    root = Path(tiny_data_config.data.cache_dir)
    assert not list(root.rglob(".tmp-*")), "temporary folders left behind"
    cases = describe_dataset(tiny_data_config.data)
    fresh = _with(tiny_data_config, "data", cache_dir=str(root.parent / "fresh"))
    _, expected = _prepare(fresh)
    _, filled = _prepare(tiny_data_config)
    assert len(list(root.glob("*/case_*"))) == len(cases)
    for got, want in zip(filled, expected):
        np.testing.assert_array_equal(got.load_image(), want.load_image())
        np.testing.assert_array_equal(got.load_label(), want.load_label())
