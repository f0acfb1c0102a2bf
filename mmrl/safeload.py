"""Reading tensor files someone else wrote, without running their code, with one-line errors.

``.safetensors`` through safetensors; ``.pt`` / ``.bin`` through ``torch.load(weights_only=True)``
(plus any state types the caller allows). A file that needs another global (a pickle that would
call code) raises :class:`WeightsRefused`; one that cannot be read (empty, truncated, corrupt)
raises :class:`FileUnreadable`. Both name the file, in one line, without torch's advice to
retry with ``weights_only=False``.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["WeightsRefused", "FileUnreadable", "first_sentence", "load_weights_only", "load_safetensors"]


class WeightsRefused(ValueError):
    """The file needs a global that is not a tensor/state type: it is never loaded."""


class FileUnreadable(ValueError):
    """The file cannot be read (empty, truncated, corrupt)."""


def first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's first non-empty line (its type name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def _refusal(text: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)  # a global the weights-only unpickler does not allow
    if found:
        return f"it needs '{found.group(1)}'"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # e.g. "Unsupported operand 149"
    return found.group(1).strip().rstrip(".").lower() if found else "the weights-only unpickler rejects it"


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", safe: Sequence[type] = (),
                      what: str = "tensor", name: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with the ``safe`` types allowed. Errors name the file
    (``name``, default the full path) and, for a refusal, the global it needed (``what``: what is allowed)."""
    label = name if name is not None else str(path)
    try:
        with torch.serialization.safe_globals(list(safe)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "GLOBAL " not in text and "WeightsUnpickler error" not in text:
            raise FileUnreadable(f"{label}: {first_sentence(err)}") from None
        raise WeightsRefused(f"{path}: refused to load ({_refusal(text)}, not a {what} type; "
                             f"read with torch.load(weights_only=True))") from None
    except Exception as err:  # truncated zip, bad header, I/O error
        raise FileUnreadable(f"{label}: {first_sentence(err)}") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``; an empty, truncated or corrupt file is :class:`FileUnreadable`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and the OSErrors of a short read
        reason = first_sentence(err).replace("Error while deserializing header: ", "")
        size = Path(path).stat().st_size if Path(path).exists() else 0
        raise FileUnreadable(f"{path}: not a readable safetensors file ({reason}; {size:,} bytes); "
                             f"save or copy the model again") from None
