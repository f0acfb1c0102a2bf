"""DeepSpeed checkpoints with a pointer that only moves once every rank has finished writing.

Layout: ``OUTPUT/checkpoints/step_00001000/`` (DeepSpeed's files for every rank, plus
``mmrl_complete.json``) and ``OUTPUT/checkpoints/latest`` (the tag of the newest complete
checkpoint, replaced atomically). All ranks call :meth:`save`; DeepSpeed writes each rank's
shards, a barrier waits for all of them, then rank 0 marks the folder complete, moves the
pointer and prunes old folders beyond ``keep_last``. A crash at any point leaves ``latest``
naming a complete checkpoint (or nothing), never a half-written one.

Nothing in a checkpoint is unpickled as an arbitrary object: before DeepSpeed reads a checkpoint,
every ``.pt`` file of its folder is loaded with ``torch.load(weights_only=True)`` (tensors, containers,
numbers, strings, plus the few DeepSpeed state types of :func:`safe_types`), and DeepSpeed's own
loads run with ``weights_only=True`` too (:func:`weights_only_loads`). A file that needs any other
global is refused (:class:`CheckpointRefused`, never fallen back from: someone wrote it on purpose); a
file that cannot be read (truncated, corrupt) makes ``resume=auto`` fall back to the previous
complete checkpoint, and the unreadable folder is renamed ``unreadable_step_...``. Rank 0 reads
every fresh checkpoint back the same way and records the newest readable one in
``OUTPUT/checkpoints/verified``; pruning never removes that one.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..fileio import atomic_write_text

__all__ = ["CheckpointManager", "CheckpointRefused", "CheckpointUnreadable", "COMPLETE_MARK", "safe_types",
           "verify_checkpoint", "weights_only_loads"]

COMPLETE_MARK = "mmrl_complete.json"
VERIFIED = "verified"
_PREFIX = "step_"
_UNREADABLE = "unreadable_"


class CheckpointRefused(ValueError):
    """A checkpoint file needs a global that is not a tensor/state type: it is never loaded."""


class CheckpointUnreadable(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, missing)."""


def safe_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (found by saving real checkpoints
    with ZeRO 0-3 and loading them with ``weights_only=True``): the ZeRO optimizers' ``loss_scaler``
    (``LossScaler``; ``DynamicLossScaler`` under fp16), their ``zero_stage`` (``ZeroStageEnum``) and
    ZeRO 1/2's ``param_slice_mappings`` (``fragment_address``, a dataclass of two ints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    with torch.serialization.safe_globals(safe_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__  # its first sentence


def verify_checkpoint(folder: str | Path) -> list[Path]:
    """Load every ``.pt`` file of a checkpoint folder with ``weights_only=True`` (and drop it again).

    Raises :class:`CheckpointRefused` for a file that needs any global beyond tensors and
    :func:`safe_types`, :class:`CheckpointUnreadable` for one that cannot be read."""
    folder = Path(folder)
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise CheckpointUnreadable(f"{folder}: no .pt files")
    for path in files:
        try:
            _safe_load(path)
        except pickle.UnpicklingError as err:
            text = str(err)
            found = re.search(r"GLOBAL ([\w.]+)", text)  # a global the weights-only unpickler does not allow
            if not found and "WeightsUnpickler error" not in text:
                raise CheckpointUnreadable(f"{path.name}: {_first_line(err)}") from None
            need = f"it needs '{found.group(1)}'" if found else _weights_error(text)
            raise CheckpointRefused(f"{path}: refused to load ({need}, not a tensor/state type; checkpoints are "
                                    f"read with torch.load(weights_only=True))") from None
        except Exception as err:  # truncated zip, bad header, I/O error
            raise CheckpointUnreadable(f"{path.name}: {_first_line(err)}") from None
    return files


def _weights_error(text: str) -> str:
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # e.g. "Unsupported operand 149"
    return found.group(1).strip().rstrip(".").lower() if found else "the weights-only unpickler rejects it"


@contextlib.contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """DeepSpeed's own checkpoint reads (``engine.checkpoint_engine.load``, which calls
    ``torch.load(weights_only=False)``) load with ``weights_only=True`` and the :func:`safe_types` while inside."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "load"):
        yield
        return

    def load(path: str, map_location: Any = None) -> Any:
        return _safe_load(path, map_location)

    ckpt_engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del ckpt_engine.load


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, is_main: bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main

    @staticmethod
    def tag_for(step: int) -> str:
        return f"{_PREFIX}{step:08d}"

    def complete_tags(self):
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name.startswith(_PREFIX) and (p / COMPLETE_MARK).is_file())

    def latest(self) -> str | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (self.root / tag / COMPLETE_MARK).is_file():
                return tag
        tags = self.complete_tags()  # pointer missing or stale: newest complete folder
        return tags[-1] if tags else None

    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        tag = self.tag_for(step)
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            stale = self.root / tag
            if stale.exists() and not (stale / COMPLETE_MARK).exists():
                shutil.rmtree(stale)  # an incomplete folder of an earlier, interrupted save
        if dist.is_initialized():
            dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are on disk
        if self.is_main:
            try:  # read it back as a resume would: a checkpoint that cannot be read is never marked complete
                verify_checkpoint(self.root / tag)
            except (CheckpointRefused, CheckpointUnreadable) as err:
                print(f"mmrl train: warning: checkpoint {tag} does not read back ({err}); "
                      f"it is not marked complete", file=sys.stderr, flush=True)
            else:
                mark = {"step": step, "time": time.time()}
                atomic_write_text(self.root / tag / COMPLETE_MARK, json.dumps(mark))
                atomic_write_text(self.root / "latest", tag)
                atomic_write_text(self.root / VERIFIED, tag)
                self.prune()
        if dist.is_initialized():
            dist.barrier()
        return tag

    def verified(self) -> str | None:
        """The newest checkpoint read back with ``weights_only=True`` (after its save or on resume)."""
        path = self.root / VERIFIED
        return (path.read_text().strip() or None) if path.is_file() else None

    def prune(self) -> None:
        """Remove complete checkpoints beyond the newest ``keep_last``, never the :meth:`verified` one."""
        keep = self.verified()
        for old in self.complete_tags()[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def _newest_readable(self, own: bool) -> str | None:
        """The newest complete checkpoint whose files all load with ``weights_only=True``, falling back
        past unreadable ones (one line each); a refused file raises. Every rank verifies (same files,
        same answer); for this run's own folder rank 0 then renames the unreadable ones
        ``unreadable_step_...`` and moves ``latest`` and ``verified`` to the one chosen."""
        first = self.latest()
        if first is None:
            return None
        candidates = [first] + [t for t in reversed(self.complete_tags()) if t < first]
        failed: list[tuple[str, CheckpointUnreadable]] = []
        chosen = None
        for tag in candidates:
            try:
                verify_checkpoint(self.root / tag)
            except CheckpointUnreadable as err:
                failed.append((tag, err))
                continue
            chosen = tag
            break
        if dist.is_initialized():
            dist.barrier()  # every rank has decided before any folder moves
        if chosen is None:
            tag, err = failed[0]
            raise CheckpointUnreadable(f"checkpoint {self.root / tag} is unreadable ({err}) and no earlier "
                                       f"checkpoint can be read; move {self.root} aside to start afresh")
        if self.is_main:
            for tag, err in failed:
                print(f"checkpoint {tag} is unreadable ({err}); resuming from {chosen}", file=sys.stderr, flush=True)
            if own:
                for tag, _ in failed:
                    target = self.root / f"{_UNREADABLE}{tag}"
                    if target.exists():
                        target = self.root / f"{_UNREADABLE}{tag}.{int(time.time())}"
                    (self.root / tag).rename(target)
                atomic_write_text(self.root / "latest", chosen)
                atomic_write_text(self.root / VERIFIED, chosen)
        if dist.is_initialized():
            dist.barrier()
        return chosen

    def resolve(self, resume: str | None) -> tuple[Path | None, str | None]:
        """``resume`` ("auto", a checkpoints folder, a tag folder or None) -> (root, tag) or (None, None).

        The checkpoint is verified first (:func:`verify_checkpoint`); "auto" and a checkpoints folder
        fall back past unreadable checkpoints, a tag folder (asked for by name) does not."""
        if resume is None:
            return None, None
        if resume == "auto":
            tag = self._newest_readable(own=True)
            return (self.root, tag) if tag else (None, None)
        path = Path(resume)
        if (path / COMPLETE_MARK).is_file():
            try:
                verify_checkpoint(path)
            except CheckpointUnreadable as err:
                raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({err})") from None
            return path.parent, path.name
        if path.is_dir():
            tag = CheckpointManager(path, self.keep_last, self.is_main)._newest_readable(own=False)
            if tag:
                return path, tag
        raise FileNotFoundError(f"resume={resume}: no complete checkpoint there (expected a folder with "
                                f"{COMPLETE_MARK} or a checkpoints folder with a 'latest' pointer)")

    @staticmethod
    def load(engine, root: Path, tag: str) -> dict[str, Any]:
        """DeepSpeed's load of a checkpoint :meth:`resolve` verified, its reads with ``weights_only=True``."""
        with weights_only_loads(engine):
            path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        return client_state or {}
