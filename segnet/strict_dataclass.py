"""Strict conversion between plain YAML data and frozen dataclass trees.

Every problem is collected with its full dotted path (``model.unet3d.filterz: unknown key (did
you mean 'filters'?)``) so that one run of the parser reports all mistakes in a file, not just
the first. Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``X | None``, ``tuple[T, ...]``, fixed-length ``tuple[A, B, C]`` and nested dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class _Problems:
    """Collects ``path: message`` strings while walking a tree.

    Attributes:
        rules: whether the classes' cross-field ``validate()`` rules run too.
    """

    def __init__(self, rules: bool = True) -> None:
        self.items: list[str] = []
        self.rules = rules

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or the list of choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(choices)})" if choices else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], _type_name(args[0]) + ' values')}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()


def _convert(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    """Converts ``value`` to ``tp`` or records a problem and returns ``_MISSING``."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML reads `2` as int; Literal[2, 4] must accept it but not True (bool is an int).
        if (
            not isinstance(value, bool)
            and value in allowed
            and type(value) in {type(a) for a in allowed}
        ):
            return value
        hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
        problems.add(
            path,
            f"must be one of {', '.join(repr(a) for a in allowed)}, got {_describe(value)}{hint}",
        )
        return _MISSING
    if origin is tuple:
        return _convert_tuple(value, tp, path, problems)
    return _convert_scalar(value, tp, path, problems)


def _convert_union(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        trial = _Problems()
        converted = _convert(value, arg, path, trial)
        if not trial.items:
            return converted
    real = [a for a in args if a is not type(None)]
    # `X | None`, or the one member of the value's kind (a list or a scalar): the problem with
    # that member is the useful message (`must be one of 1, 2, 4, got 3`).
    same_kind = [a for a in real if _is_list_type(a) == isinstance(value, list | tuple)]
    if len(real) == 1 or (len(same_kind) == 1 and not _is_plain_scalar(same_kind[0])):
        return _convert(value, (same_kind or real)[0], path, problems)
    # A plain scalar member (`true/false`) alone would hide the list form the key also takes.
    problems.add(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    return _MISSING


def _is_plain_scalar(tp: Any) -> bool:
    return tp in _PLURAL


def _is_list_type(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _convert_tuple(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple):
        problems.add(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        return _MISSING
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    else:
        item_types = list(args)
        if len(value) != len(args):
            problems.add(path, f"expected {_type_name(tp)}, got {len(value)} values")
            return _MISSING
    items = [
        _convert(v, t, _join(path, i), problems) for i, (v, t) in enumerate(zip(value, item_types))
    ]
    return _MISSING if any(i is _MISSING for i in items) else tuple(items)


def _convert_scalar(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # YAML's .nan/.inf are floats, and an integer too big for a float overflows: no
            # setting means either, and a NaN slips through every `x <= 0`-style rule.
            with contextlib.suppress(OverflowError):
                if math.isfinite(number := float(value)):
                    return number
            problems.add(path, f"expected a finite number, got {_describe(value)}")
            return _MISSING
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported field type {tp!r} at {path}")
    problems.add(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    return _MISSING


def _build(cls: type[T], data: Any, path: str, problems: _Problems) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.add(path, f"expected a mapping of settings, got {_describe(data)}")
        return _MISSING
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    problems_before = len(problems.items)
    failed: set[str] = set()
    for key, value in data.items():
        key_path = _join(path, str(key))
        if not isinstance(key, str) or key not in fields:
            problems.add(key_path, "unknown key" + suggest(str(key), fields))
            continue
        converted = _convert(value, hints[key], key_path, problems)
        if converted is _MISSING:
            failed.add(key)
        else:
            kwargs[key] = converted
    try:
        instance = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - required fields are a schema choice
        problems.add(path, str(exc))
        return _MISSING
    _check_rules(instance, path, problems, failed, clean=len(problems.items) == problems_before)
    return instance


def _check_rules(
    instance: Any, path: str, problems: _Problems, failed: set[str], clean: bool
) -> None:
    """Runs the class's cross-field ``validate()`` and records what it finds.

    When some fields failed to parse they hold their defaults, so rules that mention them would
    only add noise: those are dropped, and a rule tripping over a half-built tree is ignored
    (the problems already recorded are what the user must fix first).
    """
    validate = getattr(instance, "validate", None)
    if validate is None or not problems.rules:
        return
    try:
        found = validate()
    except Exception:
        if clean:
            raise
        return
    for rel_path, message in found:
        if not clean and rel_path.split(".")[0].split("[")[0] in failed:
            continue
        problems.add(_join(path, rel_path) if rel_path else path, message)


def from_dict(cls: type[T], data: Any, rules: bool = True) -> tuple[T | None, list[str]]:
    """Builds ``cls`` from plain data; returns ``(instance or None, problems)``.

    Args:
        cls: the dataclass.
        data: plain YAML data.
        rules: also apply the cross-field ``validate()`` rules (False: types and keys only).
    """
    problems = _Problems(rules)
    instance = _build(cls, data, "", problems)
    if problems.items or instance is _MISSING:
        return None, problems.items
    return instance, []


def to_dict(instance: Any) -> Any:
    """Plain YAML-ready data for a dataclass tree (tuples become lists)."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, tuple | list):
        return [to_dict(v) for v in instance]
    return instance


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets ``a.b.c = value`` inside nested dicts, creating the intermediate mappings."""
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value
