"""Typed, validated configs: dataclasses filled from YAML plus ``key=value`` overrides.

``load_config(TrainConfig, "configs/tiny.yaml", ["lr=1e-3", "data.train=shards/{00000..00009}.tar"])``
reads the YAML, applies the overrides (dotted keys reach nested dataclasses; values are parsed
as YAML scalars, so ``1e-3``, ``true``, ``null`` and ``[1, 2]`` mean what they look like) and
builds the dataclass, checking every key and type. Any problem is one :class:`ConfigError`
naming the key: ``config key 'data.resampled': expected bool, got 'maybe'``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .fileio import atomic_write_text

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "parse_overrides", "save_config", "merge"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(a) for a in args if a is not type(None))  # null: leave the key out
        raise ConfigError(f"config key {key!r}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp) or (Any,)
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:  # a fixed-length tuple
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r}: expected str, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``: unknown keys and bad types are errors; then
    ``__post_init__`` / ``validate()`` of the dataclass run its own checks."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known keys under {section}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:  # name the key from the top of the config
            if not prefix:
                raise
            raise ConfigError(str(err).replace("config key '", f"config key '{prefix}")
                              .replace("config keys '", f"config keys '{prefix}")) from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings merged key by key (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
