"""Local shard files checked for what a person can fix: missing, empty, a folder, or not a tar.

Cheap by design (a cluster's shard lists run to 10^5 files on a shared filesystem): the loader
probes the first shard of each source at start (one ``stat`` and one 512-byte read) and looks at
every shard of a source only when that probe finds a problem or the epoch length cannot be known.
A source none of whose shards is usable (a mistyped path, a wrong file) is an error, one line; one
with some bad shards is a one-line warning, and the loader skips and counts them as it goes.
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Sequence

from .remote import is_remote

log = logging.getLogger(__name__)

__all__ = ["ShardFileError", "shard_problem", "check_shards"]

# compressed tars webdataset opens: gzip, bzip2, xz, zstd
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_LISTED = 3


class ShardFileError(ValueError):
    """A shard named in the training data is missing or is not a readable tar file."""


def _local(url: str) -> str | None:
    path = url[len("file:"):] if url.startswith("file:") else url
    return None if is_remote(path) else path


def shard_problem(url: str, empty_tar: bool = True) -> str | None:
    """What is wrong with a local shard file (``None``: nothing found, or not a local file); a valid tar
    holding no file counts when ``empty_tar``."""
    path = _local(url)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if os.path.isdir(path):
        return "is a folder, not a tar file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(tarfile.BLOCKSIZE)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if head.startswith(_COMPRESSED):
        return None
    if len(head) < tarfile.BLOCKSIZE:
        return f"is not a tar file ({st.st_size} bytes, shorter than one tar header)"
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:  # the end-of-archive blocks first
        return "is an empty tar (no files)" if empty_tar else None
    except tarfile.HeaderError:
        return "is not a tar file (no tar header at its start)"
    return None


def _names(paths: Sequence[str]) -> str:
    more = len(paths) - _LISTED
    return ", ".join(paths[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def check_shards(spec: str, shards: Sequence[str], every: bool = False) -> None:
    """Look at the shards of source ``spec``: raise :class:`ShardFileError` (one line) when none is usable,
    or when ``every`` (the epoch length depends on them) and any is missing or invalid; else warn once
    about the bad ones. Probes the first shard only, unless ``every`` or the first has a problem."""
    if not shards or (not every and shard_problem(shards[0], empty_tar=False) is None):
        return
    problems = [(s, why) for s in shards if (why := shard_problem(s))]
    if not problems:
        return
    missing = [s for s, why in problems if why == "does not exist"]
    if missing:
        amount = f"none of its {len(shards)} shards exist" if len(missing) == len(shards) else \
            f"{len(missing)} of its {len(shards)} shards do not exist"
        message = f"{shards[0]}: no such shard" if len(shards) == 1 else f"{spec}: {amount} ({_names(missing)})"
    else:
        path, why = problems[0]
        more = f"; {len(problems) - 1} more of the {len(shards)} shards of {spec} too" if len(problems) > 1 else ""
        message = f"{path}: this shard {why}{more}"
    if every or len(problems) == len(shards):
        raise ShardFileError(message)
    log.warning("%s; they are skipped and counted (bad_shards)", message)
