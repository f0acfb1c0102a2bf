"""``mmrl train`` configuration: one typed dataclass, YAML + ``key=value`` overrides (mmrl.config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..data.augment import AugConfig

__all__ = ["AugConfig", "DataConfig", "EvalConfig", "TrainConfig"]

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("clip", "siglip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    train: str = ""                      # shard pattern(s); braces expand, "::" joins sources
    weights: str | None = None        # per-source weights "1::3" (resampled mode)
    resampled: bool = True               # infinite weighted resampling (False: epochs over the shards)
    num_samples: int | None = None    # samples per epoch; default from sizes.json
    shuffle_buffer: int = 2000           # sample shuffle buffer (epoch mode)
    max_bad_samples: int = 1000          # consecutive bad samples before failing fast
    stream_timeout_s: float = 60.0       # remote shards (http(s)://, s3://, pipe:): a read that waits this long
                                         # for data fails its shard (counted in bad_shards), never a hang
    multi_caption: bool = False          # draw one of the sample's json "captions" per use instead of its txt
    group_key: str | None = None      # JSON field naming a sample's group (e.g. "concept"): samples of
                                         # one group are each other's positives (mmrl.train.group_loss)
    group_size: int = 1                  # > 1: batches hold groups of this many samples (needs group_key)
    group_shared_aug: bool = False       # a group's samples in a batch share their random augmentation
    synthetic: bool = False              # random images and token ids, no shards read (speed measurements,
                                         # mmrl.data.synthetic); data.train is then ignored, with a warning;
                                         # an epoch is num_samples (default 1,000,000), needed with epochs


@dataclass
class EvalConfig:
    """Evaluation during training (mmrl.train.periodic_eval); none unless ``suite`` or ``val_data`` is set."""

    every: int = 0                       # optimizer steps between evaluations; 0: only at the end of the run
    suite: str | None = None             # a suite YAML (as `mmrl eval suite`), run on the main rank
    suite_root: str | None = None        # the suite's data root (default: the file's own `root`)
    val_data: str | None = None          # held-out shards (data.train's syntax): validation loss and R@1
    val_samples: int = 1000              # the fixed set: the first N samples of val_data, in order
    val_batch_size: int = 256            # global batch of the in-batch loss/R@1 (and the suite's batch size)

    @property
    def enabled(self) -> bool:
        return bool(self.suite or self.val_data)

    def validate(self, prefix: str = "") -> None:
        for key in ("suite", "suite_root", "val_data"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"config key '{prefix}{key}': expected a path or null, got {value!r}")
        if self.every < 0:
            raise ConfigError(f"config key '{prefix}every': expected an integer >= 0, got {self.every!r}")
        for key in ("val_samples", "val_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{prefix}{key}': expected an integer >= 1, got {getattr(self, key)!r}")
        if self.suite_root is not None and self.suite is None:
            raise ConfigError(f"config key '{prefix}suite_root': set {prefix}suite too (the suite whose data it holds)")
        if self.every > 0 and not self.enabled:
            raise ConfigError(f"config key '{prefix}every': nothing to evaluate; set {prefix}suite "
                              f"and/or {prefix}val_data")


@dataclass
class TrainConfig:
    # model
    model: str = "mmrl-vit-tiny-p8-64"
    pool: str = "ggem"
    pool_kwargs: dict[str, Any] = field(default_factory=dict)
    final_ln_after_pool: bool = False
    patch_dropout: float = 0.0           # FLIP: fraction of patch tokens dropped per image in training, in [0, 1)
    lock_text: bool = False
    lock_image: bool = False             # freeze the image tower (open_clip's lock_image_tower, LiT)
    lock_image_unlocked_groups: int = 0  # with lock_image: leave open_clip's last N groups trainable (1: pooler
                                         # and proj; 2: also the last block and ln_post; ...)
    lock_image_freeze_bn_stats: bool = False  # with lock_image: passed to open_clip (its ViT ignores it)
    cache_text: bool = False             # with lock_text and an HF text tower: pooled text features computed once
    warm_text_cache: bool = True         # with cache_text: compute every caption of small local shards up
                                         # front, in large batches (mmrl.data.caption_index)
    init_from: str | None = None         # start from these weights (a model folder or a .safetensors/.pt/.bin
                                         # file): tensors of matching key and shape (mmrl.model.init_weights);
                                         # skipped when a checkpoint is resumed
    init_strict: bool = False            # with init_from: any missing, unexpected or mismatched key is an error
    # data
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)  # train-time augmentation (mmrl.data.augment)
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation during training (never changes it)
    batch_size: int = 64                 # per rank, per micro-step
    workers: int = 2                     # data-loading processes per rank
    # schedule
    max_steps: int | None = None      # optimizer steps; with epochs, whichever ends first
    epochs: int | None = None
    lr: float = 5e-4
    p_lr_mult: float = 1.0               # learning-rate multiplier for GGeM's exponents
    lr_layer_decay: float = 1.0          # in (0, 1]: ViT block i of L trains at lr * d^(L - i), the embeddings
                                         # at lr * d^(L + 1), the head, text tower and temperature at lr (1: off)
    weight_decay: float = 0.2
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    # engine
    precision: str = "fp32"
    zero_stage: int = 0
    dist_timeout_s: float = 1800.0       # seconds any collective waits for the other ranks before the run ends
                                         # naming the silent rank (exit 4); above the longest one-rank pause
                                         # (a checkpoint save, main-rank evaluation, the model export)
    grad_accum: int = 1
    grad_checkpointing: bool = False
    compile: bool = False                # torch.compile the model through DeepSpeed's engine.compile(); ZeRO 0-2
                                         # (nn.Module.compile in place: state-dict keys unchanged)
    compile_mode: str | None = None      # with compile: torch.compile mode (inductor only), e.g. "max-autotune"
    compile_backend: str = "inductor"    # with compile: a torch._dynamo backend ("aot_eager": no C++ compiler)
    # loss
    loss: str = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True
    image_loss_weight: float = 0.0       # > 0: add the image-image term over groups (needs data.group_key)
    image_loss_temperature: float = 0.1
    # checkpoints and logging
    save_every: int = 1000               # optimizer steps between checkpoints
    keep_last: int = 3
    resume: str | None = "auto"       # "auto", a checkpoint folder, or null
    output_dir: str = "runs/train"
    log_every: int = 10
    max_nonfinite_steps: int = 20        # consecutive skipped (non-finite) steps before aborting
    seed: int = 0

    def validate(self) -> None:
        def bad(key: str, expected: str, got: Any) -> ConfigError:
            return ConfigError(f"config key {key!r}: expected {expected}, got {got!r}")

        if self.precision not in PRECISIONS:
            raise bad("precision", " or ".join(PRECISIONS), self.precision)
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", "0, 1, 2 or 3", self.zero_stage)
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise bad("compile_mode", "null or one of " + ", ".join(COMPILE_MODES), self.compile_mode)
        if (self.compile or self.compile_backend != "inductor") and self.compile_backend not in _dynamo_backends():
            raise bad("compile_backend", "a torch._dynamo backend (e.g. 'inductor', 'aot_eager')",
                      self.compile_backend)
        if self.compile and self.zero_stage == 3:  # ZeRO-3 gathers parameters outside traced code
            raise ConfigError("config key 'compile': not supported with zero_stage=3 (use zero_stage 0-2)")
        if self.compile_mode is not None and self.compile_backend != "inductor":
            raise ConfigError(f"config key 'compile_mode': needs compile_backend='inductor', "
                              f"not {self.compile_backend!r}")
        if not 0 < self.dist_timeout_s < float("inf"):
            raise bad("dist_timeout_s", "a positive number of seconds", self.dist_timeout_s)
        if self.loss not in LOSSES:
            raise bad("loss", " or ".join(LOSSES), self.loss)
        for key in ("batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1", getattr(self, key))
        if not 0 <= self.patch_dropout < 1:
            raise bad("patch_dropout", "a float in [0, 1)", self.patch_dropout)
        if self.workers < 0:
            raise bad("workers", "an integer >= 0", self.workers)
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("config keys 'max_steps' / 'epochs': set at least one")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "an integer >= 1", self.max_steps)
        if self.epochs is not None and self.epochs < 1:
            raise bad("epochs", "an integer >= 1", self.epochs)
        if self.lr <= 0:
            raise bad("lr", "a positive float", self.lr)
        if not 0 < self.lr_layer_decay <= 1:
            raise bad("lr_layer_decay", "a float in (0, 1] (1: no layer decay)", self.lr_layer_decay)
        if self.lock_image_unlocked_groups < 0:
            raise bad("lock_image_unlocked_groups", "an integer >= 0", self.lock_image_unlocked_groups)
        for key in ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"):
            if getattr(self, key) and not self.lock_image:
                raise ConfigError(f"config key {key!r}: applies to a locked image tower; set lock_image=true")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0", self.warmup_steps)
        if len(self.betas) != 2:
            raise bad("betas", "two floats", self.betas)
        if self.resume not in (None, "auto") and not isinstance(self.resume, str):
            raise bad("resume", "'auto', a checkpoint path or null", self.resume)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise bad("init_from", "a model folder or weights file path, or null", self.init_from)
        self.aug.validate("aug.")
        self.eval.validate("eval.")
        if self.data.group_size < 1:
            raise bad("data.group_size", "an integer >= 1", self.data.group_size)
        if self.data.group_size > 1 and not self.data.group_key:
            raise ConfigError("config key 'data.group_size': grouping needs data.group_key "
                              "(the JSON field naming the group)")
        if self.image_loss_weight < 0:
            raise bad("image_loss_weight", "a float >= 0", self.image_loss_weight)
        if self.image_loss_weight > 0 and not self.data.group_key:
            raise ConfigError("config key 'image_loss_weight': the image-image term needs data.group_key")
        if self.image_loss_temperature <= 0:
            raise bad("image_loss_temperature", "a positive float", self.image_loss_temperature)
        if self.data.group_key and self.loss != "clip":
            raise ConfigError(f"config key 'data.group_key': grouped training needs loss=clip, not {self.loss!r}")
        if not 0 < self.data.stream_timeout_s < float("inf"):
            raise bad("data.stream_timeout_s", "a positive number of seconds", self.data.stream_timeout_s)
        if self.data.num_samples is not None and self.data.num_samples < 1:
            raise bad("data.num_samples", "an integer >= 1 or null", self.data.num_samples)
        if self.data.synthetic:  # no shards: data.train and data.weights are not read
            if self.epochs is not None and self.data.num_samples is None:
                raise ConfigError("config key 'data.num_samples': synthetic data with epochs needs an epoch length "
                                  "(e.g. data.num_samples=100000), or use max_steps")
        elif not self.data.train:
            raise ConfigError("config key 'data.train': set the training shards "
                              "(e.g. data.train='shards/{00000..00009}.tar'), or data.synthetic=true for random data")
        elif self.data.weights is not None and len(self.data.weights.split("::")) != len(self.data.train.split("::")):
            raise ConfigError("config key 'data.weights': give one weight per '::'-separated source in data.train")


def _dynamo_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())
