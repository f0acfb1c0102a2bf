"""One writer per run folder: ``OUTPUT/.mmrl.lock``.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds ``{"pid", "host", "started"}``
as JSON; the process also holds a kernel lock on it, which is released however the process ends.
It is a POSIX record lock (``fcntl.lockf``) rather than ``flock``: forked children (data loader
workers) do not inherit it, so workers outliving a killed run do not keep its folder locked.
A second run on the folder finds the file locked and refuses with
:class:`RunFolderInUse` (a ``ValueError``: ``mmrl train`` prints it as one line and exits 2)
before touching anything else there. A lock file left by a killed run -- not locked, and naming a
process of this host that no longer exists -- is taken over. A lock file naming a process of
another host (or a live process that does not hold the lock) is not: remove it by hand if that run
is gone. Multi-rank runs take the lock on the main rank only.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderInUse", "RunLock", "pid_alive"]

LOCK_NAME = ".mmrl.lock"


class RunFolderInUse(ValueError):
    pass


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


class RunLock:
    """``with RunLock(output_dir) as lock: ...`` (or :meth:`acquire` / :meth:`release`).
    ``lock.took_over`` is a line describing a stale lock that was taken over, else None."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.took_over: str | None = None

    # ------------------------------------------------------------------------------------
    def _holder(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _describe(self, holder: dict) -> str:
        if not holder:
            return "another mmrl train"
        return (f"another mmrl train (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                f"started {holder.get('started', '?')})")

    def _in_use(self, holder: dict, hint: str = "wait for it or pick another output_dir") -> RunFolderInUse:
        return RunFolderInUse(f"{self.folder} is in use by {self._describe(holder)}; {hint}")

    def _write(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(fd)

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released meanwhile: try to create it again
                    continue
                created = False
            else:
                created = True
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            try:  # the file we hold may have been removed (released) after we opened it: start over
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            if not created:
                holder = self._holder(fd)
                same_host = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                if holder and not (same_host and isinstance(pid, int) and not pid_alive(pid)):
                    os.close(fd)
                    raise self._in_use(holder, f"wait for it or pick another output_dir (remove {self.path} "
                                               "if that run is gone)")
                self.took_over = (f"{self.path}: taking over the stale lock of {self._describe(holder)}, "
                                  "which is no longer running")
            self._write(fd)
            self.fd = fd
            return self
        raise RunFolderInUse(f"{self.folder}: could not take {self.path} (other runs keep taking it)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.path.is_file() and os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # also releases the kernel lock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
