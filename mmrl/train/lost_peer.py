"""A rank that dies or stops answering ends the job with one line, never a hang.

Every collective runs under the process group's timeout (``dist_timeout_s``, set when the group is
created: :func:`mmrl.train.distributed.init_distributed`). When a peer's process ends, gloo reports it
at the next collective, usually at once ("Connection reset by peer [ADDR]:PORT" / "Connection closed
by peer"); a peer that hangs, or a network that fails, is reported when the timeout expires
("Timed out waiting Nms for recv operation"). :func:`watch_peers` turns those errors into
:class:`LostPeer` (``mmrl train`` prints it as one line and exits :data:`LOST_PEER`), naming the lost
rank from what every rank told the others at start (:class:`Peers`: host and pid): a peer on this
host whose process is gone, the only other rank of a two-rank job, or the ranks on the host of the
address gloo names. The line also says what the run was doing (``what()``) -- the optimizer step,
a checkpoint save, ... -- and at which step. On nccl, torch's watchdog enforces the timeout: it
ends the process itself (``TORCH_NCCL_ASYNC_ERROR_HANDLING``) unless ``TORCH_NCCL_BLOCKING_WAIT=1``
makes the collective raise, which is then reported here like gloo's errors.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .run_lock import pid_alive

__all__ = ["LOST_PEER", "LostPeer", "Peers", "is_peer_failure", "watch_peers"]

LOST_PEER = 4  # exit status of a run that lost contact with another rank

# gloo (tcp transport) and nccl (with blocking wait) errors that mean a peer is gone or silent
_CLOSED = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|Connection refused|ncclRemoteError|"
                     r"remote process exited", re.IGNORECASE)
_TIMEOUT = re.compile(r"Timed out waiting \d+ ?ms|Watchdog caught collective operation timeout|Socket Timeout",
                      re.IGNORECASE)
_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


class LostPeer(RuntimeError):
    """Another rank of the job died or stopped answering (one line: which rank, during what, at which step)."""


@dataclass(frozen=True)
class Peers:
    """Every rank's host, pid and addresses, exchanged once at start (one ``all_gather_object``)."""

    rank: int
    hosts: tuple[str, ...]
    pids: tuple[int, ...]
    addresses: tuple[frozenset[str], ...]

    @classmethod
    def gather(cls, rank: int, world_size: int) -> Peers:
        host = socket.gethostname()
        mine = (host, os.getpid(), sorted(_addresses(host)))
        every = [mine]
        if world_size > 1 and dist.is_initialized():
            every = [None] * world_size
            dist.all_gather_object(every, mine)
        return cls(rank, tuple(h for h, _, _ in every), tuple(p for _, p, _ in every),
                   tuple(frozenset(a) for _, _, a in every))

    def lost(self, message: str) -> tuple[list[int], str]:
        """The ranks ``message`` (a backend error) points at, and how they were found."""
        others = [r for r in range(len(self.hosts)) if r != self.rank]
        here = socket.gethostname()
        dead = [r for r in others if self.hosts[r] == here and _ended(self.pids[r])]
        if dead:
            return dead, "its process ended" if len(dead) == 1 else "their processes ended"
        if len(others) == 1:
            return others, "its process ended, hangs, or the network failed"
        found = _ADDRESS.search(message)
        if found:
            address = found.group(1)
            local = address.startswith("127.") or address == "::1"
            on_host = [r for r in others if (self.hosts[r] == here if local else address in self.addresses[r])]
            if on_host:
                return on_host, f"the peer at {address} (host {self.hosts[on_host[0]]}) is gone or silent"
        return [], "a peer ended, hangs, or the network failed"


def _ended(pid: int) -> bool:
    """Whether process ``pid`` of this host has ended (gone, or a zombie its parent has not reaped yet)."""
    if not pid_alive(pid):
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _addresses(host: str) -> set[str]:
    found = {"127.0.0.1"}
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        pass
    return found


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because a peer is gone or silent."""
    if not isinstance(err, RuntimeError) or isinstance(err, LostPeer):
        return False
    text = str(err)
    return bool(_CLOSED.search(text) or _TIMEOUT.search(text))


def _backend_reason(text: str) -> str:
    """The backend's own words, one line: gloo's source location and its generic advice dropped."""
    line = " ".join(text.split())
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)
    return line.split(". This is typically")[0].rstrip(". ")[:200]


def describe(err: BaseException, peers: Peers | None, what: str, timeout_s: float) -> str:
    """The one line of :class:`LostPeer` for backend error ``err``."""
    text = str(err)
    ranks, how = peers.lost(text) if peers is not None else ([], "a peer ended, hangs, or the network failed")
    who = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}") if ranks else "a peer rank"
    timed_out = bool(_TIMEOUT.search(text)) and not _CLOSED.search(text)
    event = f"no answer from {who} within dist_timeout_s={timeout_s:g}" if timed_out else f"lost contact with {who}"
    return (f"{event} ({how}) during {what}; backend: {_backend_reason(text)}; "
            f"restart the job with resume=auto to continue from the last complete checkpoint")


@contextmanager
def watch_peers(peers: Callable[[], Peers | None], what: Callable[[], str], timeout_s: float) -> Iterator[None]:
    """Re-raise a peer failure inside the block as :class:`LostPeer` (``peers()`` and ``what()`` read then)."""
    try:
        yield
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        raise LostPeer(describe(err, peers(), what(), timeout_s)) from None
