"""DeepSpeed checkpoints with a pointer that only moves once every rank has finished writing.

Layout: ``OUTPUT/checkpoints/step_00001000/`` (DeepSpeed's files for every rank, plus
``mmrl_complete.json``) and ``OUTPUT/checkpoints/latest`` (the tag of the newest complete
checkpoint, replaced atomically). All ranks call :meth:`save`; DeepSpeed writes each rank's
shards, a barrier waits for all of them, then rank 0 marks the folder complete, moves the
pointer and prunes old folders beyond ``keep_last``. A crash at any point leaves ``latest``
naming a complete checkpoint (or nothing), never a half-written one.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..fileio import atomic_write_text

__all__ = ["CheckpointManager", "COMPLETE_MARK"]

COMPLETE_MARK = "mmrl_complete.json"
_PREFIX = "step_"


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
            mark = {"step": step, "time": time.time()}
            atomic_write_text(self.root / tag / COMPLETE_MARK, json.dumps(mark))
            atomic_write_text(self.root / "latest", tag)
            for old in self.complete_tags()[: -self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def resolve(self, resume: str | None) -> tuple[Path | None, str | None]:
        """``resume`` ("auto", a checkpoints folder, a tag folder or None) -> (root, tag) or (None, None)."""
        if resume is None:
            return None, None
        if resume == "auto":
            tag = self.latest()
            return (self.root, tag) if tag else (None, None)
        path = Path(resume)
        if (path / COMPLETE_MARK).is_file():
            return path.parent, path.name
        if path.is_dir():
            tag = CheckpointManager(path, self.keep_last, False).latest()
            if tag:
                return path, tag
        raise FileNotFoundError(f"resume={resume}: no complete checkpoint there (expected a folder with "
                                f"{COMPLETE_MARK} or a checkpoints folder with a 'latest' pointer)")

    @staticmethod
    def load(engine, root: Path, tag: str) -> dict[str, Any]:
        path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        return client_state or {}
