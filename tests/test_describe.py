"""``mmrl.describe_model``: a model describes itself from its modules (``mmrl info``, reports)."""
import json

import pytest
import torch

import mmrl
from mmrl.cli import main


def test_plain_tower_described_from_its_modules():
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="ggem", pool_kwargs={"p_init": 2.5})
    d = mmrl.describe_model(model)
    assert (d.width, d.layers, d.heads, d.image_size, d.patch_size, d.tokens) == (192, 4, 6, 64, 8, 64)
    assert d.pool == "ggem" and d.p == [2.5] * 6 and d.pretrained_parts == []
    assert d.stem == "one 8x8 patchify convolution" and d.text_tower.startswith("transformer width 256 x 4 blocks")
    assert d.parameters == sum(p.numel() for p in model.parameters())
    assert d.image_tower == "ViT width 192 x 4 blocks, 64 px, 64 tokens of 8x8 px from one 8x8 patchify convolution"
    # the description follows the module, not the config: change the pooler's exponents and it says so
    with torch.no_grad():
        model.visual.pooler.p.fill_(4.0)
    assert mmrl.describe_model(model).p == [4.0] * 6


def test_conv_stem_and_pretrained_stem_towers():
    conv = mmrl.create_model("mmrl-vit-convstem-p16-64-minilm", pool="gem", pretrained=False)
    d = mmrl.describe_model(conv)
    assert d.stem == "a conv stem of 4 stride-2 3x3 convolutions [24, 48, 96, 192] (groupnorm) then 1x1 to the width"
    assert d.tokens == 16 and d.pretrained_parts == ["text tower: " + d.text_tower.split("'")[1]]
    effnet = mmrl.create_model("mmrl-vit-effnetstem-ft-p16-64-minilm", pool="ggem", lock_text=True, pretrained=False)
    d = mmrl.describe_model(effnet)
    assert d.stem == ("the stride-16 stages of an ImageNet-pretrained efficientnet_lite0 (locked but for its last "
                      "1 stage, fine-tuned) then 1x1 to the width")
    assert d.pretrained_parts[0] == "image stem: efficientnet_lite0 (ImageNet-1k)" and len(d.pretrained_parts) == 2
    assert "bert" in d.text_tower and "6 layers" in d.text_tower and "mean pooling" in d.text_tower
    assert d.lock_text and d.trainable_parameters < d.parameters


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_info_prints_the_description(tmp_path, capsys, pool):
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool=pool)
    mmrl.save_model(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded, _, _ = mmrl.load_model(tmp_path / "m")
    assert info == json.loads(json.dumps(mmrl.describe_model(loaded).as_dict()))
    assert info["pool"] == pool and info["p"] is None and info["model_class"] == "CLIP"
