"""The hand-off between preprocessing and the tf.data pipeline: one preprocessed case."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PreprocessedCase:
    """A case after resampling, cropping and normalisation, stored as ``.npy`` files.

    Attributes:
        case_id: the dataset's identifier (e.g. ``hippocampus_001``).
        image_path: float32 array of shape (depth, height, width, channels), C-contiguous.
        label_path: uint8 array of shape (depth, height, width), or None for unlabelled cases.
        foreground: per foreground class, an int32 array (n, 3) of voxel coordinates sampled
            from that class (at most a few thousand), used to draw foreground patches; stored in
            ``foreground_path`` as an ``.npz`` with keys ``class_1``, ``class_2``, ...
        shape: (depth, height, width) of the stored arrays.
    """

    case_id: str
    image_path: Path
    label_path: Path | None
    foreground_path: Path | None
    shape: tuple[int, int, int]

    def load_image(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.image_path, mmap_mode="r" if mmap else None)

    def load_label(self, mmap: bool = True) -> np.ndarray | None:
        if self.label_path is None:
            return None
        return np.load(self.label_path, mmap_mode="r" if mmap else None)

    def load_foreground(self) -> dict[int, np.ndarray]:
        if self.foreground_path is None:
            return {}
        with np.load(self.foreground_path) as data:
            return {int(k.split("_")[1]): data[k] for k in data.files}
