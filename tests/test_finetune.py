"""Fine-tuning controls: ``lock_image`` (open_clip's lock_image_tower, the pooler in the last group) and
``lr_layer_decay`` (per-block learning rates over the ViT): the optimizer's groups, which parameters a real
AdamW step moves, the schedule keeping the ratios, config errors, one ``mmrl train`` run."""
import sys

import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip.transformer import VisionTransformer

import mmrl
from mmrl.config import ConfigError
from mmrl.train import TrainConfig
from mmrl.train.config import DataConfig
from mmrl.train.module import ContrastiveModule
from mmrl.train.optim import make_optimizer, param_groups, warmup_cosine

TINY = "mmrl-vit-tiny-p8-64"  # ViT of 4 blocks
LR, WD, P_MULT = 1e-2, 0.1, 3.0
HEAD = ("ln_post.", "pooler.", "proj")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def tiny_module(lock_groups: int | None = None) -> ContrastiveModule:
    torch.manual_seed(0)
    model = mmrl.create_model(TINY, "ggem")
    if lock_groups is not None:
        model.lock_image_tower(unlocked_groups=lock_groups)
    return ContrastiveModule(model)


def one_step(module: ContrastiveModule, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One AdamW step on a real CLIP loss; parameter name -> largest absolute change."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.manual_seed(1)
    images, texts = torch.randn(4, 3, 64, 64), torch.randint(1, 49000, (4, 32))
    image_features, text_features, scale, _ = module(images, texts)
    ClipLoss()(image_features, text_features, scale).backward()
    optimizer.step()
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in module.named_parameters()}


def visual(names) -> set[str]:
    return {n.removeprefix("model.visual.") for n in names if n.startswith("model.visual.")}


def lrs_by_name(module: ContrastiveModule, optimizer) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight decay) of its optimizer group."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def expected_scale(name: str, d: float, blocks: int = 4) -> float:
    """The lr scale the spec gives ``name``: head 1, block i d^(L - i), embeddings d^(L + 1), rest 1."""
    if not name.startswith("model.visual."):
        return 1.0
    local = name.removeprefix("model.visual.")
    if local.startswith("transformer.resblocks."):
        return d ** (blocks - int(local.split(".")[2]))
    if local.startswith(HEAD):
        return 1.0
    assert local.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"), local
    return d ** (blocks + 1)


def test_lock_image_with_no_unlocked_group_moves_no_visual_parameter_but_the_text_tower():
    module = tiny_module(lock_groups=0)
    assert not any(p.requires_grad for p in module.model.visual.parameters())
    optimizer = make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6, P_MULT)
    assert not visual(lrs_by_name(module, optimizer))  # frozen parameters are not optimized
    moved = one_step(module, optimizer)
    assert all(moved[n] == 0 for n in moved if n.startswith("model.visual."))
    text = [n for n in moved if not n.startswith("model.visual.")]
    assert len(text) > 50 and all(moved[n] > 0 for n in text), [n for n in text if moved[n] == 0]


@pytest.mark.parametrize("groups, trained", [
    (1, {"pooler.p", "proj"}),  # open_clip's last group is proj; mmrl's pooler joins it
    (2, {"pooler.p", "proj", "ln_post.weight", "ln_post.bias"}),  # + [resblocks[-1], ln_post]
])
def test_unlocked_groups_train_exactly_open_clips_last_groups_plus_the_pooler(groups, trained):
    module = tiny_module(lock_groups=groups)
    if groups == 2:
        last_block = visual(n for n, _ in module.named_parameters() if ".visual.transformer.resblocks.3." in n)
        trained = trained | last_block
    assert visual(n for n, p in module.named_parameters() if p.requires_grad) == trained
    moved = one_step(module, make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6, P_MULT))
    assert visual(n for n, m in moved.items() if m > 0) == trained


@pytest.mark.parametrize("groups", range(7))  # 4 blocks: 6 groups, and more than there are
def test_lock_matches_open_clips_vision_transformer_lock(groups):
    torch.manual_seed(0)
    mmrl_tower = mmrl.create_model(TINY, "ggem").visual
    plain = VisionTransformer(64, 8, 192, 4, 6, 4.0, output_dim=256)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in mmrl_tower.named_parameters() if n != "pooler.p"]
    mmrl_tower.lock(groups)
    plain.lock(groups)
    trained = {n for n, p in mmrl_tower.named_parameters() if p.requires_grad}
    assert trained - {"pooler.p"} == {n for n, p in plain.named_parameters() if p.requires_grad}
    assert ("pooler.p" in trained) == (groups > 0)


def test_lock_keeps_a_pretrained_stems_own_lock():
    model = mmrl.create_model(TINY, "ggem", pretrained=False,
                              vision_cfg={"patch_size": 16, "pretrained_stem": {"name": "efficientnet_lite0"}})
    model.lock_image_tower(unlocked_groups=100)  # every group unlocked
    assert not any(p.requires_grad for p in model.visual.conv1.body.parameters())
    assert all(p.requires_grad for n, p in model.visual.named_parameters() if not n.startswith("conv1.body."))


def test_layer_decay_gives_each_block_its_lr_and_a_real_step_moves_at_that_lr():
    d = 0.5
    module = tiny_module()
    optimizer = make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6, P_MULT, layer_decay=d)
    lrs = lrs_by_name(module, optimizer)
    flat = {n: wd for n, (_, wd) in lrs_by_name(module, make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6)).items()}
    assert set(lrs) == set(flat)
    for name, (lr, wd) in lrs.items():
        want = LR * (P_MULT if name == "model.visual.pooler.p" else expected_scale(name, d))
        assert lr == pytest.approx(want, rel=1e-12), name
        assert wd == flat[name], name  # the weight-decay split is unchanged
    assert lrs["model.visual.transformer.resblocks.3.attn.in_proj_weight"][0] == pytest.approx(LR / 2)
    assert lrs["model.visual.transformer.resblocks.0.attn.in_proj_weight"][0] == pytest.approx(LR / 16)
    assert lrs["model.visual.conv1.weight"][0] == pytest.approx(LR / 32)
    assert lrs["model.token_embedding.weight"][0] == lrs["logit_scale"][0] == LR
    # Adam's first step moves an undecayed parameter by about its lr (|m / sqrt(v)| = 1)
    moved = one_step(module, optimizer)
    for i in range(4):
        name = f"model.visual.transformer.resblocks.{i}.ln_1.bias"
        assert moved[name] == pytest.approx(LR * d ** (4 - i), rel=1e-3), name
    assert moved["model.visual.ln_pre.bias"] == pytest.approx(LR * d ** 5, rel=1e-3)
    assert moved["model.visual.ln_post.bias"] == pytest.approx(LR, rel=1e-3)
    assert moved["model.visual.pooler.p"] == pytest.approx(LR * P_MULT, rel=1e-3)


def test_the_schedule_scales_every_group_alike():
    module = tiny_module()
    optimizer = make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6, P_MULT, layer_decay=0.75)
    initial = [g["lr"] for g in optimizer.param_groups]
    assert len(set(initial)) == 7  # full, p, embeddings and four blocks
    factor = warmup_cosine(3, 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for step in range(1, 8):
        optimizer.step()
        scheduler.step()
        for g, lr0 in zip(optimizer.param_groups, initial):
            assert g["lr"] == pytest.approx(lr0 * factor(step), rel=1e-12)


def test_layer_decay_one_gives_todays_three_groups():
    module = tiny_module()
    groups = param_groups(module, WD, P_MULT, layer_decay=1.0)
    names = {id(p): n for n, p in module.named_parameters()}
    assert [(g["name"], g["weight_decay"], g["lr_mult"]) for g in groups] == [
        ("decay", WD, 1.0), ("no_decay", 0.0, 1.0), ("ggem_p", 0.0, P_MULT)]
    assert all(set(g) == {"params", "weight_decay", "lr_mult", "name"} for g in groups)
    members = [[names[id(p)] for p in g["params"]] for g in groups]
    block_weights = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    decay = {"model.text_projection", "model.visual.proj", "model.visual.conv1.weight"} | {
        f"model.{tower}transformer.resblocks.{i}.{w}" for tower in ("", "visual.") for i in range(4)
        for w in block_weights}
    assert set(members[0]) == decay and len(members[0]) == 35
    assert members[2] == ["model.visual.pooler.p"]
    assert set(members[1]) == set(names.values()) - decay - {"model.visual.pooler.p"}
    assert members == [[names[id(p)] for p in g["params"]] for g in param_groups(module, WD, P_MULT)]


def test_layer_decay_over_a_partly_locked_tower_groups_only_the_trained_layers():
    module = tiny_module(lock_groups=2)
    optimizer = make_optimizer(module, LR, WD, (0.9, 0.98), 1e-6, 1.0, layer_decay=0.5)
    lrs = lrs_by_name(module, optimizer)
    assert {lr for n, (lr, _) in lrs.items() if n.startswith("model.visual.transformer.")} == {LR / 2}
    assert {lr for n, (lr, _) in lrs.items() if n.startswith("model.visual.") and "resblocks" not in n} == {LR}


def base_config(**kw) -> TrainConfig:
    return TrainConfig(max_steps=1, data=DataConfig(synthetic=True), **kw)


@pytest.mark.parametrize("kw, key", [
    ({"lr_layer_decay": 0.0}, "lr_layer_decay"),
    ({"lr_layer_decay": 1.5}, "lr_layer_decay"),
    ({"lr_layer_decay": -0.5}, "lr_layer_decay"),
    ({"lock_image": True, "lock_image_unlocked_groups": -1}, "lock_image_unlocked_groups"),
    ({"lock_image_unlocked_groups": 2}, "lock_image_unlocked_groups"),
    ({"lock_image_freeze_bn_stats": True}, "lock_image_freeze_bn_stats"),
])
def test_config_errors_are_one_line_naming_the_key(kw, key):
    with pytest.raises(ConfigError) as err:
        base_config(**kw).validate()
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message


def test_valid_fine_tuning_configs_pass():
    base_config(lock_image=True, lock_image_unlocked_groups=3, lock_image_freeze_bn_stats=True,
                lr_layer_decay=0.65).validate()
    base_config(lr_layer_decay=1.0).validate()


@pytest.mark.slow
def test_mmrl_train_with_a_locked_tower_and_layer_decay(tmp_path):
    from test_train import TINY as TINY_YAML
    from test_train import read_log, run

    out = tmp_path / "run"
    run([sys.executable, "-m", "mmrl", "train", TINY_YAML, "data.synthetic=true", "batch_size=8", "workers=0",
         "max_steps=2", "warmup_steps=0", "lr=1e-3", "log_every=1", "lock_image=true",
         "lock_image_unlocked_groups=2", "lr_layer_decay=0.75", f"output_dir={out}"])
    assert [r["lr"] for r in read_log(out) if "lr" in r][:1] == [pytest.approx(1e-3)]
    torch.manual_seed(0)  # the trainer's initial weights (seed 0)
    initial = mmrl.create_model(TINY, "ggem").state_dict()
    trained = mmrl.load_model(out / "model")[0].state_dict()
    changed = {k for k in initial if k.startswith("visual.") and not torch.equal(initial[k], trained[k])}
    head_and_last_block = ("visual.pooler.", "visual.proj", "visual.ln_post.", "visual.transformer.resblocks.3.")
    assert changed == {k for k in initial if k.startswith(head_and_last_block)}
    assert not torch.equal(initial["text_projection"], trained["text_projection"])
