"""segnet: config-driven 3D medical image segmentation on TensorFlow 2 / Keras 3."""

from __future__ import annotations

# Must run before anything imports TensorFlow: it sets TF_ENABLE_ONEDNN_OPTS.
from segnet import _tf_env  # noqa: F401

__version__ = "0.1.0"
