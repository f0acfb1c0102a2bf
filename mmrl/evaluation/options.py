"""Task options: one dataclass per task whose fields are both its ``mmrl eval TASK`` flags and its
suite entry keys.

A field ``val_proportion`` is the flag ``--val-proportion`` and the suite key ``val_proportion``; a
bool field that defaults to true is the flag ``--no-x`` (suite: ``x: false``), one that defaults to
false the flag ``--x``; a list field takes several values (``--recall-k 1 5 10``; suite:
``recall_k: [1, 5, 10]``). Values from either side go through :func:`mmrl.config.from_dict` (types)
and the dataclass's :meth:`TaskOptions.validate` (choices, required fields, ranges), so a bad value
is the same one-line :class:`~mmrl.config.ConfigError` naming the suite key or, on the command
line, the flag.

Field metadata, set with :func:`option`: ``help``; ``metavar``; ``choices``; ``path`` -- ``"data"``
(in a suite relative to the suite's ``root``; on the command line as given) or ``"file"`` (in a
suite relative to the suite file); ``suite`` -- ``True`` (a suite key too), ``False`` (a flag only)
or ``"root"`` (a flag only; in a suite it is the suite's ``root``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..config import ConfigError, from_dict

__all__ = ["option", "TaskOptions", "flag_of", "suite_keys", "options_from_entry", "in_suite", "data_paths"]

T = TypeVar("T", bound="TaskOptions")


def option(default: Any = None, *, help: str, metavar: str | None = None, choices: tuple[str, ...] | None = None,
           path: str | None = None, suite: bool | str = True) -> Any:
    """A task option: a dataclass field with its help text and how a suite reads it (module docstring)."""
    if path not in (None, "data", "file") or suite not in (True, False, "root"):
        raise ValueError("option: path must be None, 'data' or 'file' and suite True, False or 'root'")
    meta = {"help": help, "metavar": metavar, "choices": choices, "path": path, "suite": suite}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TaskOptions:
    """Base of a task's options. ``needs``: the fields that must be set, as alternatives -- e.g.
    ``(("dataset",), ("train", "test"))``: ``dataset``, or ``train`` and ``test`` (not both)."""

    needs: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def validate(self) -> None:
        """Choices and :attr:`needs`; subclasses add their own checks (and call this)."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"config key {f.name!r}: expected one of {', '.join(choices)}, got {value!r}")
        if not self.needs:
            return
        alternatives = " or ".join(" + ".join(repr(k) for k in alt) for alt in self.needs)
        given = [alt for alt in self.needs if any(getattr(self, k) is not None for k in alt)]
        if len(given) > 1:
            raise ConfigError(f"config keys {alternatives}: give one of them, not several")
        if not given or any(getattr(self, k) is None for k in given[0]):
            raise ConfigError(f"missing config key {alternatives}")

    def require(self, ok: bool, key: str, expected: str) -> None:
        """Raise the one-line error for ``key`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"config key {key!r}: expected {expected}, got {getattr(self, key)!r}")


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of option field ``f`` (``--val-proportion``; ``--no-eccv`` for a
    bool that defaults to true)."""
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def suite_keys(cls: type) -> list[str]:
    """The suite entry keys of options class ``cls`` (its fields that are not flags only)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("suite", True) is True]


def options_from_entry(cls: type[T], values: dict[str, Any]) -> T:
    """Options ``cls`` from a suite entry's task keys (a ConfigError names a bad or unknown key)."""
    allowed = set(suite_keys(cls))
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} (keys of this task: {', '.join(suite_keys(cls))})")
    return from_dict(cls, values)


def in_suite(options: T, root: Path, suite_dir: Path) -> T:
    """``options`` of a suite entry with its paths resolved: ``data`` paths under the suite's
    ``root``, ``file`` paths relative to the suite file's folder (inline lists pass through), and
    the ``"root"`` option set to the suite's root."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.metadata.get("suite") == "root":
            changes[f.name] = str(root)
        elif value is None:
            continue
        elif f.metadata.get("path") == "data":
            changes[f.name] = str(root / str(value))
        elif f.metadata.get("path") == "file" and isinstance(value, str):
            p = Path(value)
            changes[f.name] = str(p if p.is_absolute() else suite_dir / p)
    return dataclasses.replace(options, **changes)


def data_paths(options: TaskOptions) -> list[str]:
    """The ``data`` path options that are set, in field order (what must exist for the task to run)."""
    return [str(getattr(options, f.name)) for f in dataclasses.fields(options)
            if f.metadata.get("path") == "data" and getattr(options, f.name) is not None]
