"""FLIP patch dropout: in training the pooler sees the kept tokens only (every pool kind, every stem),
eval mode and r = 0 are untouched, saved models load as the same network, the key is validated."""
import json

import pytest
import torch
from open_clip.transformer import PatchDropout
from torch import nn

import mmrl
from helpers.eager_engine import EagerEngine
from mmrl.config import ConfigError, load_config
from mmrl.model.vision import build_vision_tower
from mmrl.pooling import list_pools
from mmrl.train import trainer as trainer_module
from mmrl.train.config import TrainConfig

TINY = "mmrl-vit-tiny-p8-64"   # 64 px, patch 8: 64 patch tokens
N = 64
RATE = 0.5
CONV_STEM = {"vision_cfg": {"conv_stem": {"channels": [16, 32, 64], "norm": "groupnorm"}}}
EFFNET_STEM = {"vision_cfg": {"patch_size": 16, "pretrained_stem": {"name": "efficientnet_lite0"}},
               "pretrained": False}  # 64 px, patch 16: 16 patch tokens; random stem weights suffice here


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _model(pool, rate=None, **kwargs):
    torch.manual_seed(0)
    kw = {} if rate is None else {"patch_dropout": rate}
    return mmrl.create_model(TINY, pool=pool, **kw, **kwargs)


class _Taps:
    """What enters and leaves the tower's patch-dropout stage, and what enters the pooler."""

    def __init__(self, visual):
        self.dropout_in = self.dropout_out = self.pooler_in = None
        self.handles = [
            visual.patch_dropout.register_forward_hook(self._dropout),
            visual.pooler.register_forward_pre_hook(self._pooler),
        ]

    def _dropout(self, module, args, out):
        self.dropout_in, self.dropout_out = args[0].detach(), out.detach()

    def _pooler(self, module, args):
        self.pooler_in = args[0].detach()

    def close(self):
        for h in self.handles:
            h.remove()


def _encode_tapped(model, images):
    """``model.encode_image(images)`` (no grad) with the tower's dropout and pooler inputs recorded."""
    taps = _Taps(model.visual)
    try:
        with torch.no_grad():
            return model.encode_image(images), taps
    finally:
        taps.close()


def _kept_indices(full, kept):
    """Index in ``full`` ([B, 1 + N, C]) of every token of ``kept`` ([B, 1 + K, C]), matched exactly."""
    match = (kept[:, :, None, :] == full[:, None, :, :]).all(-1)  # [B, 1 + K, 1 + N]
    assert (match.sum(-1) == 1).all(), "a kept token is not exactly one input token"
    return match.float().argmax(-1)


def _tower_on(visual, tokens):
    """The tower (eval arithmetic) run on the embedded tokens ``tokens`` only: ln_pre, blocks, ln_post, pool, proj."""
    x = visual.transformer(visual.ln_pre(tokens))
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(visual.pooler(x if visual.pooler.uses_class_token else x[:, 1:]))
    else:
        x = visual.ln_post(x)
        pooled = visual.pooler(x if visual.pooler.uses_class_token else x[:, 1:])
    return pooled @ visual.proj


@pytest.mark.parametrize("pool", list_pools())
def test_training_pools_exactly_the_kept_tokens(pool, images):
    model = _model(pool, RATE).train()
    visual = model.visual
    assert isinstance(visual.patch_dropout, PatchDropout) and visual.patch_dropout.prob == RATE
    features, taps = _encode_tapped(model, images)
    keep = int(N * (1 - RATE))
    assert taps.dropout_in.shape[1] == 1 + N and taps.dropout_out.shape[1] == 1 + keep
    idx = _kept_indices(taps.dropout_in, taps.dropout_out)
    assert (idx[:, 0] == 0).all()                      # the class token is kept, first
    assert (idx[:, 1:] > 0).all()                      # then patch tokens only, each once
    assert all(len(set(row.tolist())) == keep for row in idx[:, 1:])
    assert len({tuple(sorted(row.tolist())) for row in idx[:, 1:]}) > 1  # each image draws its own
    # the pooler sees the kept tokens only (with the class token for 'tok')
    assert taps.pooler_in.shape[1] == keep + (1 if visual.pooler.uses_class_token else 0)
    with torch.no_grad():
        expected = _tower_on(visual, taps.dropout_out)
        everything = _tower_on(visual, taps.dropout_in)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features, everything, rtol=1e-3, atol=1e-4)  # not the all-token features


@pytest.mark.parametrize("pool", list_pools())
def test_eval_and_zero_rate_are_unchanged(pool, images):
    plain = _model(pool)
    zero = _model(pool, 0.0)
    dropped = _model(pool, RATE)
    dropped.load_state_dict(plain.state_dict())
    zero.load_state_dict(plain.state_dict())
    assert isinstance(zero.visual.patch_dropout, nn.Identity)
    assert zero.mmrl_cfg == plain.mmrl_cfg and dropped.mmrl_cfg["model_cfg"] == plain.mmrl_cfg["model_cfg"]
    with torch.no_grad():
        for mode in (True, False):  # r = 0: bit-identical to no key, in training as in eval
            assert torch.equal(zero.train(mode).encode_image(images), plain.train(mode).encode_image(images))
        reference = plain.eval().encode_image(images)
        assert torch.equal(dropped.eval().encode_image(images), reference)
        assert not torch.allclose(dropped.train().encode_image(images), reference, atol=1e-4)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_tokens_reaching_the_pooler(rate, images):
    for pool in ("tok", "ggem"):
        model = _model(pool, rate).train()
        taps = _Taps(model.visual)
        try:
            with torch.no_grad():
                model.encode_image(images)
        finally:
            taps.close()
        patches = taps.pooler_in.shape[1] - (1 if pool == "tok" else 0)
        assert abs(patches - N * (1 - rate)) < 1 and patches >= 1, (pool, rate, patches)
        assert taps.dropout_out.shape[1] == 1 + patches  # class token kept


@pytest.mark.parametrize("stem", ["conv", "effnet"])
@pytest.mark.parametrize("pool", ["tok", "ggem", "attn"])
def test_hybrid_stems(stem, pool, images):
    kwargs = CONV_STEM if stem == "conv" else EFFNET_STEM
    tokens = N if stem == "conv" else 16
    plain = _model(pool, **kwargs)
    model = _model(pool, RATE, **kwargs)
    model.load_state_dict(plain.state_dict())
    model.train()
    features, taps = _encode_tapped(model, images)
    keep = int(tokens * (1 - RATE))
    assert taps.dropout_in.shape[1] == 1 + tokens and taps.dropout_out.shape[1] == 1 + keep
    idx = _kept_indices(taps.dropout_in, taps.dropout_out)
    assert (idx[:, 0] == 0).all() and (idx[:, 1:] > 0).all()
    assert taps.pooler_in.shape[1] == keep + (1 if pool == "tok" else 0)
    with torch.no_grad():
        torch.testing.assert_close(features, _tower_on(model.visual, taps.dropout_out), rtol=1e-5, atol=1e-6)
        assert torch.equal(model.eval().encode_image(images), plain.eval().encode_image(images))


@pytest.mark.parametrize("name", mmrl.list_models(include_open_clip=False))
def test_every_mmrl_tower_drops_patches(name):
    cfg = mmrl.get_model_config(name)
    vc = {**cfg["vision_cfg"], "pool_type": "ggem", "patch_dropout": RATE}
    torch.manual_seed(0)
    visual = build_vision_tower(cfg["embed_dim"], vc, stem_weights=False).train()
    size = vc["image_size"]
    tokens = (size // vc["patch_size"]) ** 2
    taps = _Taps(visual)
    try:
        with torch.no_grad():
            visual(torch.randn(2, 3, size, size))
    finally:
        taps.close()
    assert taps.dropout_in.shape[1] == 1 + tokens
    assert taps.pooler_in.shape[1] == int(tokens * (1 - RATE))


def test_saved_model_is_the_network_without_dropout(tmp_path, images):
    model = _model("ggem", RATE)
    with torch.no_grad():
        model.visual.pooler.p.add_(0.5)  # a trained-looking exponent
    plain = _model("ggem")
    mmrl.save_model(model, tmp_path / "dropped")
    mmrl.save_model(plain, tmp_path / "plain")
    saved = json.loads((tmp_path / "dropped" / "open_clip_config.json").read_text())
    plain_saved = json.loads((tmp_path / "plain" / "open_clip_config.json").read_text())
    assert "patch_dropout" not in saved["model_cfg"]["vision_cfg"]
    assert saved["model_cfg"] == plain_saved["model_cfg"]
    assert saved["mmrl"]["train_patch_dropout"] == RATE and "train_patch_dropout" not in plain_saved["mmrl"]
    loaded = mmrl.load_model(tmp_path / "dropped")[0]
    assert isinstance(loaded.visual.patch_dropout, nn.Identity) and loaded.mmrl_cfg["patch_dropout"] == 0.0
    with torch.no_grad():
        reference = model.eval().encode_image(images)
        assert torch.equal(loaded.encode_image(images), reference)
        plain.load_state_dict(model.state_dict())  # no dropout even in training: as the model without it
        assert torch.equal(loaded.train().encode_image(images), plain.train().encode_image(images))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_create_model_rejects_bad_rates(bad):
    with pytest.raises(ValueError, match=r"^patch_dropout: expected a float in \[0, 1\)") as err:
        mmrl.create_model(TINY, pool="avg", patch_dropout=bad)
    assert "\n" not in str(err.value) and TINY in str(err.value)
    with pytest.raises(ValueError, match=r"^vision_cfg\.patch_dropout: expected a float") as err:
        mmrl.create_model(TINY, pool="avg", vision_cfg={"patch_dropout": bad})
    assert "\n" not in str(err.value) and TINY in str(err.value)


def test_train_config_validates_patch_dropout():
    base = ["data.train=x.tar", "max_steps=1"]
    assert load_config(TrainConfig, None, base).patch_dropout == 0.0
    assert load_config(TrainConfig, None, base + ["patch_dropout=0.5"]).patch_dropout == 0.5
    for bad in ("1.0", "-0.1", "1"):
        with pytest.raises(ConfigError, match="'patch_dropout': expected a float in \\[0, 1\\)") as err:
            load_config(TrainConfig, None, base + [f"patch_dropout={bad}"])
        assert "\n" not in str(err.value)


def test_trainer_builds_the_model_with_the_rate(tmp_path, monkeypatch):
    built = {}

    class Built(Exception):
        pass

    def create_model(*args, **kwargs):
        model = mmrl.create_model(*args, **kwargs)
        built.update(kwargs=kwargs, dropout=model.visual.patch_dropout)
        raise Built  # the rest of the trainer (data, DeepSpeed) is not this test's business

    monkeypatch.setattr(trainer_module, "create_model", create_model)
    monkeypatch.setattr(trainer_module, "init_distributed", lambda info, timeout_s=None: None)
    cfg = load_config(TrainConfig, None, ["data.train=x.tar", "max_steps=1", "patch_dropout=0.25",
                                          f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(Built):
        trainer_module.train(cfg)
    assert built["kwargs"]["patch_dropout"] == 0.25
    assert isinstance(built["dropout"], PatchDropout) and built["dropout"].prob == 0.25


def test_accumulated_steps_see_the_same_patches_in_both_encodings(images):
    """grad_accum with patch dropout: each micro-batch's cached and live encodings drop the same patches,
    so the summed gradients are those of one full-batch loss over those patches."""
    from open_clip.loss import ClipLoss

    from mmrl.train.module import ContrastiveModule
    from mmrl.train.step import contrastive_step

    torch.manual_seed(0)
    module = ContrastiveModule(_model("ggem", 0.5)).train()
    texts = mmrl.get_tokenizer(module.model.mmrl_cfg["model_cfg"])([f"caption {i}" for i in range(len(images))])
    half = len(images) // 2
    batches = [{"image": images[:half], "text": texts[:half]}, {"image": images[half:], "text": texts[half:]}]
    loss_fn = ClipLoss()
    contrastive_step(EagerEngine(module), loss_fn, batches, "cpu", torch.float32, seed=1234)
    accumulated = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    feats = []
    for j, b in enumerate(batches):  # the reference: one loss over both micro-batches, same seeds
        torch.manual_seed(1234 + j)
        feats.append(module(b["image"], b["text"]))
    loss = loss_fn(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), feats[0][2])
    loss.backward()
    for name, p in module.named_parameters():
        if p.grad is not None and name in accumulated:
            assert torch.allclose(accumulated[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert "model.visual.pooler.p" in accumulated and accumulated["model.visual.pooler.p"].abs().sum() > 0
