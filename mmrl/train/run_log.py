"""Rank-0 training log: progress (steps, steps/s, ETA, loss, samples/s -- a bar on a terminal, a plain
line every ``$MMRL_PROGRESS_INTERVAL`` seconds otherwise), TensorBoard events and a JSONL file."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..fileio import no_space_guard
from ..progress import progress

__all__ = ["RunLog"]


class RunLog:
    """Writes nothing on ranks other than 0."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / "log.jsonl"
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL and the bar still work
                self.tb = None
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)  # before update: its line shows this step's values
            self.bar.update(step - self.bar.n)

    def record(self, step: int, values: dict[str, Any]) -> None:
        """A training row; TensorBoard scalars ``train/<key>``."""
        self._write(step, values, "train/")

    def record_eval(self, step: int, values: dict[str, Any]) -> None:
        """An evaluation row (keys already ``eval/...``); TensorBoard scalars under those keys."""
        self._write(step, values, "")

    def _write(self, step: int, values: dict[str, Any], tb_prefix: str) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with no_space_guard(str(self.jsonl_path)):  # a full disk: one line naming the log
            self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{tb_prefix}{key}", value, step)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{tb_prefix}{key}/{i}", v, step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        self.bar = self.jsonl = self.tb = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
