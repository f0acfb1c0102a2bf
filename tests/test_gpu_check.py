"""benchmarks/gpu_check.py: without CUDA one skip line and a JSON line last, exit 0; the device-name
table; and ``--tiny``, the whole pipeline on the CPU (the tiny model through mmrl train and through
open_clip's trainer, FLOPs, pool timing, the gpu tests collected), JSON last."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, env

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def test_without_cuda_it_says_it_skipped_and_exits_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("gpu_check: skipped: no CUDA device (torch ")
    last = json.loads(lines[-1])
    assert last["skipped"] is True and "no CUDA device" in last["reason"]


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", None), ("Tesla V100-SXM2-32GB", None)])
def test_dense_bf16_peak_by_device_name(gpu_check, name, tflops):
    assert gpu_check.peak_tflops(name) == tflops


def test_batch_from_gpu_memory(gpu_check):
    assert [gpu_check.batch_for(g) for g in (139.8, 79.2, 39.4, 22.0, 15.0)] == [256, 256, 128, 64, 32]


@pytest.mark.slow
def test_tiny_pipeline_on_cpu_prints_the_json_line_last(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600,
                          env=env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["device"] == "cpu" and result["model"] == "mmrl-vit-tiny-p8-64"
    if not torch.cuda.is_available():
        assert result["gpu_tests"].endswith(" skipped") and "passed" not in result["gpu_tests"]
    assert result["mmrl_samples_per_s"] > 0 and result["open_clip_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["mmrl_samples_per_s"] / result["open_clip_samples_per_s"],
                                            rel=0.05)
    assert result["gflop_per_step"] > 0 and result["ggem_over_avg"] > 0
    assert result["mfu"] is None and result["peak_mem_gib"] is None  # no known peak or CUDA memory on a CPU
    assert 0 < result["seconds"] < 480
