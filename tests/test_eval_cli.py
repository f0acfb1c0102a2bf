"""``mmrl eval`` end to end on tiny synthetic data: result files, feature cache, suites, tables,
and one clear error line for bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmrl
from mmrl.cli import main
from mmrl.evaluation import features as feat_mod

ARCH = "mmrl-vit-tiny-p8-64"
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red square", "blue circle", "green line", "black dot", "white cross", "grey ring"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _img(rng, size=32):
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3)).astype("uint8"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        (root / "images").mkdir(exist_ok=True)
        _img(rng).save(root / "images" / f"{i}.png")
        caps = [f"picture {i} number {k}" for k in range(1 + i % 3)] + (["a shared caption"] if i in (2, 5) else [])
        images.append({"filepath": "images", "filename": f"{i}.png", "split": "test", "imgid": i,
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 10 * i + k}
                                     for k, c in enumerate(caps)]})
    (root / "dataset_toy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            d = root / "shapes" / split / f"{c}-{name.replace(' ', '-')}"
            d.mkdir(parents=True)
            for k in range(4):
                _img(rng).save(d / f"{k}.png")
        (root / "shapes" / split / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def run(*args):
    return main(["eval", *map(str, args)])


def load(path):
    return json.loads(Path(path).read_text())


def test_retrieval_writes_clip_benchmark_schema_and_uses_the_cache(data, tmp_path, monkeypatch, capsys):
    common = ["--model", ARCH, "--out", tmp_path / "res", "--cache-dir", tmp_path / "cache", "--workers", 0]
    assert run("retrieval", "--annotations", data / "dataset_toy.json", *common) == 0
    r = load(tmp_path / "res" / "toy_zeroshot_retrieval.json")
    assert {"dataset", "model", "pretrained", "task", "metrics", "language", "protocol"} <= set(r)
    assert r["task"] == "zeroshot_retrieval" and r["model"] == ARCH and r["mmrl"]["pool"] == "ggem"
    p = r["protocol"]
    assert p["images"] == 8 and p["captions"] == 17 and p["split"] == "test" and p["format"] == "karpathy"
    assert p["duplicate_captions"] == "shared" and p["duplicate_caption_texts"] == 1
    assert set(r["metrics"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@10", "rsum"}
    # a re-run reads the cached features: nothing is encoded again
    monkeypatch.setattr(feat_mod, "_compute_image_features", lambda *a, **k: pytest.fail("image cache missed"))
    monkeypatch.setattr(feat_mod, "_encode_texts", lambda *a, **k: pytest.fail("text cache missed"))
    assert run("retrieval", "--annotations", data / "dataset_toy.json", *common) == 0
    assert load(tmp_path / "res" / "toy_zeroshot_retrieval.json")["metrics"] == r["metrics"]
    assert "toy_zeroshot_retrieval.json" in capsys.readouterr().out


def test_sets_sharing_their_captions_share_one_text_cache_file(tmp_path, monkeypatch):
    """One caption list under two evaluation sets' labels (a concept list drawn in two styles) is
    encoded once; another list is not mistaken for it."""
    torch.manual_seed(0)
    model, tok = mmrl.create_model(ARCH, pool="ggem"), mmrl.get_tokenizer(ARCH)
    calls = []
    real = feat_mod._encode_texts
    monkeypatch.setattr(feat_mod, "_encode_texts", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    texts = ["a red square", "a blue circle", "a green line"]
    first = feat_mod.extract_text_features(model, tok, texts, progress=False, cache_dir=tmp_path,
                                           label="set-a-captions")
    again = feat_mod.extract_text_features(model, tok, texts, progress=False, cache_dir=tmp_path,
                                           label="set-b-captions")
    other = feat_mod.extract_text_features(model, tok, texts[::-1], progress=False, cache_dir=tmp_path,
                                           label="set-a-captions")
    assert calls == [texts, texts[::-1]]
    assert torch.equal(first, again) and torch.allclose(other, first.flip(0), atol=1e-6)


def test_trimmed_padding_gives_the_same_text_features():
    """A Hugging Face tower (MiniLM, mean pooling) runs only up to the longest real token; an
    open_clip text transformer gets its tokens unchanged."""
    torch.manual_seed(0)
    name = "mmrl-vit-tiny-p8-64-minilm"
    model, tok = mmrl.create_model(name, pool="ggem").eval(), mmrl.get_tokenizer(name)
    tokens = tok(["a cat", "a much longer caption about a small brown dog"])
    trimmed = feat_mod.trim_padding(model, tokens)
    pad = model.text.config.pad_token_id
    assert 1 < trimmed.shape[1] < tokens.shape[1] and (tokens[:, trimmed.shape[1]:] == pad).all()
    assert (trimmed[:, -1] != pad).any()  # the longest caption keeps every real token
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
    plain = mmrl.create_model(ARCH, pool="ggem")
    plain_tokens = mmrl.get_tokenizer(ARCH)(["a cat"])
    assert feat_mod.trim_padding(plain, plain_tokens) is plain_tokens


def test_cache_is_invalidated_when_the_saved_model_changes(data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = mmrl.create_model(ARCH, pool="gem")
    mmrl.save_model(model, tmp_path / "m")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    args = ["zeroshot", "--data", data / "shapes" / "test", "--model", tmp_path / "m", "--out", tmp_path / "res",
            "--cache-dir", tmp_path / "cache", "--workers", 0, "--templates", tmp_path / "t.txt"]
    calls = []
    real = feat_mod._compute_image_features
    monkeypatch.setattr(feat_mod, "_compute_image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run(*args) == 0 and run(*args) == 0
    assert len(calls) == 1  # second run: cache hit
    with torch.no_grad():
        model.visual.pooler.p.add_(1.0)  # "train" the model and save it over the old one
    mmrl.save_model(model, tmp_path / "m")
    assert run(*args) == 0
    assert len(calls) == 2  # the weights changed: recomputed
    r = load(tmp_path / "res" / "shapes_zeroshot_classification.json")
    assert r["protocol"]["classnames_source"].endswith("classnames.txt") and r["protocol"]["classes"] == 6
    assert r["mmrl"]["pool"] == "gem" and r["pretrained"] == str((tmp_path / "m").resolve())


def test_zeroshot_linear_probe_image_retrieval(data, tmp_path):
    common = ["--model", ARCH, "--out", tmp_path, "--no-cache", "--workers", 0]
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    assert run("zeroshot", "--data", data / "shapes" / "test", "--templates", tmp_path / "t.txt", *common) == 0
    z = load(tmp_path / "shapes_zeroshot_classification.json")
    assert set(z["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and z["protocol"]["templates"] == 2
    assert run("linear-probe", "--train", data / "shapes" / "train", "--test", data / "shapes" / "test", *common) == 0
    lp = load(tmp_path / "shapes_linear_probe.json")
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "l2_lambda", "C"} <= set(lp["metrics"])
    assert lp["protocol"]["features"] == "pooled" and lp["protocol"]["feature_dim"] == 192  # tiny ViT width
    assert lp["protocol"]["train"] + lp["protocol"]["val"] == 24 and lp["protocol"]["test"] == 24
    assert run("image-retrieval", "--data", data / "shapes" / "test", *common) == 0
    ir = load(tmp_path / "shapes_image_retrieval.json")
    assert set(ir["metrics"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert ir["protocol"]["queries"] == 24


def test_suite_runs_present_entries_and_skips_missing_ones(data, tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"suite: mini\nroot: {data}\nentries:\n"
        "  - {task: retrieval, name: toy, annotations: dataset_toy.json}\n"
        "  - {task: zeroshot, name: shapes, data: shapes/test, templates: ['a {c}'], trained_on: true}\n"
        "  - {task: linear-probe, name: gone, train: nothing/train, test: nothing/test, hint: 'mmrl prepare x'}\n"
        "  - {task: zeroshot, dataset: cifar10}\n")
    assert run("suite", suite, "--model", ARCH, "--out", tmp_path / "res", "--no-cache", "--workers", 0) == 0
    out = capsys.readouterr().out
    assert "2 ok, 2 skipped, 0 failed" in out and "mmrl prepare x" in out and "cifar-10-batches-py" in out
    summary = load(tmp_path / "res" / "suite_mini.json")
    assert [e["status"] for e in summary["entries"]] == ["ok", "ok", "skipped", "skipped"]
    assert [e["trained_on"] for e in summary["entries"]] == [False, True, False, False]
    assert (tmp_path / "res" / "toy_zeroshot_retrieval.json").is_file()


@pytest.mark.parametrize("entry, message", [
    ("{task: zeroshot, data: x, trained_on: 'yes'}", r"entries\[0\] \(zeroshot\): trained_on must be true or false"),
    ("{task: zeroshot, data: x, seen: true}", r"entries\[0\] \(zeroshot\): unknown keys \['seen'\]"),
])
def test_suite_entry_errors_name_the_entry_and_key(tmp_path, entry, message):
    from mmrl.evaluation.suite import load_suite

    suite = tmp_path / "bad.yaml"
    suite.write_text(f"suite: bad\nentries:\n  - {entry}\n")
    with pytest.raises(ValueError, match=message):
        load_suite(suite)


@pytest.mark.parametrize("name", ["transfer.yaml", "demo.yaml"])
def test_shipped_suites_parse_and_skip_without_data(name, tmp_path, capsys):
    from mmrl.evaluation.suite import load_suite

    suite = load_suite(ROOT / "eval" / "suites" / name)
    assert suite.entries
    assert run("suite", ROOT / "eval" / "suites" / name, "--root", tmp_path / "empty", "--model", ARCH,
               "--out", tmp_path / "res", "--no-cache") == 0
    assert f"0 ok, {len(suite.entries)} skipped, 0 failed" in capsys.readouterr().out


def test_table_side_by_side_with_mean_and_std_over_seeds(tmp_path, capsys):
    from mmrl.evaluation.context import ModelInfo
    from mmrl.evaluation.results import write_result

    info = ModelInfo(ARCH, "x", "ggem", "saved", "k")
    for folder, acc in (("ggem-seed0", 0.50), ("ggem-seed1", 0.60), ("avg-seed0", 0.40)):
        write_result(tmp_path / folder, "cifar10", "zeroshot_classification",
                     {"acc1": acc, "acc5": 0.9, "mean_per_class_recall": acc}, info, {})
    dirs = [tmp_path / d for d in ("ggem-seed0", "ggem-seed1", "avg-seed0")]
    assert run("table", *dirs) == 0
    out = capsys.readouterr().out
    assert "| dataset | task | metric | ggem | avg |" in out
    assert "| cifar10 | zeroshot_classification | acc1 | 55.00 ± 7.07 (n=2) | 40.00 |" in out
    assert run("table", *dirs, "--format", "csv", "--metrics", "acc1") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "dataset,task,metric,ggem,ggem std,ggem n,avg,avg std,avg n"
    assert lines[1].startswith("cifar10,zeroshot_classification,acc1,0.55,0.0707107,2,0.4,,1")


def test_table_of_a_parent_folder_finds_the_results_in_its_subfolders(tmp_path, capsys):
    from mmrl.evaluation.context import ModelInfo
    from mmrl.evaluation.results import write_result

    info = ModelInfo(ARCH, "x", "ggem", "saved", "k")
    runs = tmp_path / "runs"
    for folder, acc in (("ggem-seed0/eval", 0.50), ("ggem-seed1/eval", 0.60), ("avg", 0.40),
                        ("avg/.mmrl/cache", 0.99)):
        write_result(runs / folder, "cifar10", "zeroshot_classification",
                     {"acc1": acc, "acc5": 0.9, "mean_per_class_recall": acc}, info, {})
    (runs / "ggem-seed0" / "summary.json").write_text('{"step": 8}')  # a run's files are not results
    (runs / "avg" / "suite_x.json").write_text('{"entries": []}')
    assert run("table", runs) == 0
    out = capsys.readouterr().out
    assert "| dataset | task | metric | avg | ggem/eval |" in out
    assert "| cifar10 | zeroshot_classification | acc1 | 40.00 | 55.00 ± 7.07 (n=2) |" in out
    assert run("table", f"mine={runs}", "--format", "csv", "--metrics", "acc1") == 0
    assert capsys.readouterr().out.startswith("dataset,task,metric,mine/avg,mine/avg std,mine/avg n,mine/ggem/eval,")
    assert run("table", runs / "avg") == 0  # a folder holding results itself: only its own files
    assert "| avg |" in capsys.readouterr().out
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert run("table", tmp_path / "empty") == 2
    assert "no result files (*.json), nor any in its subfolders" in capsys.readouterr().err


def _error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_clear_error_line(data, tmp_path, capsys):
    common = ["--model", ARCH, "--out", tmp_path, "--no-cache", "--workers", 0]
    assert run("retrieval", "--annotations", tmp_path / "missing.json", *common) == 2
    assert "missing.json: annotation file not found" in _error_line(capsys)
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "a.png"}]}')
    assert run("retrieval", "--annotations", tmp_path / "bad.json", *common) == 2
    assert "bad.json: JSON with 'images' but neither" in _error_line(capsys)
    assert run("retrieval", "--annotations", data / "dataset_toy.json", "--images", tmp_path, *common) == 2
    assert "8 of 8 images not found" in _error_line(capsys)
    assert run("zeroshot", "--data", "no-such-dataset", *common) == 2
    assert "no-such-dataset: neither an image folder" in _error_line(capsys)
    assert run("zeroshot", "--data", "cifar10", "--root", tmp_path, *common) == 2
    assert "cifar10: not found under" in _error_line(capsys)
    assert run("zeroshot", "--data", data / "shapes" / "test", "--model", "no-such-model", "--no-cache") == 2
    assert "no-such-model: neither a saved model folder nor a known architecture" in _error_line(capsys)
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(broken / "a" / "y.png")
    assert run("zeroshot", "--data", broken, "--templates", data / "none.txt", *common) == 2
    assert "none.txt: templates file not found" in _error_line(capsys)
    (tmp_path / "t.txt").write_text("a {c}\n")
    assert run("zeroshot", "--data", broken, "--templates", tmp_path / "t.txt", *common) == 2
    assert "cannot read image" in (line := _error_line(capsys)) and "x.png" in line
