"""The training loader (mmrl.data.loader) on tiny shards written here in img2dataset's layout.

Every test runs under an alarm guard: a loader that hangs fails the test instead of blocking.
"""
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import mmrl
from helpers.guards import fail_after
from helpers.loader_batches import take_batches
from mmrl.data.batching import decode_image, inception_crop_box, plan_transform, sample_caption
from mmrl.data.loader import LoaderConfig, epoch_sizing, make_train_loader, parse_sources
from mmrl.data.wds_stages import LoaderStallError, StreamStats, shard_samples

GUARD_S = 60
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def hang_guard():
    """Fail (not block) when a test runs longer than GUARD_S seconds."""
    with fail_after(GUARD_S, "the loader hangs"):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")


def train_transform(size=16):
    return T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


# --------------------------------------------------------------------------------------------
# shards in img2dataset's layout
# --------------------------------------------------------------------------------------------
_rng = np.random.default_rng(0)


def jpeg(size=24, seed=None):
    rng = np.random.default_rng(seed) if seed is not None else _rng
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, np.full_like(x, 128.0)], -1)
    img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good(key):
    return {"key": key, "jpg": jpeg(), "txt": f"caption of {key}",
            "json": {"key": key, "captions": [f"caption of {key}"]}}


def write_shard(path, samples, truncate_in=None):
    """Write ``samples`` (dicts: key, jpg, txt, json; None = missing) as a tar; with
    ``truncate_in=KEY`` the file is cut in the middle of that sample's image data."""
    cut = None
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if s.get(ext) is None:
                    continue
                data = s[ext] if isinstance(s[ext], bytes) else (
                    json.dumps(s[ext]) if ext == "json" else s[ext]).encode()
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                if s["key"] == truncate_in and ext == "jpg":
                    cut = tar.offset + 512 + len(data) // 2
                tar.addfile(info, io.BytesIO(data))
    if cut is not None:
        with open(path, "r+b") as fh:
            fh.truncate(cut)


def write_dataset(folder, shards, sizes=None):
    """``shards``: list of sample lists; writes 00000.tar ..., *_stats.json and sizes.json."""
    os.makedirs(folder, exist_ok=True)
    table = {}
    for i, samples in enumerate(shards):
        name = f"{i:05d}.tar"
        write_shard(os.path.join(folder, name), samples)
        table[name] = len(samples) if sizes is None else sizes[i]
        with open(os.path.join(folder, f"{i:05d}_stats.json"), "w") as fh:
            json.dump({"count": len(samples), "successes": table[name]}, fh)
    with open(os.path.join(folder, "sizes.json"), "w") as fh:
        json.dump(table, fh)
    return os.path.join(folder, "{%05d..%05d}.tar" % (0, len(shards) - 1))  # noqa: UP031  (brace pattern)


def simple_dataset(folder, n_shards, per_shard, prefix=""):
    shards = [[good(f"{prefix}{s:05d}{i:04d}") for i in range(per_shard)] for s in range(n_shards)]
    return write_dataset(folder, shards), [s["key"] for shard in shards for s in shard]


def keys_of(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.extend(batch["key"])
    return out


# --------------------------------------------------------------------------------------------
# shard boundaries, epoch mode
# --------------------------------------------------------------------------------------------
def test_webdataset_1x_emits_end_of_shard_marker_and_grouping_ignores_it(tmp_path):
    """The hazard itself (webdataset >= 0.2.96 yields {} after each shard) and our grouping."""
    urls, keys = simple_dataset(tmp_path, 2, 3)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    sources = list(wds.tariterators.url_opener([{"url": u} for u in shards]))
    items = list(wds.tariterators.tar_file_expander(sources))
    for source in sources:  # webdataset leaves its files open
        source["stream"].close()
    assert items.count({}) == 2
    stats = StreamStats(10, 10)
    got = [s for u in shards for s in shard_samples(u, stats)]
    assert [s["__key__"] for s in got] == keys
    assert all(set(s) == {"__key__", "__url__", "jpg", "txt", "json"} for s in got)
    assert stats.take_delta() == {}


@pytest.mark.parametrize("workers", [1, 2])
def test_epoch_mode_sees_every_sample_once_across_shard_boundaries(tmp_path, tokenizer, workers):
    urls, keys = simple_dataset(tmp_path, 6, 10)
    cfg = LoaderConfig(train=urls, batch_size=5, workers=workers, shuffle_buffer=8, shuffle_initial=3, seed=1)
    loader = make_train_loader(cfg, train_transform(), tokenizer)
    assert (loader.num_batches, loader.num_samples, loader.num_shards) == (12, 60, 6)
    first = keys_of(loader)
    second = keys_of(loader)   # persistent workers, next epoch
    loader.close()
    assert sorted(first) == sorted(keys) and sorted(second) == sorted(keys)
    assert first != second     # reshuffled per epoch
    assert loader.epoch == 2 and loader.step == 24 and loader.num_skipped == 0


def test_batches_have_the_documented_format(tmp_path, tokenizer):
    urls, _ = simple_dataset(tmp_path, 2, 6)
    loader = make_train_loader(LoaderConfig(train=urls, batch_size=4, workers=0), train_transform(16), tokenizer)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].is_contiguous()
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == torch.int64
    assert len(batch["key"]) == 4 and batch["step"] == 0 and isinstance(batch["skipped"], dict)
    assert len(loader) == loader.num_batches == 3


# --------------------------------------------------------------------------------------------
# sources, weights, sizing
# --------------------------------------------------------------------------------------------
def test_brace_expansion_folders_and_multiple_sources(tmp_path):
    a, _ = simple_dataset(tmp_path / "a", 3, 2)
    b, _ = simple_dataset(tmp_path / "b", 2, 5)
    sources = parse_sources(f"{a}::{tmp_path / 'b'}", "1::3")
    assert [len(s.shards) for s in sources] == [3, 2]
    assert [s.weight for s in sources] == [1.0, 3.0]
    assert [s.sizes for s in sources] == [[2, 2, 2], [5, 5]]
    assert sources[0].shards[0].endswith("a/00000.tar") and sources[1].shards[-1].endswith("b/00001.tar")
    with pytest.raises(ValueError, match="2 weights"):
        parse_sources(a, "1::2")
    with pytest.raises(FileNotFoundError):
        parse_sources(str(tmp_path / "missing" / "*.tar"))


def test_epoch_size_from_sizes_json_and_from_num_samples(tmp_path, tokenizer):
    a, _ = simple_dataset(tmp_path / "a", 4, 7)
    b, _ = simple_dataset(tmp_path / "b", 2, 5)
    subset = str(tmp_path / "a" / "{00000..00002}.tar")            # 3 of a's 4 shards: 21
    loader = make_train_loader(LoaderConfig(train=f"{subset}::{b}", batch_size=4, workers=0), train_transform(),
                               tokenizer)
    assert loader.dataset_size == 21 + 10
    assert (loader.num_batches, loader.num_samples) == (8, 32)     # ceil(31 / 4)
    cfg = LoaderConfig(train=f"{subset}::{b}", batch_size=4, workers=0, num_samples=100)
    loader = make_train_loader(cfg, train_transform(), tokenizer, world_size=2, rank=1)
    assert loader.dataset_size == 100 and (loader.num_batches, loader.num_samples) == (13, 104)
    # open_clip's arithmetic: 43 samples, global batch 10, 2 workers -> 3 batches each
    assert epoch_sizing(43, 5, 2, 2) == (6, 60)
    assert epoch_sizing(43, 5, 2, 2, round_up=False) == (4, 40)
    os.remove(tmp_path / "b" / "sizes.json")
    with pytest.raises(ValueError, match="num_samples"):
        make_train_loader(LoaderConfig(train=f"{subset}::{b}", batch_size=4, workers=0), train_transform(), tokenizer)


def test_fewer_shards_than_ranks_times_workers_is_an_error(tmp_path, tokenizer):
    urls, _ = simple_dataset(tmp_path, 3, 4)
    with pytest.raises(ValueError, match=r"3 shards < 2 ranks x 2 workers = 4"):
        make_train_loader(LoaderConfig(train=urls, batch_size=2, workers=2), train_transform(), tokenizer,
                          world_size=2)
    # fine with enough shards per worker, or when resampling
    make_train_loader(LoaderConfig(train=urls, batch_size=2, workers=1), train_transform(), tokenizer, world_size=3,
                      rank=2)
    make_train_loader(LoaderConfig(train=urls, batch_size=2, workers=2, resampled=True), train_transform(), tokenizer,
                      world_size=2)
    with pytest.raises(ValueError, match="resampled"):
        make_train_loader(LoaderConfig(train=f"{urls}::{urls}", weights="1::2", batch_size=2, workers=0),
                          train_transform(), tokenizer)


def test_weighted_resampling_gives_each_source_its_share_of_samples(tmp_path, tokenizer):
    # source a: 2 shards of 10, source b: 4 shards of 10 -> shard-uniform sampling would give b 67 %
    a, _ = simple_dataset(tmp_path / "a", 2, 10, prefix="a")
    b, _ = simple_dataset(tmp_path / "b", 4, 10, prefix="b")
    cfg = LoaderConfig(train=f"{a}::{b}", weights="1::3", resampled=True, num_samples=4000, batch_size=50,
                       workers=1, shuffle_buffer=20, shuffle_initial=5, seed=3)
    loader = make_train_loader(cfg, train_transform(8), tokenizer)
    keys = keys_of(loader)
    loader.close()
    assert len(keys) == 4000
    share_b = sum(k.startswith("b") for k in keys) / len(keys)
    assert abs(share_b - 0.75) < 0.06, share_b
    counts = Counter(keys)
    assert max(counts.values()) > 1   # drawn with replacement


# --------------------------------------------------------------------------------------------
# determinism and resume
# --------------------------------------------------------------------------------------------
def _stream(urls, tokenizer, start_step, n_batches, **kw):
    cfg = LoaderConfig(train=urls, batch_size=4, workers=2, seed=7, shuffle_buffer=10, shuffle_initial=4,
                       max_consecutive_bad_samples=50, **kw)
    return take_batches(cfg, train_transform(), tokenizer, start_step, n_batches)


def _with_bad_samples(folder):
    shards = []
    for s in range(5):
        samples = [good(f"{s:05d}{i:04d}") for i in range(8)]
        samples[3]["jpg"] = b"not a jpeg"          # skipped: bad image
        samples[5]["txt"] = None                   # skipped: no caption
        shards.append(samples)
    return write_dataset(folder, shards)


@pytest.mark.parametrize("start", [5, 6, 9, 13])   # 9: last batch of epoch 0, then epoch 1
def test_resampled_resume_continues_the_stream_exactly(tmp_path, tokenizer, start):
    urls = _with_bad_samples(tmp_path)
    kw = dict(resampled=True, num_samples=40, resample_segment=3)   # 10 batches/epoch, segment = 6 steps
    full, _ = _stream(urls, tokenizer, 0, start + 6, **kw)
    resumed, loader = _stream(urls, tokenizer, start, 6, **kw)
    assert [b["step"] for b in resumed] == list(range(start, start + 6))
    for a, b in zip(full[start:], resumed):
        assert a["key"] == b["key"] and a["step"] == b["step"]
        assert torch.equal(a["text"], b["text"])
        assert torch.equal(a["image"], b["image"])    # random crops included
    assert sum(b["skipped"].get("bad_image", 0) for b in full) > 0


def test_epoch_mode_resume_mid_epoch_continues_the_epoch(tmp_path, tokenizer):
    urls = _with_bad_samples(tmp_path)
    full, loader = _stream(urls, tokenizer, 0, 14, num_samples=40)      # 10 batches per epoch
    resumed, _ = _stream(urls, tokenizer, 7, 7)
    assert [b["step"] for b in resumed] == list(range(7, 14))
    for a, b in zip(full[7:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_same_seed_same_stream_other_seed_other_stream(tmp_path, tokenizer):
    urls, _ = simple_dataset(tmp_path, 4, 6)
    kw = dict(resampled=True, num_samples=24)
    a, _ = _stream(urls, tokenizer, 0, 4, **kw)
    b, _ = _stream(urls, tokenizer, 0, 4, **kw)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    cfg = LoaderConfig(train=urls, batch_size=4, workers=2, seed=8, resampled=True, num_samples=24)
    other = keys_of(make_train_loader(cfg, train_transform(), tokenizer))
    assert other[:16] != [k for x in a for k in x["key"]]


# --------------------------------------------------------------------------------------------
# bad data
# --------------------------------------------------------------------------------------------
def test_bad_samples_and_truncated_tar_are_skipped_and_counted(tmp_path, tokenizer):
    """Each shard: bad samples first, then 10 good ones; workers=2, so the counts cross
    process boundaries with the batches."""
    def shard(s, bad):
        return bad + [good(f"{s:05d}{i:04d}") for i in range(10)]
    shards = [
        shard(0, [dict(good("00000bad0"), jpg=b"\xff\xd8 garbage"), dict(good("00000bad1"), txt=None)]),
        shard(1, [dict(good("00001bad0"), txt="   "), dict(good("00001bad1"), jpg=None)]),
        shard(2, [dict(good("00002bad0"), jpg=jpeg()[:60])]),               # truncated JPEG data
        shard(3, []) + [good("00003tail")],                                  # truncated in its last sample
    ]
    folder = tmp_path / "d"
    urls = write_dataset(folder, shards, sizes=[10, 10, 10, 10])
    write_shard(folder / "00003.tar", shards[3], truncate_in="00003tail")
    cfg = LoaderConfig(train=urls, batch_size=5, workers=2, shuffle_buffer=0)
    loader = make_train_loader(cfg, train_transform(), tokenizer)
    keys = keys_of(loader)
    loader.close()
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(10))
    assert loader.skipped == {"bad_image": 2, "no_caption": 2, "no_image": 1, "bad_shards": 1}
    assert loader.num_skipped == 5


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    samples = [good(f"k{i}") for i in range(6)]
    write_shard(tmp_path / "t.tar", samples, truncate_in="k4")
    stats = StreamStats(10, 10)
    got = list(shard_samples(str(tmp_path / "t.tar"), stats))
    assert [s["__key__"] for s in got[:4]] == ["k0", "k1", "k2", "k3"]
    assert all("jpg" in s and "txt" in s for s in got[:4])
    assert stats.take_delta() == {"bad_shards": 1}


def test_everything_bad_fails_fast_naming_the_shards(tmp_path, tokenizer):
    shards = [[dict(good(f"{s}{i:03d}"), jpg=b"broken") for i in range(30)] for s in range(2)]
    urls = write_dataset(tmp_path, shards)
    cfg = LoaderConfig(train=urls, batch_size=4, workers=1, max_consecutive_bad_samples=25)
    loader = make_train_loader(cfg, train_transform(), tokenizer)
    with pytest.raises(LoaderStallError, match=r"25 consecutive samples were unusable.*0000[01]\.tar"):
        keys_of(loader)
    loader.close()


def test_missing_corrupt_or_empty_shards_fail_fast(tmp_path, tokenizer):
    write_shard(tmp_path / "00000.tar", [])
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar file" * 100)
    urls = f"{tmp_path}/0000{{0..3}}.tar"        # empty, garbage, then two missing files
    cfg = LoaderConfig(train=urls, batch_size=2, workers=2, resampled=True, num_samples=8,
                       max_consecutive_bad_shards=5)
    loader = make_train_loader(cfg, train_transform(), tokenizer)
    with pytest.raises(LoaderStallError, match=r"5 consecutive shards yielded no sample.*0000\d\.tar"):
        keys_of(loader)
    loader.close()


def _bad_files(folder):
    folder.mkdir()
    (folder / "empty.tar").write_bytes(b"")
    (folder / "notes.tar").write_text("not a tar\n" * 100)
    tarfile.open(folder / "none.tar", "w").close()  # a valid tar with no file in it
    write_shard(folder / "good.tar", [good("k0"), good("k1")])
    return folder


@pytest.mark.parametrize("train, message", [
    ("missing/{00000..00003}.tar", "missing/{00000..00003}.tar: none of its 4 shards exist (missing/00000.tar, "
                                   "missing/00001.tar, missing/00002.tar and 1 more)"),
    ("b/empty.tar", "b/empty.tar: this shard is empty (0 bytes)"),
    ("b/notes.tar", "b/notes.tar: this shard is not a tar file (no tar header at its start)"),
    ("b/none.tar", "b/none.tar: this shard is an empty tar (no files)"),
    ("b/good.tar::b/gone.tar", "b/gone.tar: no such shard"),
    ("b/{good,gone,empty}.tar", "b/{good,gone,empty}.tar: 1 of its 3 shards do not exist (b/gone.tar)"),
    ("b/{good,none}.tar", "b/none.tar: this shard is an empty tar (no files)"),
])
def test_missing_or_invalid_shards_are_named_at_start(tmp_path, tokenizer, monkeypatch, train, message):
    """Without sizes.json (the epoch length depends on every shard): one line naming the files."""
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path / "b")
    cfg = LoaderConfig(train=train, batch_size=2, workers=0, resampled=True)
    with pytest.raises(ValueError) as err:
        make_train_loader(cfg, train_transform(), tokenizer)
    assert str(err.value) == message


def test_unusable_first_shard_is_named_even_with_num_samples(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path / "b")
    cfg = LoaderConfig(train="b/{notes,empty}.tar", batch_size=2, workers=0, resampled=True, num_samples=8)
    with pytest.raises(ValueError, match=r"^b/notes.tar: this shard is not a tar file \(no tar header at its "
                                         r"start\); 1 more of the 2 shards of b/\{notes,empty\}.tar too$"):
        make_train_loader(cfg, train_transform(), tokenizer)


def test_some_bad_shards_are_one_warning_then_skipped_and_counted(tmp_path, tokenizer, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path / "b")
    cfg = LoaderConfig(train="b/{gone,good,empty}.tar", batch_size=2, workers=0, num_samples=4, shuffle_buffer=0)
    loader = make_train_loader(cfg, train_transform(), tokenizer)  # the first shard probed: then all of them
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["b/{gone,good,empty}.tar: 1 of its 3 shards do not exist (b/gone.tar); "
                      "they are skipped and counted (bad_shards)"]
    assert sorted(keys_of(loader)) == ["k0", "k0", "k1", "k1"]  # the one good shard, read again for the epoch
    assert loader.skipped["bad_shards"] >= 2
    skipped = [r.getMessage() for r in caplog.records if "skipping the rest of shard" in r.getMessage()]
    assert skipped and len(skipped) <= 3  # a worker shows its first three, counts the rest


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stalled_stream_is_one_line_and_nothing_else(tmp_path, tokenizer, caplog, workers):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_shard(folder / "00000.tar", [{"key": "k", "json": {"a": 1}}])  # a tar, but no image or caption
    for i in range(1, 8):
        (folder / f"{i:05d}.tar").write_bytes(b"")
    cfg = LoaderConfig(train=f"{folder}/{{00000..00007}}.tar", batch_size=2, workers=workers, resampled=True,
                       num_samples=8, max_consecutive_bad_shards=4)
    loader = make_train_loader(cfg, train_transform(), tokenizer)
    with pytest.raises(LoaderStallError) as err:
        keys_of(loader)
    loader.close()
    text = str(err.value)
    assert len(text.splitlines()) == 1 and text.startswith("4 consecutive shards yielded no sample")
    assert "is empty (0 bytes)" in text and "Traceback" not in text
    assert not [r for r in caplog.records if "skipping the rest of shard" in r.getMessage()]


def test_captions_from_txt_or_json():
    sample = {"txt": b"  a dog  ", "json": json.dumps({"captions": ["one", " ", "two"]}).encode()}
    assert sample_caption(sample) == "a dog"
    import random
    picks = {sample_caption(sample, random.Random(i), multi_caption=True) for i in range(20)}
    assert picks == {"one", "two"}
    assert sample_caption({"txt": b" \n"}) is None and sample_caption({}) is None
    assert sample_caption({"txt": b"x", "json": b"{bad"}, multi_caption=True) == "x"


# --------------------------------------------------------------------------------------------
# decoding and preprocessing
# --------------------------------------------------------------------------------------------
def test_draft_decode_reduces_large_jpegs_and_gives_the_same_tensor_shape(tmp_path, tokenizer):
    data = jpeg(256, seed=1)
    assert decode_image(data).size == (256, 256)
    assert decode_image(data, 64).size == (64, 64)       # DCT scaling 1/4
    assert decode_image(data, 100).size == (128, 128)    # never below the requested size
    assert decode_image(data, 200).size == (256, 256)
    _, preprocess, _ = mmrl.create_model_and_transforms("mmrl-vit-tiny-p8-64", pool="tok")
    plan = plan_transform(preprocess)
    assert plan.kind == "tensor" and plan.draft_size <= 64
    drafted = plan.collate([plan.row(decode_image(data, plan.draft_size))])
    full = plan.collate([plan.row(decode_image(data))])
    assert drafted.shape == full.shape == (1, 3, 64, 64)
    # and through the loader
    urls = write_dataset(tmp_path, [[dict(good(f"{s}{i}"), jpg=jpeg(256)) for i in range(4)] for s in range(2)])
    for draft in (True, False):
        loader = make_train_loader(LoaderConfig(train=urls, batch_size=4, workers=0, draft=draft), preprocess,
                                   tokenizer)
        assert next(iter(loader))["image"].shape == (4, 3, 64, 64)


def test_png_with_alpha_and_grayscale_jpeg_decode_to_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, format="JPEG")
    img = decode_image(buf.getvalue(), 16)
    assert img.mode == "RGB" and img.size == (16, 16)
    with pytest.raises(Exception):
        decode_image(b"\x89PNG\r\n\x1a\n truncated")


def test_fused_preprocessing_matches_the_open_clip_transform():
    _, preprocess_train, preprocess_val = mmrl.create_model_and_transforms("mmrl-vit-tiny-p8-64", pool="tok")
    images = [decode_image(jpeg(s, seed=s)) for s in (70, 96, 150)]
    reference = torch.stack([preprocess_val(img) for img in images])
    exact = plan_transform(preprocess_val, fast_resize=False)
    fast = plan_transform(preprocess_val)
    generic = plan_transform(lambda img: preprocess_val(img))
    assert (exact.kind, fast.kind, generic.kind) == ("pil", "tensor", "generic")
    for plan, tol in ((exact, 1e-5), (generic, 0.0)):
        assert (plan.collate([plan.row(img) for img in images]) - reference).abs().max() <= tol
    fast_out = fast.collate([fast.row(img) for img in images])
    diff = (fast_out - reference).abs()
    assert diff.max() < 6 / 255 / min(STD) and diff.mean() < 0.02   # a few 8-bit levels at most
    # other PIL steps run unchanged (exact), whatever their channel count
    gray = T.Compose([T.Resize(20), T.CenterCrop(20), T.Grayscale(1), T.ToTensor(), T.Normalize((0.5,), (0.25,))])
    plan = plan_transform(gray)
    assert plan.kind == "pil"
    out = plan.collate([plan.row(img) for img in images])
    assert out.shape == (3, 1, 20, 20) and (out - torch.stack([gray(img) for img in images])).abs().max() < 1e-5
    # random crops: same box distribution; shapes as the transform's
    plan = plan_transform(preprocess_train)
    assert plan.collate([plan.row(img) for img in images]).shape == (3, 3, 64, 64)


def test_inception_crop_box_follows_torchvisions_distribution():
    import random
    torch.manual_seed(0)
    rng = random.Random(0)
    img = torch.zeros(1, 200, 300)
    for scale in ((0.3, 1.0), (0.9, 1.0)):
        ours, theirs = [], []
        for _ in range(3000):
            top, left, h, w = inception_crop_box(200, 300, scale, (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
            ours.append((h * w / 60000, w / h, (top + h / 2) / 200, (left + w / 2) / 300))
            top, left, h, w = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
            theirs.append((h * w / 60000, w / h, (top + h / 2) / 200, (left + w / 2) / 300))
        ours, theirs = np.array(ours), np.array(theirs)
        assert np.allclose(ours.mean(0), theirs.mean(0), atol=0.02), (ours.mean(0), theirs.mean(0))
        assert np.allclose(ours.std(0), theirs.std(0), atol=0.02), (ours.std(0), theirs.std(0))
    assert inception_crop_box(10, 100, (0.99, 1.0), (1.0, 1.0), rng) == (0, 45, 10, 10)  # fallback: central
