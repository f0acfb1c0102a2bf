"""Progress that reads well both in a terminal and in a log file.

``progress(...)`` is the one factory for every progress bar in mmrl. Where the stream is a
terminal it returns a ``tqdm`` bar; anywhere else (CI logs, SLURM output files, a pipe) it returns
a :class:`LineProgress` that writes **one plain line per interval** and no carriage returns::

    train: 120/2000 step (6.0%) | 4.00 step/s | elapsed 0:30 | ETA 7:50 | loss=0.1234, samples/s=256.0

(count/total and percent, the average rate since the bar was created -- ``s/unit`` below one item
per second --, elapsed time, ETA when the total is known, then the postfix).

The interval is ``interval`` seconds, else ``$MMRL_PROGRESS_INTERVAL``, else 30 s. The first line
is written only once an interval has elapsed, and ``close()`` writes a final line only for a bar
that lasted at least one interval: a bar that finishes within its first interval writes nothing,
so short runs (and tests) stay quiet. Lines are written on ``update()`` calls (at most one per
interval; none once the total is reached, which is the final line's) and flushed.
``enabled=False`` writes nothing in either mode (the returned object still counts, so callers
need no special case).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TextIO, TypeVar

__all__ = ["ENV_INTERVAL", "DEFAULT_INTERVAL", "ProgressBar", "LineProgress", "progress", "default_interval",
           "format_duration", "format_rate"]

ENV_INTERVAL = "MMRL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

T = TypeVar("T")


class ProgressBar(Protocol):
    """What callers may use of a bar (``tqdm`` and :class:`LineProgress` both provide it)."""

    n: float

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def write(self, s: str, file: TextIO | None = None, end: str = "\n") -> None: ...

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


def default_interval() -> float:
    """``$MMRL_PROGRESS_INTERVAL`` (seconds, > 0) or :data:`DEFAULT_INTERVAL`."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: expected a positive number of seconds")
    return value


def format_duration(seconds: float) -> str:
    """``M:SS`` below an hour, else ``H:MM:SS`` (rounded down to whole seconds)."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(rate: float, unit: str) -> str:
    """``12.3 img/s``; below one item per second ``4.00 s/img`` (the time per item)."""
    if rate <= 0:
        return f"0 {unit}/s"
    if rate < 1:
        return f"{1 / rate:.2f} s/{unit}"
    return f"{rate:.0f} {unit}/s" if rate >= 100 else f"{rate:.1f} {unit}/s" if rate >= 10 else f"{rate:.2f} {unit}/s"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _postfix_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LineProgress:
    """A progress bar for a stream that is not a terminal: plain lines, one per ``interval``.

    ``stream=None`` writes nothing (``enabled=False``). ``clock`` returns seconds (default
    ``time.monotonic``); tests pass a fake one. The rate is the average since the bar was
    created (items counted from ``initial``); the ETA is ``(total - n) / rate``."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", initial: float = 0, interval: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.unit = unit
        self.n: float = initial
        self.initial = initial
        self.interval = default_interval() if interval is None else float(interval)
        self.stream = stream
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.last_print = self.start
        self.lines = 0
        self.postfix = ""
        self.closed = False

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar wraps no iterable: call update(n)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more items; writes a line when ``interval`` has elapsed since the last one
        (not once the total is reached: that state is the final line, written by ``close``)."""
        self.n += n
        if self.stream is None or self.closed or (self.total and self.n >= self.total):
            return
        now = self.clock()
        if now - self.last_print >= self.interval:
            self._emit(now, final=False)

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """``key=value`` pairs shown at the end of each line (``refresh`` is accepted for tqdm's
        signature; a line is written only by ``update``)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_postfix_value(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str, file: TextIO | None = None, end: str = "\n") -> None:
        """A message line (to ``file``, default stdout, like ``tqdm.write``)."""
        out = file if file is not None else sys.stdout
        out.write(s + end)
        out.flush()

    def format_line(self, now: float, final: bool = False) -> str:
        """The line for the state at time ``now`` (the final line has no ETA once the total is reached)."""
        elapsed = max(0.0, now - self.start)
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = []
        if self.total:
            pct = 100.0 * self.n / self.total
            parts.append(f"{_count(self.n)}/{_count(self.total)} {self.unit} ({pct:.1f}%)")
        else:
            parts.append(f"{_count(self.n)} {self.unit}")
        parts.append(format_rate(rate, self.unit))
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and not (final and self.n >= self.total):
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}" if rate > 0 else "ETA ?")
        if self.postfix:
            parts.append(self.postfix)
        head = f"{self.desc}: " if self.desc else ""
        return head + " | ".join(parts)

    def _emit(self, now: float, final: bool) -> None:
        assert self.stream is not None
        self.stream.write(self.format_line(now, final) + "\n")
        self.stream.flush()
        self.last_print = now
        self.lines += 1

    def close(self) -> None:
        """Writes the final line if the bar lasted at least one interval; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.stream is None:
            return
        now = self.clock()
        if self.lines or now - self.start >= self.interval:
            self._emit(now, final=True)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: float | None = None, unit: str = "it",
             initial: float = 0, enabled: bool = True, interval: float | None = None, stream: TextIO | None = None,
             clock: Callable[[], float] | None = None, leave: bool = True, **tqdm_kwargs: Any) -> ProgressBar:
    """A progress bar over ``iterable`` (iterate it) or counted by hand (``update(n)``).

    ``stream`` (default ``sys.stderr`` at call time) decides the mode: a terminal gets a ``tqdm``
    bar (``leave`` and ``tqdm_kwargs`` are passed on), anything else a :class:`LineProgress`
    writing a line every ``interval`` seconds (default ``$MMRL_PROGRESS_INTERVAL`` or 30 s).
    ``enabled=False``: a silent :class:`LineProgress` that still counts. Use it as a context
    manager or call ``close()`` (iterating to the end closes it too)."""
    out = sys.stderr if stream is None else stream
    if enabled and _is_terminal(out):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc or None, total=total, unit=unit, initial=initial, file=out, leave=leave,
                    **tqdm_kwargs)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, interval=interval,
                        stream=out if enabled else None, clock=clock)
