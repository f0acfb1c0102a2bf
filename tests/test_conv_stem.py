"""The ViT conv stem (early convolutions): token grid, locality, config errors, towers, save/load, lock."""
import json

import open_clip
import pytest
import torch
from torch import nn

import mmrl
from mmrl.layers import ConvStem

TINY = "mmrl-vit-tiny-p8-64"
STEM = {"channels": [8, 16, 32], "norm": "batchnorm"}  # patch 8: three stride-2 stages


@pytest.mark.parametrize("patch,size,norm", [(2, 8, "batchnorm"), (8, 64, "groupnorm"), (16, 64, "batchnorm"),
                                             (16, 48, "groupnorm")])
def test_stem_gives_the_patchify_token_grid(patch, size, norm):
    import math

    channels = [4 * 2 ** i for i in range(int(math.log2(patch)))]
    stem = ConvStem(patch, 24, channels, norm).eval()
    patchify = nn.Conv2d(3, 24, patch, stride=patch)
    x = torch.randn(2, 3, size, size)
    assert stem(x).shape == patchify(x).shape == (2, 24, size // patch, size // patch)


def test_stem_tokens_keep_their_place():
    """A change inside the top-left patch reaches the top-left token, not the other corners'."""
    torch.manual_seed(0)
    stem = ConvStem(16, 32, [8, 16, 32, 64]).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :16, :16] += 1.0
    delta = (stem(x) - stem(y)).abs().sum(1)[0]  # (4, 4) grid
    assert delta[0, 0] > 0 and delta[3, 3] == 0 and delta[3, 0] == 0 and delta[0, 3] == 0


@pytest.mark.parametrize("norm,independent", [("groupnorm", True), ("batchnorm", False)])
def test_which_stems_see_the_rest_of_the_batch(norm, independent):
    """In training, a BatchNorm stem's output for one image depends on its batch; a GroupNorm one's does not."""
    torch.manual_seed(0)
    stem = ConvStem(8, 16, [4, 8, 16], norm).train()
    x = torch.randn(4, 3, 32, 32)
    alone = torch.cat([stem(x[:2]), stem(x[2:])])
    assert torch.allclose(stem(x), alone, atol=1e-5) == independent


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm"])
def test_channels_last_layout_computes_the_same_stem(norm):
    """The NHWC fast path is a memory layout, not a different function (values and gradients)."""
    torch.manual_seed(0)
    fast = ConvStem(16, 32, [8, 16, 32, 64], norm).train()
    plain = ConvStem(16, 32, [8, 16, 32, 64], norm, channels_last=False).train()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 3, 64, 64)
    a, b = fast(x), plain(x)
    assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("args,match", [
    ((12, 24, [4, 8]), "power of two"),
    ((1, 24, []), "power of two"),
    ((16, 24, [4, 8, 16]), "needs 4 stride-2 stages"),
    ((8, 24, [4, 0, 8]), "positive integers"),
    ((8, 24, [4, 8.0, 8]), "positive integers"),
])
def test_stem_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        ConvStem(*args)


def test_stem_rejects_unknown_norm_and_keys():
    with pytest.raises(ValueError, match="conv_stem.norm: expected one of"):
        ConvStem(8, 24, [4, 8, 16], norm="layernorm")
    with pytest.raises(ValueError, match="vision_cfg.conv_stem: expected keys"):
        mmrl.create_model(TINY, vision_cfg={"conv_stem": {"channel": [8, 16, 32]}})


def test_tower_with_stem_save_load_round_trip(tmp_path):
    model = mmrl.create_model(TINY, pool="ggem", vision_cfg={"conv_stem": STEM})
    keys = set(model.state_dict())
    assert "visual.conv1.weight" not in keys
    assert {"visual.conv1.stages.0.weight", "visual.conv1.stages.1.running_mean", "visual.conv1.proj.weight"} <= keys
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.train()
    model.encode_image(images)  # moves the BatchNorm statistics off their initial values
    model.eval()
    assert not torch.equal(model.visual.conv1.stages[1].running_mean, torch.zeros(8))
    mmrl.save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["conv_stem"] == STEM
    loaded = mmrl.load_model(tmp_path / "m")[0]
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_stem_configs_stay_out_of_open_clips_registry():
    name = "mmrl-vit-convstem-p16-64-minilm"
    assert name in mmrl.list_models() and name not in open_clip.list_models()
    cfg = mmrl.get_model_config(name)["vision_cfg"]
    assert cfg["patch_size"] == 16 and len(cfg["conv_stem"]["channels"]) == 4


@pytest.mark.parametrize("unlocked", [0, 1])
def test_locked_stem_freezes_its_batchnorm_statistics(unlocked):
    model = mmrl.create_model(TINY, pool="ggem", vision_cfg={"conv_stem": STEM})
    model.visual.lock(unlocked_groups=unlocked)
    model.train()  # a trainer puts the whole model in train mode
    bn = model.visual.conv1.stages[1]
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(4, 3, 64, 64))
    assert not any(p.requires_grad for p in model.visual.conv1.parameters())
    assert torch.equal(bn.running_mean, before) and not bn.training
    assert model.visual.transformer.training  # the rest of the tower still trains


def test_unlocked_stem_trains_its_batchnorm():
    model = mmrl.create_model(TINY, pool="ggem", vision_cfg={"conv_stem": STEM}).train()
    bn = model.visual.conv1.stages[1]
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(4, 3, 64, 64)).sum().backward()
    assert not torch.equal(bn.running_mean, before) and bn.training
    assert model.visual.conv1.stages[0].weight.grad is not None
