"""Training throughput on this machine: mmrl train vs open_clip's trainer on the same input, MFU,
torch.compile, patch dropout, 2 processes vs 1.

One run, the same tiny fp32 model (mmrl-vit-tiny-p8-64: ViT w192 x4 patch 8 at 64 px + text
w256 x4), batch 64, and the same input for both trainers: synthetic batches (``data.synthetic=true``
/ ``--dataset-type synthetic``: no decoding, so the comparison is of the training step itself):

1. peak fp32 matmul GFLOP/s of this machine (2048^3 matmuls, all threads);
2. ``mmrl train`` in one process (DeepSpeed engine, ZeRO 0), pool ``tok`` -- the architecture
   open_clip builds -- and pool ``ggem``; samples/s from its log, warm-up windows dropped;
3. open_clip's trainer (``python -m open_clip_train.main --dataset-type synthetic``);
4. ``mmrl train`` with ``compile=true`` (pool ggem) over the eager ggem run: ``compile_speedup``;
5. ``mmrl train`` with ``patch_dropout=0.5`` over ``0`` (pool ggem): ``patch_dropout_speedup``;
6. ``mmrl train`` on 2 processes (torchrun, gloo) at the same global batch (2 x 32), on real
   webdataset shards built here (256 px JPEGs of coloured shapes), over 1 process on the same shards.

MFU = model FLOPs per step (counted with torch's FlopCounterMode on a forward+backward) x steps/s
/ measured peak. The last line printed is JSON:
  {"train_over_open_clip": R, "mfu": M, "compile_speedup": C, "patch_dropout_speedup": P, "two_proc_speedup": S}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mmrl-vit-tiny-p8-64"
BATCH = 64
# open_clip's trainer, with mmrl's architectures registered; argv[1] a pool kind makes its model
# builder mmrl's (the same tower, that pool), "-" leaves open_clip's own builder
OPEN_CLIP_LAUNCHER = (
    "import sys, mmrl  # registers mmrl's architectures with open_clip\n"
    "import open_clip_train.main as oc\n"
    "pool = sys.argv.pop(1)\n"
    "def build(name, pretrained=None, precision='fp32', device='cpu', output_dict=None, aug_cfg=None, **_):\n"
    "    # amp_*: fp32 weights, the trainer autocasts; bf16 / pure_bf16: the weights cast as open_clip does\n"
    "    weights = precision if precision in ('bf16', 'fp16', 'pure_bf16', 'pure_fp16') else 'fp32'\n"
    "    model, train_tf, val_tf = mmrl.create_model_and_transforms(name, pool, precision=weights, device=device)\n"
    "    model.output_dict = bool(output_dict)\n"
    "    return model, train_tf, val_tf\n"
    "if pool != '-':\n"
    "    oc.create_model_and_transforms = build\n"
    "oc.main(sys.argv[1:])\n"
)


def peak_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def step_flops(model_name: str = MODEL, batch: int = BATCH, pool: str = "ggem", device: str = "cpu",
               count_batch: int | None = None) -> float:
    """Model FLOPs of one forward+backward at ``batch`` (torch's FlopCounterMode), counted at
    ``count_batch`` samples (default: all) and scaled linearly (the B x B logits are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    import mmrl

    count_batch = min(batch, count_batch or batch)
    model = mmrl.create_model(model_name, pool=pool, device=device)
    tokenizer = mmrl.get_tokenizer(model_name)
    size = model.visual.image_size
    images = torch.randn(count_batch, 3, *(size if isinstance(size, (tuple, list)) else (size, size)), device=device)
    texts = tokenizer([f"a photo number {i}" for i in range(count_batch)]).to(device)
    with FlopCounterMode(display=False) as counter:
        image_f, text_f, scale = model(images, texts)
        (image_f @ text_f.T * scale).logsumexp(1).mean().backward()
    return float(counter.get_total_flops()) * batch / count_batch


def build_shards(folder: Path, n: int = 2048) -> str:
    from mmrl.data import ImageTextRecord
    from mmrl.data.shards import build_shards as build

    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 210, 30)}
    records = []
    (folder / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:256, :256]
    for i in tqdm(range(n), desc="images", unit="img"):
        name = list(colors)[i % 4]
        img = rng.integers(0, 60, (256, 256, 3)).astype(np.uint8) + 180
        r = 40 + (i * 7) % 60
        img[(yy - 128) ** 2 + (xx - 128 + (i % 50)) ** 2 < r * r] = colors[name]
        path = folder / "img" / f"{i}.jpg"
        Image.fromarray(img).save(path, quality=90)
        records.append(ImageTextRecord(str(path), [f"a {name} disc, picture {i}"]))
    build(records, folder / "shards", shard_size=256, progress=False)
    return str(folder / "shards" / f"{{00000..{n // 256 - 1:05d}}}.tar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mmrl(shards: str | None, out: Path, steps: int, nproc: int, pool: str, *extra: str) -> float:
    data = ["data.synthetic=true", f"data.num_samples={BATCH * steps * 4}"] if shards is None else \
        [f"data.train={shards}"]
    args = ["-m", "mmrl", "train", str(ROOT / "configs" / "tiny.yaml"), *data,
            f"batch_size={BATCH // nproc}", f"max_steps={steps}", f"pool={pool}", "workers=1", "log_every=5",
            "save_every=100000", f"output_dir={out}", "resume=null", *extra]
    env = dict(os.environ)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"mmrl train failed:\n{proc.stderr[-3000:]}")
    rates = [json.loads(line)["samples_per_s"] for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(rates[2:])  # the first windows include start-up (and compilation)


def run_open_clip(out: Path, steps: int, model: str = MODEL, batch: int = BATCH, precision: str = "fp32",
                  pool: str | None = None, workers: int = 1, log_every: int = 5, skip: int = 2,
                  timeout: float | None = None) -> float:
    """open_clip's trainer (``open_clip_train.main --dataset-type synthetic``, one process) for ``steps``
    steps of ``batch``: the median samples/s of its log lines after the first ``skip``. ``pool``: train
    mmrl's tower with that pool kind through open_clip's trainer (None: open_clip's own model)."""
    launcher = out / "launch_open_clip.py"
    out.mkdir(parents=True, exist_ok=True)
    launcher.write_text(OPEN_CLIP_LAUNCHER)
    args = [sys.executable, str(launcher), pool or "-", "--model", model, "--batch-size", str(batch), "--epochs", "1",
            "--train-num-samples", str(batch * steps), "--workers", str(workers), "--precision", precision,
            "--lr", "5e-4", "--warmup", "20", "--log-every-n-steps", str(log_every), "--logs", str(out),
            "--name", "oc", "--save-frequency", "0", "--report-to", "", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--local-loss", "--gather-with-grad", "--dataset-type", "synthetic"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=out, timeout=timeout)
    text = proc.stdout + proc.stderr + "".join(p.read_text() for p in out.rglob("out.log"))
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", text)]
    if proc.returncode != 0 or len(rates) <= skip:
        errors = [line.strip() for line in text.splitlines() if re.search(r"\w+(Error|Exception)\b", line)]
        reason = errors[-1] if errors else (text.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"open_clip trainer failed (exit {proc.returncode}, {len(rates)} log lines): {reason}")
    return statistics.median(rates[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per measured run")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = peak_matmul_gflops()
    flops = step_flops()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = build_shards(tmp / "data")
        plan = [
            ("mmrl train, pool tok", lambda: run_mmrl(None, tmp / "m1", args.steps, 1, "tok")),
            ("open_clip trainer, pool tok", lambda: run_open_clip(tmp / "oc", args.steps)),
            ("mmrl train, pool ggem", lambda: run_mmrl(None, tmp / "m2", args.steps, 1, "ggem")),
            ("mmrl train, pool ggem, compile",
             lambda: run_mmrl(None, tmp / "m3", args.steps, 1, "ggem", "compile=true")),
            ("mmrl train, pool ggem, patch dropout 0.5",
             lambda: run_mmrl(None, tmp / "m4", args.steps, 1, "ggem", "patch_dropout=0.5")),
            ("mmrl train, shards, 1 process", lambda: run_mmrl(shards, tmp / "m5", args.steps, 1, "tok")),
            ("mmrl train, shards, 2 processes", lambda: run_mmrl(shards, tmp / "m6", args.steps, 2, "tok")),
        ]
        runs = {}
        for name, fn in tqdm(plan, desc="training runs", unit="run"):
            runs[name] = fn()
    ours, base = runs["mmrl train, pool tok"], runs["open_clip trainer, pool tok"]
    ggem = runs["mmrl train, pool ggem"]
    result = {
        "train_over_open_clip": round(ours / base, 3),
        "mfu": round(flops / BATCH * ours / (peak * 1e9), 3),
        "compile_speedup": round(runs["mmrl train, pool ggem, compile"] / ggem, 3),
        "patch_dropout_speedup": round(runs["mmrl train, pool ggem, patch dropout 0.5"] / ggem, 3),
        "two_proc_speedup": round(runs["mmrl train, shards, 2 processes"] / runs["mmrl train, shards, 1 process"], 3),
    }
    print(f"\nfp32 matmul peak: {peak:.1f} GFLOP/s; model: {flops / 1e9:.2f} GFLOP per step of {BATCH} "
          f"(forward+backward); both trainers on synthetic batches unless 'shards' is named")
    print(f"{'run':<44}{'samples/s':>12}{'GFLOP/s':>10}")
    for name, rate in runs.items():
        print(f"{name:<44}{rate:>12.1f}{flops / BATCH * rate / 1e9:>10.1f}")
    for key, bound in (("train_over_open_clip", 1.0), ("mfu", 0.6)):
        print(f"target {key} >= {bound}: {'met' if result[key] >= bound else 'NOT met'} ({result[key]})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
