"""``mmrl eval TASK`` flags derived from the task's options dataclass (:mod:`mmrl.evaluation.options`).

One flag per field: ``--val-proportion`` for ``val_proportion``, ``--no-eccv`` for a bool that
defaults to true (``--x`` for one that defaults to false), several values for a list field
(``--recall-k 1 5 10``). The values are read as YAML scalars (text fields as given) and built with
:func:`mmrl.config.from_dict` and the dataclass's own checks -- what a suite entry goes through --
so a bad value is the suite's one-line error, naming the flag instead of the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, Union

__all__ = ["add_task_flags", "task_options"]

_DEST = "task_option_"  # argparse dest prefix: options never collide with the model/run flags
_SUITE_NOTE = {False: "; a flag only (a suite's paths are relative to its root)",
               "root": "; in a suite: the suite's root"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _takes_text(tp: Any) -> bool:
    """Whether a value of type ``tp`` may be text (then a flag's value is kept as typed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(tp))
    return tp is str or tp is Any


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def add_task_flags(parser: argparse.ArgumentParser, task) -> None:
    """Add one flag per field of ``task.options`` to ``parser`` (a group titled by the task)."""
    from ..evaluation.options import flag_of

    hints = typing.get_type_hints(task.options)
    group = parser.add_argument_group(f"{task.name} options (suite entry keys: the same names, '_' for '-')")
    for f in dataclasses.fields(task.options):
        meta, default = f.metadata, _default(f)
        help_text = meta.get("help", "") + _SUITE_NOTE.get(meta.get("suite", True), "")
        kwargs: dict[str, Any] = {"dest": _DEST + f.name, "default": None}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["help"] = f"turn off {help_text}" if default else help_text
        else:
            choices = meta.get("choices")
            kwargs["metavar"] = meta.get("metavar") or ("{" + ",".join(choices) + "}" if choices and len(choices) <= 8
                                                        else f.name.upper())
            if _is_list(hints[f.name]):
                kwargs["nargs"] = "+"
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            kwargs["help"] = help_text + (f" (default {shown})" if shown is not None else "")
        group.add_argument(flag_of(f), **kwargs)


def _scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _name_flags(message: str, cls: type) -> str:
    """A ConfigError message with the option names of its key part (before ': ') as flags."""
    from ..evaluation.options import flag_of

    flags = {f.name: flag_of(f) for f in dataclasses.fields(cls)}
    head, sep, tail = message.partition(": ")

    def flag(m: re.Match) -> str:
        return flags.get(m[1], m[0])

    return re.sub(r"(?:config keys? )?'(\w+)(?:\[\d+\])?'", flag, head) + sep + tail


def task_options(task, args: argparse.Namespace) -> Any:
    """``task.options`` from the parsed flags (a ValueError names the flag of a bad value)."""
    from ..config import ConfigError, from_dict

    hints = typing.get_type_hints(task.options)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(task.options):
        raw = getattr(args, _DEST + f.name, None)
        if raw is None:
            continue
        if isinstance(raw, bool) or _takes_text(hints[f.name]):
            values[f.name] = raw
        else:
            values[f.name] = [_scalar(r) for r in raw] if isinstance(raw, list) else _scalar(raw)
    try:
        return from_dict(task.options, values)
    except ConfigError as err:
        raise ConfigError(_name_flags(str(err), task.options)) from None
