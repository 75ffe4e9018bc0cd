"""The one place that maps ``model.name`` to the function that builds that architecture.

Every builder takes the whole ``ExperimentConfig`` (input channels come from
``data.num_channels``, classes from ``data.num_classes``, settings from the model's own
sub-config, e.g. ``model.unet3d``) and returns a ``SegmentationModel``
(``segnet.models.base``), whose outputs are float32 logits. The names here are the sub-config
names of ``ModelConfig``; a test keeps the two in sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from segnet.errors import UserError
from segnet.models.base import SegmentationModel
from segnet.models.segnet import build_segnet
from segnet.models.unet3d import build_unet3d
from segnet.models.unet3d_cascade import build_unet3d_cascade
from segnet.strict_dataclass import suggest

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig

Builder = Callable[["ExperimentConfig"], SegmentationModel]

MODELS: dict[str, Builder] = {
    "unet3d": build_unet3d,  # 3D U-Net, optionally at a lower resolution in-graph
    "unet3d_cascade": build_unet3d_cascade,  # low-resolution U-Net guiding a full-resolution one
    "segnet": build_segnet,  # 2D or 3D SegNet with argmax unpooling
}


def registered_names() -> tuple[str, ...]:
    """The accepted values of ``model.name``, sorted."""
    return tuple(sorted(MODELS))


def build_model(config: ExperimentConfig) -> SegmentationModel:
    """Builds ``config.model.name`` for ``config.data``'s channels and classes.

    Raises:
        UserError: the name is not registered; the message lists the registered names.
        TypeError: the builder returned a model that is not a ``SegmentationModel`` (the loss
            and the trainer would not know its outputs).
    """
    name = config.model.name
    builder = MODELS.get(name)
    if builder is None:
        raise UserError(
            f"model.name: unknown model '{name}'{suggest(name, MODELS)}; "
            f"registered models: {', '.join(registered_names())}"
        )
    model = builder(config)
    if not isinstance(model, SegmentationModel):
        raise TypeError(
            f"the builder of model '{name}' returned a {type(model).__name__}, not a "
            "segnet.models.base.SegmentationModel"
        )
    return model
