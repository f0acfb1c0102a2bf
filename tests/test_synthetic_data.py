"""``data.synthetic``: random batches in the real loader's format, valid token ids, determinism
per (seed, rank, step), config validation, and a real ``mmrl train`` run on them."""
import json
import sys

import pytest
import torch
from test_train import TINY, run, shape_shards

import mmrl
from mmrl.config import ConfigError, load_config
from mmrl.data.augment import AugConfig, build_train_transform
from mmrl.data.loader import LoaderConfig, make_train_loader
from mmrl.data.synthetic import SYNTHETIC_NUM_SAMPLES, make_synthetic_loader
from mmrl.train import TrainConfig

MODEL = "mmrl-vit-tiny-p8-64"


@pytest.fixture(scope="module")
def tiny():
    """(model, train transform as ``mmrl train`` builds it, tokenizer) of the tiny recipe's model."""
    model, preprocess, _ = mmrl.create_model_and_transforms(MODEL)
    return model, build_train_transform(preprocess, AugConfig()), mmrl.get_tokenizer(MODEL)


def synthetic(tiny, **kw):
    _, preprocess, tokenizer = tiny
    loader_kw = {k: kw.pop(k) for k in ("rank", "world_size", "epoch", "start_step") if k in kw}
    cfg = LoaderConfig(**{"train": "", "batch_size": 4, "num_samples": 40, **kw})
    return make_synthetic_loader(cfg, preprocess, tokenizer, **loader_kw)


def same(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and a["step"] == b["step"] and a["key"] == b["key"]
            and all(torch.equal(a[k], b[k]) for k in ("image", "text", "group") if k in a))


@pytest.mark.parametrize("group_key", [None, "concept"])
def test_batches_match_a_real_loaders_batch_for_the_same_model(tmp_path, tiny, group_key):
    _, preprocess, tokenizer = tiny
    urls = shape_shards(tmp_path, 16, 4)
    real_loader = make_train_loader(LoaderConfig(train=urls, batch_size=4, workers=0, num_samples=16,
                                                 group_key=group_key), preprocess, tokenizer)
    real = next(iter(real_loader))
    real_loader.close()
    loader = synthetic(tiny, group_key=group_key)
    fake = next(iter(loader))
    assert fake.keys() == real.keys()
    for key in ("image", "text") + (("group",) if group_key else ()):
        assert fake[key].shape == real[key].shape and fake[key].dtype == real[key].dtype, key
    assert fake["image"].shape == (4, 3, 64, 64)
    assert fake["step"] == real["step"] == 0 and isinstance(fake["step"], int)
    assert len(fake["key"]) == 4 and all(isinstance(k, str) for k in fake["key"]) and len(set(fake["key"])) == 4
    assert fake["skipped"] == real["skipped"] == {}  # the counts since the previous batch: none
    assert loader.num_skipped == 0 and loader.skipped == dict.fromkeys(real_loader.skipped, 0)
    assert loader.num_shards == 0 and len(loader) == loader.num_batches
    assert -6 < float(fake["image"].min()) < -1 and 1 < float(fake["image"].max()) < 6  # normalised-image range
    assert float(fake["image"].std()) == pytest.approx(1.0, abs=0.1)
    loader.close()


def check_layout(text: torch.Tensor, start: int | None, end: int, pad: int, vocab: int, specials: set[int]):
    assert text.dtype == torch.long and int(text.min()) >= 0 and int(text.max()) < vocab
    lengths = []
    for row in text.tolist():
        if start is not None:
            assert row[0] == start
            row = row[1:]
        assert row.count(end) == 1
        n = row.index(end)
        assert all(t == pad for t in row[n + 1:])  # padding after the end token
        assert 1 <= n and not specials & set(row[:n])  # at least one ordinary token, no special one
        lengths.append(n)
    assert len(set(lengths)) > 3  # caption lengths vary


def test_token_ids_are_valid_for_the_models_vocabulary_and_layout(tiny):
    model, _, tokenizer = tiny
    text = synthetic(tiny, batch_size=32).batch(0)["text"]
    assert text.shape == (32, model.context_length)
    check_layout(text, tokenizer.sot_token_id, tokenizer.eot_token_id, 0, model.token_embedding.num_embeddings,
                 set(tokenizer.all_special_ids))


def test_token_ids_of_a_hugging_face_tokenizer_follow_its_layout(tiny):
    _, preprocess, _ = tiny
    tokenizer = mmrl.get_tokenizer("mmrl-vit-tiny-p8-64-minilm")
    hf = tokenizer.tokenizer
    loader = make_synthetic_loader(LoaderConfig(train="", batch_size=32), preprocess, tokenizer)
    check_layout(loader.batch(0)["text"], hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.vocab_size,
                 set(hf.all_special_ids))


def test_a_batch_depends_only_on_seed_rank_and_step(tiny):
    whole = list(synthetic(tiny))
    assert [b["step"] for b in whole] == list(range(10))
    again = synthetic(tiny)
    assert all(same(again.batch(s), whole[s]) for s in (7, 0, 3))  # any order: no state between steps
    resumed = list(synthetic(tiny, start_step=6))
    assert len(resumed) == 4 and all(same(a, b) for a, b in zip(resumed, whole[6:]))
    assert sum(torch.equal(a["image"], b["image"]) for a, b in zip(whole, whole[1:])) <= 1  # steps differ
    assert not torch.equal(whole[0]["text"], whole[1]["text"]) or not torch.equal(whole[1]["text"], whole[2]["text"])
    rank0, rank1 = (synthetic(tiny, rank=r, world_size=2).batch(3) for r in (0, 1))
    assert not torch.equal(rank0["image"], rank1["image"]) and not torch.equal(rank0["text"], rank1["text"])
    assert rank0["key"] != rank1["key"]
    assert not torch.equal(synthetic(tiny, seed=1).batch(0)["image"], whole[0]["image"])


def test_epochs_follow_the_train_loader_contract(tiny):
    loader = synthetic(tiny, num_samples=10)  # ceil(10 / 4) = 3 batches per epoch
    assert (loader.num_batches, loader.num_samples, loader.dataset_size, loader.epoch) == (3, 12, 10, 0)
    assert [b["step"] for b in loader] == [0, 1, 2] and loader.epoch == 1
    assert [b["step"] for b in loader] == [3, 4, 5] and loader.epoch == 2
    mid = synthetic(tiny, num_samples=10, start_step=4)
    assert mid.epoch == 1 and [b["step"] for b in mid] == [4, 5] and mid.epoch == 2
    two_ranks = synthetic(tiny, num_samples=10, rank=1, world_size=2)  # ceil(10 / 8) = 2 per rank
    assert (two_ranks.num_batches, two_ranks.num_samples) == (2, 16)
    assert synthetic(tiny, num_samples=None).dataset_size == SYNTHETIC_NUM_SAMPLES
    with pytest.raises(ValueError, match="start_step 4 is in epoch 1, not 2"):
        synthetic(tiny, num_samples=10, start_step=4, epoch=2)


def test_group_ids_are_shared_by_group_size_samples_and_distinct_across_ranks(tiny):
    batch = synthetic(tiny, batch_size=8, group_key="concept", group_size=2).batch(5)
    groups = batch["group"].tolist()
    assert groups[0::2] == groups[1::2] or groups[1:-1:2] == groups[2::2]  # pairs, whatever the window offset
    assert len(set(groups)) in (4, 5)
    other = synthetic(tiny, batch_size=8, group_key="concept", group_size=2, rank=1, world_size=2).batch(5)
    assert not set(groups) & set(other["group"].tolist())


def one_line_error(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, TINY, overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_config_validation():
    cfg = load_config(TrainConfig, TINY, ["data.synthetic=true", "max_steps=2"])
    assert cfg.data.synthetic and cfg.data.train == "" and cfg.data.num_samples is None
    # data.train and data.weights are not read in synthetic mode (the trainer warns about data.train)
    load_config(TrainConfig, TINY, ["data.synthetic=true", "data.train=a.tar::b.tar", "data.weights=1"])
    load_config(TrainConfig, TINY, ["data.synthetic=true", "epochs=2", "data.num_samples=1000"])
    assert "'data.train'" in one_line_error(["max_steps=2"]) and "data.synthetic=true" in one_line_error([])
    assert "'data.num_samples'" in one_line_error(["data.synthetic=true", "epochs=2"])
    assert "'data.num_samples'" in one_line_error(["data.synthetic=true", "data.num_samples=0"])


@pytest.mark.slow
def test_mmrl_train_runs_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "mmrl", "train", TINY, "data.synthetic=true", "max_steps=2",
                "data.train=nowhere/{00000..00003}.tar", "batch_size=8", "log_every=1",
                f"output_dir={out}"])
    assert "data.train='nowhere/{00000..00003}.tar' is not read" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["skipped_samples"] == 0
    assert (out / "model").is_dir()
    saved = load_config(TrainConfig, out / "config.yaml")
    assert saved.data.synthetic
