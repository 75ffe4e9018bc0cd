"""Which compute precision to train and predict in: ``runtime.precision``,
``evaluation.precision`` and their hardware rules.

Mixed precision is only worth it where the hardware runs the low-precision convolutions
natively; elsewhere TensorFlow emulates them and a step gets many times *slower* (the README's
"Performance on CPUs" has the figures of ``benchmarks/bench_precision.py``). So a config that
says ``mixed_bfloat16`` is fast on one machine and unusable on the next, and ``auto`` picks per
machine:

* GPUs, all of compute capability 8.0 or newer (Ampere+): ``mixed_bfloat16`` (tensor cores,
  no loss scaling needed);
* GPUs of compute capability 7.x (Volta, Turing): ``mixed_float16`` with a dynamic loss scale;
* CPUs with AMX or AVX512-BF16, and oneDNN on: ``mixed_bfloat16``;
* anything else: ``float32``.

An explicit choice is kept as written; one that the hardware emulates is kept with a warning.

Inference (``evaluation.precision``, :func:`choose_inference_precision`) runs the model's
convolutions in bfloat16 under ``auto`` wherever training's ``auto`` would pick bfloat16, and in
float32 elsewhere; the logits, the softmax, the blending of windows and the metrics are float32
either way (the models' heads compute in float32).

A resumed run must also fit its checkpoint: ``mixed_float16`` saves a loss-scaled optimizer
whose state cannot restore into a float32 or bfloat16 one, nor the other way round. So
:func:`precision_for_resume` keeps ``auto`` on the checkpoint's side of that line when a run
moves to other hardware, and explains what to do where no precision on that side can run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from segnet._tf_env import ONEDNN_VAR, onednn_enabled
from segnet.errors import RunDirError

Precision = Literal["float32", "mixed_bfloat16", "mixed_float16"]
InferencePrecision = Literal["auto", "float32", "bfloat16"]

# oneDNN runs bfloat16 convolutions natively only with one of these (see /proc/cpuinfo).
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision training runs in, and why.

    Attributes:
        name: a Keras dtype policy name: float32, mixed_bfloat16 or mixed_float16.
        reason: half a sentence for the log, naming the hardware that decided.
        warning: set when an explicit choice will run emulated (slow) on this hardware.
    """

    name: Precision
    reason: str
    warning: str | None = None


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags the kernel reports; empty where there is no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Sets the Keras global dtype policy for the models built inside, then restores it."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of every visible GPU; (0, 0) where TensorFlow does not say."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0)))[:2])
    return capabilities  # type: ignore[return-value]


def choose_precision(
    requested: Precision | Literal["auto"],
    gpus: Sequence[tuple[int, int]] | None = None,
    cpu_flags: frozenset[str] | None = None,
    onednn: bool | None = None,
) -> PrecisionChoice:
    """Resolves ``runtime.precision`` for this machine (the hardware arguments default to it).

    Args:
        requested: ``runtime.precision`` as configured, ``auto`` included.
        gpus: compute capabilities of the GPUs training will use; empty trains on the CPU.
        cpu_flags: the CPU's feature flags.
        onednn: whether TensorFlow's oneDNN kernels are on.
    """
    hardware, native = _native_precisions(gpus, cpu_flags, onednn)
    if requested == "auto":
        preferred: tuple[Precision, ...] = ("mixed_bfloat16", "mixed_float16")
        for name in preferred:
            if native[name]:
                return PrecisionChoice(name, f"auto: {hardware} runs it natively")
        return PrecisionChoice("float32", f"auto: {hardware} has no fast mixed precision")
    chosen: Precision = requested
    if chosen == "float32" or native[chosen]:
        return PrecisionChoice(chosen, f"as configured, on {hardware}")
    if chosen == "mixed_bfloat16":
        # float16 on a CPU fails outright for want of kernels (the trainer explains that);
        # bfloat16 runs, emulated, at a small fraction of float32's speed.
        warning = (
            f"runtime.precision: mixed_bfloat16 on a {hardware}: TensorFlow emulates bfloat16 "
            "here, many times slower than float32; set "
            "runtime.precision: auto or float32"
        )
        return PrecisionChoice(chosen, f"as configured, on {hardware}, emulated", warning)
    return PrecisionChoice(chosen, f"as configured, on {hardware}")


def choose_inference_precision(
    requested: InferencePrecision,
    gpus: Sequence[tuple[int, int]] | None = None,
    cpu_flags: frozenset[str] | None = None,
    onednn: bool | None = None,
) -> PrecisionChoice:
    """Resolves ``evaluation.precision``: the Keras policy the models predict under.

    ``auto`` is bfloat16 where the hardware runs it natively and float32 elsewhere (float16
    GPUs included: their inference stays float32 until measured). Arguments as for
    :func:`choose_precision`.
    """
    if requested == "float32":
        return PrecisionChoice("float32", "as configured")
    hardware, native = _native_precisions(gpus, cpu_flags, onednn)
    if requested == "auto":
        if native["mixed_bfloat16"]:
            return PrecisionChoice("mixed_bfloat16", f"auto: {hardware} runs it natively")
        return PrecisionChoice("float32", f"auto: {hardware} has no native bfloat16")
    if native["mixed_bfloat16"]:
        return PrecisionChoice("mixed_bfloat16", f"as configured, on {hardware}")
    warning = (
        f"evaluation.precision: bfloat16 on a {hardware}: TensorFlow emulates bfloat16 here, "
        "many times slower than float32; set evaluation.precision: auto or float32"
    )
    return PrecisionChoice("mixed_bfloat16", f"as configured, on {hardware}, emulated", warning)


def _native_precisions(
    gpus: Sequence[tuple[int, int]] | None,
    cpu_flags: frozenset[str] | None,
    onednn: bool | None,
) -> tuple[str, dict[str, bool]]:
    """The hardware in words, and which mixed precisions it runs natively."""
    gpus = list(gpu_compute_capabilities() if gpus is None else gpus)
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    onednn = onednn_enabled() if onednn is None else onednn
    cpu_units = sorted(f for f in NATIVE_BF16_CPU_FLAGS if f in flags)
    cpu_native_bf16 = bool(cpu_units) and onednn
    if gpus:
        oldest = min(gpus)
        hardware = f"GPU compute capability {oldest[0]}.{oldest[1]}"
        return hardware, {"mixed_bfloat16": oldest >= (8, 0), "mixed_float16": oldest >= (7, 0)}
    if cpu_native_bf16:
        hardware = f"CPU with {' and '.join(cpu_units)}"
    elif cpu_units:
        hardware = f"CPU with {' and '.join(cpu_units)} but {ONEDNN_VAR}=0"
    else:
        hardware = "CPU without AMX or AVX512-BF16"
    return hardware, {"mixed_bfloat16": cpu_native_bf16, "mixed_float16": False}


def precision_for_resume(
    choice: PrecisionChoice,
    requested: Precision | Literal["auto"],
    loss_scaled: bool | None,
    checkpoints: Path,
    gpus: Sequence[tuple[int, int]] | None = None,
) -> PrecisionChoice:
    """``choice`` adjusted so that the run's checkpoints restore into the optimizer it builds.

    ``auto`` resolves afresh on every start, so a run moved between machines can meet a
    checkpoint from the other side of the float16 line. bfloat16 and float32 runs share one
    optimizer layout, so between those two the new machine's choice stands.

    Args:
        choice: :func:`choose_precision`'s answer on this machine.
        requested: ``runtime.precision`` as configured.
        loss_scaled: whether the newest checkpoint holds a float16 loss scale; None when the
            run has no checkpoint yet.
        checkpoints: the checkpoint directory, for messages.
        gpus: compute capabilities of the GPUs training will use (default: this machine's).

    Raises:
        RunDirError: no precision this machine can run fits the checkpoint.
    """
    if loss_scaled is None or loss_scaled == (choice.name == "mixed_float16"):
        return choice
    if requested != "auto":
        # Only --force gets here: the stored config said otherwise when the checkpoint was made.
        trained = "mixed_float16" if loss_scaled else "float32 or mixed_bfloat16"
        raise RunDirError(
            f"{checkpoints} was trained in {trained}, and runtime.precision: {requested} cannot "
            "restore its optimizer state (only mixed_float16 keeps a loss scale); set "
            "runtime.precision back to auto or the precision it was trained in, or train in a "
            "new --run-dir"
        )
    if not loss_scaled:
        # A 7.x GPU meets a float32 or bfloat16 checkpoint: float32 restores it and runs
        # anywhere, where bfloat16 would be emulated on that GPU.
        return PrecisionChoice(
            "float32",
            f"auto: the checkpoints have no float16 loss scale, so float32 instead of "
            f"{choice.name}",
        )
    gpus = list(gpu_compute_capabilities() if gpus is None else gpus)
    if gpus:
        # Any GPU that TensorFlow supports has float16 kernels; Ampere and newer run it natively.
        return PrecisionChoice(
            "mixed_float16",
            f"auto: the checkpoints hold a float16 loss scale, so mixed_float16 instead of "
            f"{choice.name}",
        )
    raise RunDirError(
        f"{checkpoints} was trained in mixed_float16 on a GPU, and a CPU has no float16 kernels "
        "to continue it; resume this run on a GPU, or train in a new --run-dir"
    )
