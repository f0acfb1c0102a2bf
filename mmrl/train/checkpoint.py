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

A save that fails on any rank (the ranks agree through one all-reduce) removes the partial
folder on every rank's behalf and raises; a full disk is :class:`mmrl.fileio.NoSpaceLeft`, one
line naming the checkpoint (DeepSpeed's files are written through Python file objects so that
the ``ENOSPC`` is not lost in torch's stream errors). Earlier checkpoints are untouched.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..fileio import NoSpaceLeft, atomic_write_text, is_no_space
from ..safeload import FileUnreadable, WeightsRefused, load_weights_only
from .distributed import worst_on_any_rank

__all__ = ["CheckpointManager", "CheckpointRefused", "CheckpointUnreadable", "CheckpointSaveFailed", "COMPLETE_MARK",
           "safe_types", "verify_checkpoint", "weights_only_loads", "file_object_saves"]

COMPLETE_MARK = "mmrl_complete.json"
VERIFIED = "verified"
_PREFIX = "step_"
_UNREADABLE = "unreadable_"


class CheckpointRefused(WeightsRefused):
    """A checkpoint file needs a global that is not a tensor/state type: it is never loaded."""


class CheckpointUnreadable(FileUnreadable):
    """A checkpoint file cannot be read (truncated, corrupt, missing)."""


class CheckpointSaveFailed(ValueError):
    """Another rank failed to write its part of a checkpoint (that rank names its error)."""


_OK, _FAILED, _FULL = 0, 1, 2


def _code(err: BaseException | None, path: Path) -> int:
    return _OK if err is None else _FULL if is_no_space(err, path) else _FAILED


def safe_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (found by saving real checkpoints
    with ZeRO 0-3 and loading them with ``weights_only=True``): the ZeRO optimizers' ``loss_scaler``
    (``LossScaler``; ``DynamicLossScaler`` under fp16), their ``zero_stage`` (``ZeroStageEnum``) and
    ZeRO 1/2's ``param_slice_mappings`` (``fragment_address``, a dataclass of two ints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str | Path, map_location: Any = "cpu", name: str | None = None) -> Any:
    try:
        return load_weights_only(path, map_location, safe_types(), what="tensor/state", name=name)
    except WeightsRefused as err:
        raise CheckpointRefused(str(err).replace("read with", "checkpoints are read with")) from None
    except FileUnreadable as err:
        raise CheckpointUnreadable(str(err)) from None


def verify_checkpoint(folder: str | Path) -> list[Path]:
    """Load every ``.pt`` file of a checkpoint folder with ``weights_only=True`` (and drop it again).

    Raises :class:`CheckpointRefused` for a file that needs any global beyond tensors and
    :func:`safe_types`, :class:`CheckpointUnreadable` for one that cannot be read."""
    folder = Path(folder)
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise CheckpointUnreadable(f"{folder}: no .pt files")
    for path in files:
        _safe_load(path, name=path.name)
    return files


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


@contextlib.contextmanager
def file_object_saves(engine) -> Iterator[None]:
    """DeepSpeed's torch checkpoint engine saves through a Python file object while inside, so a full
    disk surfaces as ``OSError(ENOSPC)`` (torch's own file writer reports "unexpected pos")."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "zipfile_serialization"):  # another engine: as it is
        yield
        return

    def save(state_dict: Any, path: str) -> None:
        with open(path, "wb") as fh:
            torch.save(state_dict, fh, _use_new_zipfile_serialization=ckpt_engine.zipfile_serialization)

    ckpt_engine.save = save
    try:
        yield
    finally:
        del ckpt_engine.save


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, is_main: bool, device: Any = "cpu"):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.device = device  # for the ranks' agreement on a failed save (a CUDA device under nccl)

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
        folder = self.root / tag
        before = self.latest()
        error: BaseException | None = None
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if folder.exists() and not (folder / COMPLETE_MARK).exists():
                    shutil.rmtree(folder)  # an incomplete folder of an earlier, interrupted save
            if dist.is_initialized():
                dist.barrier()
            with file_object_saves(engine):
                engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it before anyone raises
            error = err
        mine = _code(error, folder)
        self._settle(worst_on_any_rank(mine, self.device), mine, error, folder, before)
        error = None
        if self.is_main:  # every rank's files are on disk
            try:  # read it back as a resume would: a checkpoint that cannot be read is never marked complete
                verify_checkpoint(folder)
            except (CheckpointRefused, CheckpointUnreadable) as err:
                print(f"mmrl train: warning: checkpoint {tag} does not read back ({err}); "
                      f"it is not marked complete", file=sys.stderr, flush=True)
            else:
                try:
                    atomic_write_text(folder / COMPLETE_MARK, json.dumps({"step": step, "time": time.time()}))
                except Exception as err:  # noqa: BLE001
                    error = err
                else:
                    atomic_write_text(self.root / "latest", tag)  # tiny; a failure here leaves a complete folder
                    atomic_write_text(self.root / VERIFIED, tag)
                    self.prune()
        mine = _code(error, folder)
        self._settle(worst_on_any_rank(mine, self.device), mine, error, folder, before)
        return tag

    def _settle(self, worst: int, mine: int, error: BaseException | None, folder: Path, before: str | None) -> None:
        """After the ranks agreed on ``worst`` (this rank's outcome: ``mine``): nothing to do, or remove the
        partial folder and raise (this rank's own error, or one line saying another rank failed)."""
        if worst == _OK:
            return
        if self.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()  # removed before any rank reports
        kept = f"{before} is intact" if before else "there is no earlier checkpoint"
        if worst == _FULL and mine != _FAILED:
            where = "" if mine == _FULL else " (on another rank)"
            raise NoSpaceLeft(f"no space left on device writing checkpoint {folder}{where}; "
                              f"the partial checkpoint was removed, {kept}")
        if error is not None:
            raise error
        raise CheckpointSaveFailed(f"checkpoint {folder}: another rank failed to write its part (its error "
                                   f"names why); the partial checkpoint was removed, {kept}")

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
