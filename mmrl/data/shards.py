"""Build webdataset shards in img2dataset's layout from :class:`ImageTextRecord` lists.

Output (the same as img2dataset's webdataset writer, so one loader reads both)::

    OUT/00000.tar          {key}.jpg  {key}.txt  {key}.json   per sample
    OUT/00000_stats.json   count, successes, failures by reason, failed samples, duration
    OUT/sizes.json         {"00000.tar": successes, ...}  (open_clip's epoch-size file)

Keys are ``{shard:05d}{index:0Nd}`` with N the digits of ``shard_size - 1`` (9 digits for the
default 10,000, like img2dataset). Record ``i`` always lands in shard ``i // shard_size`` at
index ``i % shard_size``, and tar members carry fixed metadata, so the same input and options
give byte-identical shards. A sample whose image cannot be read or decoded, or which has no
caption, is skipped and counted by reason; its key stays unused.

Each shard is written to a temporary name and renamed when complete; its stats file is
renamed last and marks completion together with a fingerprint of the shard's records (image
path, captions, source, meta), each image file's size and modification time (``os.stat``; the
pixels are not hashed, so the check stays cheap) and the options. Running the build again keeps
finished shards whose fingerprint matches and redoes the rest, so an interrupted build resumes
and a replaced or repaired image (new size or mtime) gets its shard rebuilt. ``force=True``
rebuilds every shard whatever is there.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..fileio import TMP_MARK, atomic_write_bytes, atomic_write_text, no_space_guard, temp_path
from ..progress import progress as progress_bar
from .images import ImageError, encode_image
from .records import ImageTextRecord

__all__ = ["ShardOptions", "build_shards", "write_sizes", "format_summary"]

STATS_SUFFIX = "_stats.json"
MAX_LISTED_FAILURES = 100


@dataclass(frozen=True)
class ShardOptions:
    max_size: int = 256
    shard_size: int = 10000
    quality: int = 90

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_size < 8:
            raise ValueError(f"max_size must be >= 8 pixels, got {self.max_size}")


def _file_state(image) -> list[int] | None:
    """``[size, mtime_ns]`` of an image file; ``None`` when it cannot be stat'ed (or is in-memory bytes)."""
    if not isinstance(image, (str, os.PathLike)):
        return None
    try:
        st = os.stat(image)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(records: Sequence[ImageTextRecord], options: ShardOptions) -> str:
    """Records, their image files' size and mtime, and the options: what a shard's bytes depend on."""
    h = hashlib.sha1(json.dumps(asdict(options), sort_keys=True).encode())
    for r in records:
        h.update(json.dumps([r.image, r.captions, r.source, r.meta, _file_state(r.image)],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _tick(n: int = 1) -> None:
    if _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += n


def _write_shard(task) -> dict:
    shard_id, records, options, fingerprint, out_dir, key_digits = task
    start = time.time()
    out_dir = Path(out_dir)
    name = f"{shard_id:05d}.tar"
    tmp_tar = temp_path(out_dir / name)
    reasons: Counter = Counter()
    failures: list[dict] = []
    guard = no_space_guard(f"shard {out_dir / name}", tmp_tar, cleanup=lambda: tmp_tar.unlink(missing_ok=True),
                           note="; the partial shard was removed, finished shards are kept (and reused next run)")
    with guard, tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, record in enumerate(records):
            key = f"{shard_id:05d}{index:0{key_digits}d}"
            reason, detail, encoded = None, "", None
            if not record.caption:
                reason, detail = "missing_caption", "no caption"
            else:
                try:
                    encoded = encode_image(record.image, options.max_size, options.quality)
                except ImageError as err:
                    reason, detail = err.reason, str(err)
            if reason:
                reasons[reason] += 1
                if len(failures) < MAX_LISTED_FAILURES:
                    failures.append({"key": key, "image": record.image, "reason": reason, "error": detail[:300]})
            else:
                meta = {
                    "key": key, "caption": record.caption, "source": record.source, "image_path": record.image,
                    "width": encoded.width, "height": encoded.height,
                    "original_width": encoded.original_width, "original_height": encoded.original_height,
                    "status": "success", **record.meta,
                }
                if len(record.captions) > 1:
                    meta["captions"] = record.captions
                _add_member(tar, f"{key}.jpg", encoded.data)
                _add_member(tar, f"{key}.txt", record.caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            _tick()
    os.replace(tmp_tar, out_dir / name)
    successes = len(records) - sum(reasons.values())
    stats = {
        "count": len(records), "successes": successes,
        "failed_to_read": reasons["failed_to_read"], "failed_to_decode": reasons["failed_to_decode"],
        "missing_caption": reasons["missing_caption"],
        "status_dict": {"success": successes, **reasons}, "failures": failures,
        "duration": round(time.time() - start, 3), "writer": "mmrl", "fingerprint": fingerprint,
        "options": asdict(options),
    }
    atomic_write_bytes(out_dir / f"{shard_id:05d}{STATS_SUFFIX}", json.dumps(stats, indent=1).encode())
    return {"shard": shard_id, "successes": successes, "reasons": dict(reasons)}


def _read_stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _shard_stats(out_dir: Path) -> dict[str, dict]:
    """``{tar name: stats}`` for every ``*_stats.json`` whose tar exists next to it."""
    found = {}
    for stats_path in sorted(out_dir.glob(f"*{STATS_SUFFIX}")):
        stats = _read_stats(stats_path)
        tar = stats_path.name[: -len(STATS_SUFFIX)] + ".tar"
        if stats is None or "successes" not in stats:
            raise ValueError(f"{stats_path}: unreadable or has no 'successes' field")
        if (out_dir / tar).is_file():
            found[tar] = stats
    return found


def _write_sizes(out_dir: Path, stats: dict[str, dict]) -> dict[str, int]:
    sizes = {tar: int(s["successes"]) for tar, s in stats.items()}
    atomic_write_text(out_dir / "sizes.json", json.dumps(sizes, indent=1) + "\n")
    return sizes


def write_sizes(out_dir: str | Path) -> dict[str, int]:
    """(Re)write ``sizes.json`` from the ``*_stats.json`` files next to the shards."""
    out_dir = Path(out_dir)
    return _write_sizes(out_dir, _shard_stats(out_dir))


def format_summary(summary: dict) -> str:
    failures = summary["failures"]
    skipped = sum(failures.values())
    detail = f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(failures.items()))})" if skipped else ""
    return (f"{summary['out']}: {summary['shards']} shards ({summary['reused']} reused), "
            f"{summary['samples']:,} samples written, {skipped:,} skipped{detail}")


def build_shards(
    records: Sequence[ImageTextRecord],
    out_dir: str | Path,
    *,
    max_size: int = 256,
    shard_size: int = 10000,
    workers: int | None = None,
    quality: int = 90,
    progress: bool = True,
    desc: str = "sharding",
    force: bool = False,
) -> dict:
    """Write ``records`` as shards into ``out_dir``; returns a summary dict
    ``{"out", "shards", "reused", "samples", "failures": {reason: n}}``.

    Finished shards whose fingerprint (records, image size and mtime, options) matches are reused;
    ``force`` rebuilds them all."""
    options = ShardOptions(max_size=max_size, shard_size=shard_size, quality=quality)
    options.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (the output must be a folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    for leftover in out.glob(f".*{TMP_MARK}*"):  # from an interrupted run
        leftover.unlink(missing_ok=True)
    n_shards = (len(records) + shard_size - 1) // shard_size
    for stale in out.glob(f"*{STATS_SUFFIX}"):  # our shards from an earlier, longer input
        shard_id = stale.name[: -len(STATS_SUFFIX)]
        stats = _read_stats(stale)
        if shard_id.isdigit() and int(shard_id) >= n_shards and stats and stats.get("writer") == "mmrl":
            (out / f"{shard_id}.tar").unlink(missing_ok=True)
            stale.unlink()
    key_digits = max(1, len(str(shard_size - 1)))
    tasks, reused = [], 0
    done_samples = 0
    for shard_id in range(n_shards):
        chunk = records[shard_id * shard_size: (shard_id + 1) * shard_size]
        fingerprint = _fingerprint(chunk, options)
        stats = _read_stats(out / f"{shard_id:05d}{STATS_SUFFIX}")
        if (not force and stats and stats.get("fingerprint") == fingerprint
                and (out / f"{shard_id:05d}.tar").is_file()):
            reused += 1
            done_samples += len(chunk)
            continue
        tasks.append((shard_id, list(chunk), options, fingerprint, str(out), key_digits))
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    bar = progress_bar(total=len(records), initial=done_samples, desc=desc, unit="img", enabled=progress)
    if tasks:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        counter = ctx.Value("l", 0)
        if workers == 1:
            _init_worker(counter)
            for task in tasks:
                _write_shard(task)
                bar.update(counter.value - (bar.n - done_samples))
            _init_worker(None)
        else:
            with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
                pending = pool.map_async(_write_shard, tasks, chunksize=1)
                while not pending.ready():
                    pending.wait(0.2)
                    bar.update(counter.value - (bar.n - done_samples))
                pending.get()  # re-raise a worker's exception
                bar.update(counter.value - (bar.n - done_samples))
    bar.close()
    all_stats = _shard_stats(out)  # read once: sizes.json and this build's failure totals
    sizes = _write_sizes(out, all_stats)
    failures: Counter = Counter()
    for shard_id in range(n_shards):
        stats = all_stats.get(f"{shard_id:05d}.tar", {})
        failures.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    samples = sum(sizes.get(f"{i:05d}.tar", 0) for i in range(n_shards))
    return {"out": str(out), "shards": n_shards, "reused": reused, "samples": samples, "failures": dict(failures)}
