"""Retrieval and zero-shot numbers equal CLIP_benchmark's own ``evaluate`` on the same model and
data (its dataset classes and collate function, our tiny random-init model)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmrl
from mmrl.evaluation import RunOptions
from mmrl.evaluation.context import EvalModel, ModelInfo
from mmrl.model.factory import create_transforms

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "red blue green small large round square dog cat bird tree house car boat sun moon".split()
CLASSES = ["apple", "bicycle", "castle", "dolphin", "eagle", "forest"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="ggem").eval()
    preprocess = create_transforms(model)[1]
    tokenizer = mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")
    info = ModelInfo("mmrl-vit-tiny-p8-64", "random-init(seed=0)", "ggem", "random-init", "test:tiny")
    return EvalModel(model, preprocess, tokenizer, info)


def noise_image(rng, size=(40, 36)):
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 60, size=(*size, 3)), 0, 255).astype("uint8")
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    """A Flickr-style CSV (CLIP_benchmark's format) over 14 images with 1-4 captions each."""
    root = tmp_path_factory.mktemp("flickr")
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(14):
        noise_image(rng).save(root / f"{1000 + i}.jpg", quality=95)
        for k in range(1 + i % 4):
            words = rng.choice(WORDS, size=5)
            lines.append(f"{1000 + i}.jpg,a {' '.join(words)} number {i} {k}")
    (root / "tiny_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    rng = np.random.default_rng(1)
    for c in CLASSES:
        (root / c).mkdir()
        for k in range(5):
            noise_image(rng, (32, 32)).save(root / c / f"{k}.png")
    return root


def image_captions_collate_fn(batch):
    """CLIP_benchmark's collate for caption datasets (its builder module needs ``requests``)."""
    images, texts = zip(*batch)
    return torch.stack(images), texts


def test_retrieval_equals_clip_benchmark(tiny, flickr_like, tmp_path):
    from clip_benchmark.datasets.flickr import Flickr
    from clip_benchmark.metrics import zeroshot_retrieval as cb

    from mmrl.evaluation.retrieval import evaluate, run_retrieval

    ds = Flickr(str(flickr_like), str(flickr_like / "tiny_test_karpathy.txt"), transform=tiny.preprocess)
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=image_captions_collate_fn)
    want = cb.evaluate(tiny.model, loader, tiny.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    got = evaluate(tiny.model, loader, tiny.tokenizer, "cpu", amp=False, progress=False)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-7), key
    assert 0 < want["image_retrieval_recall@1"] < 1  # not a degenerate case
    # the CLI path (annotation parsing, cached features, chunked ranking) gives the same numbers
    opts = RunOptions(device="cpu", batch_size=4, progress=False, cache_dir=tmp_path / "cache", out_dir=tmp_path)
    path, metrics = run_retrieval(tiny, opts, flickr_like / "tiny_test_karpathy.txt", eccv=False)
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-7), key
    assert path.name == "tiny_test_karpathy_zeroshot_retrieval.json"


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's ``accuracy`` calls float() on a 1-element array, which numpy >= 2.4
    rejects; this is the same computation with ``.item()``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zeroshot_equals_clip_benchmark(tiny, folder, tmp_path, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as cb
    from torchvision.datasets import ImageFolder

    from mmrl.evaluation.zeroshot import evaluate, run_zeroshot

    monkeypatch.setattr(cb, "accuracy", _accuracy)  # the numpy >= 2.4 workaround above
    ds = ImageFolder(str(folder), transform=tiny.preprocess)
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    want = cb.evaluate(tiny.model, loader, tiny.tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    got = evaluate(tiny.model, loader, tiny.tokenizer, CLASSES, TEMPLATES, "cpu", amp=False, progress=False)
    assert got == pytest.approx(want, abs=1e-12)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    opts = RunOptions(device="cpu", batch_size=4, progress=False, cache_dir=None, out_dir=tmp_path)
    _, metrics = run_zeroshot(tiny, opts, str(folder), classnames=str(tmp_path / "classes.txt"),
                              templates=str(tmp_path / "templates.txt"))
    assert metrics == pytest.approx(want, abs=1e-12)
