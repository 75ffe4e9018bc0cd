"""Tests for segnet.precision: ``runtime.precision: auto`` and its hardware rules."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import logging
from pathlib import Path

import pytest
from helpers import tiny_config

from segnet.errors import RunDirError
from segnet.precision import (
    PrecisionChoice,
    choose_inference_precision,
    choose_precision,
    precision_for_resume,
    read_cpu_flags,
)
from segnet.run_dir import stored_config
from segnet.training import trainer

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
    assert "precision: mixed_bfloat16, auto: test CPU" in caplog.text
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


CKPT = Path("runs/x/checkpoints")
F32 = PrecisionChoice("float32", "auto: CPU without AMX or AVX512-BF16 has no fast mixed precision")
BF16 = PrecisionChoice("mixed_bfloat16", "auto: GPU compute capability 8.0 runs it natively")
F16 = PrecisionChoice("mixed_float16", "auto: GPU compute capability 7.0 runs it natively")


@pytest.mark.parametrize(
    ("choice", "loss_scaled", "gpus", "expected"),
    [
        (BF16, None, [(8, 0)], "mixed_bfloat16"),  # a new run takes the machine's choice
        (F16, None, [(7, 0)], "mixed_float16"),
        (F32, False, [], "float32"),
        (BF16, False, [(8, 0)], "mixed_bfloat16"),  # bf16 and f32 share the optimizer layout
        (F16, True, [(7, 0)], "mixed_float16"),
        (F16, False, [(7, 0)], "float32"),  # a bf16/f32 run moved onto a Volta GPU
        (BF16, True, [(8, 0)], "mixed_float16"),  # a Volta run moved onto an Ampere GPU
        (F32, True, [(6, 1)], "mixed_float16"),  # Pascal still has float16 kernels
    ],
)
def test_auto_resumes_on_the_checkpoints_side_of_the_float16_line(
    choice: PrecisionChoice,
    loss_scaled: bool | None,
    gpus: list[tuple[int, int]],
    expected: str,
) -> None:
    resumed = precision_for_resume(choice, "auto", loss_scaled, CKPT, gpus=gpus)
    assert resumed.name == expected
    if expected == choice.name:
        assert resumed == choice  # unchanged, reason included
    else:
        assert f"instead of {choice.name}" in resumed.reason


def test_a_float16_checkpoint_on_a_cpu_says_to_resume_on_a_gpu() -> None:
    # End to end through segnet-train: the reliability corpus entry float16-checkpoint-on-a-cpu.
    with pytest.raises(RunDirError) as error:
        precision_for_resume(F32, "auto", True, CKPT, gpus=[])
    message = str(error.value)
    assert str(CKPT) in message and "mixed_float16" in message
    assert "resume this run on a GPU" in message and "new --run-dir" in message


@pytest.mark.parametrize(
    ("requested", "loss_scaled"),
    [("float32", True), ("mixed_bfloat16", True), ("mixed_float16", False)],
)
def test_an_explicit_precision_across_the_float16_line_is_refused_with_the_fix(
    requested: str, loss_scaled: bool
) -> None:
    choice = PrecisionChoice(requested, "as configured")  # type: ignore[arg-type]
    with pytest.raises(RunDirError, match=r"set runtime\.precision back to auto"):
        precision_for_resume(choice, requested, loss_scaled, CKPT, gpus=[(8, 0)])  # type: ignore[arg-type]


def test_a_run_moved_onto_a_float16_machine_resumes_in_float32(
    tiny_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tiny_config(tiny_root, tmp_path, "runtime.precision=auto", "train.epochs=1")
    first = trainer.train(config, run_dir=tmp_path / "run", quiet=True)

    # The same run directory, now on a machine whose auto choice is float16 (a Volta GPU,
    # pretended: this CPU could not run float16). Its checkpoint has no loss scale.
    def volta(requested: str) -> PrecisionChoice:
        return PrecisionChoice("mixed_float16", "auto: GPU compute capability 7.0 runs it natively")

    monkeypatch.setattr(trainer, "choose_precision", volta)
    longer = tiny_config(tiny_root, tmp_path, "runtime.precision=auto", "train.epochs=2")
    with caplog.at_level(logging.INFO, logger="segnet"):
        resumed = trainer.train(longer, run_dir=tmp_path / "run", force=True, quiet=True)
    assert "float32 instead of mixed_float16" in caplog.text
    assert resumed.step == 2 * first.step  # restored, then one more epoch
    assert {layer.compute_dtype for layer in resumed.model.layers} == {"float32"}


@pytest.mark.parametrize(
    ("gpus", "flags", "onednn", "expected"),
    [
        ([], AVX2, True, "float32"),
        ([], SAPPHIRE_RAPIDS, True, "mixed_bfloat16"),
        ([], COOPER_LAKE, True, "mixed_bfloat16"),
        ([], SAPPHIRE_RAPIDS, False, "float32"),
        ([(8, 0)], AVX2, True, "mixed_bfloat16"),
        ([(7, 5)], SAPPHIRE_RAPIDS, True, "float32"),  # float16 inference is not measured
    ],
)
def test_auto_inference_runs_bfloat16_only_where_the_hardware_runs_it_natively(
    gpus: list[tuple[int, int]], flags: frozenset[str], onednn: bool, expected: str
) -> None:
    choice = choose_inference_precision("auto", gpus=gpus, cpu_flags=flags, onednn=onednn)
    assert choice.name == expected
    assert choice.reason.startswith("auto: ") and choice.warning is None


def test_explicit_inference_precisions_are_kept_and_emulation_warned() -> None:
    kept = choose_inference_precision("float32", gpus=[], cpu_flags=SAPPHIRE_RAPIDS, onednn=True)
    assert (kept.name, kept.warning) == ("float32", None)
    native = choose_inference_precision("bfloat16", gpus=[], cpu_flags=COOPER_LAKE, onednn=True)
    assert (native.name, native.warning) == ("mixed_bfloat16", None)
    emulated = choose_inference_precision("bfloat16", gpus=[], cpu_flags=AVX2, onednn=True)
    assert emulated.name == "mixed_bfloat16"
    assert emulated.warning is not None and "evaluation.precision: auto" in emulated.warning
