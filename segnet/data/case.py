"""The hand-off between preprocessing and the tf.data pipeline: one preprocessed case."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# numpy parses every .npy header with ast.literal_eval. On CPython 3.11.7 (and other releases
# before the fix of gh-106905), parsing in two threads at once can raise "SystemError: AST
# constructor recursion depth mismatch"; the cache and the tf.data readers load in threads, so
# every load goes through this lock. Header parsing is microseconds; memory-mapped loads read
# nothing else, and the few full loads are small.
_NUMPY_LOAD = threading.Lock()


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    """``np.load`` of one ``.npy`` file (memory-mapped by default), safe to call from threads."""
    with _NUMPY_LOAD:
        return np.load(path, mmap_mode="r" if mmap else None)


@contextlib.contextmanager
def open_npz(path: Path) -> Iterator[Any]:
    """``np.load`` of an ``.npz`` file, its members read inside the block; safe from threads."""
    with _NUMPY_LOAD, np.load(path) as data:
        yield data


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
        return load_array(self.image_path, mmap)

    def load_label(self, mmap: bool = True) -> np.ndarray | None:
        if self.label_path is None:
            return None
        return load_array(self.label_path, mmap)

    def load_foreground(self) -> dict[int, np.ndarray]:
        if self.foreground_path is None:
            return {}
        with open_npz(self.foreground_path) as data:
            return {int(k.split("_")[1]): data[k] for k in data.files}
