"""The model registry, and the contract every registered model keeps, table-driven over it.

Every row builds a tiny model through ``build_model`` from a validated config, as the trainer
does: output shapes and the ``get_config``/``from_config`` round trip on 16^3 and on the odd
17x18x19, one training step through the ``output_scales`` / ``supervised_outputs`` contract,
and mixed precision. The contract itself (``SegmentationModel``) is checked when a class is
defined, and each argument rule holds for a config file and a constructor call alike.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import dataclasses
import inspect
import json
import math
import re
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.config import ExperimentConfig, ModelConfig, build_config, per_axis
from segnet.errors import ConfigError, UserError
from segnet.models import build_model, registered_names
from segnet.models.base import CONTRACT, SegmentationModel
from segnet.models.blocks import downsample_labels
from segnet.models.registry import MODELS
from segnet.models.segnet import SegNet
from segnet.models.unet3d import UNet3D
from segnet.models.unet3d_cascade import UNet3DCascade
from segnet.precision import precision_policy

CHANNELS, CLASSES = 2, 3
TINY = {"depth": 2, "filters": 4}
TINY_CASCADE = {"downsample": 2, "low": TINY, "high": TINY}

# (row id, model.name, that model's sub-config): every registered name has at least one row.
ROWS = [
    ("unet3d", "unet3d", TINY),
    ("unet3d_low_res", "unet3d", {**TINY, "input_downsample": 2, "loss_at": "low"}),
    ("unet3d_deep_supervision", "unet3d", {**TINY, "deep_supervision": True, "norm": "batch"}),
    ("unet3d_learned_up", "unet3d", {**TINY, "input_downsample": 2, "output_upsample": "learned"}),
    ("unet3d_cascade", "unet3d_cascade", TINY_CASCADE),
    ("unet3d_cascade_low", "unet3d_cascade", {**TINY_CASCADE, "train_stage": "low"}),
    # stage1_from is read by the trainer (it copies the weights in), not by the builder.
    (
        "unet3d_cascade_high",
        "unet3d_cascade",
        {**TINY_CASCADE, "train_stage": "high", "stage1_from": "runs/low"},
    ),
    (
        # nnU-Net's plan for a coarse depth axis: keep it, convolve within slices, pool later.
        "unet3d_per_axis",
        "unet3d",
        {
            **TINY,
            "pool_sizes": [[1, 2, 2], [2, 2, 2]],
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "deep_supervision": True,
        },
    ),
    (
        "unet3d_per_axis_low_res",
        "unet3d",
        {**TINY, "input_downsample": [1, 2, 2], "loss_at": "low", "upsampling": "resize"},
    ),
    ("segnet3d", "segnet", TINY),
    ("segnet3d_per_axis", "segnet", {**TINY, "pool_sizes": [[1, 2, 2], [2, 2, 2]]}),
    ("segnet2d", "segnet", {**TINY, "spatial_dims": 2, "norm": "group", "groups": 2}),
]
ROW = pytest.mark.parametrize(("name", "settings"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
SIZE = pytest.mark.parametrize("size", [(16, 16, 16), (17, 18, 19)], ids=["16cube", "odd"])
CLASSES_OF = {"unet3d": UNet3D, "unet3d_cascade": UNet3DCascade, "segnet": SegNet}  # by model.name


def tiny_config(name: str, settings: dict[str, Any]) -> ExperimentConfig:
    data = {"num_channels": CHANNELS, "num_classes": CLASSES, "patch_size": [16, 16, 16]}
    return build_config({"data": data, "model": {"name": name, name: settings}})


def spatial_dims(model: keras.Model) -> int:
    return len(model.input_shape) - 2


def random_batch(model: keras.Model, size: tuple[int, ...], seed: int = 0) -> np.ndarray:
    shape = (2, *size[-spatial_dims(model) :], CHANNELS)
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def supervised_loss(model: keras.Model, outputs: Any, labels: Any) -> Any:
    """Cross-entropy over the supervised outputs, halving per level: what the loss must do."""
    outputs = keras.tree.flatten(outputs)
    total = 0.0
    for rank, index in enumerate(model.supervised_outputs):
        target = downsample_labels(labels, CLASSES, model.output_scales[index], spatial_dims(model))
        ce = keras.losses.categorical_crossentropy(target, outputs[index], from_logits=True)
        total += 0.5**rank * keras.ops.mean(ce)
    return total


def test_registry_names_are_the_model_sub_configs() -> None:
    sub_configs = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    assert set(registered_names()) == sub_configs
    assert {r[1] for r in ROWS} == set(MODELS), "every registered model needs a test row"
    assert set(CLASSES_OF) == set(MODELS)


@pytest.mark.parametrize("name", sorted(CLASSES_OF))
def test_sub_config_fields_are_the_constructor_arguments(name: str) -> None:
    arguments = set(inspect.signature(CLASSES_OF[name].__init__).parameters)
    fields = {f.name for f in dataclasses.fields(getattr(ModelConfig(), name))}
    trainer_fields = {"stage1_from"} if name == "unet3d_cascade" else set()  # copies stage 1 in
    assert fields - trainer_fields == arguments - {"self", "num_channels", "num_classes", "kwargs"}


# (model.name, its sub-config, the key of the rule it breaks): each rule is written once, in the
# config dataclass, and a config file and a direct constructor call both meet it.
BROKEN = [
    ("unet3d", {"depth": 8}, "depth"),
    ("unet3d", {"filters": 0}, "filters"),
    ("unet3d", {"growth": 0.5}, "growth"),
    ("unet3d", {"dropout": 1.0}, "dropout"),
    ("unet3d", {"convs_per_level": 0}, "convs_per_level"),
    ("unet3d", {"filters": 8, "max_filters": 4}, "max_filters"),
    ("unet3d", {"input_downsample": 3}, "input_downsample"),
    ("unet3d", {"loss_at": "low"}, "loss_at"),
    ("unet3d", {"upsampling": "nearest"}, "upsampling"),
    ("unet3d", {"input_downsample": [1, 3, 2]}, "input_downsample[1]"),
    ("unet3d", {"depth": 2, "pool_sizes": [[1, 2, 2]]}, "pool_sizes"),
    ("unet3d", {"depth": 1, "pool_sizes": [[1, 3, 2]]}, "pool_sizes[0]"),
    ("unet3d", {"depth": 1, "pool_sizes": [[1, 1, 1]]}, "pool_sizes"),
    ("unet3d", {"depth": 1, "kernel_sizes": [[3, 3, 3]]}, "kernel_sizes"),
    ("unet3d", {"depth": 1, "kernel_sizes": [[3, 3, 3], [2, 3, 3]]}, "kernel_sizes[1]"),
    ("segnet", {"depth": 1, "spatial_dims": 2, "pool_sizes": [[1, 2, 2]]}, "pool_sizes[0]"),
    ("segnet", {"spatial_dims": 1}, "spatial_dims"),
    ("segnet", {"norm": "layer"}, "norm"),
    ("segnet", {"activation": "relu6"}, "activation"),
    ("unet3d_cascade", {"downsample": 3}, "downsample"),
    ("unet3d_cascade", {"train_stage": "both"}, "train_stage"),
    ("unet3d_cascade", {"low": {"depth": 0}}, "low.depth"),
    ("unet3d_cascade", {"high": {"deep_supervision": True}}, "high.deep_supervision"),
]


@pytest.mark.parametrize(
    ("name", "settings", "key"), BROKEN, ids=[f"{r[0]}-{r[2]}" for r in BROKEN]
)
def test_each_argument_rule_holds_for_configs_and_constructors(
    name: str, settings: dict, key: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"model.{name}.{key}:")):
        tiny_config(name, settings)
    model_class = CLASSES_OF[name]
    with pytest.raises(ValueError, match=rf"^{model_class.__name__}: (.*; )?{re.escape(key)}:"):
        model_class(CHANNELS, CLASSES, **settings)


@pytest.mark.parametrize("missing", CONTRACT)
def test_a_model_class_missing_the_contract_fails_when_defined(missing: str) -> None:
    members = {
        "output_scales": property(lambda self: (1,)),
        "supervised_outputs": property(lambda self: (0,)),
        "get_config": lambda self: SegmentationModel.get_config(self),
    }
    type("Complete", (SegmentationModel,), dict(members))  # the control: no error
    del members[missing]
    with pytest.raises(TypeError, match=rf"Forgetful must define {missing}"):
        type("Forgetful", (SegmentationModel,), members)


def test_a_builder_returning_a_plain_keras_model_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def plain(config: ExperimentConfig) -> keras.Model:
        image = keras.Input((None, None, None, CHANNELS))
        return keras.Model(image, keras.layers.Conv3D(CLASSES, 1)(image))

    monkeypatch.setitem(MODELS, "segnet", plain)
    with pytest.raises(TypeError, match=r"'segnet'.*SegmentationModel"):
        build_model(tiny_config("segnet", TINY))


def test_unknown_name_lists_the_registered_models() -> None:
    config = ExperimentConfig()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, name="unet"))
    with pytest.raises(UserError) as info:
        build_model(config)
    message = str(info.value)
    assert "model.name" in message and "did you mean 'unet3d'" in message
    assert all(name in message for name in registered_names())


@ROW
@SIZE
def test_outputs_match_the_input_size(name: str, settings: dict, size: tuple[int, ...]) -> None:
    model = build_model(tiny_config(name, settings))
    x = random_batch(model, size)
    outputs = keras.tree.flatten(model(x))
    assert len(outputs) == len(model.output_scales)
    for output, scale in zip(outputs, model.output_scales):
        scales = per_axis(scale, len(x.shape) - 2)
        expected = (2, *(math.ceil(n / s) for n, s in zip(x.shape[1:-1], scales)), CLASSES)
        assert tuple(output.shape) == expected
        assert output.dtype == "float32"
    assert model.input_shape[-1] == CHANNELS
    assert all(n is None for n in model.input_shape[:-1])


@ROW
@SIZE
def test_config_round_trip_rebuilds_the_same_model(
    name: str, settings: dict, size: tuple[int, ...]
) -> None:
    model = build_model(tiny_config(name, settings))
    config = json.loads(json.dumps(model.get_config()))  # what a .keras file stores
    arguments = set(inspect.signature(type(model).__init__).parameters) - {"self", "kwargs"}
    assert set(config) == arguments | {"name", "trainable"}, "get_config misses an argument"
    assert config == model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    assert (clone.output_scales, clone.supervised_outputs) == (
        model.output_scales,
        model.supervised_outputs,
    )
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    clone.set_weights(model.get_weights())
    x = random_batch(model, size)
    for expected, actual in zip(keras.tree.flatten(model(x)), keras.tree.flatten(clone(x))):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


@ROW
def test_training_steps_reduce_a_finite_loss(name: str, settings: dict) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(tiny_config(name, settings))
    x = random_batch(model, (16, 16, 16))
    labels = (x[..., 0] > 0).astype("int32") + (x[..., 1] > 1).astype("int32")
    optimizer = keras.optimizers.Adam(1e-2)
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = supervised_loss(model, model(x, training=True), labels)
        gradients = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in gradients), "a trainable weight gets no gradient"
        optimizer.apply(gradients, model.trainable_variables)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_plain_keras_fit_trains_a_model_with_argmax_kernels() -> None:
    keras.utils.set_random_seed(0)
    model = build_model(tiny_config("segnet", TINY))
    x = random_batch(model, (16, 16, 16))
    labels = (x[..., 0] > 0).astype("int32")
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    history = model.fit(x, labels, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]


@pytest.fixture
def mixed_bfloat16():
    with precision_policy("mixed_bfloat16"):
        yield


@ROW
@pytest.mark.usefixtures("mixed_bfloat16")
def test_mixed_bfloat16_computes_in_bfloat16_with_float32_logits(name: str, settings: dict) -> None:
    model = build_model(tiny_config(name, settings))
    compute_dtypes = {layer.compute_dtype for layer in model.layers}
    assert "bfloat16" in compute_dtypes
    for output in keras.tree.flatten(model(random_batch(model, (16, 16, 16)))):
        assert output.dtype == "float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(output)))
