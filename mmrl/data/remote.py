"""Shards that are not local files: ``http(s)://`` URLs, ``s3://`` URLs and ``pipe:`` commands.

Forms (in ``data.train``; brace patterns expand inside them as for local paths)
    ``pipe:CMD``      the tar is CMD's standard output (``pipe:cat /d/{00000..00003}.tar``,
                      ``pipe:aws s3 cp s3://bucket/cc3m/{00000..00331}.tar -``); CMD runs in ``sh``.
    ``http(s)://..``  fetched by mmrl itself (urllib), not by webdataset's ``curl`` pipe, whose
                      connection has no read timeout.
    ``s3://..``       read as ``pipe:aws s3 cp URL -``: the AWS CLI must be on ``PATH`` (checked when
                      such a shard is named, one line if it is not).

Never a hang
    :func:`open_shard` waits at most ``timeout`` seconds (``data.stream_timeout_s``) for each piece of
    data. A server or a command that stops sending (:class:`TimeoutError`; the command is killed), a
    connection closed before its ``Content-Length`` (:class:`ConnectionError`), or a command that
    exits non-zero (:class:`OSError`) ends the stream there, as if the file ended, and the error is
    kept in the stream's ``failure``: a reader that buffers (tarfile's stream mode) keeps every byte
    delivered before it, so the loader gets exactly the samples of a local tar cut at that byte, and
    counts ``failure`` as the shard's error (``bad_shards``). An HTTP error status or a failed
    connection raises an :class:`OSError` naming it when the shard is opened.

Sizes
    :func:`shard_home` says where a shard's ``sizes.json`` lives (next to the local file, the URL, or
    the ``s3://`` object a ``pipe:`` command reads) and :func:`read_table` reads it.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request

from webdataset.gopen import gopen as wds_open

__all__ = ["DEFAULT_TIMEOUT", "is_remote", "s3_command", "check_command", "open_shard", "shard_home", "read_table"]

DEFAULT_TIMEOUT = 60.0
_CHUNK = 1 << 16
_SHELL_WORDS = {"exec", "env", "command", "time", "nice", "cd", "set", "export", "if", "for", "while", "{", "(", "!"}


def is_remote(url: str) -> bool:
    """True for ``pipe:`` commands and URLs with a scheme other than ``file:``."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def s3_command(url: str) -> str:
    """The ``pipe:`` URL that reads ``s3://`` object ``url`` with the AWS CLI."""
    return f"pipe:aws s3 cp {shlex.quote(url)} -"


def check_command(url: str, spec: str) -> None:
    """For a ``pipe:`` shard: raise a one-line ValueError when its program is not on ``PATH`` (only a
    plain first word is checked; shell syntax and variable assignments are left to the shell)."""
    if not url.startswith("pipe:"):
        return
    try:
        words = shlex.split(url[len("pipe:"):])
    except ValueError:
        return
    if not words or "=" in words[0] or words[0] in _SHELL_WORDS or shutil.which(words[0]):
        return
    if words[0] == "aws" and "s3://" in url:
        raise ValueError(f"{spec}: s3:// shards are read with the AWS CLI (aws s3 cp URL -), but 'aws' is not "
                         f"on PATH; install it (pip install awscli) or name another pipe:COMMAND")
    raise ValueError(f"{spec}: the command of its pipe: shards, {words[0]!r}, is not on PATH")


class _HttpShard:
    """A shard over HTTP: ``read`` raises instead of blocking or ending early."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        try:
            self.response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310  (http(s) only)
        except urllib.error.HTTPError as err:
            raise OSError(f"HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise OSError(f"cannot connect ({err.reason})") from None
        except TimeoutError:
            raise TimeoutError(f"no response for {timeout:g} s (data.stream_timeout_s)") from None
        length = self.response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self.received = 0
        self.failure: Exception | None = None

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (what one socket read brings), ``b""`` at the end or after a failure."""
        if self.failure is not None or n == 0:
            return b""
        try:
            data = self.response.read1(n if n is not None and n > 0 else _CHUNK)
        except TimeoutError:
            self.failure = TimeoutError(f"no data for {self.timeout:g} s after {self.received} bytes "
                                        f"(data.stream_timeout_s)")
            return b""
        except (http.client.HTTPException, OSError) as err:
            self.failure = ConnectionError(f"connection broken after {self.received} bytes ({type(err).__name__})")
            return b""
        self.received += len(data)
        if not data and self.length is not None and self.received < self.length:
            self.failure = ConnectionError(f"connection closed after {self.received} of {self.length} bytes")
        if n is None or n < 0:  # everything
            while chunk := self.read(_CHUNK):
                data += chunk
        return data

    def close(self) -> None:
        self.response.close()

    def __repr__(self) -> str:
        return self.url


class _CommandShard:
    """A ``pipe:`` shard: the command's output, read with a timeout; its exit status checked at the end."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,  # noqa: S602
                                     stderr=self.errors, stdin=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.ended = False
        self.failure: Exception | None = None

    def _error_text(self) -> str:
        self.errors.seek(0)
        lines = [line.strip() for line in self.errors.read().decode(errors="replace").splitlines() if line.strip()]
        return f": {lines[-1]}" if lines else ""

    def _read_some(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self._kill()
            self.ended = True
            self.failure = TimeoutError(f"no output for {self.timeout:g} s from the command (data.stream_timeout_s)")
            return b""
        data = os.read(self.fd, n)
        if not data:
            self.ended = True
            try:
                status = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                self.failure = TimeoutError(f"the command did not exit {self.timeout:g} s after its output ended")
                return b""
            if status != 0:
                self.failure = OSError(f"the command exited with status {status}{self._error_text()}")
        return data

    def read(self, n: int = -1) -> bytes:
        if self.ended or n == 0:
            return b""
        if n is not None and n > 0:
            return self._read_some(n)
        parts = []
        while chunk := self._read_some(_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()

    def close(self) -> None:
        """Stop the command if it is still running (a consumer that stopped early) and reap it."""
        self.proc.stdout.close()
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self._kill()
        self.errors.close()

    def __repr__(self) -> str:
        return self.url


def open_shard(url: str, timeout: float = DEFAULT_TIMEOUT):
    """A readable binary stream of shard ``url`` (local paths and other schemes: webdataset's ``gopen``)."""
    if url.startswith(("http://", "https://")):
        return _HttpShard(url, timeout)
    if url.startswith("pipe:"):
        return _CommandShard(url, timeout)
    return wds_open(url)


def shard_home(url: str) -> tuple[str, str] | None:
    """``(folder, name)`` of a shard: its local folder, its URL's parent, or for a ``pipe:`` command
    the first ``http(s)://``/``s3://`` URL or the last existing local file it names; None if unknown."""
    if url.startswith("file:"):
        url = url[len("file:"):]
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[len("pipe:"):])
        except ValueError:
            return None
        urls = [w for w in words if w.startswith(("http://", "https://", "s3://"))]
        files = [w for w in words if os.path.isfile(w)]
        if urls:
            url = urls[0]
        elif files:
            url = files[-1]
        else:
            return None
    if "://" in url:
        folder, _, name = url.split("?", 1)[0].rpartition("/")
        return (folder, name) if folder and name else None
    path = os.path.abspath(url)
    return os.path.dirname(path), os.path.basename(path)


def read_table(folder: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """``sizes.json`` of ``folder`` (a local folder, an ``http(s)://`` or ``s3://`` prefix); raises an
    OSError or ValueError whose message names the file and what went wrong."""
    where = f"{folder}/sizes.json"
    try:
        if folder.startswith(("http://", "https://")):
            with contextlib.closing(_HttpShard(where, timeout)) as fh:
                raw = fh.read()
                if fh.failure is not None:
                    raise fh.failure
        elif folder.startswith("s3://"):
            if not shutil.which("aws"):
                raise OSError("the AWS CLI ('aws') is not on PATH")
            proc = subprocess.run(["aws", "s3", "cp", where, "-"], capture_output=True, timeout=timeout)
            if proc.returncode:
                lines = proc.stderr.decode(errors="replace").strip().splitlines()
                raise OSError(f"aws s3 cp exited with status {proc.returncode}" + (f": {lines[-1]}" if lines else ""))
            raw = proc.stdout
        else:
            where = os.path.join(folder, "sizes.json")
            with open(where, "rb") as fh:
                raw = fh.read()
        table = json.loads(raw)
    except subprocess.TimeoutExpired:
        raise OSError(f"{where}: no answer in {timeout:g} s (data.stream_timeout_s)") from None
    except FileNotFoundError:
        raise OSError(f"{where}: no such file") from None
    except OSError as err:
        raise OSError(f"{where}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object {{shard name: sample count}}")
    return table
