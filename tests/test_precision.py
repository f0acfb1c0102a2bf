"""Mixed precision: GGeM's maths stays fp32 inside bf16 autocast (tower level), DeepSpeed's bf16 path
trains on CPU within tolerance of fp32 and exports its fp32 master weights, and a precision the
accelerator lacks (fp16 on CPU) is refused in one line before anything is built."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, TINY, env, error_lines, read_log, run

import mmrl
from helpers.op_dtypes import OpDtypes
from mmrl.config import ConfigError
from mmrl.layers import GGeM, ggem_reference
from mmrl.train.precision import check_precision

MODEL = "mmrl-vit-tiny-p8-64"


def _tower_tokens_and_pool(model, images):
    """Run the image tower under CPU bf16 autocast; returns (tokens the pooler got, its output, its p)."""
    got = {}

    def hook(module, inputs, output):
        got["tokens"], got["pooled"] = inputs[0].detach(), output.detach()

    handle = model.visual.pooler.register_forward_hook(hook)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.encode_image(images)
    finally:
        handle.remove()
    assert torch.isfinite(features).all()
    return got["tokens"], got["pooled"], model.visual.pooler.effective_p().detach()


def test_ggem_pools_in_fp32_inside_bf16_autocast(one_thread):
    torch.manual_seed(0)
    model = mmrl.create_model(MODEL, pool="ggem").eval()
    with torch.no_grad():  # distinct exponents per group, so a wrong group split would show
        model.visual.pooler.p.copy_(torch.linspace(1.5, 6.0, model.visual.pooler.groups))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        tokens, pooled, p = _tower_tokens_and_pool(model, images)
        assert tokens.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16  # the tower runs in bf16
        ref = ggem_reference(tokens.double(), p.double())
        # fp32 maths, then one rounding to bf16: as close to the float64 pool as its correct bf16 rounding
        rounded = ref.to(torch.bfloat16).double()
        assert ((pooled.double() - ref).abs() <= (rounded - ref).abs() + 1e-6 * ref.abs()).all()
        # the same pool computed in bf16 (powers and the mean over 64 tokens rounded to 8 bits) misses often
        pc = p.to(torch.bfloat16).repeat_interleave(tokens.shape[-1] // p.numel())
        in_bf16 = tokens.clamp(min=1e-6).pow(pc).mean(dim=1).pow(1.0 / pc)
        missed = (in_bf16.double() != rounded).float().mean().item()
        assert missed > 0.1, missed  # measured 0.18 (the fused fp32 pool: 0)
        # and the ops inside the pooler see float32 tensors only, though autocast is on
        mode = OpDtypes()
        with torch.autocast("cpu", dtype=torch.bfloat16), mode:
            model.visual.pooler(tokens)
    for op in ("log2", "exp2", "amax", "mean", "addcmul"):
        assert mode.seen.get(op) == {torch.float32}, (op, mode.seen.get(op))


def test_ggem_gradients_in_fp32_inside_bf16_autocast(one_thread):
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 12).bfloat16().requires_grad_()
    p = torch.tensor([2.0, 3.5, 5.0], requires_grad=True)
    pool = GGeM(12, groups=3)
    with torch.no_grad():
        pool.p.copy_(p)
    weights = torch.randn(3, 12).bfloat16().float()  # exact in bf16: the backward of the cast keeps it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (pool(tokens).float() * weights).sum().backward()
    x64 = tokens.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_()
    (ggem_reference(x64, p64) * weights.double()).sum().backward()
    assert tokens.grad.dtype == torch.bfloat16 and pool.p.grad.dtype == torch.float32
    # p's gradient is computed and kept in fp32: float32 accuracy, not bf16's 2^-8
    torch.testing.assert_close(pool.p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    # x's gradient is fp32 maths rounded once to the input's bf16
    torch.testing.assert_close(tokens.grad.double(), x64.grad, rtol=2 ** -8, atol=1e-6)


def test_check_precision_refuses_fp16_on_cpu_in_one_line():
    cpu = torch.device("cpu")
    check_precision("fp32", cpu)
    check_precision("bf16", cpu)  # DeepSpeed's CPU accelerator supports bf16 (trained below)
    with pytest.raises(ConfigError) as err:
        check_precision("fp16", cpu)
    msg = str(err.value)
    assert "\n" not in msg and "precision=fp16" in msg and "CPU" in msg and "precision=bf16 or fp32" in msg


def _train(out, precision, zero, steps=5):
    return [sys.executable, "-m", "mmrl", "train", TINY, "data.synthetic=true", f"precision={precision}",
            f"zero_stage={zero}", "batch_size=8", f"max_steps={steps}", "lr=1e-4", "warmup_steps=0", "workers=0",
            "log_every=1", f"save_every={steps}", f"output_dir={out}", "resume=null"]


@pytest.mark.slow
def test_fp16_on_cpu_is_refused_before_anything_is_built(tmp_path):
    proc = subprocess.run(_train(tmp_path / "run", "fp16", 0), capture_output=True, text=True, timeout=300,
                          env=env(), cwd=ROOT)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "precision=fp16" in lines[0] and "use precision=bf16 or fp32" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "run"
    run(_train(out, "fp32", 0), timeout=900)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_bf16_training_on_cpu_tracks_fp32(tmp_path, fp32_run, zero):
    """A few DeepSpeed steps in bf16 and in fp32 from the same seed and synthetic batches.

    Tolerances: the first loss is of identical weights, so it differs by the bf16 forward only
    (activations rounded to 8 significant bits; the logits are ~14 x a cosine, so a logit moves by
    up to ~14 x 2^-9 = 0.03 and the mean loss much less; measured 0.0012): 0.02. Later steps add the
    training difference: Adam's first updates are about lr x sign(gradient) per weight, so a
    bf16-rounded gradient that flips a small gradient's sign moves that weight the other way; at
    lr 1e-4 over 5 steps the losses stay within 0.05 (measured at most 0.031, ZeRO 0). The weight
    updates of the two runs point the same way: cosine > 0.8 (measured 0.86 with ZeRO 0, 0.90 with
    ZeRO 2; a run whose masters were not updated, or updated from wrong gradients, is near 0).
    The runs are deterministic (same seed, batches and thread count), so these margins do not flake.
    """
    torch.manual_seed(0)
    init = mmrl.create_model(MODEL, pool="ggem").state_dict()  # what the trainer builds from seed 0
    runs = {"fp32": fp32_run, "bf16": tmp_path / "bf16"}
    run(_train(runs["bf16"], "bf16", zero), timeout=900)
    fp32_log, bf16_log = read_log(runs["fp32"]), read_log(runs["bf16"])
    assert [r["step"] for r in bf16_log] == [1, 2, 3, 4, 5]
    assert abs(bf16_log[0]["loss"] - fp32_log[0]["loss"]) <= 0.02
    for a, b in zip(fp32_log, bf16_log):
        assert abs(a["loss"] - b["loss"]) <= 0.05, (a["step"], a["loss"], b["loss"])
    # the engine trained a bf16 module: the checkpoint's module weights are bf16
    states = torch.load(next((runs["bf16"] / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")),
                        map_location="cpu", weights_only=False)
    module = states["module"]
    assert module["model.visual.conv1.weight"].dtype == torch.bfloat16
    # the export holds the fp32 master weights: GGeM's p moved by ~5 x lr, far less than bf16's step at 3.0
    # (1/64), so the module's rounded copy would still read exactly 3.0
    exported = {p: load_file(runs[p] / "model" / "open_clip_model.safetensors") for p in runs}
    bf16_p, fp32_p = exported["bf16"]["visual.pooler.p"], exported["fp32"]["visual.pooler.p"]
    assert exported["bf16"]["visual.pooler.p"].dtype == torch.float32
    assert (bf16_p != 3.0).all() and (fp32_p != 3.0).all()
    assert _cos(bf16_p - 3.0, fp32_p - 3.0) > 0.8
    assert abs(bf16_log[-1]["ggem_p"][0] - float(bf16_p[0])) < 1e-4  # the log reads the masters too
    moved = [k for k in init if k in exported["fp32"] and not torch.equal(exported["fp32"][k], init[k])]
    assert len(moved) > 50
    upd_bf16 = torch.cat([(exported["bf16"][k] - init[k]).flatten() for k in moved])
    upd_fp32 = torch.cat([(exported["fp32"][k] - init[k]).flatten() for k in moved])
    assert _cos(upd_bf16, upd_fp32) > 0.8, _cos(upd_bf16, upd_fp32)
    # the exported bf16 run evaluates like the fp32 one (fp32 weights, no autocast needed)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats = {}
    for p, out in runs.items():
        model, _, _ = mmrl.load_model(out / "model")
        with torch.no_grad():
            feats[p] = model.encode_image(images, normalize=True)
    assert next(model.parameters()).dtype == torch.float32 and torch.isfinite(feats["bf16"]).all()
    assert (feats["bf16"] * feats["fp32"]).sum(-1).min() > 0.99
