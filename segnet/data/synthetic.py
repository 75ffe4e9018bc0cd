"""Synthetic 3D phantoms in the MSD / nnU-Net layout, for tests, demos and smoke training.

Each case is a body (an ellipsoid of textured tissue, zero outside as in skull-stripped MRI)
holding one structure per foreground class: an ellipsoid, a torus, a blobby sphere and a wavy
tube, cycling for more classes, each randomly sized, rotated and placed. Class intensities
overlap with the tissue and with each other, and unlabelled distractor spheres share the class
intensities, so that intensity alone cannot segment (a single threshold gets a foreground Dice
well below 0.8) and a model has to learn shape and context. A smooth multiplicative bias field,
slight blur and Rician noise complete the picture.

Layout written under ``root``::

    dataset.json                 MSD description; images listed nnU-Net-v1 style (no suffix)
    folds.json                   {"folds": {"0": [case ids], ...}}
    imagesTr/case_000_0000.nii.gz  float32 image, one file per channel
    labelsTr/case_000.nii.gz       uint8 labels 0..num_classes-1
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from segnet.data.volumes import make_geometry, write_volume
from segnet.errors import UserError

log = logging.getLogger("segnet")
ANISOTROPIC_SPACING = (1.0, 1.0, 2.5)  # mm; axis 2 (the file's k) is the thick-slice axis
_SHAPE_NAMES = ("ellipsoid", "torus", "blob", "tube")
# Class mean intensities alternate above and below the tissue's 100 so no threshold splits them.
_CLASS_MEANS = (150.0, 62.0, 128.0, 78.0, 165.0, 48.0)
_TISSUE_MEAN = 100.0


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`write_synthetic_dataset` generates."""

    num_cases: int = 40
    shape: tuple[int, int, int] = (64, 64, 64)  # voxels; the k axis shrinks when anisotropic
    num_classes: int = 4  # background included
    num_channels: int = 1  # channels differ in which class is bright or dark
    anisotropic: bool = False  # spacing ANISOTROPIC_SPACING instead of 1 mm
    seed: int = 0
    num_folds: int = 5
    noise_std: float = 14.0  # Rician noise, in intensity units (tissue mean is 100)
    bias_strength: float = 0.25  # bias field multiplies intensities by 1 +- this

    def validate(self) -> None:
        """Raises UserError for settings that cannot make a dataset."""
        problems = []
        if self.num_cases < 2:
            problems.append(f"num_cases must be at least 2, got {self.num_cases}")
        if min(self.shape) < 8:
            problems.append(f"shape must be at least 8 voxels per axis, got {list(self.shape)}")
        if not 2 <= self.num_classes <= 255:
            problems.append(f"num_classes must be in 2..255, got {self.num_classes}")
        if self.num_channels < 1:
            problems.append(f"num_channels must be at least 1, got {self.num_channels}")
        if not 2 <= self.num_folds <= self.num_cases:
            problems.append(f"num_folds must be in 2..num_cases, got {self.num_folds}")
        if problems:
            raise UserError("synthetic dataset: " + "; ".join(problems))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return ANISOTROPIC_SPACING if self.anisotropic else (1.0, 1.0, 1.0)

    @property
    def voxel_shape(self) -> tuple[int, int, int]:
        """The array shape: the k axis has fewer, thicker slices when anisotropic."""
        d, h, w = self.shape
        return (d, h, max(8, round(w / self.spacing[2])))


# ---------------------------------------------------------------------------------------------
# Shapes: boolean masks from local coordinates u (3, ...) in mm, scaled by s
# ---------------------------------------------------------------------------------------------
def _ellipsoid(u: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    radii = s * rng.uniform(6.0, 12.0, size=3)
    return ((u / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1.0


def _torus(u: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    major, minor = s * rng.uniform(8.0, 12.0), s * rng.uniform(3.5, 5.5)
    ring = np.sqrt(u[0] ** 2 + u[1] ** 2) - major
    return ring**2 + u[2] ** 2 <= minor**2


def _blob(u: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    radius = s * rng.uniform(7.0, 11.0)
    wobble = _smooth_field(rng, u.shape[1:], cells=4)
    return np.sqrt((u**2).sum(axis=0)) <= radius * (1.0 + 0.35 * wobble)


def _tube(u: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    radius, half_length = s * rng.uniform(2.5, 4.5), s * rng.uniform(10.0, 18.0)
    bend = s * rng.uniform(2.0, 5.0) * np.sin(u[2] / (s * 5.0))  # a wavy centre line
    return ((u[0] - bend) ** 2 + u[1] ** 2 <= radius**2) & (np.abs(u[2]) <= half_length)


_SHAPES: tuple[Callable[[np.ndarray, float, np.random.Generator], np.ndarray], ...] = (
    _ellipsoid,
    _torus,
    _blob,
    _tube,
)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse noise on a cells^3 grid, cubic-upsampled."""
    coarse = rng.standard_normal((cells,) * len(shape))
    field = ndimage.zoom(coarse, [n / cells for n in shape], order=3, mode="nearest")
    field = field[tuple(slice(0, n) for n in shape)]
    return field / max(float(np.abs(field).max()), 1e-6)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _place(
    coords: np.ndarray, extent: np.ndarray, rng: np.random.Generator, spread: float
) -> np.ndarray:
    """Coordinates (3, ...) relative to a random centre near the middle, randomly rotated."""
    centre = extent / 2 + rng.uniform(-spread, spread, size=3) * extent
    return np.einsum("ij,i...->j...", _rotation(rng), coords - centre[:, None, None, None])


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
def make_phantom(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case.

    Returns:
        ``(image, label)``: float32 (depth, height, width, channels) and uint8 (depth, height,
        width) with values 0..num_classes-1, on the grid ``spec.voxel_shape`` x ``spec.spacing``.
    """
    shape, spacing = spec.voxel_shape, np.asarray(spec.spacing)
    coords = np.stack(
        np.meshgrid(*[np.arange(n) * sp for n, sp in zip(shape, spacing)], indexing="ij"), axis=0
    )  # (3, D, H, W) in mm
    extent = np.asarray(shape) * spacing
    scale = float(extent.min()) / 64.0  # structure sizes are designed for a 64 mm volume
    body = (
        (
            _place(coords, extent, rng, 0.02)
            / (extent * rng.uniform(0.42, 0.48, size=3))[:, None, None, None]
        )
        ** 2
    ).sum(axis=0) <= 1.0
    label = np.zeros(shape, np.uint8)
    for cls in range(1, spec.num_classes):
        mask = _SHAPES[(cls - 1) % len(_SHAPES)](_place(coords, extent, rng, 0.2), scale, rng)
        label[mask & body] = cls
    distractors = [
        _ellipsoid(_place(coords, extent, rng, 0.25), 0.45 * scale, rng) for _ in range(2)
    ]
    channels = [_channel(spec, rng, c, label, body, distractors) for c in range(spec.num_channels)]
    return np.stack(channels, axis=-1), label


def _channel(
    spec: SyntheticSpec,
    rng: np.random.Generator,
    channel: int,
    label: np.ndarray,
    body: np.ndarray,
    distractors: list[np.ndarray],
) -> np.ndarray:
    means = np.array(
        [_TISSUE_MEAN]
        + [_CLASS_MEANS[(c + 2 * channel) % len(_CLASS_MEANS)] for c in range(spec.num_classes - 1)]
    )
    means = means + rng.normal(0.0, 6.0, size=means.shape)  # per-case contrast jitter
    clean = means[label] + 12.0 * _smooth_field(rng, label.shape, cells=6) * (label == 0)
    for mask in distractors:  # unlabelled look-alikes: intensity alone cannot tell them apart
        clean[mask & (label == 0)] = means[rng.integers(1, spec.num_classes)]
    clean = ndimage.gaussian_filter(clean, sigma=0.6)
    clean *= 1.0 + spec.bias_strength * _smooth_field(rng, label.shape, cells=3)
    noisy = np.hypot(
        clean + rng.normal(0.0, spec.noise_std, label.shape),
        rng.normal(0.0, spec.noise_std, label.shape),
    )  # Rician, as in MR magnitude
    return np.where(body, noisy, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------
def case_ids(spec: SyntheticSpec) -> list[str]:
    return [f"case_{i:03d}" for i in range(spec.num_cases)]


def write_synthetic_dataset(root: str | Path, spec: SyntheticSpec) -> Path:
    """Writes every case, ``dataset.json`` and ``folds.json`` into ``root`` (not atomic).

    Cases depend only on ``(spec, case index)``, so a case is the same whatever ``num_cases``.
    """
    spec.validate()
    root = Path(root)
    shape, spacing = spec.voxel_shape, spec.spacing
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(shape) * np.asarray(spacing) / 2  # centred on the origin
    image_geometry = make_geometry(affine, shape, np.float32)
    for index, case in enumerate(case_ids(spec)):
        image, label = make_phantom(spec, np.random.default_rng([spec.seed, index]))
        for c in range(spec.num_channels):
            write_volume(
                root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image[..., c], image_geometry
            )
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label, image_geometry, np.uint8)
    _write_json(root / "dataset.json", _dataset_json(spec))
    _write_json(root / "folds.json", _folds_json(spec))
    return root


_NAME = "SegnetSynthetic"


def _dataset_json(spec: SyntheticSpec) -> dict:
    names = ["background"] + [
        f"{_SHAPE_NAMES[(c - 1) % len(_SHAPE_NAMES)]}_{c}" for c in range(1, spec.num_classes)
    ]
    return {
        "name": _NAME,
        "description": "Synthetic phantoms from segnet.data.synthetic; "
        f"seed {spec.seed}, spacing {list(spec.spacing)} mm",
        "tensorImageSize": "3D",
        "modality": {str(c): f"synthetic_{c}" for c in range(spec.num_channels)},
        "labels": {str(i): name for i, name in enumerate(names)},
        "numTraining": spec.num_cases,
        "training": [
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
            for case in case_ids(spec)
        ],
        "test": [],
    }


def _folds_json(spec: SyntheticSpec) -> dict:
    order = np.random.default_rng(spec.seed).permutation(spec.num_cases)
    ids = case_ids(spec)
    folds = {
        str(k): sorted(ids[i] for i in order[k :: spec.num_folds]) for k in range(spec.num_folds)
    }
    return {"description": f"{spec.num_folds}-fold split, seed {spec.seed}", "folds": folds}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def ensure_synthetic_dataset(root: str | Path, spec: SyntheticSpec | None = None) -> Path:
    """Generates the dataset into ``root`` unless it is already there; returns ``root``.

    The dataset is built in a hidden sibling folder and renamed into place, so an interrupted
    generation never leaves half a dataset, and two concurrent callers both end with one
    complete copy.

    Raises:
        UserError: ``root`` exists but holds something else, or cannot be written.
    """
    root, spec = Path(root), spec or SyntheticSpec()
    spec.validate()
    if (root / "dataset.json").is_file():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(
            f"{root}: exists but is not a dataset (no dataset.json); remove it or "
            "point data.root elsewhere"
        )
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex}")
    log.info(
        "generating %d synthetic phantom cases of %s voxels in %s (first use only; takes a few "
        "seconds)",
        spec.num_cases,
        "x".join(map(str, spec.shape)),
        root,
    )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_dataset(tmp, spec)
        _move_into_place(tmp, root)
    except PermissionError as exc:
        raise UserError(
            f"cannot create the synthetic dataset in {root.parent}: {exc.strerror}; "
            "choose a writable data.root"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_synthetic_dataset(root: Path) -> bool:
    """Whether ``root`` holds a dataset this module generated (its dataset.json says so)."""
    try:
        return json.loads((root / "dataset.json").read_text("utf-8")).get("name") == _NAME
    except (OSError, ValueError, AttributeError):
        return False


def _move_into_place(tmp: Path, root: Path) -> None:
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # rename cannot replace a directory, even an empty one, on every system
    try:
        tmp.rename(root)
    except OSError:
        if not (root / "dataset.json").is_file():
            raise  # not a concurrent generator that won the race: a real failure
