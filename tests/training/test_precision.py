"""Tests for segnet.training.precision: ``runtime.precision: auto`` and its hardware rules."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import logging
from pathlib import Path

import pytest
from training_helpers import tiny_config

from segnet.run_dir import stored_config
from segnet.training import trainer
from segnet.training.precision import PrecisionChoice, choose_precision, read_cpu_flags

AVX2 = frozenset({"fma", "avx", "avx2"})  # an AMD EPYC (Zen 3): no bfloat16 units
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
COOPER_LAKE = AVX2 | {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize(
    ("gpus", "flags", "onednn", "expected"),
    [
        ([], AVX2, True, "float32"),
        ([], SAPPHIRE_RAPIDS, True, "mixed_bfloat16"),
        ([], COOPER_LAKE, True, "mixed_bfloat16"),
        ([], SAPPHIRE_RAPIDS, False, "float32"),  # without oneDNN, Eigen emulates bfloat16
        ([(8, 6)], AVX2, True, "mixed_bfloat16"),
        ([(9, 0), (8, 0)], AVX2, True, "mixed_bfloat16"),
        ([(7, 5)], SAPPHIRE_RAPIDS, True, "mixed_float16"),  # the GPU decides, not the CPU
        ([(8, 0), (7, 0)], AVX2, True, "mixed_float16"),  # the oldest GPU decides
        ([(6, 1)], SAPPHIRE_RAPIDS, True, "float32"),
    ],
)
def test_auto_picks_mixed_precision_only_where_the_hardware_runs_it_natively(
    gpus: list[tuple[int, int]], flags: frozenset[str], onednn: bool, expected: str
) -> None:
    choice = choose_precision("auto", gpus=gpus, cpu_flags=flags, onednn=onednn)
    assert choice.name == expected
    assert choice.reason.startswith("auto: ") and choice.warning is None


@pytest.mark.parametrize("requested", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_an_explicit_precision_is_kept(requested: str) -> None:
    choice = choose_precision(requested, gpus=[(8, 0)], cpu_flags=AVX2, onednn=True)
    assert (choice.name, choice.warning) == (requested, None)


def test_explicit_bfloat16_on_a_cpu_without_bfloat16_units_warns_with_the_fix() -> None:
    choice = choose_precision("mixed_bfloat16", gpus=[], cpu_flags=AVX2, onednn=True)
    assert choice.name == "mixed_bfloat16"
    assert choice.warning is not None
    assert "emulates bfloat16" in choice.warning
    assert "runtime.precision: auto or float32" in choice.warning
    native = choose_precision("mixed_bfloat16", gpus=[], cpu_flags=SAPPHIRE_RAPIDS, onednn=True)
    assert native.warning is None


def test_cpu_flags_are_read_from_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16\n"
        "bugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n"
    )
    assert read_cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_an_auto_run_trains_in_the_chosen_precision_and_stores_auto(
    tiny_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Pretend this machine has bfloat16 units, whatever it really has: the tiny model is cheap
    # even emulated, and the choice must reach the model while the run directory keeps "auto".
    def native_bf16(requested: str) -> PrecisionChoice:
        assert requested == "auto"
        return PrecisionChoice("mixed_bfloat16", "auto: test CPU runs it natively")

    monkeypatch.setattr(trainer, "choose_precision", native_bf16)
    config = tiny_config(tiny_root, tmp_path, "runtime.precision=auto", "train.epochs=1")
    with caplog.at_level(logging.INFO, logger="segnet"):
        result = trainer.train(config, run_dir=tmp_path / "run", quiet=True)
    compute_dtypes = {layer.compute_dtype for layer in result.model.layers}
    assert "bfloat16" in compute_dtypes
    assert all(w.dtype == "float32" for w in result.model.weights)  # mixed: weights stay f32
    assert "precision mixed_bfloat16 (auto: test CPU" in caplog.text
    stored = stored_config(tmp_path / "run")
    assert stored is not None and stored.runtime.precision == "auto"

    # Resuming with the same config is not "a different experiment".
    again = trainer.train(config, run_dir=tmp_path / "run", quiet=True)
    assert again.step == result.step


def test_auto_on_this_machine_matches_its_hardware(tiny_root: Path, tmp_path: Path) -> None:
    expected = choose_precision("auto").name
    config = tiny_config(tiny_root, tmp_path, "runtime.precision=auto", "train.epochs=1")
    result = trainer.train(config, run_dir=tmp_path / "run", quiet=True)
    compute_dtypes = {layer.compute_dtype for layer in result.model.layers}
    if expected == "float32":
        assert compute_dtypes == {"float32"}
    else:
        assert expected.removeprefix("mixed_") in compute_dtypes
