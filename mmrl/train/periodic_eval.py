"""Evaluation during ``mmrl train`` (``eval.*``): a suite and/or a held-out validation set, every
``eval.every`` optimizer steps and at the end of the run, logged as ``eval/...`` keys.

Evaluation never changes training: it runs under ``torch.no_grad`` with every module in eval mode
(each module's own mode restored after), torch's CPU and CUDA generators (and Python's and
NumPy's) are saved and restored around it, and it reads its data itself -- the training loader is
not touched. The schedule is a function of the step, so a resumed run evaluates where the
uninterrupted one would have.

* ``eval.val_data`` (:mod:`.val_set`): on all ranks, each its share of the fixed set's batches,
  through the DeepSpeed engine (under ZeRO-3 its forward gathers the partitioned parameters; every
  rank runs the same number of forwards); sums all-reduced: ``eval/val_loss``,
  ``eval/val_i2t_r1``, ``eval/val_t2i_r1``, ``eval/val_samples``, ``eval/val_skipped``.
* ``eval.suite`` (:mod:`mmrl.evaluation.suite`): on the main rank only, on a consolidated copy of
  the current weights -- :func:`.params.full_state_dict`, the export's fp32 weights, gathered by
  every rank (a collective under ZeRO-3, and under ZeRO-1/2 for the fp32 master partitions) and
  loaded into a second model on the main rank, so the suite's forwards need no other rank. The
  other ranks wait for it (within the process group's timeout). Results:
  ``eval/<entry label>/<metric>`` for the metrics of the task's headline (plus
  ``eval/<entry label>/headline`` when it averages several), result files under
  ``OUTPUT/eval/step_<step>/``.
"""
from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..evaluation.context import EvalModel, ModelInfo, RunOptions
from ..evaluation.suite import EntryResult, load_suite, run_suite
from ..evaluation.tasks import get_task
from ..model import create_model
from .config import TrainConfig
from .distributed import DistInfo, on_main_rank
from .module import make_loss
from .params import full_state_dict
from .val_set import FixedSet, val_metrics, val_shards

__all__ = ["PeriodicEval", "suite_values", "preserved_state"]


@contextmanager
def preserved_state(module: torch.nn.Module):
    """``torch.no_grad``, every submodule in eval mode, and the random generators, restored after."""
    modes = [(m, m.training) for m in module.modules()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # this rank's device
    py, np_state = random.getstate(), np.random.get_state()
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training  # each module's own flag (a custom train() may have set some apart)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        random.setstate(py)
        np.random.set_state(np_state)


def suite_values(results: list[EntryResult]) -> dict[str, float]:
    """``eval/<label>/<metric>`` for the headline metrics of each entry that ran (and
    ``eval/<label>/headline`` when the headline averages several); a label used by two entries
    is prefixed with the task (``zeroshot:cifar10``)."""
    labels = [r.name for r in results]
    out: dict[str, float] = {}
    for r in results:
        if r.status != "ok":
            continue
        label = r.name if labels.count(r.name) == 1 else f"{r.task}:{r.name}"
        headline = get_task(r.task).headline
        for key in headline.keys:
            if key in r.metrics:
                out[f"eval/{label}/{key}"] = r.metrics[key]
        value = r.headline()
        if len(headline.keys) > 1 and value is not None:
            out[f"eval/{label}/headline"] = value
    return out


class PeriodicEval:
    """Built on every rank before training (a bad suite file or missing val shards fail up front)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, module: torch.nn.Module,
                 preprocess: Callable, tokenizer: Callable, out_dir: Path):
        self.cfg, self.ecfg, self.info, self.device = cfg, cfg.eval, info, device
        self.module, self.preprocess, self.tokenizer, self.out = module, preprocess, tokenizer, out_dir
        self.suite = load_suite(self.ecfg.suite, self.ecfg.suite_root) if self.ecfg.suite else None
        self.fixed = None
        if self.ecfg.val_data:
            self.fixed = FixedSet(val_shards(self.ecfg.val_data), self.ecfg.val_samples, self.ecfg.val_batch_size,
                                  preprocess, tokenizer, info.rank, info.world_size,
                                  timeout=cfg.data.stream_timeout_s)
        self.loss_fn = make_loss(cfg.loss, local_loss=True, gather_with_grad=False, rank=0, world_size=1)
        self.copy: torch.nn.Module | None = None  # the suite's model, main rank only, made at the first suite run
        self.last_step: int | None = None
        self.warned_short = False

    def due(self, step: int) -> bool:
        return self.ecfg.every > 0 and step % self.ecfg.every == 0

    def evaluate(self, step: int, engine, dtype: torch.dtype, message: Callable[[str], None]) -> dict[str, float]:
        """Evaluate the current weights (on all ranks, at the same step); the ``eval/...`` values."""
        start = time.time()
        values: dict[str, float] = {}
        with preserved_state(self.module):
            if self.fixed is not None:
                values.update(self._validate(engine, dtype))
                if values["eval/val_samples"] + values["eval/val_skipped"] < self.ecfg.val_samples \
                        and not self.warned_short:
                    self.warned_short = True
                    message(f"eval: {self.ecfg.val_data} holds {self.fixed.size} usable samples, "
                            f"fewer than eval.val_samples={self.ecfg.val_samples}: all of them are used")
            if self.suite is not None:
                values.update(self._run_suite(step, engine, message))
        self.last_step = step
        values["eval/seconds"] = round(time.time() - start, 3)
        return values

    def _validate(self, engine, dtype: torch.dtype) -> dict[str, float]:
        def forward(images: torch.Tensor, texts: torch.Tensor):
            return engine(images.to(self.device, dtype=dtype), texts.to(self.device))

        return val_metrics(forward, self.fixed, self.loss_fn, self.cfg.loss, self.device,
                           lockstep=self.cfg.zero_stage == 3)

    def _run_suite(self, step: int, engine, message: Callable[[str], None]) -> dict[str, float]:
        state = full_state_dict(engine, self.module, self.cfg.zero_stage)  # all ranks: a collective
        values = on_main_rank(self.info.is_main, self.device, lambda: self._suite_on_copy(step, state, message),
                              f"run eval.suite={self.ecfg.suite} at step {step}")
        return values or {}

    def _suite_on_copy(self, step: int, state: dict[str, torch.Tensor], message: Callable[[str], None]):
        cfg = self.cfg
        if self.copy is None:
            bias = {"init_logit_bias": -10.0} if cfg.loss == "siglip" else {}  # SigLIP's model has a logit_bias
            self.copy = create_model(cfg.model, cfg.pool, pool_kwargs=cfg.pool_kwargs or None,
                                     final_ln_after_pool=cfg.final_ln_after_pool, pretrained=False,
                                     **bias).to(self.device)
        self.copy.load_state_dict(state)
        self.copy.eval()
        info = ModelInfo(cfg.model, f"{self.out} step {step}", cfg.pool, "training", f"train:{self.out}:{step}")
        em = EvalModel(self.copy, self.preprocess, self.tokenizer, info)
        opts = RunOptions(device=str(self.device), batch_size=self.ecfg.val_batch_size, num_workers=0,
                          progress=False, cache_dir=None, out_dir=self.out / "eval" / f"step_{step:08d}")
        results = run_suite(em, opts, self.suite, log=lambda m: print(f"eval step {step}: {m}", file=sys.stderr))
        for r in results:
            if r.status != "ok":
                message(f"eval step {step}: {r.task} {r.name} {r.status}: {r.message}")
        return suite_values(results)
