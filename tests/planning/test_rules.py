"""The planning rules on synthetic fingerprints: no files, no timing, one fact per test."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from segnet.config import build_config
from segnet.data.preprocessing import ChannelStats
from segnet.errors import UserError
from segnet.planning import rules
from segnet.planning.fingerprint import ClassStats, Fingerprint
from segnet.planning.planner import parse_budget, plan_tree
from segnet.planning.rules import Hardware
from segnet.planning.writer import plain

CPU = Hardware(gpu=False, name="a test CPU (2 cores)")
MR = ChannelStats(mean=100.0, std=20.0, low=10.0, high=300.0)
CT = ChannelStats(mean=40.0, std=200.0, low=-1000.0, high=1500.0)


def fingerprint(
    spacings: list[tuple[float, float, float]],
    shapes: list[tuple[int, int, int]],
    channels: tuple[str, ...] = ("MRI",),
    cropped: list[tuple[int, int, int]] | None = None,
) -> Fingerprint:
    stats = {"MRI": MR, "CT": CT, "T2": MR, "": MR}
    return Fingerprint(
        name="Synthetic",
        root="data/synthetic",
        layout="msd",
        channel_names=channels,
        class_names=("background", "organ"),
        spacings=tuple(spacings),
        shapes=tuple(shapes),
        cropped_shapes=tuple(cropped or shapes),
        intensity=tuple(stats[c] for c in channels),
        classes=(ClassStats("organ", len(shapes), 10.0),),
        folds_file="folds.json",
    )


def isotropic() -> Fingerprint:  # hippocampus-like: 1 mm, about 35 x 50 x 36
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in rng.integers((31, 40, 26), (43, 59, 45))) for _ in range(20)]
    shapes[0] = (35, 50, 36)
    return fingerprint([(1.0, 1.0, 1.0)] * 20, shapes)


def anisotropic() -> Fingerprint:  # cardiac cine MRI: 1.5 x 1.5 in plane, 5-10 mm between slices
    spacings = [(1.5, 1.5, 10.0)] * 16 + [(1.5, 1.5, 5.0)] * 4
    return fingerprint(spacings, [(216, 256, 9)] * 20)


def network(fp: Fingerprint, spacing=None, model="unet3d", voxels=rules.PATCH_VOXELS[False]):
    spacing = spacing or list(fp.median_spacing)
    shape = rules.planned_shape(fp, None, cropped=False)
    sizing = rules.Sizing(voxels, 16, "a test budget")
    return rules.plan_network(fp, spacing, shape, model, sizing)


def test_isotropic_data_plans_nnunets_hippocampus_network():
    fp = isotropic()
    assert rules.target_spacing(fp).value == [1.0, 1.0, 1.0]
    assert rules.resample(fp, [1.0, 1.0, 1.0]).value is False
    net, why = network(fp)
    assert net.patch_size == (40, 56, 40)  # nnU-Net's choice, and configs/hippocampus_unet3d.yaml's
    assert net.pool_sizes == ((2, 2, 2),) * 3
    assert net.kernel_sizes == ((3, 3, 3),) * 4
    assert net.batch_size == 2
    assert all(choice.reason for choice in why.values())


def test_an_anisotropic_axis_takes_its_10th_percentile_spacing():
    fp = anisotropic()
    target = rules.target_spacing(fp)
    assert target.value == [1.5, 1.5, 5.0]  # the median is 10 mm; its 10th percentile 5 mm
    assert "10th percentile" in target.reason
    assert rules.resample(fp, target.value).value is True  # 16 cases are at 10 mm


def test_spacing_within_the_anisotropy_ratio_keeps_the_median():
    fp = fingerprint([(1.0, 1.0, 3.0)] * 9 + [(1.0, 1.0, 1.0)], [(64, 64, 64)] * 10)
    assert rules.target_spacing(fp).value == [1.0, 1.0, 3.0]


def test_a_coarse_axis_is_not_pooled_and_convolves_within_slices_first():
    fp = fingerprint([(1.5, 1.5, 10.0)] * 10, [(216, 256, 9)] * 10)
    net, _ = network(fp)
    # In-plane pools first; the slice axis joins once in-plane spacing is within 2x of 10 mm.
    assert [p[2] for p in net.pool_sizes[:2]] == [1, 1]
    assert [k[2] for k in net.kernel_sizes[:2]] == [1, 1]
    assert net.kernel_sizes[2] == (3, 3, 3)
    assert all(p[:2] == (2, 2) for p in net.pool_sizes)
    assert net.patch_size[2] == 8  # the 9 slices, rounded to the pools' multiple 2
    assert_divisible(net)


def test_topology_follows_nnunet_per_level():
    pools, kernels = rules.topology((160, 192, 8), (1.5, 1.5, 10.0), None)
    assert pools == ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 1), (2, 2, 1))
    assert kernels[:3] == ((3, 3, 1), (3, 3, 1), (3, 3, 3))
    assert len(kernels) == len(pools) + 1


def test_tiny_volumes_are_padded_to_one_pooling():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(5, 6, 7)] * 4)
    net, _ = network(fp)
    assert net.patch_size == (8, 8, 8) and net.pool_sizes == ((2, 2, 2),)
    assert net.batch_size == 2  # more would hold far over 5% of this dataset


def test_huge_volumes_fit_the_budget_and_stay_divisible():
    fp = fingerprint([(2.5, 0.7, 0.7)] * 50, [(300, 512, 512)] * 50)
    net, _ = network(fp)
    assert math.prod(net.patch_size) <= rules.PATCH_VOXELS[False]
    assert net.depth <= rules.MAX_DEPTH
    assert net.patch_size[1] == net.patch_size[2] > net.patch_size[0]  # the aspect ratio kept
    assert_divisible(net)


def test_a_smaller_budget_gives_a_smaller_patch_of_the_same_aspect():
    fp = anisotropic()
    big, _ = network(fp)
    small, _ = network(fp, voxels=rules.MIN_VOXELS)
    assert math.prod(small.patch_size) <= rules.MIN_VOXELS < math.prod(big.patch_size)
    assert small.patch_size[0] <= small.patch_size[1]
    assert_divisible(small)


def test_two_dimensional_data_gets_a_slice_axis():
    fp = fingerprint([(5.0, 1.0, 1.0)] * 10, [(1, 256, 256)] * 10)
    net, why = network(fp)
    assert net.slice_axis == 0 and net.patch_size == (1, 256, 256)
    assert all(p[0] == 1 for p in net.pool_sizes)
    assert all(k[0] == 1 for k in net.kernel_sizes)
    assert "2D" in why["patch_size"].reason


def test_two_dimensional_data_with_segnet_plans_a_2d_segnet():
    fp = fingerprint([(5.0, 1.0, 1.0)] * 10, [(1, 64, 64)] * 10)
    tree = plan_tree(fp, "segnet", rules.first_sizing(CPU))
    segnet = tree["model"]["segnet"]
    assert segnet["spatial_dims"].value == 2
    assert all(len(p) == 2 for p in segnet["pool_sizes"].value)
    tree["train"].update(rules.schedule(2000, 0.1, 3600))
    config = build_config(plain(tree))  # strict: it trains as written
    assert config.spatial_dims == 2 and config.data.patch_size == (1, 64, 64)


def test_a_3d_plan_on_an_anisotropic_grid_rotates_about_its_thick_axis_only():
    tree = plan_tree(anisotropic(), "unet3d", rules.first_sizing(CPU))
    choice = tree["augmentation"]["coarse_axis"]
    assert choice.value == 2 and "rotations turn about it only" in choice.reason
    tree["train"].update(rules.schedule(2000, 0.1, 3600))
    config = build_config(plain(tree))
    assert config.augmentation.coarse_axis == 2 and config.augmentation.rotation_degrees == 15
    assert "augmentation" not in plan_tree(isotropic(), "unet3d", rules.first_sizing(CPU))


def test_ct_and_mr_channels_get_their_own_normalisation():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(64, 64, 64)] * 4, channels=("CT", "T2"))
    choices = rules.normalization(fp)
    assert list(choices) == ["channel_normalization"]
    assert choices["channel_normalization"].value == ["ct", "zscore"]
    assert "-1000" in choices["channel_normalization"].reason  # the percentiles it clips to
    both_ct = fingerprint([(1.0, 1.0, 1.0)] * 4, [(64, 64, 64)] * 4, channels=("CT", "CT"))
    assert rules.normalization(both_ct)["normalization"].value == "ct"
    unnamed = fingerprint([(1.0, 1.0, 1.0)] * 4, [(64, 64, 64)] * 4, channels=("",))
    assert "names no modality" in rules.normalization(unnamed)["normalization"].reason


def test_a_multichannel_plan_is_a_valid_config():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(64, 64, 64)] * 4, channels=("CT", "T2"))
    tree = plan_tree(fp, "unet3d", rules.first_sizing(CPU))
    tree["train"].update(rules.schedule(2000, 0.1, 3600))
    tree["data"]["num_channels"] = 2
    config = build_config(plain(tree))
    assert config.preprocessing.channel_normalization == ("ct", "zscore")


def test_crop_only_when_the_nonzero_region_is_small():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 2, [(100, 100, 100)] * 2, cropped=[(50, 50, 50)] * 2)
    assert rules.crop_to_nonzero(fp).value is True
    assert rules.crop_to_nonzero(isotropic()).value is False


def test_the_schedule_fits_the_affordable_steps():
    steps = rules.affordable_steps(0.5, 3600)
    assert steps == int(3600 * rules.TRAINING_SHARE / 0.5)
    plan = rules.schedule(steps, 0.5, 3600)
    epochs, per_epoch = plan["epochs"].value, plan["steps_per_epoch"].value
    assert epochs * per_epoch <= steps
    assert rules.EPOCH_STEPS[0] <= per_epoch <= rules.EPOCH_STEPS[1]
    assert 1 <= plan["val_every"].value <= epochs


def test_few_steps_shrink_the_patch_budget_and_enough_keep_it():
    first = rules.first_sizing(CPU)
    smaller = rules.sizing_for_steps(first, rules.STEPS_WANTED // 4)
    assert smaller is not None and smaller.max_voxels == first.max_voxels // 4
    assert rules.sizing_for_steps(first, rules.STEPS_WANTED - 1) is None
    floor = rules.sizing_for_steps(first, 1)
    assert floor is not None and floor.max_voxels == rules.MIN_VOXELS


@pytest.mark.parametrize(
    ("text", "seconds"), [("60m", 3600), ("1h30m", 5400), ("90s", 90), ("45", 2700), ("2h", 7200)]
)
def test_budgets_read_as_durations(text: str, seconds: float):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "soon", "m", "1x", "-5m", "1.2.3m"])
def test_bad_budgets_are_user_errors(text: str):
    with pytest.raises(UserError, match="--budget"):
        parse_budget(text)


def assert_divisible(net: rules.Network) -> None:
    step = rules.divisor(net.pool_sizes)
    assert all(p % d == 0 for p, d in zip(net.patch_size, step)), (net.patch_size, step)


def test_largest_component_only_for_classes_in_one_piece_in_every_label():
    fp = replace(
        isotropic(),
        class_names=("background", "heart", "lesion", "absent"),
        classes=(
            ClassStats("heart", 20, 10.0, one_piece=20),
            ClassStats("lesion", 12, 1.0, one_piece=9),
            ClassStats("absent", 0, 0.0),
        ),
    )
    choice = rules.largest_component(fp)
    assert choice.value == [1]
    assert "heart" in choice.reason and "lesion 3 of 12" in choice.reason


def test_no_class_in_one_piece_everywhere_means_no_post_processing():
    fp = replace(isotropic(), classes=(ClassStats("organ", 20, 10.0, one_piece=19),))
    choice = rules.largest_component(fp)
    assert choice.value is False and "organ 1 of 20" in choice.reason


def test_a_plan_with_post_processing_passes_the_strict_checks():
    fp = replace(isotropic(), classes=(ClassStats("organ", 20, 10.0, one_piece=20),))
    tree = plan_tree(fp, "unet3d", rules.first_sizing(CPU))
    config = build_config(plain(tree))
    assert config.evaluation.keep_largest_component == (1,)
