"""Atomic file writes: write a temporary file next to the target, then rename it over it.

A reader never sees a half-written file, and a crash leaves at most a temporary
``.NAME.tmp-*`` file (which the shard builder, for one, cleans up on its next run).

A write that fails because the filesystem is full (``ENOSPC``, ``EDQUOT``, or the messages
torch and safetensors turn them into) removes its temporary file and raises :class:`NoSpaceLeft`,
one line naming the file; the target, if it existed, is untouched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["TMP_MARK", "NoSpaceLeft", "is_no_space", "no_space_guard", "temp_path", "atomic_write",
           "atomic_write_files", "atomic_write_bytes", "atomic_write_text"]

TMP_MARK = ".tmp-"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# what a full disk looks like once a library has wrapped the OSError
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch writing to a path (C++ streams) loses the errno: these, on a filesystem with ~nothing free
_STREAM_TEXTS = ("unexpected pos", "iostream error", "file write failed")
_NEARLY_FULL = 1 << 20


class NoSpaceLeft(OSError):
    """A write failed because its filesystem is full; the message names where."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # crosses process pools (shard workers) intact
        return type(self), (self.strerror,)


def _free_bytes(path: str | os.PathLike | None) -> int | None:
    probe = Path(path) if path else None
    while probe is not None and not probe.exists():
        probe = probe.parent if probe.parent != probe else None
    if probe is None:
        return None
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_no_space(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full filesystem. With ``path``,
    torch's errno-less stream errors count too when ``path``'s filesystem has under 1 MiB free."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return True
        text = str(cur).lower()
        if any(t in text for t in _FULL_TEXTS):
            return True
        if path is not None and any(t in text for t in _STREAM_TEXTS):
            free = _free_bytes(path)
            if free is not None and free < _NEARLY_FULL:
                return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextlib.contextmanager
def no_space_guard(where: str, path: str | os.PathLike | None = None,
                   cleanup: Callable[[], None] | None = None, note: str = "") -> Iterator[None]:
    """Run the block; if it fails, call ``cleanup`` (any failure), and turn a full filesystem into
    :class:`NoSpaceLeft`: ``no space left on device writing WHERE`` plus ``note``."""
    try:
        yield
    except NoSpaceLeft:
        if cleanup is not None:
            cleanup()
        raise
    except BaseException as err:
        full = is_no_space(err, path)  # before cleanup frees space again
        if cleanup is not None:
            cleanup()
        if full:
            raise NoSpaceLeft(f"no space left on device writing {where}{note}") from None
        raise


def temp_path(path: Path) -> Path:
    """A unique temporary name in ``path``'s folder (hidden, marked with :data:`TMP_MARK`)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_files(writes: dict[str | os.PathLike, Callable[[str], None]]) -> list[Path]:
    """Fill a temporary file for every target (``write(tmp)``), then rename them all into place, in
    order: if any write fails, every temporary file is removed and no target changes."""
    staged: list[tuple[Path, Path]] = []

    def remove_temps() -> None:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)

    for target, write in writes.items():
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        staged.append((tmp, path))
        with no_space_guard(str(path), tmp, cleanup=remove_temps):
            write(str(tmp))
    with no_space_guard(str(staged[-1][1]) if staged else "", cleanup=remove_temps):
        for tmp, path in staged:
            os.replace(tmp, path)
    return [path for _, path in staged]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``; the temporary
    file is removed if ``write`` fails (:class:`NoSpaceLeft` when the filesystem is full)."""
    return atomic_write_files({path: write})[0]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
