"""mmrl train on DeepSpeed, for real: multi-process runs (torchrun + gloo on CPU), exact resume
after SIGKILL, SIGTERM, and update equivalences (2 ranks vs 1, ZeRO-3, grad accumulation)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmrl
from mmrl.config import ConfigError, load_config
from mmrl.data import ImageTextRecord
from mmrl.data.shards import build_shards
from mmrl.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle", "bar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def shape_image(color, shape, rng) -> Image.Image:
    a = np.full((80, 80, 3), 255, np.uint8)
    yy, xx = np.mgrid[:80, :80]
    mask = {"square": (abs(yy - 40) < 22) & (abs(xx - 40) < 22),
            "circle": (yy - 40) ** 2 + (xx - 40) ** 2 < 500,
            "bar": (abs(yy - 40) < 8) & (abs(xx - 40) < 34)}[shape]
    a[mask] = color
    noise = rng.integers(-25, 25, a.shape)
    return Image.fromarray(np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8))


def shape_shards(root: Path, n: int, shard_size: int) -> str:
    """``n`` captioned shape images in four shards under ``root``; their brace pattern."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 3]
        path = root / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        shape_image(COLORS[color], shape, rng).save(path)
        records.append(ImageTextRecord(str(path), [f"a {color} {shape}"]))
    build_shards(records, root / "shards", shard_size=shard_size, progress=False)
    return str(root / "shards" / "{00000..00003}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shape_shards(tmp_path_factory.mktemp("train_data"), 192, 48)


def run(cmd, timeout=420, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT, **kw)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_log(out: Path):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_zero2_training_run(tmp_path, shards):
    out = tmp_path / "run"
    run(torchrun(2, "-m", "mmrl", "train", TINY, f"data.train={shards}", "batch_size=16", "max_steps=8",
                 "save_every=4", "keep_last=2", "zero_stage=2", "workers=1", "lr=1e-3", "warmup_steps=2",
                 "log_every=1", f"output_dir={out}"))
    log = read_log(out)
    assert [row["step"] for row in log] == list(range(1, 9))
    losses = [row["loss"] for row in log]
    assert np.mean(losses[-3:]) < losses[0] - 0.2, losses  # it learns
    assert all(len(row["ggem_p"]) == 6 and row["samples_per_s"] > 0 for row in log)
    assert log[0]["lr"] < log[1]["lr"]  # warmup per optimizer step
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    assert len(list((ckpts / "step_00000008").glob("*optim_states.pt"))) == 2  # one ZeRO partition per rank
    assert json.loads((out / "summary.json").read_text())["step"] == 8
    model, preprocess, tokenizer = mmrl.load_model(out / "model")
    assert list(model.state_dict()) == list(mmrl.create_model("mmrl-vit-tiny-p8-64", "ggem").state_dict())
    assert model.logit_scale.dim() == 0  # open_clip's 0-dim temperature is back in the export
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(feats).all()
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())


def save_step_batch(path: Path) -> None:
    """The fixed global batch of 16 that tests/helpers/train_step_worker.py steps on."""
    g = torch.Generator().manual_seed(0)
    tokenizer = mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")
    captions = [f"a {c} {s} number {i}" for i, (c, s) in enumerate(zip(list(COLORS) * 4, SHAPES * 6))]
    # groups: positives within a rank's half (0, 1), across the halves (2, 3) and singletons
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 2, 3, 6, 7, 1, 8, 9, 9])
    torch.save({"image": torch.randn(16, 3, 64, 64, generator=g), "text": tokenizer(captions[:16]), "group": groups},
               path)


STEP_WORKER = str(ROOT / "tests" / "helpers" / "train_step_worker.py")


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    """One optimizer step on the same global batch of 16 in several engine configurations."""
    tmp = tmp_path_factory.mktemp("steps")
    save_step_batch(tmp / "batch.pt")
    worker = STEP_WORKER
    run(torchrun(1, worker, str(tmp / "batch.pt"), str(tmp), "global:0:1", "accum:0:2", "nan1:0:1:nan",
                 "sig_global:0:1:siglip",
                 "grp_global:0:1:group", "grp_accum:0:2:group", "stem_global:0:1:stem", "pstem_global:0:1:pstem"))
    run(torchrun(2, worker, str(tmp / "batch.pt"), str(tmp), "zero2:2:1", "zero3:3:1", "nan2:2:1:nan",
                 "sig_zero2:2:1:siglip",
                 "grp_zero2:2:1:group", "stem_zero3:3:1:stem", "pstem_zero3:3:1:pstem"))
    return {p.stem: torch.load(p) for p in tmp.glob("*.pt") if p.stem != "batch"}


def assert_same_update(a, b, atol=2e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def initial_state():
    torch.manual_seed(0)
    return mmrl.create_model("mmrl-vit-tiny-p8-64", "ggem").state_dict()


@pytest.mark.parametrize("variant", ["zero2", "zero3"])
def test_local_loss_gather_with_grad_on_two_ranks_equals_global_batch(step_results, variant):
    ref, two = step_results["global"], step_results[variant]
    assert abs(two["loss"] - ref["loss"]) < 1e-5
    assert_same_update(two["state"], ref["state"])


def test_siglip_on_two_ranks_equals_global_batch(step_results):
    ref, two = step_results["sig_global"], step_results["sig_zero2"]
    assert abs(two["loss"] - ref["loss"]) < 1e-4
    assert_same_update(two["state"], ref["state"])
    assert ref["state"]["logit_bias"].dim() == 0  # exported in open_clip's shape


def test_grad_accumulation_equals_the_larger_batch(step_results):
    ref, acc = step_results["global"], step_results["accum"]
    assert abs(acc["loss"] - ref["loss"]) < 1e-5
    assert_same_update(acc["state"], ref["state"])
    moved = [k for k, v in initial_state().items() if not torch.equal(v, ref["state"][k])]
    assert len(moved) > 50  # the step really changed the model


@pytest.mark.parametrize("variant", ["grp_zero2", "grp_accum"])
def test_grouped_loss_on_two_ranks_or_micro_batches_equals_global_batch(step_results, variant):
    ref, other = step_results["grp_global"], step_results[variant]
    assert abs(other["loss"] - ref["loss"]) < 1e-5
    assert_same_update(other["state"], ref["state"])
    assert abs(ref["loss"] - step_results["global"]["loss"]) > 0.1  # the groups changed the loss


def test_groupnorm_conv_stem_on_two_ranks_equals_global_batch(step_results):
    ref, two = step_results["stem_global"], step_results["stem_zero3"]
    assert abs(two["loss"] - ref["loss"]) < 1e-5
    assert_same_update(two["state"], ref["state"])
    assert "visual.conv1.stages.0.weight" in ref["state"] and "visual.conv1.weight" not in ref["state"]
    torch.manual_seed(0)
    start = mmrl.create_model("mmrl-vit-tiny-p8-64", "ggem", vision_cfg={"conv_stem": {"channels": [8, 16, 32],
                                                                                      "norm": "groupnorm"}})
    moved = [k for k, v in start.state_dict().items() if not torch.equal(v, ref["state"][k])]
    assert "visual.conv1.stages.0.weight" in moved and len(moved) > 50  # the stem trained with the rest


def test_pretrained_stem_on_two_ranks_equals_global_batch_and_stays_fixed(step_results):
    """ZeRO-3 partitions the EfficientNet-Lite0 stages too: the locked ones (and every BatchNorm's
    statistics) come back unchanged, while its fine-tuned last stage (``train_stages: 1``), the 1x1
    projection and the transformer train -- the same update as one process with the global batch."""
    from mmrl.layers.pretrained_stem import efficientnet_lite0_state_dict

    ref, two = step_results["pstem_global"], step_results["pstem_zero3"]
    assert abs(two["loss"] - ref["loss"]) < 1e-5
    assert_same_update(two["state"], ref["state"])
    packaged = efficientnet_lite0_state_dict()
    body = {k: v for k, v in ref["state"].items() if k.startswith("visual.conv1.body.")}
    assert len(body) > 100 and torch.equal(body["visual.conv1.body.0.weight"], packaged["conv_stem.weight"])
    assert torch.equal(body["visual.conv1.body.1.running_var"], packaged["bn1.running_var"])
    torch.manual_seed(0)
    start = mmrl.create_model("mmrl-vit-tiny-p8-64", "ggem", vision_cfg={
        "pretrained_stem": {"name": "efficientnet_lite0", "train_stages": 1}, "patch_size": 16}).state_dict()
    moved = {k for k, v in start.items() if not torch.equal(v, ref["state"][k])}
    last = "visual.conv1.body.6."  # conv_stem, bn1, blocks.0-4: blocks.4 is the fine-tuned stage
    moved_in_body = moved & set(body)
    assert moved_in_body and all(k.startswith(last) and "running" not in k for k in moved_in_body)
    assert "visual.conv1.proj.weight" in moved and len(moved) > 20


@pytest.mark.parametrize("variant", ["nan1", "nan2"])
def test_nonfinite_loss_skips_the_step_on_every_rank(step_results, variant):
    res = step_results[variant]
    assert res["skipped"]
    start = initial_state()
    assert all(torch.equal(start[k], res["state"][k]) for k in start)


def assert_same_exported_weights(a: Path, b: Path, what: str) -> None:
    """The models two runs exported (``RUN/model``) hold bit-identical tensors."""
    whole = load_file(a / "model" / "open_clip_model.safetensors")
    again = load_file(b / "model" / "open_clip_model.safetensors")
    assert whole.keys() == again.keys()
    different = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not different, f"{what} differs in {different[:5]}"


def train_cmd(shards, out, *extra):
    return [sys.executable, "-m", "mmrl", "train", TINY, f"data.train={shards}", "batch_size=8", "workers=1",
            "lr=1e-3", "warmup_steps=2", "log_every=1", f"output_dir={out}", *extra]


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, shards):
    common = ("max_steps=8", "save_every=2")
    run(train_cmd(shards, tmp_path / "whole", *common))
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(shards, out, *common), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text() == "step_00000002"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    resumed = run(train_cmd(shards, out, *common, "resume=auto"))
    assert "resumed from" in resumed.stderr + resumed.stdout
    steps = [row["step"] for row in read_log(out)]
    assert steps[-1] == 8 and 3 in steps
    assert_same_exported_weights(tmp_path / "whole", out, "the resumed run")


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, shards, to):
    """SIGTERM to the trainer alone (``kill PID``), or to its whole process group, loader workers
    included, as SLURM's scancel / time limit and torchrun's teardown send it: the same clean stop."""
    out = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(shards, out, "max_steps=500", "save_every=1000", "workers=2"), env=env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]  # stopped, not finished: `mmrl train && mmrl eval` stops here
    assert "Traceback" not in stderr, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and 2 <= summary["step"] < 500
    assert (out / "checkpoints" / "latest").read_text() == f"step_{summary['step']:08d}"
    assert "stopped at step" in stdout and "model:" not in stdout
    assert not (out / ".mmrl.lock").exists()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mmrl train: error:")]


@pytest.mark.slow
def test_one_writer_per_run_folder(tmp_path, shards):
    """A second run on a folder in use refuses in one line (exit 2) and leaves the first's files
    alone; a changed config against the folder's checkpoints is one line too; a killed run's
    lock is taken over."""
    out = tmp_path / "busy"
    first_cmd = train_cmd(shards, out, "max_steps=60", "save_every=1000")
    first = subprocess.Popen(first_cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 1):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(first_cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    assert second.returncode == 2, second.stderr[-3000:]
    assert error_lines(second.stderr) == [
        f"mmrl train: error: {out} is in use by another mmrl train (pid {first.pid} on host {socket.gethostname()}, "
        f"started {json.loads((out / '.mmrl.lock').read_text())['started']}); wait for it or pick another output_dir"]
    assert "Traceback" not in second.stderr and not second.stdout.strip()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert [row["step"] for row in read_log(out)] == list(range(1, 61))  # nothing of the second run
    assert json.loads((out / "summary.json").read_text())["step"] == 60
    assert load_config(TrainConfig, out / "config.yaml") == load_config(TrainConfig, TINY, first_cmd[5:])
    assert stdout.strip().splitlines()[-3:] == [f"model: {out / 'model'}",
                                               f"logs: {out / 'log.jsonl'}, {out / 'tensorboard'}",
                                               f"summary: {out / 'summary.json'}"]
    assert not (out / ".mmrl.lock").exists()

    saved = (out / "config.yaml").read_bytes()
    changed = subprocess.run(train_cmd(shards, out, "max_steps=60", "save_every=1000", "model=mmrl-vit-small-p8-64"),
                             capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    assert error_lines(changed.stderr) == [
        f"mmrl train: error: {out} holds a run with model=mmrl-vit-tiny-p8-64 (this config: "
        f"model=mmrl-vit-small-p8-64); use another output_dir, or remove {out / 'checkpoints'} to start over there"]
    assert (out / "config.yaml").read_bytes() == saved

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".mmrl.lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                                "started": "2026-01-01 00:00:00"}))
    again = run(first_cmd)  # resumes the finished run at its last step: nothing to train, the export again
    assert f"taking over the stale lock of another mmrl train (pid {int(gone.stdout)} on host" in again.stderr
    assert not (out / ".mmrl.lock").exists()


@pytest.mark.slow
def test_config_yaml_is_written_only_once_the_run_has_started(tmp_path, shards):
    out = tmp_path / "failed"
    proc = subprocess.run(train_cmd(shards, out, "max_steps=2", f"resume={tmp_path / 'nowhere'}"),
                          capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(error_lines(proc.stderr)) == 1 and "no complete checkpoint there" in proc.stderr
    assert not (out / "config.yaml").exists() and not (out / ".mmrl.lock").exists()


@pytest.mark.slow
def test_mistyped_shards_are_one_line_naming_them(tmp_path, shards):
    out = tmp_path / "run"
    typo = shards.replace("shards", "shard")
    proc = subprocess.run(train_cmd(typo, out, "max_steps=2", "data.num_samples=64"), capture_output=True, text=True,
                          timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    folder = typo.rsplit("/", 1)[0]
    assert error_lines(proc.stderr) == [f"mmrl train: error: {typo}: none of its 4 shards exist ({folder}/00000.tar, "
                                        f"{folder}/00001.tar, {folder}/00002.tar and 1 more)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "skipping" not in proc.stderr
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_one_cpu_process_does_not_compile_the_shared_memory_op(tmp_path):
    """init_distributed for one CPU process: a working process group, and DeepSpeed's shm op (only
    useful between processes) is neither compiled into a fresh extensions folder nor loaded."""
    code = ("import os, torch.distributed as dist, deepspeed.comm.comm as c\n"
            "from mmrl.train.distributed import DistInfo, init_distributed\n"
            "init_distributed(DistInfo())\n"
            "assert dist.is_initialized() and dist.get_world_size() == 1\n"
            "print('shm_op', c.cdb.shm_comm_op)\n")
    extensions = tmp_path / "torch_extensions"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**env(), "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shm_op None" in proc.stdout
    assert not any(extensions.rglob("*shm*")), sorted(extensions.rglob("*"))


@pytest.mark.slow
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'zero_stage': expected 0, 1, 2 or 3"):
        load_config(TrainConfig, TINY, ["data.train=x", "zero_stage=4"])
    with pytest.raises(ConfigError, match="unknown config key 'data.shards'"):
        load_config(TrainConfig, TINY, ["data.shards=x"])
    with pytest.raises(ConfigError, match="'precision': expected fp32 or bf16 or fp16"):
        load_config(TrainConfig, TINY, ["data.train=x", "precision=int8"])
    with pytest.raises(ConfigError, match="'batch_size': expected int"):
        load_config(TrainConfig, TINY, ["data.train=x", "batch_size=big"])
    with pytest.raises(ConfigError, match="data.weights"):
        load_config(TrainConfig, TINY, ["data.train=a.tar::b.tar", "data.weights=1"])
    cfg = load_config(TrainConfig, TINY, ["data.train=a.tar", "lr=3e-4", "data.resampled=false", "betas=[0.9, 0.95]"])
    assert cfg.lr == 3e-4 and cfg.data.resampled is False and list(cfg.betas) == [0.9, 0.95]
    proc = subprocess.run([sys.executable, "-m", "mmrl", "train", TINY, "data.train=x", "loss=triplet"],
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    assert (proc.returncode == 2
            and proc.stderr.strip().splitlines()[-1].startswith("mmrl train: error: config key 'loss'"))


@pytest.mark.parametrize("pool", ["tok", "avg", "gem", "ggem"])
def test_gpu_recipes_are_valid(pool):
    cfg = load_config(TrainConfig, ROOT / "configs" / f"cc3m-vitb16-{pool}.yaml",
                      ["data.train=/data/cc3m/{00000..00331}.tar"])
    assert (cfg.model, cfg.pool, cfg.precision, cfg.zero_stage) == ("ViT-B-16", pool, "bf16", 1)
    assert cfg.local_loss and cfg.gather_with_grad and cfg.epochs == 32
