"""Train-time photometric augmentation (mmrl.data.augment): what each step does, that PIL and the
loader's uint8-tensor path agree, and that the training config builds and validates it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmrl.config import ConfigError, load_config
from mmrl.data.augment import AugConfig, RandomLowResolution, build_train_transform
from mmrl.data.batching import plan_transform, seeded_global_rngs
from mmrl.model import create_model, create_transforms


def _image(seed: int = 0, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.NEAREST)  # blocky: has detail to lose


def test_low_resolution_round_trip_loses_detail_keeps_size_and_is_identity_at_p0():
    img = _image()
    assert RandomLowResolution(0.0)(img) is img
    out = RandomLowResolution(1.0, (8, 8))(img)
    assert out.size == img.size and out.mode == "RGB"
    a, b = np.asarray(img, dtype=np.float32), np.asarray(out, dtype=np.float32)
    assert np.abs(a - b).mean() > 5  # 48x40 -> 8 px shorter side -> back: blurred
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0).contiguous()
    y = RandomLowResolution(1.0, (8, 8))(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    # the tensor and PIL paths blur alike (both bicubic, antialiased down): a few 8-bit levels
    assert (y[0].permute(1, 2, 0).float() - torch.from_numpy(b)).abs().mean() < 12
    small = RandomLowResolution(1.0, (64, 64))
    assert small(img) is img  # already at or below the drawn side: unchanged


@pytest.mark.parametrize("kind", ["grayscale", "invert"])
def test_tensor_plan_matches_pil_transform(kind):
    model = create_model("mmrl-vit-tiny-p8-64", "ggem")
    aug = AugConfig(scale=(1.0, 1.0), **{kind: 1.0})  # full-image crop: both paths see the same pixels
    transform = build_train_transform(create_transforms(model)[0], aug)
    plan = plan_transform(transform)
    assert plan.kind == "tensor"  # the photometric steps keep the fast path
    img = _image(1, (80, 80))
    with seeded_global_rngs(3):
        ref = transform(img)
    with seeded_global_rngs(3):
        row = plan.row(img)
    got = plan.collate([row])[0]
    assert got.shape == ref.shape == (3, 64, 64)
    assert (got - ref).abs().mean() < 0.05  # normalised units; resize kernels differ by a few levels
    if kind == "grayscale":
        assert torch.allclose(got[0] * 0.26862954 + 0.48145466, got[1] * 0.26130258 + 0.4578275, atol=1e-5)
    else:  # inversion: the normalised image of 255 - x
        plain = plan_transform(build_train_transform(create_transforms(model)[0], AugConfig(scale=(1.0, 1.0))))
        with seeded_global_rngs(3):
            base = plain.collate([plain.row(img)])[0]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        assert torch.allclose((got * std + mean), 1 - (base * std + mean), atol=1e-5)


def test_build_train_transform_sets_scale_and_inserts_steps_after_the_crop():
    model = create_model("mmrl-vit-tiny-p8-64", "ggem")
    base = create_transforms(model)[0]
    t = build_train_transform(base, AugConfig(scale=(0.5, 1.0), grayscale=0.2, invert=0.3, low_res=0.4))
    kinds = [type(s).__name__ for s in t.transforms]
    assert kinds[:4] == ["RandomResizedCrop", "RandomLowResolution", "RandomGrayscale", "RandomInvert"]
    assert t.transforms[0].scale == (0.5, 1.0)
    assert [type(s).__name__ for s in build_train_transform(base, AugConfig()).transforms] == \
        [type(s).__name__ for s in base.transforms]
    assert isinstance(t.transforms[-1], T.Normalize)


def test_train_config_validates_aug():
    from mmrl.train import TrainConfig

    cfg = load_config(TrainConfig, None, ["data.train=x", "max_steps=1", "aug.invert=0.5", "aug.scale=[0.8, 1.0]"])
    assert cfg.aug.invert == 0.5 and tuple(cfg.aug.scale) == (0.8, 1.0)
    with pytest.raises(ConfigError, match="'aug.grayscale': expected a probability"):
        load_config(TrainConfig, None, ["data.train=x", "max_steps=1", "aug.grayscale=1.5"])
    with pytest.raises(ConfigError, match="'aug.low_res_size'"):
        load_config(TrainConfig, None, ["data.train=x", "max_steps=1", "aug.low_res_size=[32, 16]"])
