"""Evaluation during ``mmrl train`` (eval.*): config lines, the validation metrics against a direct
computation, evaluation leaving training bit-identical, a suite's rows, and ZeRO-3 on two ranks."""
import io
import json
import math
import random
import tarfile

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import load_file
from test_train import TINY, read_log, run, shape_shards, torchrun, train_cmd

import mmrl
from mmrl.config import ConfigError, load_config
from mmrl.evaluation.context import RunOptions, load_eval_model
from mmrl.evaluation.suite import load_suite, run_suite
from mmrl.model import create_transforms
from mmrl.train import TrainConfig
from mmrl.train.module import ContrastiveModule, make_loss
from mmrl.train.periodic_eval import preserved_state
from mmrl.train.val_set import FixedSet, val_metrics, val_shards

ARCH = "mmrl-vit-tiny-p8-64"
CLASSES = ["red square", "blue circle", "green bar", "yellow square"]
VAL_N, VAL_BS = 30, 8  # 4 global batches, the last of 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval")
    (root / "train").mkdir()
    (root / "val").mkdir()
    train = shape_shards(root / "train", 96, 24)
    val = shape_shards(root / "val", 40, 10)
    # a tiny zero-shot set (image folders + classnames.txt) and a suite pointing at it
    rng = np.random.default_rng(1)
    colors = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 190, 40), "yellow": (230, 210, 30)}
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            d = root / "suite_data" / "shapes" / split / f"{c}-{name.replace(' ', '-')}"
            d.mkdir(parents=True)
            for k in range(3):
                a = np.full((48, 48, 3), 255, np.uint8)
                a[12:36, 12:36] = colors[name.split()[0]]
                a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{k}.png")
        (root / "suite_data" / "shapes" / split / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    suite = root / "suite.yaml"
    suite.write_text("suite: tiny\nentries:\n  - {task: zeroshot, name: shapes, data: shapes/test}\n")
    return {"root": root, "train": train, "val": val, "suite": suite, "suite_root": root / "suite_data"}


# --------------------------------------------------------------------------------------------
def test_eval_config_errors_name_the_key():
    base = ["data.train=x"]
    cfg = load_config(TrainConfig, TINY, base)
    assert cfg.eval.every == 0 and not cfg.eval.enabled  # nothing evaluated unless suite or val_data
    cases = {
        "eval.every=-1": "config key 'eval.every': expected an integer >= 0, got -1",
        "eval.every=5": "config key 'eval.every': nothing to evaluate; set suite and/or val_data",
        "eval.val_samples=0": "config key 'eval.val_samples': expected an integer >= 1, got 0",
        "eval.val_batch_size=0": "config key 'eval.val_batch_size': expected an integer >= 1, got 0",
        "eval.suite_root=data": "config key 'eval.suite_root': set suite too (the suite whose data it holds)",
        "eval.val_data=' '": "config key 'eval.val_data': expected a path or null, got ' '",
        "eval.every=many": "config key 'eval.every': expected int, got 'many'",
        "eval.suites=a.yaml": "unknown config key 'eval.suites'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, TINY, [*base, override])
        assert str(err.value).startswith(message), (override, str(err.value))
        assert "\n" not in str(err.value)
    cfg = load_config(TrainConfig, TINY, [*base, "eval.every=3", "eval.val_data=v.tar", "eval.val_samples=10"])
    assert cfg.eval.enabled and cfg.eval.every == 3 and cfg.eval.val_samples == 10


# --------------------------------------------------------------------------------------------
def read_fixed_set(pattern: str, n: int) -> list[tuple[bytes, str]]:
    """The first ``n`` (image bytes, caption) pairs of the shards, in order -- read with tarfile."""
    import braceexpand

    out: list[tuple[bytes, str]] = []
    for shard in braceexpand.braceexpand(pattern):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in samples:  # insertion order: the tar's order
            out.append((samples[key]["jpg"], samples[key]["txt"].decode().strip()))
    return out[:n]


def direct_val_metrics(model, preprocess, tokenizer, pattern: str, n: int, bs: int, logit_scale) -> dict:
    """Validation loss and R@1 by hand: open_clip's ClipLoss per batch of ``bs``, weighted by its size."""
    pairs = read_fixed_set(pattern, n)
    loss_fn, total, i2t, t2i = ClipLoss(), 0.0, 0, 0
    scale = logit_scale.detach().float().clamp(max=math.log(100)).exp().reshape(())
    with torch.no_grad():
        for start in range(0, len(pairs), bs):
            chunk = pairs[start:start + bs]
            images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in chunk])
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(tokenizer([c for _, c in chunk]), normalize=True)
            total += float(loss_fn(img, txt, scale)) * len(chunk)
            logits = scale * img @ txt.T
            i2t += int((logits.argmax(1) == torch.arange(len(chunk))).sum())
            t2i += int((logits.argmax(0) == torch.arange(len(chunk))).sum())
    return {"eval/val_loss": total / len(pairs), "eval/val_i2t_r1": i2t / len(pairs),
            "eval/val_t2i_r1": t2i / len(pairs), "eval/val_samples": len(pairs)}


@pytest.fixture(scope="module")
def tiny_module():
    torch.manual_seed(0)
    model = mmrl.create_model(ARCH, "ggem")
    model.eval()
    preprocess = create_transforms(model)[1]
    return model, ContrastiveModule(model), preprocess, mmrl.get_tokenizer(ARCH)


def test_val_metrics_equal_a_direct_computation(data, tiny_module, one_thread):
    model, module, preprocess, tokenizer = tiny_module
    fixed = FixedSet(val_shards(data["val"]), VAL_N, VAL_BS, preprocess, tokenizer)
    with torch.no_grad():
        got = val_metrics(module, fixed, make_loss("clip", True, False, 0, 1), "clip", "cpu", lockstep=False)
    want = direct_val_metrics(model, preprocess, tokenizer, data["val"], VAL_N, VAL_BS, module.logit_scale)
    assert got["eval/val_samples"] == VAL_N and got["eval/val_skipped"] == 0 and fixed.size == VAL_N
    assert got["eval/val_i2t_r1"] == want["eval/val_i2t_r1"] and got["eval/val_t2i_r1"] == want["eval/val_t2i_r1"]
    assert got["eval/val_loss"] == pytest.approx(want["eval/val_loss"], rel=1e-6)
    assert 0 < got["eval/val_i2t_r1"] < 1  # neither trivial value: the check can tell a wrong R@1


def test_each_rank_gets_its_share_of_the_same_batches(data, tiny_module, one_thread):
    """The global batches are the same whatever the world size (batch b on rank b % W); under
    lockstep (ZeRO-3) every rank runs ceil(batches / W) forwards, dummies where it has none left."""
    _, module, preprocess, tokenizer = tiny_module
    shards = val_shards(data["val"])
    whole = {b.index: b for b in FixedSet(shards, VAL_N, VAL_BS, preprocess, tokenizer)}
    assert sorted(whole) == [0, 1, 2, 3] and len(whole[3].texts) == VAL_N - 3 * VAL_BS
    for world in (2, 3, 5):
        seen = {}
        for rank in range(world):
            parts = list(FixedSet(shards, VAL_N, VAL_BS, preprocess, tokenizer, rank, world))
            assert all(b.index % world == rank for b in parts)
            seen.update({b.index: b for b in parts})
            calls = []

            def forward(images, texts):
                calls.append(len(images))
                return module(images, texts)

            fixed = FixedSet(shards, VAL_N, VAL_BS, preprocess, tokenizer, rank, world)
            with torch.no_grad():
                val_metrics(forward, fixed, make_loss("clip", True, False, 0, 1), "clip", "cpu", lockstep=True)
            assert len(calls) == math.ceil(4 / world), (world, rank, calls)
        assert sorted(seen) == sorted(whole)
        for i, b in whole.items():
            assert torch.equal(seen[i].images, b.images) and torch.equal(seen[i].texts, b.texts)


def test_an_undecodable_image_is_left_out_and_counted(tmp_path, tiny_module, one_thread):
    _, module, preprocess, tokenizer = tiny_module
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good, format="PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(6):
            members = {"png": good.getvalue() if i != 2 else b"not a png", "txt": f"caption {i}".encode()}
            if i == 4:
                members = {"txt": b"no image"}  # not a sample of the set at all
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    fixed = FixedSet(val_shards(str(tmp_path / "00000.tar")), 10, 2, preprocess, tokenizer)
    batches = list(fixed)
    assert [(b.index, len(b.texts), b.skipped) for b in batches] == [(0, 2, 0), (1, 1, 1), (2, 1, 0)]
    with torch.no_grad():
        got = val_metrics(module, fixed, make_loss("clip", True, False, 0, 1), "clip", "cpu", lockstep=False)
    assert got["eval/val_samples"] == 4 and got["eval/val_skipped"] == 1 and fixed.size == 5


def test_preserved_state_restores_modes_and_random_generators():
    model = mmrl.create_model(ARCH, "ggem")
    model.train()
    model.transformer.eval()  # a submodule set apart from its parent's mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with preserved_state(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        _ = (torch.rand(100), random.random(), np.random.rand(5))  # draws that must not leak out
    assert {name: m.training for name, m in model.named_modules()} == modes
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


# --------------------------------------------------------------------------------------------
def eval_args(data, every: int, suite: bool = True) -> list[str]:
    args = [f"eval.every={every}", f"eval.val_data={data['val']}", f"eval.val_samples={VAL_N}",
            f"eval.val_batch_size={VAL_BS}"]
    if suite:
        args += [f"eval.suite={data['suite']}", f"eval.suite_root={data['suite_root']}"]
    return args


@pytest.fixture(scope="module")
def run_pair(data, tmp_path_factory):
    """The same 6-step run without and with evaluation (val set and suite every 2 steps); patch
    dropout is on only in train mode, so a model left in eval mode after an evaluation would show."""
    tmp = tmp_path_factory.mktemp("pair")
    common = ("max_steps=6", "save_every=100", "patch_dropout=0.25")
    run(train_cmd(data["train"], tmp / "plain", *common))
    run(train_cmd(data["train"], tmp / "evaluated", *common, *eval_args(data, 2)))
    return tmp / "plain", tmp / "evaluated"


@pytest.mark.slow
def test_evaluation_never_changes_training(run_pair):
    plain, evaluated = run_pair
    a = load_file(plain / "model" / "open_clip_model.safetensors")
    b = load_file(evaluated / "model" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"evaluation changed the weights: {different[:5]}"
    train_rows = [r for r in read_log(evaluated) if "loss" in r]
    assert [r["loss"] for r in train_rows] == [r["loss"] for r in read_log(plain)]


@pytest.mark.slow
def test_suite_and_val_set_during_training_write_eval_rows(run_pair, data):
    _, out = run_pair
    rows = [r for r in read_log(out) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, 4, 6]  # every 2 steps; the end (6) not evaluated twice
    for r in rows:
        assert {"eval/val_loss", "eval/val_i2t_r1", "eval/val_t2i_r1", "eval/shapes/acc1", "eval/seconds"} <= set(r)
        assert r["eval/val_samples"] == VAL_N and r["eval/seconds"] > 0 and 0 <= r["eval/shapes/acc1"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == {k: v for k, v in rows[-1].items() if k != "time"}
    result = json.loads((out / "eval" / "step_00000006" / "suite_tiny.json").read_text())
    assert result["entries"][0]["status"] == "ok"
    assert result["entries"][0]["metrics"]["acc1"] == rows[-1]["eval/shapes/acc1"]
    # the final evaluation is of the exported weights: a direct computation agrees
    model, preprocess, tokenizer = mmrl.load_model(out / "model")
    want = direct_val_metrics(model, preprocess, tokenizer, data["val"], VAL_N, VAL_BS, model.logit_scale)
    assert rows[-1]["eval/val_loss"] == pytest.approx(want["eval/val_loss"], rel=1e-5)
    assert rows[-1]["eval/val_i2t_r1"] == want["eval/val_i2t_r1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"eval/val_loss", "eval/shapes/acc1", "eval/seconds", "train/loss"} <= tags
    assert [e.step for e in tb.Scalars("eval/val_loss")] == [2, 4, 6]


@pytest.mark.slow
def test_zero3_on_two_ranks_evaluates_like_one_process(data, tmp_path):
    """ZeRO-3 partitions the parameters: the val forwards run on both ranks through the engine, the
    suite on rank 0 on a gathered copy. The logged metrics are those one process computes."""
    out = tmp_path / "zero3"
    run(torchrun(2, "-m", "mmrl", "train", TINY, f"data.train={data['train']}", "batch_size=8", "workers=1",
                 "lr=1e-3", "warmup_steps=2", "log_every=1", "max_steps=4", "save_every=100", "zero_stage=3",
                 f"output_dir={out}", *eval_args(data, 2)), timeout=600)
    rows = [r for r in read_log(out) if "eval/val_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    model, preprocess, tokenizer = mmrl.load_model(out / "model")
    want = direct_val_metrics(model, preprocess, tokenizer, data["val"], VAL_N, VAL_BS, model.logit_scale)
    last = rows[-1]
    assert last["eval/val_samples"] == VAL_N
    assert last["eval/val_loss"] == pytest.approx(want["eval/val_loss"], rel=1e-4)
    for key in ("eval/val_i2t_r1", "eval/val_t2i_r1"):
        assert abs(last[key] - want[key]) <= 1 / VAL_N + 1e-9, key  # at most one near-tie flips
    # the suite on the gathered copy: what `mmrl eval suite` gives for the exported model
    em = load_eval_model(str(out / "model"))
    results = run_suite(em, RunOptions(device="cpu", batch_size=VAL_BS, progress=False, out_dir=tmp_path / "res"),
                        load_suite(data["suite"], data["suite_root"]), log=lambda m: None)
    assert last["eval/shapes/acc1"] == pytest.approx(results[0].metrics["acc1"])
