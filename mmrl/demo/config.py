"""``mmrl demo`` configuration: where the corpora and the run live, the training recipe (a
``train:`` section of :class:`mmrl.train.TrainConfig` keys), the evaluation suite, the
baselines and the pooling study. YAML (``configs/demo.yaml``) plus ``key=value`` overrides:

    mmrl demo train.max_steps=100 prepare_limit=200
    mmrl demo --study study.seeds=[0,1,2,3]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict

__all__ = ["DemoConfig", "StudyConfig", "BASELINES"]

# untrained: the architecture with every weight at random initialisation (no pretrained weights);
# pretrained-init: the recipe's model at step 0 -- its pretrained parts (a locked text tower, a
# pretrained stem) loaded, the rest random; raw-pixels: an image as its RGB pixels.
BASELINES = ("untrained", "pretrained-init", "raw-pixels")
POOLS = ("tok", "avg", "max", "gem", "ggem", "cgem", "attn")


@dataclass
class StudyConfig:
    pools: list[str] = field(default_factory=lambda: ["tok", "avg", "gem", "ggem", "cgem"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/study"
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the demo's train section
    recipe: str = "pinned"                               # "pinned": apply study.train; "demo": the demo's
                                                         # train section as it is (study.train ignored)
    only: str | None = None                           # evaluate only these suite entries
    exclude: list[str] = field(default_factory=list)     # ... and not these (task or name substring)

    def overrides(self) -> dict[str, Any]:
        """The overrides of the demo's train section that every study run gets."""
        return dict(self.train) if self.recipe == "pinned" else {}

    def validate(self) -> None:
        bad = [p for p in self.pools if p not in POOLS]
        if bad or not self.pools:
            raise ConfigError(f"config key 'study.pools': expected a non-empty list of {', '.join(POOLS)}, "
                              f"got {self.pools!r}")
        if self.recipe not in ("pinned", "demo"):
            raise ConfigError(f"config key 'study.recipe': expected 'pinned' (apply study.train) or 'demo', "
                              f"got {self.recipe!r}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"config key 'study.seeds': expected distinct integers, got {self.seeds!r}")


@dataclass
class DemoConfig:
    root: str = "data"                       # prepared corpora (mmrl prepare NAME --root ROOT)
    out: str = "runs/demo"                   # the run: train/, eval/, plots/, report.md
    corpora: list[str] = field(default_factory=lambda: ["emoji", "tuxpaint", "fashion-mnist", "glyphs"])
    train_corpora: list[str] = field(default_factory=lambda: ["emoji", "glyphs"])  # whose train/ shards are trained on
    prepare_limit: int | None = None      # cap source items per corpus (CI-sized demo); None: all
    prepare_limits: dict[str, int] = field(default_factory=dict)  # per-corpus caps (override prepare_limit)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys (data.train, output_dir filled in)
    suite: str = "eval/suites/demo.yaml"
    only: str | None = None               # run only suite entries whose name or task contains this
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    floor_baselines: list[str] = field(default_factory=lambda: ["untrained", "raw-pixels"])  # the floor's; the
                                             # other baselines are reported beside it (gap per set)
    baseline_exclude: dict[str, list[str]] = field(
        default_factory=lambda: {"pretrained-init": ["zeroshot", "linear-probe"]})
                                             # suite entries a baseline skips (task, or name substring)
    raw_pixel_size: int = 32
    eval_batch_size: int = 128
    eval_workers: int = 1
    baselines_alongside_training: bool = False  # evaluate the baselines in a second process while the model trains
    train_threads: int | None = 1         # intra-op CPU threads of `mmrl train` (null: torch's default)
    baseline_threads: int | None = 1      # ... and of the baselines' process when it runs alongside
    floor_margin: float = 0.05               # quality floor: trained - best baseline >= this (fraction)
    check_floor: bool = True                 # exit non-zero when the quality floor is not met
    study: StudyConfig = field(default_factory=StudyConfig)

    def validate(self) -> None:
        from ..prepare import RECIPES

        for key in ("corpora", "train_corpora"):
            bad = [c for c in getattr(self, key) if c not in RECIPES]
            if bad:
                raise ConfigError(f"config key {key!r}: unknown corpus {bad[0]!r} (known: {', '.join(RECIPES)})")
        missing = [c for c in self.train_corpora if c not in self.corpora]
        if missing:
            raise ConfigError(f"config key 'train_corpora': {missing[0]!r} is not in 'corpora' (it must be prepared)")
        if self.prepare_limit is not None and self.prepare_limit < 1:
            raise ConfigError(f"config key 'prepare_limit': expected a positive integer or null, "
                              f"got {self.prepare_limit!r}")
        for name, n in self.prepare_limits.items():
            if name not in self.corpora or not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"config key 'prepare_limits.{name}': expected a corpus of 'corpora' with a "
                                  f"positive integer, got {n!r}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"config key 'baselines': unknown baseline {bad[0]!r} (known: {', '.join(BASELINES)})")
        bad = [b for b in self.floor_baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"config key 'floor_baselines': unknown baseline {bad[0]!r} "
                              f"(known: {', '.join(BASELINES)})")
        for name, patterns in self.baseline_exclude.items():
            if name not in BASELINES or not isinstance(patterns, list) or not all(isinstance(x, str) and x
                                                                                  for x in patterns):
                raise ConfigError(f"config key 'baseline_exclude.{name}': expected a baseline of "
                                  f"{', '.join(BASELINES)} with a list of task names or name substrings, "
                                  f"got {patterns!r}")
        for key in ("raw_pixel_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r}: expected an integer >= 1, got {getattr(self, key)!r}")
        for key in ("train_threads", "baseline_threads"):
            n = getattr(self, key)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ConfigError(f"config key {key!r}: expected an integer >= 1 or null, got {n!r}")
        if self.eval_workers < 0:
            raise ConfigError(f"config key 'eval_workers': expected an integer >= 0, got {self.eval_workers!r}")
        for key in ("output_dir", "resume"):
            if key in self.train:
                raise ConfigError(f"config key 'train.{key}': set by the demo (the run lives in 'out')")
        # the recipe's keys are checked now, with one placeholder source per training corpus
        self.train_config("::".join(f"/nonexistent/{c}/train" for c in self.train_corpora), "/nonexistent/out")

    def limit_for(self, corpus: str) -> int | None:
        return self.prepare_limits.get(corpus, self.prepare_limit)

    def train_config(self, shards: str, output_dir: str | Path, extra: dict[str, Any] | None = None,
                     prefix: str = "train."):
        """The :class:`TrainConfig` of a run: the ``train`` section (+ ``extra``), its data and output."""
        from ..config import merge
        from ..train import TrainConfig

        data = merge(dict(self.train), dict(extra or {}))
        data = merge(data, {"data": {"train": shards}, "output_dir": str(output_dir), "resume": "auto"})
        return from_dict(TrainConfig, data, prefix=prefix)
