"""Grouped training: the grouping stage, group ids in batches, and the grouped contrastive loss
(identity with open_clip's ClipLoss, a per-anchor reference for the image-image term)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image
from torchvision import transforms as T

import mmrl
from helpers.loader_batches import take_batches
from mmrl.config import ConfigError
from mmrl.data.loader import LoaderConfig, make_train_loader
from mmrl.data.wds_stages import group_id, group_samples, sample_group
from mmrl.train import TrainConfig
from mmrl.train.config import DataConfig
from mmrl.train.group_loss import GroupContrastiveLoss


def raw(key, group=None, json_bytes=None):
    sample = {"__key__": key}
    if json_bytes is not None:
        sample["json"] = json_bytes
    elif group is not None:
        sample["json"] = json.dumps({"concept": group}).encode()
    return sample


# --------------------------------------------------------------------------------------------
# the grouping stage
# --------------------------------------------------------------------------------------------
def test_sample_group_reads_the_json_field_and_tolerates_bad_json():
    assert sample_group(raw("a", "1f600"), "concept") == "1f600"
    assert sample_group(raw("b", json_bytes=json.dumps({"concept": 7}).encode()), "concept") == "7"
    assert sample_group(raw("c", json_bytes=b"{not json"), "concept") is None
    assert sample_group(raw("d", json_bytes=json.dumps({"concept": ""}).encode()), "concept") is None
    assert sample_group(raw("e", json_bytes=json.dumps({"concept": ["x"]}).encode()), "concept") is None
    assert sample_group(raw("f"), "concept") is None
    assert sample_group(raw("g", "x"), "other") is None


@pytest.mark.parametrize("size", [2, 3])
def test_group_samples_emits_every_sample_once_and_whole_groups_together(size):
    rng = np.random.default_rng(0)
    samples = [raw(f"{g}-{i}", f"g{g}") for g in range(40) for i in range(int(rng.integers(1, 6)))]
    samples += [raw(f"none-{i}") for i in range(7)]
    order = rng.permutation(len(samples))
    stream = [samples[i] for i in order]
    out = list(group_samples(iter(stream), "concept", size, max_pending=1000))
    assert sorted(s["__key__"] for s in out) == sorted(s["__key__"] for s in samples)
    # walk the output: a group's sample is either part of a full run of `size` or a leftover
    groups = [sample_group(s, "concept") for s in out]
    i, full_runs = 0, 0
    while i < len(groups):
        g = groups[i]
        if g is not None and groups[i:i + size] == [g] * size:
            full_runs += 1
            i += size
        else:
            i += 1
    expected = sum(len([s for s in samples if sample_group(s, "concept") == f"g{g}"]) // size for g in range(40))
    assert full_runs >= expected


def test_group_samples_releases_the_oldest_group_when_too_many_wait():
    stream = [raw(f"k{i}", f"g{i}") for i in range(5)] + [raw("k0b", "g0")]
    out = [s["__key__"] for s in group_samples(iter(stream), "concept", 2, max_pending=2)]
    # g0, then g1, g2 go out alone as the pending set overflows; the late partner of g0 is a leftover
    assert out[:3] == ["k0", "k1", "k2"]
    assert sorted(out) == sorted(s["__key__"] for s in stream)


def test_group_samples_with_size_one_is_the_identity():
    stream = [raw(f"k{i}", "same") for i in range(4)]
    assert list(group_samples(iter(stream), "concept", 1)) == stream


def test_group_id_is_stable_and_distinct():
    assert group_id("group:1f600") == group_id("group:1f600")
    ids = {group_id(f"group:{i}") for i in range(10000)}
    assert len(ids) == 10000 and min(ids) >= 0 and max(ids) < 2 ** 63


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------
def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(folder, n_groups=12, per_group=3, n_shards=4):
    samples = []
    for g in range(n_groups):
        for i in range(per_group):
            meta = {"concept": f"c{g}"} if g < n_groups - 1 else {}  # the last "group" has no concept
            samples.append((f"{g:03d}{i}", meta))
    rng = np.random.default_rng(1)
    samples = [samples[i] for i in rng.permutation(len(samples))]
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(n_shards):
        part = samples[s::n_shards]
        name = f"{s:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for j, (key, meta) in enumerate(part):
                for ext, data in (("jpg", _jpeg(j)), ("txt", f"caption {key}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = len(part)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / ("{00000..%05d}.tar" % (n_shards - 1)))  # noqa: UP031  (brace pattern)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_carry_group_ids_and_hold_groups_together(tmp_path, workers):
    urls = _shards(tmp_path)
    cfg = LoaderConfig(train=urls, batch_size=6, workers=workers, shuffle_buffer=20, shuffle_initial=10,
                       group_key="concept", group_size=3)
    transform = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
    loader = make_train_loader(cfg, transform, mmrl.get_tokenizer("mmrl-vit-tiny-p8-64"))
    batches = list(loader)
    loader.close()
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"{g:03d}{i}" for g in range(12) for i in range(3))  # one epoch, nothing lost
    for b in batches:
        assert b["group"].dtype == torch.long and b["group"].shape == (6,)
        for key, gid in zip(b["key"], b["group"].tolist()):
            g = int(key[:3])
            assert gid == (group_id(f"group:c{g}") if g < 11 else group_id(f"sample:{_url_of(urls, key)}#{key}"))
    # a concept is spread over the shards, so grouping collects it across shard boundaries
    if workers == 0:
        together = sum(len(set(b["group"].tolist())) for b in batches)
        assert together <= 6 * len(batches) // 2  # on average at least two samples per group in a batch


def _url_of(urls, key):
    folder = urls.rsplit("/", 1)[0]
    for tar in sorted(__import__("glob").glob(f"{folder}/*.tar")):
        with tarfile.open(tar) as t:
            if f"{key}.jpg" in t.getnames():
                return tar
    raise KeyError(key)


def test_train_config_checks_the_grouping_keys():
    base = dict(data=DataConfig(train="x.tar"), max_steps=1)
    with pytest.raises(ConfigError, match="data.group_size"):
        TrainConfig(**{**base, "data": DataConfig(train="x.tar", group_size=2)}).validate()
    with pytest.raises(ConfigError, match="image_loss_weight"):
        TrainConfig(**base, image_loss_weight=1.0).validate()
    with pytest.raises(ConfigError, match="loss=clip"):
        TrainConfig(**{**base, "data": DataConfig(train="x.tar", group_key="concept")}, loss="siglip").validate()
    TrainConfig(**{**base, "data": DataConfig(train="x.tar", group_key="concept", group_size=3)},
                image_loss_weight=0.5).validate()


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
def _features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return image, text


def test_distinct_groups_and_no_image_term_is_open_clips_clip_loss():
    image, text = _features()
    scale = torch.tensor(14.0)
    ref = ClipLoss()(image, text, scale)
    ref_grads = torch.autograd.grad(ref, (image, text))
    for groups in (None, torch.arange(12) * 7 + 3):
        ours = GroupContrastiveLoss()(image, text, scale, groups=groups)
        torch.testing.assert_close(ours, ref)
        for a, b in zip(torch.autograd.grad(ours, (image, text)), ref_grads):
            torch.testing.assert_close(a, b)


def _reference(image, text, scale, groups, weight, temp):
    """Per-anchor loops, straight from the definitions."""
    n = len(groups)
    li, lt = scale * image @ text.T, scale * text @ image.T
    clip = 0.0
    for i in range(n):
        pos = [j for j in range(n) if groups[j] == groups[i]]
        clip = clip - sum(li[i].log_softmax(0)[j] for j in pos) / len(pos) / 2
        clip = clip - sum(lt[i].log_softmax(0)[j] for j in pos) / len(pos) / 2
    clip = clip / n
    img = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pos = [j for j in others if groups[j] == groups[i]]
        if not pos:
            continue
        logits = torch.stack([image[i] @ image[j] / temp for j in others])
        logp = logits.log_softmax(0)
        img = img - sum(logp[others.index(j)] for j in pos) / len(pos)
    return clip + weight * img / n


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_grouped_loss_matches_the_per_anchor_reference(weight):
    image, text = _features()
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6])  # 3, 5 singletons: no image positive
    scale = torch.tensor(10.0)
    ours = GroupContrastiveLoss(image_weight=weight, image_temperature=0.2)(image, text, scale, groups=groups)
    ref = _reference(image, text, scale, groups.tolist(), weight, 0.2)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (image, text)), torch.autograd.grad(ref, (image, text))):
        torch.testing.assert_close(a, b)


def test_image_term_rewards_groups_that_are_close():
    image, text = _features(n=8)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = GroupContrastiveLoss(image_weight=1.0)
    base = loss(image, text, torch.tensor(10.0), groups=groups)
    assert loss.last["image_loss"] > 0
    close = image.detach().clone()
    close[1::2] = F.normalize(close[0::2] + 0.01 * close[1::2], dim=-1)
    better = loss(close, text, torch.tensor(10.0), groups=groups)
    assert loss.last["image_loss"] < 0.5 and better < base


@pytest.mark.parametrize("shared", [True, False])
def test_group_shared_aug_gives_a_groups_samples_the_same_random_draws(tmp_path, shared):
    # every group: two samples with the same image bytes; a strongly random transform
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for g in range(8):
            for i in range(2):
                key = f"{g:03d}{i}"
                for ext, data in (("jpg", _jpeg(g)), ("txt", f"caption {key}".encode()),
                                  ("json", json.dumps({"concept": f"c{g}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 16}))
    cfg = LoaderConfig(train=str(folder / "00000.tar"), batch_size=16, workers=0, shuffle_buffer=0,
                       group_key="concept", group_size=2, group_shared_aug=shared)
    transform = T.Compose([T.RandomResizedCrop(12, scale=(0.2, 1.0)), T.RandomGrayscale(0.5), T.ToTensor()])
    batch = next(iter(make_train_loader(cfg, transform, mmrl.get_tokenizer("mmrl-vit-tiny-p8-64"))))
    same = [torch.equal(batch["image"][2 * g], batch["image"][2 * g + 1]) for g in range(8)]
    assert batch["key"][0::2] == [f"{g:03d}0" for g in range(8)]
    assert all(same) if shared else not any(same)


@pytest.mark.parametrize("start", [3, 7])
def test_grouped_stream_resumes_exactly(tmp_path, start):
    """Grouping and shared augmentation are functions of the seeded stream: a loader started at
    step S gives the batches an uninterrupted one gave from S on (images included)."""
    urls = _shards(tmp_path, n_groups=16, per_group=3)
    cfg = LoaderConfig(train=urls, batch_size=4, workers=2, seed=5, shuffle_buffer=12, shuffle_initial=6,
                       resampled=True, num_samples=48, resample_segment=2, group_key="concept", group_size=2,
                       group_shared_aug=True)
    transform = T.Compose([T.RandomResizedCrop(12, scale=(0.3, 1.0)), T.RandomGrayscale(0.5), T.ToTensor()])
    tokenizer = mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")

    full, _ = take_batches(cfg, transform, tokenizer, 0, start + 4)
    resumed, _ = take_batches(cfg, transform, tokenizer, start, 4)
    for a, b in zip(full[start:], resumed):
        assert a["step"] == b["step"] and a["key"] == b["key"]
        assert torch.equal(a["group"], b["group"]) and torch.equal(a["image"], b["image"])
