"""GGeM towers as open_clip models: registry, pooling wiring, open_clip parity, save/load."""
import json

import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer

import mmrl
from mmrl.pooling import GGeM, list_pools

TINY = "mmrl-vit-tiny-p8-64"


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_registry_has_mmrl_and_open_clip_vits():
    names = mmrl.list_models()
    assert {"mmrl-vit-tiny-p8-64", "mmrl-vit-small-p8-64", "mmrl-vit-tiny-p8-64-minilm",
            "mmrl-vit-tiny-p16-64-minilm"} <= set(names)
    assert {"ViT-B-16", "ViT-B-32", "ViT-L-14"} <= set(names)
    assert "RN50" not in names  # not a ViT: nothing to pool
    # pure open_clip configs are registered with open_clip as well
    assert TINY in open_clip.list_models()


@pytest.mark.parametrize("pool", list_pools())
def test_every_pool_kind_runs_in_a_tower(pool, images):
    model = mmrl.create_model(TINY, pool=pool).eval()
    assert isinstance(model, open_clip.CLIP)
    assert isinstance(model.visual, VisionTransformer) and model.visual.pool_type == pool
    tokenizer = mmrl.get_tokenizer(TINY)
    text = tokenizer(["a red apple", "a cat", "a chick inside an egg"])
    image_features, text_features, logit_scale = model(images, text)
    assert image_features.shape == text_features.shape == (3, 256)
    assert torch.isfinite(image_features).all() and logit_scale.dim() == 0
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))


def test_ggem_defaults_one_group_per_head():
    model = mmrl.create_model(TINY)  # pool defaults to ggem
    heads = 192 // 32
    assert isinstance(model.visual.pooler, GGeM) and model.visual.pooler.p.shape == (heads,)
    assert "visual.pooler.p" in model.state_dict()
    assert "visual.pooler.p" in model.no_weight_decay()
    custom = mmrl.create_model(TINY, pool="ggem", pool_kwargs={"groups": 12, "p_init": 2.0, "eps": 1e-5})
    assert custom.visual.pooler.p.shape == (12,) and custom.visual.pooler.eps == 1e-5


@pytest.mark.parametrize("pool", ["avg", "max", "gem", "ggem", "cgem", "attn"])
def test_class_token_excluded(pool):
    visual = mmrl.create_model(TINY, pool=pool).visual
    x = torch.randn(2, 1 + 64, 192)
    pooled, tokens = visual._global_pool(x)
    x2 = x.clone()
    x2[:, 0] += 5.0
    pooled2, _ = visual._global_pool(x2)
    torch.testing.assert_close(pooled, pooled2)
    torch.testing.assert_close(tokens, x[:, 1:])


def test_tok_uses_class_token():
    visual = mmrl.create_model(TINY, pool="tok").visual
    x = torch.randn(2, 65, 192)
    torch.testing.assert_close(visual._global_pool(x)[0], x[:, 0])


@pytest.mark.parametrize("after", [False, True])
def test_layernorm_before_or_after_pooling(after):
    visual = mmrl.create_model(TINY, pool="ggem", final_ln_after_pool=after).visual
    with torch.no_grad():
        visual.ln_post.bias.add_(0.3)
    x = torch.randn(2, 65, 192)
    pooled, _ = visual._pool(x)
    expected = visual.ln_post(visual.pooler(x[:, 1:])) if after else visual.pooler(visual.ln_post(x)[:, 1:])
    torch.testing.assert_close(pooled, expected)


@pytest.fixture(scope="module")
def vit_b16_reference():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16").eval()


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_open_clip_parity(pool, vit_b16_reference):
    reference = vit_b16_reference
    reference.visual.pool_type = pool  # open_clip's own pooling paths
    ours = mmrl.create_model("ViT-B-16", pool=pool).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())  # no pooler keys for tok/avg
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog"])
    with torch.no_grad():
        assert torch.equal(ours.encode_image(image), reference.encode_image(image))
        assert torch.equal(ours.encode_text(text), reference.encode_text(text))
    reference.visual.pool_type = "tok"


def test_open_clip_weights_load_into_ggem_with_only_pooler_keys_missing(vit_b16_reference):
    ours = mmrl.create_model("ViT-B-16", pool="ggem")
    result = ours.load_state_dict(vit_b16_reference.state_dict(), strict=False)
    assert result.missing_keys == ["visual.pooler.p"] and result.unexpected_keys == []
    assert ours.visual.pooler.p.shape == (12,)


@pytest.mark.parametrize("pool,kwargs", [("ggem", {"p_init": 2.5}), ("attn", {}), ("cgem", {}), ("tok", {})])
def test_save_load_round_trip(tmp_path, images, pool, kwargs):
    model = mmrl.create_model(TINY, pool=pool, pool_kwargs=kwargs or None, final_ln_after_pool=True).eval()
    if hasattr(model.visual.pooler, "p"):
        with torch.no_grad():
            model.visual.pooler.p.copy_(torch.rand_like(model.visual.pooler.p) * 3 + 1)
    mmrl.save_model(model, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["open_clip_config.json", "open_clip_model.safetensors"]  # no temp files left
    loaded, preprocess, tokenizer = mmrl.load_model(tmp_path / "m")
    assert loaded.visual.pool_type == pool and loaded.visual.final_ln_after_pool
    text = tokenizer(["a red apple", "two cats"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(text), loaded.encode_text(text))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    from PIL import Image

    assert preprocess(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_tok_model_loads_in_plain_open_clip(tmp_path, images):
    model = mmrl.create_model(TINY, pool="tok").eval()
    mmrl.save_model(model, tmp_path / "m")
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), model.encode_image(images))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        mmrl.load_model(tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="open_clip_config.json: not valid JSON"):
        mmrl.load_model(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(ValueError, match="'model_cfg' missing"):
        mmrl.load_model(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickled with weights_only=False, this creates the marker file
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage, reason", [
    ("empty", "header too small; 0 bytes"),
    ("header", "invalid header length; 1,000 bytes"),
    ("data", "incomplete metadata, file not fully covered"),
])
def test_damaged_weights_are_one_line_naming_the_file(tmp_path, capsys, damage, reason):
    folder = tmp_path / "m"
    mmrl.save_model(mmrl.create_model(TINY, pool="ggem"), folder)
    weights = folder / "open_clip_model.safetensors"
    size = {"empty": 0, "header": 1000, "data": weights.stat().st_size // 2}[damage]
    with open(weights, "r+b") as fh:
        fh.truncate(size)
    message = f"{weights}: not a readable safetensors file ({reason}"
    with pytest.raises(ValueError) as err:
        mmrl.load_model(folder)
    assert str(err.value).startswith(message) and str(err.value).endswith("; save or copy the model again")
    from mmrl.cli import main

    assert main(["eval", "image-retrieval", "--model", str(folder), "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "res")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmrl eval: error: {message}")


def test_a_pickled_bin_that_runs_code_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "m"
    mmrl.save_model(mmrl.create_model(TINY, pool="ggem"), folder)
    (folder / "open_clip_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": _Payload(marker)}, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        mmrl.load_model(folder)
    assert str(err.value) == (f"{folder / 'open_clip_pytorch_model.bin'}: refused to load (it needs 'io.open', "
                              f"not a tensor type; read with torch.load(weights_only=True))")
    assert not marker.exists()
    torch.save(mmrl.create_model(TINY, pool="ggem").state_dict(), folder / "open_clip_pytorch_model.bin")
    assert mmrl.load_model(folder)[0].visual.pool_type == "ggem"  # a plain state dict loads


def test_weights_that_do_not_match_config_are_rejected(tmp_path):
    mmrl.save_model(mmrl.create_model(TINY, pool="ggem"), tmp_path / "m")
    cfg_path = tmp_path / "m" / "open_clip_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_cfg"]["vision_cfg"]["pool_type"] = "avg"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected.*visual.pooler.p"):
        mmrl.load_model(tmp_path / "m")


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        mmrl.create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="unknown pool_type 'median'"):
        mmrl.create_model(TINY, pool="median")
    with pytest.raises(ValueError, match=r"unknown keys \['pool_groups'\]"):
        mmrl.create_model(TINY, vision_cfg={"pool_groups": 3})
    with pytest.raises(ValueError, match="no open_clip ViT"):
        mmrl.create_model("RN50")
    with pytest.raises(ValueError, match="precision"):
        mmrl.create_model(TINY, precision="fp8")


def test_bf16_autocast_forward_is_finite(images):
    model = mmrl.create_model(TINY, pool="ggem").eval()
    with torch.no_grad():
        ref = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode_image(images)
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.float(), ref).min() > 0.99


def test_minilm_text_tower_locked_lit_style(tmp_path, images):
    name = "mmrl-vit-tiny-p8-64-minilm"
    model = mmrl.create_model(name, pool="ggem", lock_text=True).eval()
    assert isinstance(model, open_clip.CustomTextCLIP)
    trainable_text = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")]
    assert trainable_text == ["text.proj.weight"]
    assert all(p.requires_grad for p in model.visual.parameters())
    tokenizer = mmrl.get_tokenizer(name)
    ids = tokenizer(["A chick inside an egg."])
    assert ids[0, 0].item() == 101  # BERT [CLS]: the MiniLM WordPiece vocabulary, not CLIP's BPE
    mmrl.save_model(model, tmp_path / "m")
    loaded, _, tokenizer2 = mmrl.load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), loaded.encode_text(tokenizer2(["A chick inside an egg."])))
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    unlocked = mmrl.create_model(name, pool="ggem")
    assert all(p.requires_grad for p in unlocked.text.parameters())


def test_clip_benchmark_metrics_accept_the_model():
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    model = mmrl.create_model(TINY, pool="ggem").eval()
    tokenizer = mmrl.get_tokenizer(TINY)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    retrieval_loader = [(images, [["a cat", "a small cat"], ["a dog"], ["a car"], ["an apple"]])]
    metrics = zeroshot_retrieval.evaluate(model, retrieval_loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 4])
    assert {"image_retrieval_recall@1", "text_retrieval_recall@4"} <= set(metrics)
    # (clip_benchmark 1.6.2's evaluate() for classification calls float() on a 1-element
    # array, which numpy >= 2.4 rejects; its classifier and scoring functions are used directly)
    dataset = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 1]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, ["cat", "dog", "car"], ["a photo of a {c}.", "a {c}."], "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    assert classifier.shape == (256, 3) and logits.shape == (4, 3) and torch.equal(target, torch.tensor([0, 1, 2, 1]))


def test_cached_locked_text_tower_matches_and_keeps_keys(tmp_path):
    from mmrl.model.text_cache import CachedHFTextEncoder

    name = "mmrl-vit-tiny-p8-64-minilm"
    torch.manual_seed(0)
    model = mmrl.create_model(name, pool="ggem", lock_text=True)
    keys = list(model.state_dict())
    tokenizer = mmrl.get_tokenizer(name)
    ids = tokenizer(["A chick inside an egg.", "a red apple", "A chick inside an egg."])
    model.eval()
    with torch.no_grad():
        reference = model.encode_text(ids)
    model.train()  # the cache runs the frozen transformer without dropout whatever the mode
    from mmrl.model.text_cache import enable_text_cache

    enable_text_cache(model)
    assert isinstance(model.text, CachedHFTextEncoder) and list(model.state_dict()) == keys
    lengths = []
    hook = model.text.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    first = model.encode_text(ids)
    hook.remove()
    real = int((ids != model.text.config.pad_token_id).sum(1).max())
    assert lengths == [real] and real < ids.shape[1]  # padding columns cut off, features unchanged
    assert model.text.misses == 2 and model.text.hits == 1  # the repeated caption was computed once
    second = model.encode_text(ids)
    assert model.text.hits == 4
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    second.sum().backward()
    assert model.text.proj.weight.grad is not None
    assert all(p.grad is None for p in model.text.transformer.parameters())
    mmrl.save_model(model, tmp_path / "m")
    loaded, _, tok = mmrl.load_model(tmp_path / "m")  # a plain (uncached) tower, same weights
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tok(["a red apple"])), reference[1:2])
    with pytest.raises(ValueError, match="lock_text"):
        mmrl.create_model(name, pool="ggem", cache_text=True)


def test_text_cache_warm_equals_on_the_fly_features():
    """``warm`` computes exactly the features a batch would, counts as neither hit nor miss, and
    never evicts: afterwards a batch of warmed captions runs no transformer at all."""
    from mmrl.model.text_cache import enable_text_cache

    name = "mmrl-vit-tiny-p8-64-minilm"
    torch.manual_seed(0)
    model = mmrl.create_model(name, pool="ggem", lock_text=True)
    tokenizer = mmrl.get_tokenizer(name)
    captions = ["A chick inside an egg.", "a red apple", "the letter q", "an emoji of a frog face, with long legs",
                "three", "the pound sign"]
    model.eval()
    with torch.no_grad():
        reference = model.encode_text(tokenizer(captions))
    enable_text_cache(model)
    assert model.text.warm(tokenizer(captions + captions[:2]), batch_size=4) == len(captions)
    assert (model.text.hits, model.text.misses) == (0, 0)
    calls = []
    hook = model.text.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    got = model.encode_text(tokenizer(captions[::-1]))
    hook.remove()
    assert not calls and (model.text.hits, model.text.misses) == (len(captions), 0)
    torch.testing.assert_close(got, reference.flip(0))
    assert model.text.warm(tokenizer(captions)) == 0  # all cached already
    model.text.max_entries = len(captions) + 1
    assert model.text.warm(tokenizer(["one", "two", "three more"])) == 1  # room for one: nothing evicted
    assert len(model.text._cache) == len(captions) + 1


def test_text_cache_in_eval_mode_reads_but_never_changes_the_cache():
    """Evaluation during training runs the model in eval mode: it must leave the training cache as it was
    (entries, order, evictions), while still giving the same features."""
    from mmrl.model.text_cache import enable_text_cache

    name = "mmrl-vit-tiny-p8-64-minilm"
    torch.manual_seed(0)
    model = enable_text_cache(mmrl.create_model(name, pool="ggem", lock_text=True), max_entries=3)
    tokenizer = mmrl.get_tokenizer(name)
    model.train()
    with torch.no_grad():
        trained = model.encode_text(tokenizer(["a red apple", "the letter q", "three"]))
    before = list(model.text._cache)
    model.eval()
    with torch.no_grad():
        evaluated = model.encode_text(tokenizer(["three", "a frog", "a red apple", "a new caption"]))
    assert list(model.text._cache) == before  # nothing added, evicted or reordered
    torch.testing.assert_close(evaluated[0], trained[2])
    torch.testing.assert_close(evaluated[2], trained[0])
    model.train()
    with torch.no_grad():
        model.encode_text(tokenizer(["a frog"]))
    assert len(model.text._cache) == 3 and list(model.text._cache)[-1] not in before  # training stores again
