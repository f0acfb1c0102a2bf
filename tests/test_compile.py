"""``compile=true``: the model through torch.compile -- no graph break in the image tower (GGeM's
fused autograd Function included), compiled outputs and gradients equal to eager ones, grad
checkpointing and accumulation together, clean state-dict keys in what a compiled run saves.

Most equality checks use the ``aot_eager`` backend (AOTAutograd's captured forward and backward
graphs run by eager kernels: seconds, no C++ build); the inductor checks build C++ kernels and are
marked slow."""
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import mmrl
from helpers.eager_engine import EagerEngine
from mmrl.config import ConfigError, load_config
from mmrl.layers.generalized_mean import ggem
from mmrl.train.config import TrainConfig
from mmrl.train.module import ContrastiveModule
from mmrl.train.step import contrastive_step

TINY = "mmrl-vit-tiny-p8-64"
POOLS = ["ggem", "gem", "cgem", "avg", "max", "tok"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _visual(pool, checkpointing=False):
    torch.manual_seed(0)
    model = mmrl.create_model(TINY, pool)
    with torch.no_grad():  # exponents away from their init, unequal per group
        for p in model.visual.pooler.parameters():
            p.copy_(torch.linspace(1.5, 4.0, p.numel()))
    model.set_grad_checkpointing(checkpointing)
    return model.visual.train()


def _images(n=4):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _forward_backward(fn, params, x):
    for p in params.values():
        p.grad = None
    out = fn(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _assert_close_grads(eager, compiled):
    """Each gradient within float32 reordering noise of eager's: 1e-5 of its largest element (inductor
    fuses and reorders sums: elements near zero differ by ~5e-7 of the tensor's scale)."""
    assert eager.keys() == compiled.keys() and eager
    for name in eager:
        scale = float(eager[name].abs().max())
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=max(1e-6, 1e-5 * scale), msg=name)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_image_tower_has_no_graph_break(pool, checkpointing):
    visual = _visual(pool, checkpointing)
    explained = torch._dynamo.explain(visual)(_images())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    with torch.no_grad():  # inference: GGeM's forward without the autograd Function
        explained = torch._dynamo.explain(visual.eval())(_images())
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("pool", ["ggem", "gem", "avg", "tok"])
def test_compiled_tower_outputs_and_gradients_equal_eager(pool):
    visual = _visual(pool, checkpointing=True)
    params = dict(visual.named_parameters())
    x = _images()
    eager_out, eager_grads = _forward_backward(visual, params, x)
    compiled = torch.compile(visual, backend="aot_eager", fullgraph=True)
    out, grads = _forward_backward(compiled, params, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    _assert_close_grads(eager_grads, grads)
    if pool in ("ggem", "gem"):
        assert grads["pooler.p"].abs().min() > 0  # the exponents do learn through the compiled graph


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fused_ggem_compiles_to_the_same_values_and_gradients(backend):
    """The Function alone, clamped inputs (x < eps) included, dynamic batch and token counts."""
    fn = torch.compile(ggem, backend=backend, fullgraph=True, dynamic=True)
    for shape in [(5, 16, 12), (3, 9, 12)]:
        x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 2
        p0 = torch.tensor([1.0, 2.5, 6.0])
        results = []
        for f in (ggem, fn):
            x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
            y = f(x, p)
            (y * torch.arange(12.0)).sum().backward()
            results.append((y.detach(), x.grad, p.grad))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert (results[1][1][x0 < 1e-6] == 0).all()  # clamped elements get no gradient
        with torch.no_grad():
            torch.testing.assert_close(fn(x0, p0), ggem(x0, p0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_ggem_tower_equals_eager():
    visual = _visual("ggem")
    params = dict(visual.named_parameters())
    x = _images()
    eager_out, eager_grads = _forward_backward(visual, params, x)
    out, grads = _forward_backward(torch.compile(visual, fullgraph=True), params, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    _assert_close_grads(eager_grads, grads)


def test_compiled_step_with_checkpointing_and_accumulation_equals_eager():
    """Two optimizer steps of grad_accum=2 (no-grad and live encodings, cached negatives) on a
    grad-checkpointed model: losses, gradients and updated weights as in eager mode."""
    from open_clip.loss import ClipLoss

    images = _images(8)
    texts = mmrl.get_tokenizer(TINY)([f"a caption number {i}" for i in range(8)])
    batches = [{"image": images[:4], "text": texts[:4]}, {"image": images[4:], "text": texts[4:]}]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = mmrl.create_model(TINY, "ggem")
        model.set_grad_checkpointing(True)
        module = ContrastiveModule(model).train()
        if compiled:
            module.compile(backend="aot_eager")  # what engine.compile() does
        engine = EagerEngine(module)
        losses, grads = [], []
        for _ in range(2):
            loss, _ = contrastive_step(engine, ClipLoss(), batches, "cpu", torch.float32)
            losses.append(float(loss))
            grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
            engine.update()
        runs.append((losses, grads, module.state_dict()))
    (eager_losses, eager_grads, eager_state), (losses, grads, state) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert losses[1] != losses[0]  # the first step did update the weights
    for e, c in zip(eager_grads, grads):
        _assert_close_grads(e, c)
    assert list(state) == list(eager_state)  # in-place compile: no _orig_mod. prefix
    for key in state:
        torch.testing.assert_close(state[key], eager_state[key], rtol=1e-4, atol=1e-6, msg=key)


def test_compile_config_keys_validate():
    def cfg(*overrides):
        return load_config(TrainConfig, None, ["data.train=x.tar", "max_steps=1", *overrides])

    assert cfg().compile is False
    ok = cfg("compile=true", "compile_mode=max-autotune")
    assert ok.compile and ok.compile_mode == "max-autotune" and ok.compile_backend == "inductor"
    assert cfg("compile=true", "compile_backend=aot_eager").compile_backend == "aot_eager"
    assert cfg("compile=true", "zero_stage=2").zero_stage == 2 and cfg("zero_stage=3").zero_stage == 3
    for overrides, key in [(["compile_mode=fastest"], "compile_mode"),
                           (["compile_backend=nope"], "compile_backend"),
                           (["compile_backend=aot_eager", "compile_mode=max-autotune"], "compile_mode"),
                           (["zero_stage=3"], "compile")]:
        with pytest.raises(ConfigError) as err:
            cfg("compile=true", *overrides)
        message = str(err.value)
        assert f"'{key}'" in message and "\n" not in message


def test_compile_keys_may_change_on_resume(tmp_path):
    from mmrl.config import save_config
    from mmrl.train.trainer import check_same_run

    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    overrides = ["data.train=x.tar", "max_steps=1", f"output_dir={out}"]
    save_config(load_config(TrainConfig, None, overrides), out / "config.yaml")
    check_same_run(load_config(TrainConfig, None, [*overrides, "compile=true", "compile_mode=max-autotune"]))
    with pytest.raises(ValueError, match="max_steps"):
        check_same_run(load_config(TrainConfig, None, [*overrides[:1], "max_steps=2", overrides[2]]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"])  # inductor: the same run, by benchmarks/train.py (minutes of C++)
def test_compiled_training_run_with_checkpointing_and_accumulation(tmp_path_factory, tmp_path, backend):
    """A real one-process ``mmrl train``: compile + grad checkpointing + grad_accum=2, then a resume
    of its checkpoint; the checkpoint and the exported model have the model's own keys."""
    from test_train import env, run, shape_shards, train_cmd

    shards = shape_shards(tmp_path_factory.mktemp("data"), 64, 16)
    out = tmp_path / "run"
    common = ("compile=true", f"compile_backend={backend}", "grad_checkpointing=true", "grad_accum=2",
              "save_every=1")
    proc = run(train_cmd(shards, out, "max_steps=2", *common), timeout=900)
    assert "model compiled" in proc.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(row["loss"] == row["loss"] for row in log)
    expected = list(mmrl.create_model(TINY, "ggem").state_dict())
    saved = load_file(out / "model" / "open_clip_model.safetensors")
    assert sorted(saved) == sorted(expected)
    model, _, _ = mmrl.load_model(out / "model")
    assert list(model.state_dict()) == expected
    ckpt = torch.load(out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not [k for k in ckpt["module"] if "_orig_mod" in k]
    assert sorted(ckpt["module"]) == sorted(["logit_scale", *(f"model.{k}" for k in expected if k != "logit_scale")])
    # the compiled run's step-1 checkpoint resumed eagerly (compile keys may change on resume)
    step1 = out / "checkpoints" / "step_00000001"
    resumed = subprocess.run(train_cmd(shards, out, "max_steps=2", *common[2:], f"resume={step1}"),
                             capture_output=True, text=True, timeout=600, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step1}" in resumed.stderr + resumed.stdout
    assert sorted(load_file(out / "model" / "open_clip_model.safetensors")) == sorted(expected)
