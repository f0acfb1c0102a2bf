"""Zero-shot class names and prompt templates.

Sources, in order: files given by the user (one entry a line; templates hold ``{c}``); for
ImageNet, open_clip's ``IMAGENET_CLASSNAMES`` and ``OPENAI_IMAGENET_TEMPLATES``; for the other
named datasets, the files packaged with CLIP_benchmark (``en_classnames.json``,
``en_zeroshot_classification_templates.json``); anything else falls back to the ImageNet
templates, as CLIP_benchmark does.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

__all__ = ["read_templates_file", "packaged_classnames", "packaged_templates", "resolve_templates", "check_templates"]


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    """Each template must contain ``{c}`` and format with a class name alone."""
    out = []
    for n, t in enumerate(templates):
        if not isinstance(t, str) or "{c}" not in t:
            raise ValueError(f"{where}: template {n + 1} ({t!r}) has no '{{c}}' placeholder")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{where}: template {n + 1} ({t!r}) is not a valid format string ({err})") from err
        out.append(t)
    if not out:
        raise ValueError(f"{where}: no templates")
    return out


def read_templates_file(path: str | Path) -> list[str]:
    """One template a line, ``{c}`` standing for the class name (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: templates file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return check_templates(lines, str(path))


@cache
def _clip_benchmark_json(name: str) -> tuple[dict[str, list], str]:
    try:
        from importlib.resources import files

        resource = files("clip_benchmark") / "datasets" / name
        return json.loads(resource.read_text(encoding="utf-8")), f"clip_benchmark/datasets/{name}"
    except ModuleNotFoundError as err:
        raise ValueError("the packaged class names and templates come from CLIP_benchmark: pip install clip-benchmark "
                         "(or pass --classnames / --templates files)") from err


def _imagenet() -> tuple[list[str], list[str]]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def packaged_classnames(key: str) -> tuple[list[str], str]:
    """``(class names, source)`` for ``key`` (``imagenet`` or a key of CLIP_benchmark's
    ``en_classnames.json``)."""
    if key in ("imagenet", "imagenet1k"):
        return _imagenet()[0], "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES"
    data, source = _clip_benchmark_json("en_classnames.json")
    if key not in data:
        raise ValueError(f"no packaged class names for {key!r} in {source}")
    return list(data[key]), f"{source}[{key}]"


def packaged_templates(key: str | None) -> tuple[list[str], str]:
    """``(templates, source)``: open_clip's 80 OpenAI ImageNet templates for ImageNet and for
    datasets without templates of their own, else CLIP_benchmark's for ``key``."""
    if key not in (None, "imagenet", "imagenet1k"):
        data, source = _clip_benchmark_json("en_zeroshot_classification_templates.json")
        if key in data and isinstance(data[key], list):
            return check_templates(data[key], source), f"{source}[{key}]"
    return _imagenet()[1], "open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES"


def resolve_templates(templates: None | str | Path | Sequence[str], key: str | None) -> tuple[list[str], str]:
    """Templates from a file path, an explicit list, or the packaged defaults for ``key``."""
    if templates is None:
        return packaged_templates(key)
    if isinstance(templates, (str, Path)):
        return read_templates_file(templates), str(templates)
    return check_templates(list(templates), "templates"), "inline"
