"""The final export of a trained model, in ``<run_dir>/export``.

* ``model.keras``: the Keras model as trained (every output), reloadable with
  ``keras.saving.load_model`` once ``segnet`` is imported (its layers are registered).
* ``saved_model/``: a TensorFlow SavedModel whose ``serve`` signature maps an image batch
  ``(batch, depth, height, width, channels)`` float32 (``(batch, height, width, channels)`` for
  a 2D SegNet) to the full-resolution float32 logits alone; it loads with plain
  ``tf.saved_model.load`` in a process without segnet (the graph holds only TensorFlow ops).

Both are written to a temporary name and renamed into place, so an interrupted export never
leaves half a model where a previous export was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras

from segnet.files import atomic_output, temporary_sibling


def inference_model(model: keras.Model) -> keras.Model:
    """``model`` itself when it has one output, else a functional view of its output 0."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=f"{model.name}_logits")


def export_model(model: keras.Model, keras_path: Path, saved_path: Path) -> tuple[Path, Path]:
    """Writes the Keras file and the SavedModel folder, each replacing the old one whole.

    Returns:
        The two paths.
    """
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    saved_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(keras_path) as tmp_keras:
        model.save(tmp_keras)

    tmp_saved = temporary_sibling(saved_path)
    try:
        inference_model(model).export(str(tmp_saved), format="tf_saved_model", verbose=False)
        if saved_path.exists():
            shutil.rmtree(saved_path)
        tmp_saved.rename(saved_path)
    finally:
        shutil.rmtree(tmp_saved, ignore_errors=True)
    return keras_path, saved_path
