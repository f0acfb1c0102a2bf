"""Stream stages of the training loader: shards -> raw samples -> shuffled raw samples.

Everything here runs inside one data-loading worker (or in the main process when
``workers=0``) and is a plain generator, so the stages compose by nesting calls.

Shard sources
    :func:`epoch_shards` -- this worker's share of one epoch: every shard of every source,
    shuffled identically on all ranks (seeded by ``(seed, epoch)``), split by rank and then
    by worker. When the worker's share runs out before the epoch's batch count is reached it
    starts another pass over the same shards in a new order (open_clip's "wrap").

    :func:`resampled_shards` -- an endless weighted draw with replacement, seeded by
    ``(seed, rank, stream, segment)``.

Tar -> samples (:func:`shard_samples`)
    webdataset 1.x's ``tar_file_expander`` ends every shard with an end-of-shard marker (an
    empty dict, ``eof_value={}``) that 0.2.x-style grouping code (open_clip's
    ``group_by_keys_nothrow``) reads as a file and crashes on with ``KeyError: 'fname'``.
    Here each shard is expanded on its own with ``eof_value=None`` and grouped by our own
    code, so a sample can never span two shards and no marker reaches the grouping. Opening
    and reading errors go to a webdataset handler (:class:`ShardErrorHandler`) that counts
    the shard as bad and continues: a truncated or corrupt tar yields the samples before the
    damage and is never fatal.

Shuffle (:func:`shuffle_samples`)
    A sample shuffle buffer on raw (undecoded) samples, seeded explicitly.

Groups (:func:`group_samples`)
    Optionally, after the shuffle: samples naming the same group in their JSON (e.g. the
    ``concept`` of an emoji drawn in several styles) are held back until ``size`` of them
    have arrived and then emitted together, so a batch holds whole groups -- the positives of
    the grouped contrastive loss (:mod:`mmrl.train.group_loss`). Nothing is dropped: samples
    without a group pass straight through, and when more than ``max_pending`` groups wait the
    oldest is emitted incomplete (also at the end of the stream).

Counters and fail-fast (:class:`StreamStats`)
    Counts skipped samples by reason and bad shards, and raises :class:`LoaderStallError`
    naming the shards when ``max_consecutive_bad_samples`` samples in a row were unusable or
    ``max_consecutive_bad_shards`` shards in a row yielded no sample at all -- a stream of
    bad data fails within a bounded amount of work instead of hanging the trainer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence

from webdataset.tariterators import base_plus_ext, tar_file_expander

from .remote import DEFAULT_TIMEOUT, open_shard
from .shard_files import shard_problem

__all__ = [
    "LoaderStallError", "one_line_stalls", "StreamStats", "ShardErrorHandler", "derive_seed", "epoch_passes",
    "resampled_shards", "shard_samples", "stream_samples", "shuffle_samples", "sample_json", "sample_group",
    "group_samples", "group_id",
    "SAMPLE_SKIP_REASONS",
]


_LOGGED_SHARD_ERRORS = 3  # per worker; the rest are counted


def _short_error(exn: BaseException) -> str:
    """``Type: first line`` of an exception (webdataset appends the shard URL to its arguments, and
    `` @ <the stream>`` to the first of them)."""
    if isinstance(exn, OSError) and exn.strerror:
        text = exn.strerror
    else:
        text = str(exn.args[0]).split(" @ ")[0] if getattr(exn, "args", None) else str(exn)
    return f"{type(exn).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}".rstrip(": ")


# why a sample was skipped (counted per sample); "bad_shards" counts shards, not samples
SAMPLE_SKIP_REASONS = ("no_image", "no_caption", "bad_image")


class LoaderStallError(ValueError):
    """The stream produced no usable sample for too long (bad data, wrong keys, missing files)."""


def one_line_stalls(batches: Iterable) -> Iterator:
    """``batches``, a worker's :class:`LoaderStallError` re-raised with its own one-line message (the
    DataLoader wraps it in the worker's traceback)."""
    try:
        yield from batches
    except LoaderStallError as err:
        lines = str(err).strip().splitlines()
        mark = f"{LoaderStallError.__module__}.{LoaderStallError.__name__}: "
        own = [line[len(mark):] for line in lines if line.startswith(mark)]
        if not own or len(lines) == 1:
            raise
        raise LoaderStallError(own[-1]) from None


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and runs,
    unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamStats:
    """Per-worker counters plus the fail-fast guard.

    ``counts`` accumulates since the previous :meth:`take_delta`; the batch builder attaches
    that delta to each batch so counts survive the worker -> main-process hop. The first few shard
    errors travel the same way (:meth:`take_notes`) and are shown by the main process when their
    batch arrives, so a stream that stalls shows one line, its :class:`LoaderStallError`.
    """

    def __init__(self, max_consecutive_bad_samples: int, max_consecutive_bad_shards: int):
        self.max_bad_samples = max(1, int(max_consecutive_bad_samples))
        self.max_bad_shards = max(1, int(max_consecutive_bad_shards))
        self.counts: Counter = Counter()
        self.bad_sample_run = 0
        self.bad_shard_run = 0
        self.run_shards: deque = deque(maxlen=6)  # shards involved in the current bad run
        self.run_reasons: Counter = Counter()
        self.last_error = ""
        self.logged_errors = 0
        self.notes: list[str] = []

    # -- samples ---------------------------------------------------------------------------
    def skip(self, reason: str, url: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.bad_sample_run += 1
        self.run_reasons[reason] += 1
        if detail:
            self.last_error = f"{reason}: {detail}"
        if url not in self.run_shards:
            self.run_shards.append(url)
        if self.bad_sample_run >= self.max_bad_samples:
            raise LoaderStallError(
                f"{self.bad_sample_run} consecutive samples were unusable "
                f"(max_consecutive_bad_samples={self.max_bad_samples}; {dict(self.run_reasons)}) "
                f"in shards {list(self.run_shards)}"
                + (f"; last error: {self.last_error}" if self.last_error else "")
                + ". Check that the shards hold <key>.jpg/.png/.webp images with <key>.txt captions.")

    def good(self) -> None:
        if self.bad_sample_run:
            self.bad_sample_run = 0
            self.run_reasons.clear()
            self.run_shards.clear()

    # -- shards ----------------------------------------------------------------------------
    def shard_error(self, url: str, exn: BaseException) -> None:
        self.last_error = f"{url}: {_short_error(exn)}"
        if self.logged_errors < _LOGGED_SHARD_ERRORS:
            self.logged_errors += 1
            more = "; further shard errors of this worker are counted (bad_shards), not shown" \
                if self.logged_errors == _LOGGED_SHARD_ERRORS else ""
            self.notes.append(f"skipping the rest of shard {url}: {_short_error(exn)}{more}")

    def shard_done(self, url: str, n_samples: int, failed: bool) -> None:
        if failed or n_samples == 0:
            self.counts["bad_shards"] += 1
        if n_samples:
            self.bad_shard_run = 0
            return
        self.bad_shard_run += 1
        if url not in self.run_shards:
            self.run_shards.append(url)
        if self.bad_shard_run >= self.max_bad_shards:
            named = ", ".join(f"{u} {shard_problem(u) or 'had no usable sample'}" for u in self.run_shards)
            raise LoaderStallError(
                f"{self.bad_shard_run} consecutive shards yielded no sample "
                f"(max_consecutive_bad_shards={self.max_bad_shards}); last shards: {named}"
                + (f"; last error: {self.last_error}" if self.last_error else ""))

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def take_delta(self) -> dict[str, int]:
        delta = {k: v for k, v in self.counts.items() if v}
        self.counts.clear()
        return delta


class ShardErrorHandler:
    """A webdataset exception handler: records the error against the current shard and tells
    webdataset to continue with the next file or shard."""

    def __init__(self, stats: StreamStats, url: str):
        self.stats, self.url, self.failed = stats, url, False
        self.stream = None  # the opened shard: a remote stream's ``failure`` is the cause of what tarfile sees

    def __call__(self, exn: BaseException) -> bool:
        if not self.failed:
            self.stats.shard_error(self.url, getattr(self.stream, "failure", None) or exn)
        self.failed = True
        return True


def _opened(url: str, timeout: float, handler: ShardErrorHandler) -> Iterator[dict]:
    """Shard ``url`` opened (:func:`mmrl.data.remote.open_shard`) as webdataset's ``{"url", "stream"}``
    dict, the stream kept as ``handler.stream``; nothing when it cannot be opened (the error goes to
    ``handler``)."""
    try:
        handler.stream = open_shard(url, timeout)
    except Exception as exn:  # any opening failure makes the shard bad, never the stream
        handler(exn)
        return
    yield {"url": url, "stream": handler.stream}


def shard_samples(url: str, stats: StreamStats, timeout: float = DEFAULT_TIMEOUT) -> Iterator[dict]:
    """Raw samples of one tar: ``{"__key__", "__url__", "<ext>": bytes, ...}``.

    Files are grouped by key (everything before the first dot of the basename, webdataset's
    ``base_plus_ext``); a repeated extension under the same key starts a new sample (as
    open_clip tolerates). Errors are counted, never raised; a remote shard's read that waits
    ``timeout`` seconds for data is one (:mod:`mmrl.data.remote`).
    """
    handler = ShardErrorHandler(stats, url)
    files = tar_file_expander(_opened(url, timeout, handler), handler=handler, eof_value=None)
    n = 0
    current: dict | None = None
    try:
        for item in files:
            fname = item.get("fname") if isinstance(item, dict) else None
            if fname is None:  # any marker or foreign item: not a file
                continue
            key, ext = base_plus_ext(fname)
            if key is None:
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"] or ext in current:
                if current is not None:
                    n += 1
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = item["data"]
    finally:  # also when the consumer stops early (the generator is closed)
        files.close()
        if handler.stream is not None:  # webdataset never closes the stream it reads
            with contextlib.suppress(Exception):  # a pipe: URL's exit status after an early stop is no error
                handler.stream.close()
    failure = getattr(handler.stream, "failure", None)
    if failure is not None:  # a remote stream that ended early where tarfile saw a clean end
        handler(failure)
    # account for the shard before handing out its last sample: a consumer that stops right
    # after it (the worker's last batch) must not lose the shard's error count
    stats.shard_done(url, n + (current is not None), handler.failed)
    if current is not None:
        yield current


def stream_samples(urls: Iterable[str], stats: StreamStats, timeout: float = DEFAULT_TIMEOUT) -> Iterator[dict]:
    """Raw samples of a sequence of shards, in order (``timeout``: :func:`shard_samples`)."""
    for url in urls:
        yield from shard_samples(url, stats, timeout)


def epoch_passes(shards: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int,
                 stream: int, num_streams: int) -> Iterator[list[str]]:
    """This stream's shards for one epoch, as an endless sequence of passes (lists of shards):
    the first pass is this stream's share of the epoch's shard order, each further pass (the
    "wrap" when the share runs short of the epoch's batch count) reshuffles the same share."""
    order = list(shards)
    random.Random(derive_seed(seed, "epoch-shards", epoch)).shuffle(order)  # same on all ranks
    mine = order[rank::world_size][stream::num_streams]
    if not mine:
        raise ValueError(f"no shard for rank {rank} stream {stream}: {len(shards)} shards")
    n_pass = 0
    while True:
        yield list(mine)
        n_pass += 1
        mine = list(mine)
        random.Random(derive_seed(seed, "epoch-pass", epoch, rank, stream, n_pass)).shuffle(mine)


def resampled_shards(shards: Sequence[str], weights: Sequence[float] | None, *, seed: int, rank: int,
                     stream: int, segment: int) -> Iterator[str]:
    """Endless draw of shards with replacement, ``P(shard) ~ weights``."""
    rng = random.Random(derive_seed(seed, "resampled-shards", rank, stream, segment))
    shards = list(shards)
    if weights is None:
        while True:
            yield rng.choice(shards)
    cum: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    while True:
        # draw in chunks: one bisect per shard, no per-draw list building
        yield from rng.choices(shards, cum_weights=cum, k=64)


def shuffle_samples(samples: Iterable[dict], bufsize: int, initial: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer: fills to ``initial``, then grows to ``bufsize`` while emitting one random
    sample for every two read; at the end the remainder comes out in random order."""
    if bufsize <= 1:
        yield from samples
        return
    initial = max(1, min(initial, bufsize))
    buf: list[dict] = []
    emitted = 0
    for sample in samples:
        buf.append(sample)
        if len(buf) > min(bufsize, initial + emitted):
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            emitted += 1
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def sample_json(sample: dict) -> dict:
    """The sample's parsed JSON object ({} when it has none or it is unreadable or not an
    object), parsed once and cached in the sample as ``__json__``."""
    if "__json__" not in sample:
        parsed = {}
        raw = sample.get("json")
        if raw is not None:
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                parsed = {}
        sample["__json__"] = parsed if isinstance(parsed, dict) else {}
    return sample["__json__"]


def sample_group(sample: dict, key: str) -> str | None:
    """The sample's group: field ``key`` of its JSON (a non-empty string or an integer), or None."""
    value = sample_json(sample).get(key)
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
        return str(value)
    return None


def group_id(name: str) -> int:
    """A stable non-negative 63-bit id for a group name (the same on every rank, worker and run)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def group_samples(samples: Iterable[dict], key: str, size: int, max_pending: int = 4096) -> Iterator[dict]:
    """Emit samples of the same group (:func:`sample_group`) together, ``size`` at a time."""
    if size <= 1:
        yield from samples
        return
    pending: dict[str, list[dict]] = {}  # insertion order = age
    for sample in samples:
        group = sample_group(sample, key)
        if group is None:
            yield sample
            continue
        members = pending.setdefault(group, [])
        members.append(sample)
        if len(members) >= size:
            del pending[group]
            yield from members
        elif len(pending) > max_pending:
            oldest = next(iter(pending))
            yield from pending.pop(oldest)
    for members in pending.values():
        yield from members
