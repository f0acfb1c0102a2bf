"""The GPU check (``make gpu-check``): under 8 minutes on one CUDA GPU, one JSON line last.

Parts, each bounded by a timeout (a failing part is reported as null plus its error in ``errors``,
and the others still run; the exit status is then 1):

1. ``pytest -m gpu tests/test_gpu.py``: fused GGeM on CUDA against the float64 reference (values and
   gradients), the image tower under bf16 autocast, torch.compile (inductor) of the image tower;
2. ``mmrl train configs/cc3m-vitb16-ggem.yaml`` (ViT-B/16, GGeM, bf16, ZeRO-1) on synthetic batches
   (``data.synthetic=true``) for a fixed number of steps: samples/s (median of the log windows after
   the first two), peak CUDA memory (``max_memory_allocated_gib`` of its log);
3. open_clip's trainer (``open_clip_train.main --dataset-type synthetic --precision amp_bf16``, the
   same tower built by mmrl -- GGeM ViT-B/16 -- and the same batch and steps; amp_bf16 keeps fp32
   weights and autocasts, as DeepSpeed's bf16 keeps fp32 master weights; 8 loader workers, as its
   synthetic set augments a PIL image per sample, where mmrl's are ready tensors): samples/s, ratio;
4. MFU: model FLOPs of a forward+backward (torch's FlopCounterMode) x steps/s of mmrl train over the
   GPU's dense bf16 peak (:data:`DENSE_BF16_TFLOPS`; an unknown GPU gives null);
5. GGeM (fused, G=12) forward+backward time over average pooling's at ViT-B/16 shapes
   (B=256, N=196, C=768), CUDA events.

The per-GPU batch comes from the GPU's total memory (:data:`BATCH_BY_MEMORY`: 256 from 70 GiB, the
recipe's batch, which an 80 GB GPU holds without gradient checkpointing); a run that runs out of
memory is retried once at half the batch. Without CUDA it prints one line saying it skipped and
``{"skipped": true, ...}``, and exits 0. ``--tiny`` runs every part on the CPU instead (the tiny model,
fp32, a few steps; the gpu tests are collected and skipped) to check the plumbing.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import run_open_clip, step_flops  # noqa: E402 - benchmarks/train.py, beside this file

BUDGET_S = 450  # everything, under the 8 minutes with start-up
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device name; the first match wins
DENSE_BF16_TFLOPS = [(r"H100.*PCIe", 756.0), (r"H100 NVL", 835.0), (r"H100", 989.0), (r"H200", 989.0),
                     (r"A100", 312.0), (r"\bL4\b", 121.0), (r"RTX 4090", 165.0)]
# GiB of GPU memory -> per-GPU batch of ViT-B/16 at 224 px in bf16 (activations ~0.1 GiB a sample)
BATCH_BY_MEMORY = [(70, 256), (35, 128), (18, 64), (0, 32)]


@dataclass
class Plan:
    device: str
    model: str
    precision: str          # mmrl train's
    oc_precision: str       # open_clip trainer's
    batch: int
    oc_workers: int         # open_clip's synthetic set decodes and augments one PIL image per sample
    steps: int
    log_every: int
    pool_shape: tuple[int, int, int, int]  # B, N, C, G
    budgets: dict[str, float]


def peak_tflops(name: str) -> float | None:
    return next((tf for pattern, tf in DENSE_BF16_TFLOPS if re.search(pattern, name)), None)


def batch_for(total_gib: float) -> int:
    return next(batch for gib, batch in BATCH_BY_MEMORY if total_gib >= gib)


def make_plan(tiny: bool) -> Plan:
    if tiny:
        return Plan("cpu", "mmrl-vit-tiny-p8-64", "fp32", "fp32", 8, 1, 6, 2, (8, 64, 192, 6),
                    {"tests": 120, "mmrl": 150, "open_clip": 150, "pool": 30})
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return Plan("cuda", "ViT-B-16", "bf16", "amp_bf16", batch_for(total), 8, 60, 10, (256, 196, 768, 12),
                {"tests": 120, "mmrl": 130, "open_clip": 130, "pool": 30})


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.time(), budget

    def timeout(self, part_budget: float) -> float:
        return max(5.0, min(part_budget, self.budget - (time.time() - self.start)))

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 1)


def run_gpu_tests(timeout: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", proc.stdout.strip().splitlines()[-1]
                        if proc.stdout.strip() else "")
    summary = ", ".join(f"{n} {what}" for n, what in counts) or "no result"
    if proc.returncode not in (0, 5) or any(what in ("failed", "error", "errors") for _, what in counts):
        raise RuntimeError(f"gpu tests: {summary}: {proc.stdout[-1500:]}")
    return summary


def run_mmrl(plan: Plan, out: Path, batch: int, timeout: float) -> tuple[float, float | None]:
    """(samples/s, peak GiB) of mmrl train on synthetic batches."""
    cmd = [sys.executable, "-m", "mmrl", "train", str(ROOT / "configs" / "cc3m-vitb16-ggem.yaml"),
           f"model={plan.model}", "data.synthetic=true", f"precision={plan.precision}", "zero_stage=1",
           f"batch_size={batch}", f"max_steps={plan.steps}", "epochs=null", f"log_every={plan.log_every}",
           "warmup_steps=10", "save_every=1000000", f"output_dir={out}", "resume=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"mmrl train failed (exit {proc.returncode}): {(lines or ['no output'])[-1]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    if len(rates) < 3:
        raise RuntimeError(f"mmrl train logged {len(rates)} windows, need 3")
    peak = rows[-1].get("max_memory_allocated_gib")
    return statistics.median(rates[2:]), peak


def with_oom_retry(fn, batch: int):
    """``fn(batch)``; once more at half the batch when it ran out of memory. Returns (result, batch)."""
    try:
        return fn(batch), batch
    except RuntimeError as err:
        if "out of memory" not in str(err).lower() or batch < 2:
            raise
        return fn(batch // 2), batch // 2


def time_pools(plan: Plan) -> float:
    """GGeM (fused) forward+backward time over average pooling's, median of 20 after warm-up."""
    from mmrl.layers import ggem

    b, n, c, g = plan.pool_shape
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    x = torch.randn(b, n, c, device=plan.device, dtype=dtype, requires_grad=True)
    p = torch.full((g,), 3.0, device=plan.device, requires_grad=True)
    grad = torch.randn(b, c, device=plan.device, dtype=dtype)

    def ggem_step():  # gradients returned, not accumulated into .grad (no extra add in either)
        torch.autograd.grad(ggem(x, p), (x, p), grad)

    def avg_step():
        torch.autograd.grad(x.mean(dim=1), (x,), grad)

    def median_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            if plan.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return median_ms(ggem_step) / median_ms(avg_step)


def part(name: str, errors: dict, fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the JSON; the other parts still run
        errors[name] = f"{type(err).__name__}: {err}"[:600]
        print(f"gpu_check: {name} failed: {errors[name]}", file=sys.stderr, flush=True)
        return None


def check(plan: Plan, clock: Clock) -> dict:
    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu"
    result: dict = {"device": name, "model": plan.model, "batch": plan.batch, "steps": plan.steps,
                    "precision": plan.precision, "open_clip_precision": plan.oc_precision}
    errors: dict[str, str] = {}
    result["gpu_tests"] = part("gpu_tests", errors, lambda: run_gpu_tests(clock.timeout(plan.budgets["tests"])))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        got = part("mmrl", errors, lambda: with_oom_retry(
            lambda b: run_mmrl(plan, tmp / f"mmrl{b}", b, clock.timeout(plan.budgets["mmrl"])), plan.batch))
        batch = got[1] if got else plan.batch
        ours, peak = got[0] if got else (None, None)
        base = part("open_clip", errors, lambda: run_open_clip(
            tmp / "oc", plan.steps, model=plan.model, batch=batch, precision=plan.oc_precision, pool="ggem",
            workers=plan.oc_workers, log_every=plan.log_every, timeout=clock.timeout(plan.budgets["open_clip"])))
    flops = part("flops", errors, lambda: step_flops(plan.model, batch, "ggem", plan.device, count_batch=16))
    peak_tf = peak_tflops(name) if plan.device == "cuda" else None
    result.update(batch=batch, mmrl_samples_per_s=_round(ours), open_clip_samples_per_s=_round(base),
                  ratio=_round(ours / base if ours and base else None, 3),
                  gflop_per_step=_round(flops / 1e9 if flops else None),
                  peak_bf16_tflops=peak_tf,
                  mfu=_round(flops * ours / batch / (peak_tf * 1e12) if flops and ours and peak_tf else None, 3),
                  peak_mem_gib=peak)
    result["ggem_over_avg"] = _round(part("pool", errors, lambda: time_pools(plan)), 3)
    result["errors"] = errors
    result["seconds"] = clock.seconds
    return result


def _round(value, digits: int = 1):
    return None if value is None else round(float(value), digits)


def print_table(result: dict) -> None:
    rows = [("device", result["device"] + (" (--tiny: plumbing only, not a measurement)" if result["device"] == "cpu"
                                           else "")), ("gpu tests", result["gpu_tests"]),
            (f"mmrl train {result['model']} {result['precision']} ZeRO-1, batch {result['batch']}",
             f"{result['mmrl_samples_per_s']} samples/s"),
            (f"open_clip trainer, same model, {result['open_clip_precision']}",
             f"{result['open_clip_samples_per_s']} samples/s"),
            ("mmrl / open_clip", result["ratio"]),
            (f"MFU ({result['gflop_per_step']} GFLOP/step, peak {result['peak_bf16_tflops']} TFLOP/s)", result["mfu"]),
            ("peak memory (GiB)", result["peak_mem_gib"]), ("GGeM fwd+bwd / avg pool", result["ggem_over_avg"]),
            ("seconds", result["seconds"])]
    for label, value in rows:
        print(f"{label:<64}{value}")
    for name, error in result["errors"].items():
        print(f"error in {name}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="run every part on the CPU with the tiny model")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        print(f"gpu_check: skipped: {reason}")
        print(json.dumps({"skipped": True, "reason": reason}))
        return 0
    clock = Clock(BUDGET_S)
    result = check(make_plan(args.tiny), clock)
    print_table(result)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
