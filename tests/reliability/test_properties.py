"""Property-based checks (hypothesis) of the config parser and of the argmax pool/unpool layers.

Config: any unknown key, at any depth and under any known section, is reported by its full
dotted path (from YAML and from ``--set``) as the only problem; a value of the wrong kind at any
leaf is named by its path; no float setting accepts NaN or infinity.

Pooling: against a reference written window by window with plain numpy slicing (the end of
every axis simply runs short, which is what padding at the end means), on random 2D and 3D
shapes with odd sizes, random pool sizes and small integers (so ties are common and maxima can
be negative): the pooled values, unpool(pool(x)) with each maximum exactly once per window at
its first position in row-major window order, and the gradient of the pool.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import dataclasses
import itertools
import string
import types
import typing
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segnet.config import ExperimentConfig, build_config
from segnet.errors import ConfigError
from segnet.models.argmax_pooling import MaxPoolingWithArgmax, MaxUnpoolingWithArgmax

pytestmark = pytest.mark.reliability


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _tree(cls: type, prefix: str = "") -> tuple[list[str], list[tuple[str, Any]]]:
    """Dotted paths of the config's sections (``""``: the top) and of its leaves with types."""
    sections, leaves = [prefix], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            more_sections, more_leaves = _tree(hints[f.name], path)
            sections += more_sections
            leaves += more_leaves
        else:
            leaves.append((path, hints[f.name]))
    return sections, leaves


SECTIONS, LEAVES = _tree(ExperimentConfig)
FLOAT_LEAVES = [
    path
    for path, tp in LEAVES
    if tp is float
    or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))
]


def _known_keys(section: str) -> set[str]:
    """The field names of the section at ``section``."""
    prefix = f"{section}." if section else ""
    depth = prefix.count(".")
    below = [path for path, _ in LEAVES] + SECTIONS
    return {path.split(".")[depth] for path in below if path.startswith(prefix) and path != section}


def _nest(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def _problems(data: dict[str, Any], overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(data, list(overrides))
    return info.value.problems


key_names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
junk_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.dictionaries(key_names, inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(SECTIONS), key_names, junk_values, st.data())
def test_unknown_keys_are_named_by_their_dotted_path(
    section: str, key: str, value: Any, data: st.DataObject
) -> None:
    if key in _known_keys(section):
        key = f"{key}_x"  # never a field name: no field ends in _x
    path = f"{section}.{key}" if section else key
    (problem,) = _problems(_nest(path, value))
    assert problem.startswith(f"{path}: unknown key"), problem
    scalar = data.draw(st.integers(0, 9))
    (problem,) = _problems({}, [f"{path}={scalar}"])
    assert problem.startswith(f"{path}: unknown key"), problem


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LEAVES), st.dictionaries(key_names, st.integers(), min_size=1, max_size=2))
def test_a_mapping_at_any_leaf_is_named_by_its_path(leaf: tuple[str, Any], value: dict) -> None:
    path, _ = leaf
    problems = _problems(_nest(path, value))
    assert [p for p in problems if p.startswith(f"{path}: ")] == problems, problems
    assert len(problems) == 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(FLOAT_LEAVES), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_no_float_setting_accepts_nan_or_infinity(path: str, value: float) -> None:
    (problem,) = _problems(_nest(path, value))
    assert problem.startswith(f"{path}: expected a finite number"), problem


def test_the_config_tree_is_walked() -> None:
    assert {"", "data.split", "model.unet3d_cascade.low"} <= set(SECTIONS)
    assert "optimizer.learning_rate" in FLOAT_LEAVES and "optimizer.clip_norm" in FLOAT_LEAVES


# ---------------------------------------------------------------------------------------------
# Argmax pooling
# ---------------------------------------------------------------------------------------------
@st.composite
def volumes(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(x, pool)``: x of shape (batch, *spatial, channels) with 2 or 3 spatial axes of 1..7
    voxels, integers in -2..2 as float32; a pool of 1..3 per axis."""
    nd = draw(st.sampled_from([2, 3]))
    spatial = draw(st.lists(st.integers(1, 7), min_size=nd, max_size=nd))
    pool = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    shape = (draw(st.integers(1, 2)), *spatial, draw(st.integers(1, 2)))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(-2, 3, size=shape).astype(np.float32), pool


def _windows(shape: tuple[int, ...], pool: tuple[int, ...]) -> list[tuple[tuple, tuple]]:
    """``(pooled index, window slices)`` for every window; windows at the end run short."""
    counts = [-(-n // p) for n, p in zip(shape[1:-1], pool)]
    return [
        (index, tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, pool)))
        for index in itertools.product(*map(range, counts))
    ]


def reference(x: np.ndarray, pool: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled, one_hot)``: the window maxima, and x's shape with 1 at each window's first
    maximum (row-major order inside the window) and 0 elsewhere."""
    counts = [-(-n // p) for n, p in zip(x.shape[1:-1], pool)]
    pooled = np.zeros((x.shape[0], *counts, x.shape[-1]), np.float32)
    one_hot = np.zeros_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
        for index, window in _windows(x.shape, pool):
            block = x[(b, *window, c)]
            first = np.unravel_index(int(np.argmax(block)), block.shape)  # np: first maximum
            pooled[(b, *index, c)] = block[first]
            one_hot[(b, *(s.start + f for s, f in zip(window, first)), c)] = 1.0
    return pooled, one_hot


@settings(max_examples=30, deadline=None)
@given(volumes(), st.booleans())
def test_pool_unpool_and_gradient_equal_the_window_reference(
    volume: tuple[np.ndarray, tuple[int, ...]], jit: bool
) -> None:
    values, pool = volume
    expected_pooled, one_hot = reference(values, pool)
    x = tf.constant(values)
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled, argmax = MaxPoolingWithArgmax(pool, jit_compile=jit)(x)
        total = tf.reduce_sum(pooled)
    np.testing.assert_array_equal(pooled, expected_pooled)
    unpooled = MaxUnpoolingWithArgmax(pool, jit_compile=jit)([pooled, argmax, x])
    np.testing.assert_array_equal(unpooled, one_hot * _spread(expected_pooled, pool, values.shape))
    np.testing.assert_array_equal(tape.gradient(total, x), one_hot)


def _spread(pooled: np.ndarray, pool: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Each pooled value copied over its whole window, cropped to ``shape``."""
    for axis, p in enumerate(pool, start=1):
        pooled = np.repeat(pooled, p, axis=axis)
    return pooled[tuple(slice(0, n) for n in shape)]
