"""``mmrl train``: the DeepSpeed training loop.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` per rank
(:func:`mmrl.train.step.contrastive_step`: full-batch negatives under accumulation, and one
all-rank agreement per step on a non-finite loss -- the step is skipped everywhere, counted,
and too many in a row abort -- and on a pending SIGTERM/SIGINT -- a checkpoint is saved and
the run exits cleanly). Checkpoints every ``save_every`` steps (:mod:`.checkpoint`),
``resume=auto`` continues model, optimizer, schedule, step and data position (and wins over
``init_from``, the weights a fresh run starts from: :mod:`mmrl.model.init_weights`); the end of the
run exports the consolidated model with ``mmrl.save_model`` to ``OUTPUT/model``. With ``eval.suite`` /
``eval.val_data``, the weights are evaluated every ``eval.every`` steps and at the end of the run,
without changing training (:mod:`.periodic_eval`). ``compile=true`` runs the model through
torch.compile via DeepSpeed's ``engine.compile()`` (:meth:`_Trainer._compile`).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ..config import load_config, save_config, to_dict
from ..data.augment import build_train_transform
from ..data.loader import LoaderConfig, make_train_loader
from ..data.synthetic import make_synthetic_loader
from ..data.wds_stages import derive_seed
from ..fileio import atomic_write_text
from ..model import create_model, create_transforms, get_tokenizer, init_from_weights, save_model
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import DistInfo, deepspeed_config, device_for, dist_info_from_env, init_distributed, on_main_rank
from .lost_peer import Peers, watch_peers
from .module import ContrastiveModule, make_loss
from .optim import make_optimizer, warmup_cosine
from .params import full_state_dict, master_values
from .periodic_eval import PeriodicEval
from .precision import check_precision
from .run_lock import RunLock
from .run_log import RunLog
from .step import contrastive_step

__all__ = ["train", "check_same_run", "TrainingAborted"]


class TrainingAborted(RuntimeError):
    pass


class _StopFlag:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _loader_config(cfg: TrainConfig) -> LoaderConfig:
    return LoaderConfig(
        train=cfg.data.train, batch_size=cfg.batch_size, weights=cfg.data.weights, resampled=cfg.data.resampled,
        num_samples=cfg.data.num_samples, workers=cfg.workers, seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        max_consecutive_bad_samples=cfg.data.max_bad_samples, multi_caption=cfg.data.multi_caption,
        group_key=cfg.data.group_key, group_size=cfg.data.group_size, group_shared_aug=cfg.data.group_shared_aug,
        stream_timeout=cfg.data.stream_timeout_s,
    )


def _make_loader(cfg: TrainConfig, preprocess, tokenizer, **kwargs):
    """The shard loader, or random batches with ``data.synthetic`` (:mod:`mmrl.data.synthetic`)."""
    make = make_synthetic_loader if cfg.data.synthetic else make_train_loader
    return make(_loader_config(cfg), preprocess, tokenizer, **kwargs)


class _Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        import deepspeed

        self.cfg, self.info = cfg, info
        self.doing = "start-up (model broadcast, checkpoint load)"  # named if a peer is lost (.lost_peer)
        self.device = device_for(info)
        check_precision(cfg.precision, self.device)  # before anything is built: one line if it cannot run here
        self.out = Path(cfg.output_dir)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.keep_last, info.is_main, self.device)
        root, tag = self.ckpt.resolve(cfg.resume)  # verified before anything is built; resumed after initialize
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        extra = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if cfg.loss == "siglip" else {}
        model = create_model(cfg.model, cfg.pool, pool_kwargs=cfg.pool_kwargs or None,
                             final_ln_after_pool=cfg.final_ln_after_pool, lock_text=cfg.lock_text,
                             cache_text=cfg.cache_text, patch_dropout=cfg.patch_dropout, **extra)
        if cfg.init_from:
            self._init_weights(model, resuming=f"{root}/{tag}" if tag else None)
        if cfg.lock_image:  # open_clip's LiT lock (mmrl.model.vision: the pooler is in the last group)
            model.lock_image_tower(cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model = model
        train_transform, eval_transform = create_transforms(model)
        self.preprocess = build_train_transform(train_transform, cfg.aug)
        self.tokenizer = get_tokenizer(model.mmrl_cfg["model_cfg"])
        self.module = ContrastiveModule(model)
        self.loss_fn = make_loss(cfg.loss, cfg.local_loss, cfg.gather_with_grad, info.rank, info.world_size,
                                 grouped=bool(cfg.data.group_key), image_weight=cfg.image_loss_weight,
                                 image_temperature=cfg.image_loss_temperature)

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers in forked loader workers
        if cfg.data.synthetic and cfg.data.train and info.is_main:
            print(f"mmrl train: data.synthetic=true: data.train={cfg.data.train!r} is not read "
                  f"(batches are random images and token ids)", file=sys.stderr, flush=True)
        self.evaluator = PeriodicEval(cfg, info, self.device, self.module, eval_transform, self.tokenizer,
                                      self.out) if cfg.eval.enabled else None
        self.last_eval: dict[str, object] | None = None
        self.loader = _make_loader(cfg, self.preprocess, self.tokenizer, rank=info.rank, world_size=info.world_size)
        warm = cfg.cache_text and cfg.warm_text_cache and not cfg.data.synthetic  # no shards to read captions from
        self.text_warm = self._warm_text_cache() if warm else None
        steps_per_epoch = self.loader.num_batches // cfg.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(f"an epoch has {self.loader.num_batches} batches per rank, "
                             f"fewer than grad_accum={cfg.grad_accum}")
        limits = [s for s in (cfg.max_steps, cfg.epochs * steps_per_epoch if cfg.epochs else None) if s]
        self.total_steps = min(limits)
        self.steps_per_epoch = steps_per_epoch

        optimizer = make_optimizer(self.module, cfg.lr, cfg.weight_decay, cfg.betas, cfg.adam_eps, cfg.p_lr_mult,
                                   cfg.lr_layer_decay)
        # LambdaLR scales every group's initial lr (lr * lr_mult) by the same factor
        self.lr_factor = warmup_cosine(cfg.warmup_steps, self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, info.world_size), dist_init_required=False)
        if cfg.compile:
            self._compile()
        self.dtype = next(self.engine.module.parameters()).dtype
        self.step = 0
        self.last_saved_step: int | None = None  # decided locally: no rank reads another's files
        # micro_batches: batches taken from the loader (skipped steps consume data too)
        self.state: dict[str, float] = {"nonfinite_steps": 0, "samples_seen": 0, "micro_batches": 0}
        if tag:
            client = self.ckpt.load(self.engine, root, tag)
            self.step = int(client.get("step", 0))
            self.last_saved_step = self.step
            self.state.update(client.get("state", {}))
            if self.state["micro_batches"]:
                self.loader.close()
                self.loader = _make_loader(cfg, self.preprocess, self.tokenizer, rank=info.rank,
                                           world_size=info.world_size, start_step=int(self.state["micro_batches"]))
            for reason, n in client.get("skipped", {}).items():
                self.loader.skipped[reason] = n
        self.resumed_from = f"{root}/{tag}" if tag else None
        self.pooler_p = getattr(self.module.model.visual.pooler, "p", None)

    def _compile(self) -> None:
        """``compile``: DeepSpeed's ``engine.compile()``, i.e. ``nn.Module.compile`` of the wrapped
        :class:`ContrastiveModule` in place -- after ``deepspeed.initialize``, so ZeRO's hooks are
        installed first, and with no ``_orig_mod`` wrapper: checkpoints and the exported model keep
        their keys. Compilation happens lazily, at the first forward (and once more for the no-grad
        encodings of ``grad_accum > 1``). ZeRO 0-2 only (the config refuses stage 3: its parameters,
        gathered by module hooks, reach traced code as empty partitions)."""
        kwargs = {"mode": self.cfg.compile_mode} if self.cfg.compile_mode else {}
        self.engine.compile(backend=self.cfg.compile_backend, compile_kwargs=kwargs)
        if self.info.is_main:
            mode = f", mode={self.cfg.compile_mode}" if self.cfg.compile_mode else ""
            print(f"mmrl train: model compiled (backend={self.cfg.compile_backend}{mode}; "
                  f"the first steps include compilation)", file=sys.stderr, flush=True)

    def _init_weights(self, model: torch.nn.Module, resuming: str | None) -> None:
        """``init_from``: matching tensors loaded before DeepSpeed partitions anything (every rank reads
        the file); one summary line on the main rank. A resumed checkpoint wins: the init is skipped."""
        if resuming:
            if self.info.is_main:
                print(f"mmrl train: init_from skipped: resuming from {resuming}", file=sys.stderr, flush=True)
            return
        report = init_from_weights(model, self.cfg.init_from, strict=self.cfg.init_strict)
        if self.info.is_main:
            print(f"mmrl train: {report.summary()}", file=sys.stderr, flush=True)

    def _warm_text_cache(self) -> dict[str, float]:
        """Cached text features of every caption the shards can yield, computed before training
        (and before DeepSpeed partitions anything) in large batches rather than a few per step."""
        from ..data.caption_index import shard_captions

        start = time.time()
        captions = shard_captions(self.cfg.data.train, self.cfg.data.multi_caption, self.model.text.max_entries)
        if captions is None:
            if self.info.is_main:
                print("mmrl train: text cache fills while training (shards remote, unsized or too many to read first)",
                      file=sys.stderr, flush=True)
            return {"captions": 0, "computed": 0, "seconds": round(time.time() - start, 1)}
        computed = self.model.text.warm(self.tokenizer(captions), progress=self.info.is_main)
        return {"captions": len(captions), "computed": computed, "seconds": round(time.time() - start, 1)}

    # ------------------------------------------------------------------------------------
    def micro_batches(self):
        while True:  # the loader's iter() runs to the end of an epoch and continues with the next
            yield from self.loader

    def optimizer_step(self, batches: list[dict], stop: bool):
        seed = None
        if self.cfg.patch_dropout > 0:  # random patches: per rank and data position, the same again on resume
            seed = derive_seed(self.cfg.seed, "patch_dropout", self.info.rank, int(self.state["micro_batches"]))
        return contrastive_step(self.engine, self.loss_fn, batches, self.device, self.dtype, stop, seed=seed)

    def save(self):
        self.doing = f"the checkpoint save at step {self.step}"
        client = {"step": self.step, "state": dict(self.state), "skipped": dict(self.loader.skipped)}
        tag = self.ckpt.save(self.engine, self.step, client)
        self.last_saved_step = self.step
        return tag

    def export(self) -> Path:
        self.doing = "the model export"
        state = full_state_dict(self.engine, self.module, self.cfg.zero_stage)
        target = self.out / "model"
        # a full disk: NoSpaceLeft on rank 0, an earlier model kept; the other ranks must not wait for it
        on_main_rank(self.info.is_main, self.device, lambda: save_model(self.model, target, state_dict=state),
                     f"export the model to {target}")
        return target

    def logged_values(self) -> dict[str, object]:
        """Temperature and GGeM exponents, from the fp32 master weights (gathered: a collective under
        ZeRO-3, called on all ranks); on CUDA also the peak memory allocated so far (GiB)."""
        params = [self.module.logit_scale] + ([self.pooler_p] if self.pooler_p is not None else [])
        values = master_values(self.engine, params, self.cfg.zero_stage)
        out = {"logit_scale": float(values[0].clamp(max=math.log(100)).exp())}
        if self.pooler_p is not None:
            out["ggem_p"] = [round(float(v), 5) for v in values[1].clamp(min=self.module.model.visual.pooler.p_min)]
        if self.device.type == "cuda":
            out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
        return out

    def evaluate(self, log: RunLog) -> float:
        """Evaluate the current weights (all ranks); log the ``eval/...`` row. Returns its seconds."""
        self.doing = f"the evaluation at step {self.step}"
        values = self.evaluator.evaluate(self.step, self.engine, self.dtype, log.message)
        log.record_eval(self.step, values)
        self.last_eval = {"step": self.step, **values}
        return float(values["eval/seconds"])

    def run(self) -> dict[str, object]:
        cfg, info = self.cfg, self.info
        log = RunLog(self.out, self.total_steps, self.step, info.is_main)
        if self.resumed_from:
            log.message(f"resumed from {self.resumed_from} at step {self.step}")
        stopper = _StopFlag()
        stopper.install()
        stream = self.micro_batches()
        global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        consecutive_bad, last_loss, stopped = 0, float("nan"), False
        window_start, window_steps, window_wait = time.time(), 0, 0.0
        try:
            while self.step < self.total_steps:
                t0 = time.time()
                batches = [next(stream) for _ in range(cfg.grad_accum)]
                wait = time.time() - t0
                self.state["micro_batches"] += cfg.grad_accum
                lr_used = cfg.lr * self.lr_factor(self.scheduler.last_epoch)  # the base lr (groups: x lr_mult)
                self.doing = f"step {self.step + 1}"
                loss, stop = self.optimizer_step(batches, stopper.requested)
                if loss is None:
                    consecutive_bad += 1
                    self.state["nonfinite_steps"] += 1
                    log.message(f"step {self.step}: non-finite loss on some rank, step skipped")
                    if consecutive_bad >= cfg.max_nonfinite_steps:
                        raise TrainingAborted(f"{consecutive_bad} consecutive steps with a non-finite loss "
                                              f"(at step {self.step}); lower lr or check the data")
                else:
                    consecutive_bad, last_loss = 0, float(loss)
                    self.step += 1
                    self.state["samples_seen"] += global_batch
                window_steps += 1
                window_wait += wait
                elapsed = time.time() - window_start
                log.step(self.step, {"loss": f"{last_loss:.4f}",
                                     "samples/s": f"{window_steps * global_batch / max(elapsed, 1e-9):.1f}"})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    values = {"loss": last_loss, **getattr(self.loss_fn, "last", {}), "lr": lr_used,
                              "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9),
                              "data_wait_share": window_wait / max(elapsed, 1e-9),
                              "skipped_samples": self.loader.num_skipped,
                              "skipped_steps": self.state["nonfinite_steps"],
                              "epoch": (self.step * cfg.grad_accum) // self.loader.num_batches, **self.logged_values()}
                    log.record(self.step, values)
                    window_start, window_steps, window_wait = time.time(), 0, 0.0
                if self.evaluator is not None and loss is not None and not stop and self.evaluator.due(self.step):
                    window_start += self.evaluate(log)  # not counted in the next window's samples/s
                if stop:
                    log.message(f"stop requested: saving a checkpoint at step {self.step}")
                    self.save()
                    stopped = True
                    break
                if self.step % cfg.save_every == 0 and loss is not None:
                    self.save()
            if not stopped and self.last_saved_step != self.step:
                self.save()
            if self.evaluator is not None and not stopped and self.evaluator.last_step != self.step:
                self.evaluate(log)
            model_dir = None if stopped else self.export()
        finally:
            stopper.restore()
            log.close()
            self.loader.close()
        summary = {"step": self.step, "total_steps": self.total_steps, "stopped_early": stopped,
                   "final_loss": last_loss, "skipped_samples": self.loader.num_skipped,
                   "skipped": dict(self.loader.skipped), "nonfinite_steps": self.state["nonfinite_steps"],
                   "model_dir": str(model_dir) if model_dir else None, "text_cache_warm": self.text_warm,
                   "cpu_threads": torch.get_num_threads(), "eval": self.last_eval}
        if info.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary


# keys a resumed run may change (compiling changes no weight or data position)
_RESUME_FREE = ("resume", "output_dir", "init_from", "init_strict", "compile", "compile_mode", "compile_backend",
                "dist_timeout_s")
_RESUME_FREE_SECTIONS = ("eval.",)  # evaluation never changes training: a resumed run may change it


def check_same_run(cfg: TrainConfig) -> None:
    """Refuse (ValueError, one line) when ``cfg.output_dir`` holds checkpoints of a run whose saved
    ``config.yaml`` differs from ``cfg`` (``resume``, ``output_dir`` and ``init_from`` / ``init_strict``
    aside: a resumed run skips the init; so are ``compile*`` and ``dist_timeout_s``, which change no weight,
    and the ``eval.*`` keys: evaluation never changes training) or no longer loads."""
    out = Path(cfg.output_dir)
    saved_path, ckpts = out / "config.yaml", out / "checkpoints"
    if not saved_path.is_file() or not ckpts.is_dir() or not any(ckpts.iterdir()):
        return
    hint = f"use another output_dir, or remove {ckpts} to start over there"
    try:
        saved = load_config(TrainConfig, saved_path)
    except ValueError as err:
        raise ValueError(f"{out} holds checkpoints whose config.yaml no longer loads ({err}); {hint}") from None
    def kept(key: str) -> bool:
        return key not in _RESUME_FREE and not key.startswith(_RESUME_FREE_SECTIONS)

    old = {k: v for k, v in _flat(to_dict(saved)).items() if kept(k)}
    new = {k: v for k, v in _flat(to_dict(cfg)).items() if kept(k)}
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key) != new.get(key):
            raise ValueError(f"{out} holds a run with {key}={_short(old.get(key))} "
                             f"(this config: {key}={_short(new.get(key))}); {hint}")


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested config dict -> dotted keys (``data.train``), as overrides name them."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def train(cfg: TrainConfig) -> dict[str, object]:
    """Run training (in every process of the job); returns the run summary.

    The main rank holds ``OUTPUT/.mmrl.lock`` for the whole run (:mod:`.run_lock`: a second run
    on the folder refuses), checks that the folder's checkpoints are of this config
    (:func:`check_same_run`), and writes ``OUTPUT/config.yaml`` only once the model, the engine
    and any resumed checkpoint have loaded. A rank lost on the way raises :class:`.lost_peer.LostPeer`."""
    info = dist_info_from_env()
    out = Path(cfg.output_dir)
    lock, peers, trainer = None, None, None
    if info.is_main:
        lock = RunLock(out).acquire()
    try:
        if lock is not None and lock.took_over:
            print(f"mmrl train: {lock.took_over}", file=sys.stderr, flush=True)
        if info.is_main:
            check_same_run(cfg)
        init_distributed(info, cfg.dist_timeout_s)
        if info.is_main and info.world_size > 1:
            print(f"mmrl train: {info.describe()}", file=sys.stderr, flush=True)
        with watch_peers(lambda: peers, lambda: trainer.doing if trainer else "start-up", cfg.dist_timeout_s):
            peers = Peers.gather(info.rank, info.world_size)
            trainer = _Trainer(cfg, info)
            if info.is_main:
                save_config(cfg, out / "config.yaml")
            return trainer.run()
    finally:
        if lock is not None:
            lock.release()
