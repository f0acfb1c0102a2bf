"""Atomic file writes: write a temporary file next to the target, then rename it over it.

A reader never sees a half-written file, and a crash leaves at most a temporary
``.NAME.tmp-*`` file (which the shard builder, for one, cleans up on its next run).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_MARK", "temp_path", "atomic_write", "atomic_write_bytes", "atomic_write_text"]

TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """A unique temporary name in ``path``'s folder (hidden, marked with :data:`TMP_MARK`)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``; the temporary
    file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
