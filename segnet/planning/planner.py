"""The body of ``segnet-plan``: fingerprint the dataset, choose, time, fit the budget, write.

The chosen network is timed on this machine; when fewer than ``rules.MIN_STEPS`` of its steps
fit the budget, the smallest network (an eighth of the patch voxels, 8 filters) is timed too
and used instead, and when not even one epoch of that fits, the budget is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

import segnet
from segnet.config import ExperimentConfig, build_config
from segnet.errors import UserError
from segnet.planning import rules, timing
from segnet.planning.fingerprint import Fingerprint, fingerprint_dataset
from segnet.planning.rules import Choice, Hardware, Model
from segnet.planning.writer import MARK, Tree, check, choices, flow, plain, render, write_plan

_DURATION = re.compile(r"(?:(?P<h>[\d.]+)h)?(?:(?P<m>[\d.]+)m(?:in)?)?(?:(?P<s>[\d.]+)s)?")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
Say = Callable[[str], None]


def parse_budget(text: str) -> float:
    """``60m``, ``1h30m``, ``90s`` or plain minutes (``45``) -> seconds.

    Raises:
        UserError: not a positive duration.
    """
    raw = text.strip().lower().replace(" ", "")
    seconds = 0.0
    match = _DURATION.fullmatch(raw)
    if _NUMBER.fullmatch(raw):
        seconds = float(raw) * 60
    elif match and any(match.groups()):
        parts = {k: v for k, v in match.groupdict().items() if v}
        if all(_NUMBER.fullmatch(v) for v in parts.values()):
            seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[k] for k, v in parts.items())
    if seconds <= 0:
        raise UserError(
            f"--budget {text!r}: expected a positive duration such as 60m, 1h30m, 90s or 45 "
            "(minutes)"
        )
    return seconds


def duration(seconds: float) -> str:
    """``3600 -> '60 min'``, ``42 -> '42 s'``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def plan_dataset(
    dataset: str, out: Path | None, budget: str, model: Model, say: Say = print
) -> Path:
    """Plans an experiment for ``dataset`` and writes it to ``out``; returns the path.

    Args:
        dataset: the dataset folder (MSD, nnU-Net v2 or imagesTr/labelsTr folders).
        out: the YAML to write; None: ``configs/<name>.yaml``.
        budget: the training time, e.g. ``60m``.
        model: ``unet3d`` or ``segnet``.
        say: where the plan is printed, line by line.

    Raises:
        UserError: a bad dataset, budget or ``--out`` (one message, naming what to fix).
    """
    seconds = parse_budget(budget)
    _, fp = fingerprint_dataset(dataset)
    for line in fingerprint_lines(fp):
        say(line)
    hardware = timing.detect_hardware()
    tree, measured = _fit_budget(fp, model, hardware, seconds, say)
    name = tree["name"].value
    path = out if out is not None else Path("configs") / f"{name}.yaml"
    text = render(tree, _header(fp, tree, measured, path, budget, hardware))
    check(text, str(path))
    write_plan(path, text)
    for key, choice in choices(tree):
        say(f"  {key} = {flow(choice.value)}: {choice.reason}")
    say(f"wrote {path}; train with: python scripts/train.py --config {path}")
    return path


def _fit_budget(
    fp: Fingerprint, model: Model, hardware: Hardware, seconds: float, say: Say
) -> tuple[Tree, timing.StepTiming]:
    """The plan whose network fits the budget, with its training length and the timing.

    A first network is timed; when fewer than ``STEPS_WANTED`` of its steps fit, a smaller
    patch is planned and timed, and when still fewer than ``MIN_STEPS`` fit, the smallest
    network. Not even one epoch of that is a budget error.
    """
    sizing = rules.first_sizing(hardware)
    tree, measured, steps = _attempt(fp, model, sizing, seconds, say)
    smaller = rules.sizing_for_steps(sizing, steps) if steps < rules.STEPS_WANTED else None
    if smaller is not None:
        say(f"only {steps} steps fit the budget; planning a smaller patch")
        tree, measured, steps = _attempt(fp, model, smaller, seconds, say)
    if steps < rules.MIN_STEPS:
        say(f"only {steps} steps fit the budget (< {rules.MIN_STEPS}); the smallest network")
        tree, measured, steps = _attempt(fp, model, rules.smallest_sizing(steps), seconds, say)
        if steps < rules.EPOCH_STEPS[0]:
            raise _budget_too_small(seconds, measured.seconds)
    tree["train"].update(rules.schedule(steps, measured.seconds, seconds))
    tree["runtime"]["precision"] = Choice(
        "auto",
        f"picked {measured.precision} on the planning machine ({measured.precision_reason}); "
        "each machine decides for itself",
    )
    return tree, measured


def _attempt(
    fp: Fingerprint, model: Model, sizing: rules.Sizing, seconds: float, say: Say
) -> tuple[Tree, timing.StepTiming, int]:
    """A plan for ``sizing``, its timed step and the steps that fit the budget."""
    tree = plan_tree(fp, model, sizing)
    measured = _time(tree, say)
    return tree, measured, rules.affordable_steps(measured.seconds, seconds)


def _time(tree: Tree, say: Say) -> timing.StepTiming:
    config = check_tree(tree)
    measured = timing.time_training_steps(config)
    patch = "x".join(map(str, config.data.patch_size))
    say(
        f"measured {measured.seconds * 1e3:.0f} ms per training step (median of "
        f"{measured.steps}; batch {config.train.batch_size} of {patch}, {measured.precision}) "
        f"on {measured.device}"
    )
    return measured


def check_tree(tree: Tree) -> ExperimentConfig:
    """The plan so far, parsed strictly (a failure is the planner's bug)."""
    return build_config(plain(tree), source="the plan")


def _budget_too_small(seconds: float, step_seconds: float) -> UserError:
    need = rules.EPOCH_STEPS[0] * step_seconds / rules.TRAINING_SHARE
    return UserError(
        f"--budget {duration(seconds)}: too short for one epoch ({rules.EPOCH_STEPS[0]} steps) "
        f"of even the smallest network, whose step takes {step_seconds * 1e3:.0f} ms here; "
        f"give at least --budget {max(1, int(np.ceil(need / 60)))}m"
    )


# ---------------------------------------------------------------------------------------------
# The plan as a tree of choices
# ---------------------------------------------------------------------------------------------
def plan_tree(fp: Fingerprint, model: Model, sizing: rules.Sizing) -> Tree:
    """Every choice but the training length, which needs a timed step."""
    target = rules.target_spacing(fp)
    resample = rules.resample(fp, target.value)
    crop = rules.crop_to_nonzero(fp)
    spacing = target.value if resample.value else list(fp.median_spacing)
    shape = rules.planned_shape(fp, target.value if resample.value else None, crop.value)
    net, why = rules.plan_network(fp, spacing, shape, model, sizing)
    preprocessing: Tree = {"resample": resample}
    if resample.value:
        preprocessing["target_spacing"] = target
    preprocessing |= {"crop_to_nonzero": crop, **rules.normalization(fp)}
    return {
        "name": Choice(_slug(fp.name, model), "the run directory: runs/<name>"),
        "data": _data_section(fp, why),
        "preprocessing": preprocessing,
        **_augmentation(net, list(spacing)),
        "model": _model_section(net, why),
        "loss": {"name": Choice("dice_ce", "soft Dice over the foreground + cross-entropy")},
        "optimizer": {
            "name": Choice("sgd", "nnU-Net's recipe: SGD, Nesterov momentum 0.99, poly decay"),
            "learning_rate": 0.01,
            "momentum": 0.99,
        },
        "train": {
            "batch_size": why["batch_size"],
            "val_max_cases": Choice(8, "validate on up to 8 held-out cases, to keep it short"),
        },
        "evaluation": {
            "overlap": 0.5,
            "mirror_axes": Choice(
                [a for a in range(3) if a != net.slice_axis],
                "test-time mirroring over every axis the network sees (8 passes per window)",
            ),
            "keep_largest_component": rules.largest_component(fp),
        },
        "runtime": {"precision": Choice("auto", "mixed precision where the hardware runs it")},
    }


def _data_section(fp: Fingerprint, why: dict[str, Choice]) -> Tree:
    smallest = np.min(fp.shapes, axis=0)
    return {
        "root": Choice(
            fp.root,
            f"the {fp.layout} dataset; a relative path starts from the folder you train in",
        ),
        "num_classes": Choice(fp.num_classes, f"background included: {', '.join(fp.class_names)}"),
        "num_channels": Choice(fp.num_channels, _channels_text(fp)),
        "split": _split(fp),
        "patch_size": why["patch_size"],
        "foreground_fraction": Choice(
            0.33, "a third of the patches centred on a foreground class (nnU-Net)"
        ),
        "pad_small_volumes": Choice(
            True,
            f"the smallest case is {rules.voxels(smallest)} voxels: cases smaller than the patch "
            "are padded",
        ),
        "cache_dir": Choice(
            "data/cache", "preprocessed copies; relative to the folder you train in"
        ),
    }


def _split(fp: Fingerprint) -> Choice:
    if fp.folds_file:
        return Choice(
            {"folds_file": fp.folds_file, "fold": 0},
            f"the dataset's {fp.folds_file}: fold 0 held out, the others train",
        )
    if fp.splits_final:
        return Choice({}, "the dataset's splits_final.json (nnU-Net's folds): fold 0 held out")
    return Choice(
        {"num_folds": 5, "seed": 0, "fold": 0},
        "no folds file: a seeded shuffle into 5 folds, fold 0 held out",
    )


def _augmentation(net: rules.Network, spacing: list[float]) -> Tree:
    """On an anisotropic grid, rotations about the coarse axis only and zooms across it, as
    nnU-Net augments such data in-plane; a 2D network's slices are rotated in their own plane
    anyway."""
    coarse = int(np.argmax(spacing))
    ratio = spacing[coarse] / min(spacing)
    if ratio <= rules.ANISOTROPY or net.slice_axis is not None:
        return {}
    return {
        "augmentation": {
            "coarse_axis": Choice(
                coarse,
                f"axis {coarse} is {ratio:.2g}x coarser than the finest: rotations turn about it "
                "only and zooms leave it alone, so no sample mixes distant slices",
            )
        }
    }


def _model_section(net: rules.Network, why: dict) -> Tree:
    if net.model == "unet3d":
        settings: Tree = {
            "depth": why["depth"],
            "filters": why["filters"],
            "pool_sizes": why["pool_sizes"],
            "kernel_sizes": why["kernel_sizes"],
        }
        if net.depth >= 2:
            settings["deep_supervision"] = Choice(
                True,
                "losses at the lower decoder levels too: +0.004 Dice at equal steps on "
                "hippocampus, at no measurable cost (README)",
            )
        return {"name": Choice("unet3d", _unet_text(net)), "unet3d": settings}
    pools = why["pool_sizes"]
    settings = {"depth": why["depth"], "filters": why["filters"], "pool_sizes": pools}
    if net.slice_axis == 0:
        settings["spatial_dims"] = Choice(2, "axis 0 is a slice axis: SegNet runs on its slices")
        settings["pool_sizes"] = Choice([p[1:] for p in pools.value], pools.reason)
    return {"name": Choice("segnet", "--model segnet: argmax unpooling"), "segnet": settings}


def _unet_text(net: rules.Network) -> str:
    if net.slice_axis is not None:
        return f"a U-Net that is 2D across axis {net.slice_axis} (too few voxels for 3D)"
    return "a 3D U-Net with nnU-Net's per-axis pools and kernels"


def _channels_text(fp: Fingerprint) -> str:
    names = [n or "unnamed" for n in fp.channel_names]
    return f"{', '.join(names)} (dataset.json)" if any(fp.channel_names) else "from the files"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _slug(name: str, model: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "dataset"
    return f"{slug}_{model}"


# ---------------------------------------------------------------------------------------------
# The header comment and the printed summary
# ---------------------------------------------------------------------------------------------
def fingerprint_lines(fp: Fingerprint) -> list[str]:
    """The fingerprint's summary, as printed and written into the header."""
    spacing = np.asarray(fp.spacings)
    shapes = np.asarray(fp.shapes)
    lines = [
        f"{fp.name}: {fp.num_cases} labelled cases ({fp.layout} layout, {fp.root})",
        f"  spacing (mm per array axis): median {rules.mm(fp.median_spacing)}, "
        f"10th percentile {rules.mm(np.percentile(spacing, 10, axis=0))}, "
        f"90th {rules.mm(np.percentile(spacing, 90, axis=0))}",
        f"  shape (voxels): median {rules.voxels(np.median(shapes, axis=0))}, smallest "
        f"{rules.voxels(shapes.min(axis=0))}, largest {rules.voxels(shapes.max(axis=0))}",
        f"  non-zero region: a median {fp.crop_fraction():.0%} of a case",
    ]
    for c, stats in enumerate(fp.intensity):
        name = fp.channel_names[c] or "unnamed"
        lines.append(
            f"  channel {c} ({name}), foreground: mean {stats.mean:.4g}, std {stats.std:.4g}, "
            f"0.5-99.5 percentiles [{stats.low:.4g}, {stats.high:.4g}]"
        )
    for k, cls in enumerate(fp.classes, start=1):
        lines.append(
            f"  class {k} ({cls.name}): in {cls.cases} of {fp.num_cases} cases, median volume "
            f"{cls.median_ml:.3g} mL, one connected piece in {cls.one_piece} of them"
        )
    return lines


def _header(
    fp: Fingerprint,
    tree: Tree,
    measured: timing.StepTiming,
    path: Path,
    budget: str,
    hardware: Hardware,
) -> list[str]:
    name = tree["name"].value
    model = tree["model"]["name"].value
    what = "3D U-Net" if model == "unet3d" else "SegNet"
    train = tree["train"]
    steps = train["epochs"].value * train["steps_per_epoch"].value
    return [
        f"{fp.name}: {what}, {MARK} (segnet {segnet.__version__}).",
        "",
        f"  python scripts/train.py --config {path}",
        f"  python scripts/evaluate.py --run runs/{name} --checkpoint latest",
        "",
        f"Data: {fp.root} ({fp.layout}): {fp.num_cases} cases, {_count(fp.num_channels, 'channel')}"
        f", {fp.num_classes} classes; {tree['data']['split'].reason}.",
        f"Reaches: not measured yet. Its {steps} steps are sized to a {budget} budget on "
        f"{hardware.name} ({measured.seconds * 1e3:.0f} ms per step in {measured.precision}, "
        "measured when planning); on other hardware plan again, or scale train.epochs.",
        "",
        "Fingerprint:",
        *fingerprint_lines(fp),
        "",
        "Each setting says why it was chosen; edit any of them (--set overrides work too).",
    ]
