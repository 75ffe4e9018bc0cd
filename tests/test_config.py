"""The strict YAML experiment parser: every mistake reported by dotted path, never a traceback."""

from __future__ import annotations

import copy
import dataclasses
import os
import string
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segnet.config import (
    MAX_CONFIG_BYTES,
    ExperimentConfig,
    build_config,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_yaml,
    read_yaml,
)
from segnet.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def problems_of(data: dict, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(data, list(overrides))
    return info.value.problems


def test_defaults_are_valid_and_round_trip():
    config = build_config({})
    assert config == ExperimentConfig()
    assert build_config(yaml.safe_load(config_to_yaml(config))) == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path):
    config = load_config(path)
    assert build_config(yaml.safe_load(config_to_yaml(config))) == config


def test_shipped_configs_open_with_a_comment_block():
    for path in (REPO / "configs").glob("*.yaml"):
        head = path.read_text().splitlines()[:3]
        assert all(line.startswith("#") for line in head), path
        assert "scripts/train.py" in path.read_text(), path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"model": {"unet3d": {"filterz": 8}}},
            "model.unet3d.filterz: unknown key (did you mean 'filters'?)",
        ),
        ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5"),
        ({"train": {"deterministic": "yes"}}, "train.deterministic: expected true/false"),
        ({"train": {"epochs": -1}}, "train.epochs: must be at least 1, got -1"),
        ({"optimizer": {"name": "adam"}}, "optimizer.name: must be one of 'sgd', 'adamw'"),
        ({"data": {"patch_size": [64, 64]}}, "data.patch_size: expected a list of 3 values"),
        ({"data": {"patch_size": [64, "x", 64]}}, "data.patch_size[1]: expected an integer"),
        ({"data": {"split": {"fold": 7}}}, "data.split.fold: must be in 0..4, got 7"),
        ({"model": {"name": "unet"}}, "model.name: unknown model 'unet' (did you mean 'unet3d'?)"),
        (
            {"model": {"unet3d": {"input_downsample": 3}}},
            "model.unet3d.input_downsample: must be one of 1, 2, 4, got 3",
        ),
        ({"augmentation": {"noise_prob": 1.5}}, "augmentation.noise_prob: must be a probability"),
        ({"data": 5}, "data: expected a mapping of settings, got 5"),
        (
            {"loss": {"class_weights": [1.0, 2.0]}},
            "loss.class_weights: needs 4 values (data.num_classes), got 2",
        ),
        (
            {"evaluation": {"keep_largest_component": [1, 0, 4]}},
            "evaluation.keep_largest_component: lists [0, 4], not foreground classes (1 to 3",
        ),
        (
            {"evaluation": {"keep_largest_component": "yes"}},
            "evaluation.keep_largest_component: expected true/false or a list of integers, got 'yes'",
        ),
    ],
)
def test_each_mistake_names_its_dotted_path(data: dict, expected: str):
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("decay", [1, 1.0, 1.5, -0.1, ".nan"])
def test_ema_decay_must_lie_strictly_between_0_and_1(decay: object):
    problems = problems_of({}, [f"train.ema_decay={decay}"])
    assert any(p.startswith("train.ema_decay:") for p in problems), problems


@pytest.mark.parametrize(("decay", "on"), [("null", False), ("0", False), ("0.999", True)])
def test_ema_decay_null_or_0_is_off(decay: str, on: bool):
    config = build_config({}, [f"train.ema_decay={decay}"])
    assert config.train.averages_weights is on
    assert build_config(config_to_dict(config)) == config


def test_patch_size_must_divide_by_the_unet_divisor():
    data = {
        "model": {"name": "unet3d", "unet3d": {"depth": 3, "input_downsample": 2}},
        "data": {"patch_size": [32, 40, 48]},
    }
    (problem,) = problems_of(data)
    assert problem.startswith("data.patch_size: [32, 40, 48] must be divisible by 16")
    assert "try [32, 48, 48]" in problem


def test_patch_size_divides_per_axis_by_the_pools_of_that_axis():
    unet = {"depth": 2, "pool_sizes": [[1, 2, 2], [2, 2, 2]], "input_downsample": [1, 2, 1]}
    ok = {"model": {"name": "unet3d", "unet3d": unet}, "data": {"patch_size": [6, 16, 12]}}
    assert build_config(ok).model.unet3d.divisor == (2, 8, 4)
    (problem,) = problems_of({**ok, "data": {"patch_size": [5, 16, 10]}})
    assert problem.startswith("data.patch_size: [5, 16, 10] must be divisible by [2, 8, 4]")
    assert "try [6, 16, 12]" in problem


def test_channel_normalization_needs_one_scheme_per_channel():
    data = {"data": {"num_channels": 2}, "preprocessing": {"channel_normalization": ["ct"]}}
    (problem,) = problems_of(data)
    assert problem.startswith("preprocessing.channel_normalization: needs 2 values")


def test_segnet_accepts_odd_patch_sizes():
    config = build_config({"model": {"name": "segnet"}, "data": {"patch_size": [17, 18, 19]}})
    assert config.data.patch_size == (17, 18, 19)


def test_three_mistakes_are_reported_together():
    data = {"model": {"unet3d": {"filterz": 8}}, "train": {"epochs": -2, "batch_size": "two"}}
    problems = problems_of(data)
    assert len(problems) == 3, problems
    assert {p.split(":")[0] for p in problems} == {
        "model.unet3d.filterz",
        "train.epochs",
        "train.batch_size",
    }


def test_overrides_are_checked_like_the_file():
    config = build_config(
        {},
        [
            "train.epochs=3",
            "model.name=unet3d",
            "data.patch_size=[32, 32, 32]",
            "optimizer.clip_norm=null",
        ],
    )
    assert (config.train.epochs, config.model.name, config.optimizer.clip_norm) == (
        3,
        "unet3d",
        None,
    )
    problems = problems_of({}, ["train.epohcs=3", "train.epochs=x", "no_equals_sign"])
    assert any(p.startswith("train.epohcs: unknown key (did you mean 'epochs'?)") for p in problems)
    assert any(p.startswith("train.epochs: expected an integer") for p in problems)
    assert any("no_equals_sign" in p for p in problems)


def test_overrides_leave_the_callers_mapping_alone():
    # A benchmark that builds several variants from one YAML mapping once timed batch-1 steps
    # as batch-2 ones, because an override had been written into the shared nested dict.
    data = {"data": {"patch_size": [40, 56, 40]}, "train": {"batch_size": 2, "epochs": 3}}
    before = copy.deepcopy(data)
    variant = build_config(data, ["train.batch_size=1", "data.patch_size=[32, 48, 32]"])
    plain = build_config(data)
    assert data == before
    assert (variant.train.batch_size, variant.data.patch_size) == (1, (32, 48, 32))
    assert (plain.train.batch_size, plain.data.patch_size) == (2, (40, 56, 40))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "line" in str(info.value)


def test_missing_and_non_mapping_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


def test_config_is_frozen():
    config = build_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Property-based: valid configs round-trip; junk never escapes as anything but ConfigError.
# ----------------------------------------------------------------------------------------------
valid_overrides = st.fixed_dictionaries(
    {},
    optional={
        "train.epochs": st.integers(1, 1000),
        "train.batch_size": st.integers(1, 64),
        "train.seed": st.integers(0, 2**31),
        "train.ema_decay": st.one_of(st.none(), st.floats(1e-6, 0.999999)),
        "optimizer.learning_rate": st.floats(1e-6, 1.0),
        "optimizer.name": st.sampled_from(["sgd", "adamw"]),
        "model.segnet.depth": st.integers(1, 7),
        "model.segnet.spatial_dims": st.sampled_from([2, 3]),
        "data.patch_size": st.lists(st.integers(1, 300), min_size=3, max_size=3),
        "augmentation.noise_prob": st.floats(0.0, 1.0),
        "evaluation.mirror_axes": st.lists(st.sampled_from([0, 1, 2]), max_size=3),
        "name": st.text(string.ascii_letters + "_-", min_size=1, max_size=20),
    },
)


@settings(max_examples=60, deadline=None)
@given(valid_overrides)
def test_valid_configs_round_trip_through_yaml(overrides: dict):
    data: dict = {}
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    config = build_config(data)
    assert build_config(yaml.safe_load(config_to_yaml(config))) == config
    assert config_to_dict(build_config(config_to_dict(config))) == config_to_dict(config)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "data",
                    "model",
                    "train",
                    "name",
                    "unet3d",
                    "epochs",
                    "patch_size",
                    "split",
                    "fold",
                    "x",
                    "loss",
                    "segnet",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk)
def test_random_junk_gives_a_config_error_or_a_config(data):
    if not isinstance(data, dict):
        data = {"data": data}
    try:
        config = build_config(data)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
    else:
        assert isinstance(config, ExperimentConfig)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_random_override_text_never_raises_anything_else(text: str):
    try:
        build_config({}, [text])
    except ConfigError as exc:
        assert exc.problems


# ----------------------------------------------------------------------------------------------
# What PyYAML lets through: special files, duplicate keys, deep nesting, empty files.
# ----------------------------------------------------------------------------------------------
def raised_promptly(call: Callable[[], object], fifo: Path) -> BaseException | None:
    """What ``call`` raised (None if nothing), failing rather than hanging if it blocks.

    Opening a FIFO for reading waits for a writer: if ``call`` is still blocked after a few
    seconds, a writer comes and goes so that the thread ends, and the test fails.
    """
    raised: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"reading {fifo} blocked waiting for a writer")
    return raised[0] if raised else None


@pytest.mark.parametrize("read", [read_yaml, load_config], ids=["read_yaml", "load_config"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, read: Callable):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    error = raised_promptly(lambda: read(fifo), fifo)
    assert isinstance(error, ConfigError), error
    assert str(fifo) in str(error) and "FIFO" in str(error)


def test_a_device_is_refused():
    # /dev/null reads as an empty file, which used to train on every default.
    with pytest.raises(ConfigError, match="/dev/null: it is a character device"):
        load_config("/dev/null")


def test_an_oversized_file_is_refused(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    with pytest.raises(ConfigError, match="larger than 1 MiB") as info:
        load_config(path)
    assert str(path) in str(info.value)


DEEP_LIST = "[" * 5000 + "]" * 5000


def test_deep_nesting_is_one_config_error_naming_file_and_line(tmp_path: Path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\na: " + DEEP_LIST + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [info.value.problems[0]]
    assert str(path) in str(info.value)
    assert "nested too deeply at line 2" in str(info.value)


@pytest.mark.parametrize(
    "override",
    [f"data.patch_size={DEEP_LIST}", "name." + "a." * 5000 + "b=1", "data.root=" + "{a: " * 5000],
    ids=["deep-value", "deep-key", "deep-unclosed-mapping"],
)
def test_deep_overrides_are_one_config_error(override: str):
    (problem,) = problems_of({}, [override])
    assert problem.startswith("--set ") and "nested too deeply" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nname: b\n", "name: key given twice (lines 1 and 2)"),
        (
            "train:\n  epochs: 2\n  batch_size: 1\nmodel: {}\ntrain:\n  epochs: 3\n",
            "train: key given twice (lines 1 and 5)",
        ),
        (
            "train:\n  epochs: 2\n  batch_size: 1\n  epochs: 3\n",
            "train.epochs: key given twice (lines 2 and 4)",
        ),
        (
            "data:\n  cases:\n    - id: a\n      images: [x]\n      id: b\n",
            "data.cases[0].id: key given twice (lines 3 and 5)",
        ),
    ],
    ids=["top-level", "section", "setting", "in-a-list"],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(expected), info.value.problems
    assert str(path) in str(info.value)


def test_duplicate_keys_are_refused_in_overrides():
    (problem,) = problems_of({}, ["train={epochs: 2, epochs: 3}"])
    assert problem.startswith("--set train: epochs: key given twice")


def test_yaml_merge_keys_still_override():
    # `<<:` merges are how YAML spells "these, except": not a key given twice.
    assert parse_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")["other"] == {"x": 2}


def test_an_integer_too_long_to_parse_is_a_config_error(tmp_path: Path):
    path = tmp_path / "digits.yaml"
    path.write_text("train:\n  epochs: 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match="line 2, column 11 has 5001 digits"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "{}\n", "---\n...\n"])
def test_an_empty_config_is_refused(tmp_path: Path, text: str):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "empty" in str(info.value)
    assert "data" in str(info.value) and "configs/" in str(info.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        (".", "current folder"),
        ("..", "parent folder"),
        ("../elsewhere", "path separator"),
        ("a\\b", "path separator"),
        ("nul\x00byte", "control character"),
        ("new\nline", "control character"),
        ("x" * 300, "too long"),
        ("é" * 128, "too long"),  # 128 characters but 256 bytes
    ],
)
def test_name_must_be_a_plain_folder_name(name: str, why: str):
    (problem,) = problems_of({"name": name})
    assert problem.startswith("name: ") and why in problem
    suggested = problem.rsplit("e.g. ", 1)[1].strip("'")
    assert build_config({"name": suggested}).name == suggested


@pytest.mark.parametrize("name", ["a", "my experiment", "run.v2", "x" * 128, "ünïcode"])
def test_plain_folder_names_are_accepted(name: str):
    assert build_config({"name": name}).name == name


@pytest.mark.parametrize(("value", "parsed"), [("true", True), ("false", False), ("[1,3]", (1, 3))])
def test_keep_largest_component_takes_a_switch_or_classes(value: str, parsed: object):
    config = build_config({}, [f"evaluation.keep_largest_component={value}"])
    assert config.evaluation.keep_largest_component == parsed
    assert build_config(config_to_dict(config)) == config
