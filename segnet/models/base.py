"""``SegmentationModel``: the one base class a segnet architecture implements.

The trainer, the loss, inference and the exporter rely on what it declares and on nothing else
of a particular architecture. A subclass builds a functional graph in ``__init__`` in the
keras-hub layout (``# === Layers ===``, ``# === Functional Model ===``, ``# === Config ===``)
and hands it to ``SegmentationModel.__init__`` with the three facts every model states:

* ``num_channels``: input channels, the last axis of ``(batch, *spatial, channels)``.
* ``num_classes``: classes of the float32 logits, background included.
* ``spatial_dims``: 2 or 3 spatial axes.

It must define, or the ``class`` statement itself raises ``TypeError``:

* ``output_scales``: output ``i``'s downsampling factor (1 = the input's resolution), in output
  order, an int or one per spatial axis; output 0 is always full-resolution logits, which
  inference uses.
* ``supervised_outputs``: indices of the outputs the loss uses, finest first.
* ``get_config()``: ``super().get_config()`` updated with every constructor argument by name,
  so ``from_config`` (and a ``.keras`` file) rebuilds the same model.

The rules on a model's settings are written once, in its ``segnet.config`` dataclass (field
types, ``Literal`` choices, ``validate()``); a constructor applies them with
``check_arguments`` so a direct call and a config file meet the same rules.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import keras

from segnet.strict_dataclass import from_dict

CONTRACT = ("output_scales", "supervised_outputs", "get_config")
T = TypeVar("T")
Scale = int | tuple[int, ...]  # an output's downsampling: one factor, or one per spatial axis


class SegmentationModel(keras.Model):
    """Base of every architecture; see the module docstring for what a subclass provides.

    Args:
        inputs: the ``keras.Input`` of the functional graph.
        outputs: its float32 logits, one tensor or a list ordered as ``output_scales``.
        num_channels: input channels.
        num_classes: output classes, background included.
        spatial_dims: 2 or 3.
        **kwargs: ``keras.Model`` arguments (``name``, ``trainable``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Checked when the class is defined: a model missing output_scales would otherwise
        # train on its first output alone without a word.
        missing = [name for name in CONTRACT if _inherited_from_base(cls, name)]
        if missing:
            raise TypeError(
                f"{cls.__name__} must define {', '.join(missing)} to be a SegmentationModel "
                "(see segnet/models/base.py)"
            )

    def __init__(
        self,
        *,
        inputs: Any,
        outputs: Any,
        num_channels: int,
        num_classes: int,
        spatial_dims: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims

    @property
    def output_scales(self) -> tuple[Scale, ...]:
        """Downsampling factor of each output, in output order; per axis where they differ."""
        raise NotImplementedError

    @property
    def supervised_outputs(self) -> tuple[int, ...]:
        """Indices of the outputs the loss uses, finest first."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The ``keras.Model`` arguments; a subclass adds each of its constructor arguments."""
        return {"name": self.name, "trainable": self.trainable}


def _inherited_from_base(cls: type, name: str) -> bool:
    """Whether ``cls`` gets ``name`` from ``SegmentationModel`` rather than defining it."""
    for klass in cls.__mro__:
        if klass is SegmentationModel:
            return True
        if name in vars(klass):
            return False
    return True


def check_arguments(config_class: type[T], model: str, **arguments: Any) -> T:
    """Checks a constructor's arguments by the rules of the model's config dataclass.

    The arguments are parsed like the ``model.<name>`` section of a config file, so types,
    choices and cross-field rules come from one place. Fields the constructor does not take
    keep their defaults and their rules are not the model's (the cascade's ``stage1_from`` is
    the trainer's), so only problems with a passed argument are reported.

    Args:
        config_class: the model's dataclass in ``segnet.config``, e.g. ``UNet3DConfig``.
        model: the class name, for the message.
        **arguments: the constructor arguments that are fields of ``config_class``.

    Returns:
        The arguments parsed into ``config_class`` (lists as tuples), whose properties derive
        what the model needs (``divisor``, per-level pools), so those rules stay written once.

    Raises:
        ValueError: every problem, each naming its argument (``low.depth: must be in 1..7``).
    """
    parsed, problems = from_dict(config_class, arguments)
    own = [p for p in problems if re.split(r"[.:\[]", p, maxsplit=1)[0] in arguments]
    if own:
        raise ValueError(f"{model}: {'; '.join(own)}")
    if parsed is None:  # only rules on fields the constructor does not take failed
        parsed, _ = from_dict(config_class, arguments, rules=False)
    assert parsed is not None  # every argument converted, or its problem would be its own
    return parsed
