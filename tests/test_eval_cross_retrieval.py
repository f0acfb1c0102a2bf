"""Cross-style image retrieval, the raw-pixel baseline model and the linear probe's train
subsample: metrics against a brute-force reference, the folder/identity rules, the CLI and the
suite (text tasks skipped for a model without a text encoder)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmrl.cli import main
from mmrl.evaluation import RunOptions
from mmrl.evaluation.context import load_eval_model
from mmrl.evaluation.cross_retrieval import cross_retrieval_metrics, read_identity_folder, run_cross_retrieval
from mmrl.evaluation.datasets import Subsample, dataset_fingerprint, image_folder
from mmrl.evaluation.features import capture_pooled, encode_images
from mmrl.evaluation.linear_probe import stratified_subsample
from mmrl.evaluation.raw_pixels import NoTextEncoder, RawPixelModel, parse_raw_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand_image(rng, size=24):
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3)).astype("uint8"))


def _folder(path: Path, images: dict) -> Path:
    path.mkdir(parents=True)
    for stem, img in images.items():
        img.save(path / f"{stem}.png")
    return path


def _opts(tmp_path, cache=None):
    return RunOptions(device="cpu", batch_size=4, num_workers=0, progress=False, out_dir=tmp_path / "res",
                      cache_dir=cache)


def brute_force_recall(q, g, qid, gid, k):
    """Reference: full score matrix, stable descending sort (ties by index), any positive in top k."""
    s = q.astype(np.float64) @ g.T.astype(np.float64)
    hits = []
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: (-s[i, j], j))[:k]
        hits.append(any(gid[j] == qid[i] for j in order))
    return float(np.mean(hits))


# --- metrics --------------------------------------------------------------------------------------

def test_metrics_equal_a_brute_force_reference_on_a_permuted_gallery():
    g = torch.Generator().manual_seed(0)
    n = 60
    base = torch.randn(n, 16, generator=g)
    q = F.normalize(base + 0.9 * torch.randn(n, 16, generator=g), dim=-1)
    perm = torch.randperm(n, generator=g)
    gal = F.normalize(base[perm] + 0.9 * torch.randn(n, 16, generator=g), dim=-1)
    qid = [f"c{i}" for i in range(n)]
    gid = [f"c{int(i)}" for i in perm]
    metrics, counts = cross_retrieval_metrics(q, gal, qid, gid, (1, 5, 10), chunk_size=7)
    assert counts == {"identities": n, "query_used": n, "gallery_used": n, "query_unmatched": 0,
                      "gallery_unmatched": 0}
    qn, gn = q.numpy(), gal.numpy()
    for k in (1, 5, 10):
        q2g = brute_force_recall(qn, gn, qid, gid, k)
        g2q = brute_force_recall(gn, qn, gid, qid, k)
        assert metrics[f"q2g_recall@{k}"] == pytest.approx(q2g)
        assert metrics[f"g2q_recall@{k}"] == pytest.approx(g2q)
        assert metrics[f"recall@{k}"] == pytest.approx((q2g + g2q) / 2)
    assert 0 < metrics["q2g_recall@1"] < 1 and metrics["q2g_recall@1"] != metrics["g2q_recall@1"]
    # a permutation of either side (features and identities together) changes nothing
    p2 = torch.randperm(n, generator=g)
    again, _ = cross_retrieval_metrics(q[p2], gal, [qid[i] for i in p2], gid, (1, 5, 10))
    assert again == pytest.approx(metrics)


def test_unshared_identities_are_left_out_and_ties_follow_the_index_rule():
    e = torch.eye(3)
    # query a, b, x (x only here); gallery z, a, b, y (z and y only here; z would be query a's
    # nearest neighbour, but is not a candidate)
    q = torch.stack([e[0], e[1], e[2]])
    gal = torch.stack([e[0], e[0], e[1], F.normalize(torch.ones(3), dim=0)])
    qid, gid = ["a", "b", "x"], ["z", "a", "b", "y"]
    metrics, counts = cross_retrieval_metrics(q, gal, qid, gid, (1, 2))
    assert counts == {"identities": 2, "query_used": 2, "gallery_used": 2, "query_unmatched": 1,
                      "gallery_unmatched": 2}
    # among the used gallery [a=e0, b=e1]: query a -> a first; query b -> b first
    assert metrics["q2g_recall@1"] == 1.0 and metrics["g2q_recall@1"] == 1.0
    # exact ties (every image identical): the candidate listed first takes rank 0, so only the
    # query whose positive comes first is a hit at 1, in both directions
    same = F.normalize(torch.ones(2, 4), dim=-1)
    m, _ = cross_retrieval_metrics(same, same, ["p", "q"], ["q", "p"], (1, 2))
    assert m["q2g_recall@1"] == 0.5 and m["g2q_recall@1"] == 0.5 and m["recall@2"] == 1.0
    m, _ = cross_retrieval_metrics(same, same, ["p", "q"], ["p", "q"], (1,))
    assert m["q2g_recall@1"] == 0.5 and m["g2q_recall@1"] == 0.5
    m, _ = cross_retrieval_metrics(same[:1], same, ["p"], ["p", "q"], (1,))
    assert m["q2g_recall@1"] == 1.0


def test_no_shared_identity_is_a_clear_error():
    x = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="no identity is shared"):
        cross_retrieval_metrics(x, x, ["a", "b", "c"], ["d", "e", "f"])


# --- folders, identities and the raw-pixel model ---------------------------------------------------

@pytest.fixture(scope="module")
def styles(tmp_path_factory):
    """Two "styles" of 12 concepts: style b is style a with slight noise, files shuffled in name
    order by a labels.json mapping; an extra concept on each side."""
    root = tmp_path_factory.mktemp("styles")
    rng = np.random.default_rng(0)
    concepts = {f"u{i:02d}": _rand_image(rng) for i in range(12)}
    _folder(root / "a" / "images", {**concepts, "only-a": _rand_image(rng)})
    b = {}
    for c, img in concepts.items():
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(24, 24, 3))
        b[c] = Image.fromarray(np.clip(arr, 0, 255).astype("uint8"))
    names = {c: f"img{k:03d}" for k, c in enumerate(reversed(list(b)))}
    _folder(root / "b" / "images", {names[c]: img for c, img in b.items()} | {"img999": _rand_image(rng)})
    labels = [{"filename": f"{names[c]}.png", "concept": c} for c in b]
    labels.append({"filename": "img999.png", "concept": "only-b"})
    (root / "b" / "labels.json").write_text(json.dumps({"style": "b", "images": labels}))
    _folder(root / "same", dict(concepts))
    return root


def test_identities_from_stems_or_labels_json(styles):
    a = read_identity_folder(styles / "a" / "images")
    b = read_identity_folder(styles / "b" / "images")
    assert a.ids_source == "file stem" and a.ids[:2] == ["only-a", "u00"] and len(a.ids) == 13
    assert b.ids_source.endswith("labels.json") and b.ids[0] == "u11" and b.ids[-1] == "only-b"
    with pytest.raises(FileNotFoundError):
        read_identity_folder(styles / "nothing")


def test_identical_images_give_recall_one_with_raw_pixels(styles, tmp_path):
    em = load_eval_model("raw-pixels")
    path, m = run_cross_retrieval(em, _opts(tmp_path), styles / "same", styles / "a" / "images", name="same")
    assert path.name == "same_cross_retrieval.json"
    assert all(m[f"{d}recall@{k}"] == 1.0 for d in ("q2g_", "g2q_", "") for k in (1, 5, 10))
    r = json.loads(path.read_text())
    assert r["task"] == "cross_retrieval" and r["model"] == "raw-pixels-32" and r["pretrained"] == "none"
    assert r["protocol"]["identities"] == 12 and r["protocol"]["gallery_unmatched"] == 1


def test_labels_json_pairs_shuffled_file_names(styles, tmp_path):
    em = load_eval_model("raw-pixels:16")
    _, m = run_cross_retrieval(em, _opts(tmp_path), "a/images", "b/images", root=styles)
    assert m["recall@1"] == 1.0  # noisy copies are still each other's nearest neighbours
    r = json.loads((tmp_path / "res" / "a-b_cross_retrieval.json").read_text())
    assert r["protocol"]["query_unmatched"] == 1 and r["protocol"]["gallery_unmatched"] == 1


def test_non_overlapping_folders_fail_clearly(tmp_path, capsys):
    rng = np.random.default_rng(1)
    q = _folder(tmp_path / "q", {"a": _rand_image(rng), "b": _rand_image(rng)})
    g = _folder(tmp_path / "g", {"c": _rand_image(rng)})
    assert main(["eval", "cross-retrieval", "--query", str(q), "--gallery", str(g), "--model", "raw-pixels",
                 "--out", str(tmp_path / "res"), "--no-cache", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no identity is shared by the query (2 images) and the gallery (1 images)" in err[0]
    assert not (tmp_path / "res").exists()


def test_raw_pixel_vector_is_the_resized_mean_centred_image():
    model = RawPixelModel(4)
    x = torch.rand(2, 3, 4, 4)
    v = model.encode_image(x)  # already 4 x 4: the flattened image minus its mean
    ref = x.flatten(1)
    assert torch.allclose(v, ref - ref.mean(1, keepdim=True), atol=1e-6)
    flat = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 9, 13)
    small = model.encode_image(flat).view(3, 16)  # resized: each channel stays constant
    assert torch.allclose(small, (torch.tensor([0.2, 0.5, 0.9]) - 1.6 / 3)[:, None].expand(3, 16), atol=1e-6)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(model.encode_image(x, normalize=True).norm(dim=1), torch.ones(2))
    emb, pooled = encode_images(model, x, torch.device("cpu"), False)
    assert torch.equal(emb, pooled)  # the pooled tap is the same vector
    with capture_pooled(model) as store:
        model.encode_image(x)
    assert store is not None and len(store) == 1
    with pytest.raises(NoTextEncoder, match="no text encoder"):
        model.encode_text(torch.zeros(1, 5, dtype=torch.long))
    em = load_eval_model("raw-pixels:8")
    assert em.info.key == "raw-pixels-8" and em.info.source == "raw-pixels" and em.info.pool is None
    assert em.preprocess(Image.new("L", (20, 10))).shape == (3, 8, 8)
    for bad in ("raw-pixels:0", "raw-pixels:x", "raw-pixels:"):
        with pytest.raises(ValueError, match="raw-pixels:SIZE"):
            load_eval_model(bad)
    assert parse_raw_pixels("raw-pixels-run") is None and parse_raw_pixels("raw-pixels:64") == 64


def test_identical_pooled_features_are_cached_once(styles, tmp_path):
    from safetensors.torch import load_file

    from mmrl.evaluation.datasets import ImageListDataset
    from mmrl.evaluation.features import extract_image_features

    em = load_eval_model("raw-pixels:8")
    ds = ImageListDataset(read_identity_folder(styles / "same").paths, em.preprocess)
    kw = dict(cache_dir=tmp_path, model_key=em.info.key, progress=False)
    first = extract_image_features(em.model, ds, **kw)
    (cached,) = tmp_path.iterdir()
    assert "pooled" not in load_file(str(cached)) and first.pooled is not None
    again = extract_image_features(em.model, ds, **kw)
    assert torch.equal(again.pooled, first.pooled) and torch.equal(again.embedding, first.embedding)


# --- train subsample ------------------------------------------------------------------------------

def test_stratified_subsample_counts_and_determinism():
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)[shuffle]
    idx = stratified_subsample(y, 20, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(y[idx], minlength=4).tolist() == [10, 6, 3, 1]
    assert torch.equal(idx, stratified_subsample(y, 20, seed=0))
    assert not torch.equal(idx, stratified_subsample(y, 20, seed=1))
    # largest remainders: 7 of (50, 30, 15, 5) -> exact 3.5, 2.1, 1.05, 0.35 -> 3, 2, 1, 0 + 1 to class 0
    assert torch.bincount(y[stratified_subsample(y, 7, seed=0)], minlength=4).tolist() == [4, 2, 1, 0]
    assert torch.equal(stratified_subsample(y, 1000, seed=0), torch.arange(100))
    with pytest.raises(ValueError):
        stratified_subsample(y, 0, seed=0)


def test_subsample_fingerprint_differs_from_the_full_split(tmp_path):
    rng = np.random.default_rng(2)
    for c in ("0-a", "1-b"):
        _folder(tmp_path / "train" / c, {str(k): _rand_image(rng, 8) for k in range(4)})
    ds = image_folder(tmp_path / "train")
    sub = Subsample(ds, [0, 5], [0, 1])
    assert dataset_fingerprint(sub) != dataset_fingerprint(ds)
    assert dataset_fingerprint(sub) != dataset_fingerprint(Subsample(ds, [0, 6], [0, 1]))
    assert dataset_fingerprint(sub) == dataset_fingerprint(Subsample(ds, [0, 5], [0, 1]))
    assert len(sub) == 2 and sub[1][1] == 1


# --- suite and linear probe with raw pixels ---------------------------------------------------------

def test_suite_with_raw_pixels_skips_text_tasks_and_runs_image_tasks(styles, tmp_path, capsys):
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for c, shade in (("0-dark", 40), ("1-light", 215)):
            imgs = {}
            for k in range(10 if split == "train" else 4):
                arr = np.clip(shade + rng.integers(-30, 31, size=(12, 12, 3)), 0, 255).astype("uint8")
                arr[: k % 6 + 2] = 255 - shade  # a band of varying height: same class, different pixels
                imgs[str(k)] = Image.fromarray(arr)
            _folder(styles / "cls" / split / c, imgs)
    (styles / "dataset_x.json").write_text("{}")
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"suite: px\nroot: {styles}\nentries:\n"
        "  - {task: retrieval, name: caps, annotations: dataset_x.json}\n"
        "  - {task: zeroshot, name: cls, data: cls/test}\n"
        "  - {task: cross-retrieval, name: ab, query: a/images, gallery: b/images}\n"
        "  - {task: image-retrieval, name: cls, data: cls/test}\n"
        "  - {task: linear-probe, name: cls, train: cls/train, test: cls/test, train_limit: 8}\n"
        "  - {task: cross-retrieval, name: gone, query: nope/images, gallery: b/images, hint: 'make it'}\n")
    common = ["--model", "raw-pixels:8", "--out", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"),
              "--workers", "0"]
    assert main(["eval", "suite", str(suite), *common]) == 0
    out = capsys.readouterr().out
    assert "3 ok, 3 skipped, 0 failed" in out and "make it" in out
    summary = json.loads((tmp_path / "res" / "suite_px.json").read_text())
    status = [(e["status"], e["message"]) for e in summary["entries"]]
    assert status[:2] == [("skipped", "raw-pixels has no text encoder")] * 2
    assert [s for s, _ in status[2:]] == ["ok", "ok", "ok", "skipped"]
    assert summary["entries"][2]["metrics"]["recall@1"] == 1.0
    lp = json.loads((tmp_path / "res" / "cls_linear_probe.json").read_text())
    p = lp["protocol"]
    assert p["train_limit"] == 8 and p["train_images"] == 8 and p["train_images_available"] == 20
    assert p["train"] + p["val"] == 8 and p["feature_dim"] == 3 * 8 * 8 and p["test"] == 8
    assert lp["metrics"]["lp_acc1"] == 1.0  # dark vs light is linearly separable in pixels
    cached = sorted(f.name for f in (tmp_path / "cache").iterdir())
    assert any(n.startswith("cls-train-limit8-seed0-") for n in cached)
    # without the limit the full split is encoded and cached apart from the subsample
    assert main(["eval", "linear-probe", "--train", str(styles / "cls" / "train"), "--test",
                 str(styles / "cls" / "test"), *common]) == 0
    lp = json.loads((tmp_path / "res" / "cls_linear_probe.json").read_text())
    assert lp["protocol"]["train_images"] == 20 and lp["protocol"]["train_limit"] is None
    cached = [f.name for f in (tmp_path / "cache").iterdir()]
    assert any(n.startswith("cls-train-") and "limit" not in n for n in cached)
