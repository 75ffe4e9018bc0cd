"""Model architectures, their building blocks and the registry that maps names to builders.

Importing this package registers every segnet layer and model with Keras, so
``keras.saving.load_model("model.keras")`` works after ``import segnet.models`` without
``custom_objects``.
"""

from __future__ import annotations

from segnet.models.registry import build_model, registered_names

__all__ = ["build_model", "registered_names"]
