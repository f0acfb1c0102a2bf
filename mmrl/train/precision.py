"""Which ``precision`` the accelerator can train in, checked before anything is built.

DeepSpeed's bf16 path (the module in bf16, fp32 master weights in the optimizer) runs on CPU
(tested: ``tests/test_precision.py``, a few steps within tolerance of fp32) and on CUDA GPUs
that support bf16 (Ampere and later; ``benchmarks/gpu_check.py``). fp16 has no CPU path in
DeepSpeed (fp16 is not in its CPU accelerator's ``supported_dtypes()`` and ``deepspeed.initialize`` fails with
"Type fp16 is not supported on your device."); :func:`check_precision` refuses such a run in one
line naming the key, what fails and what to use instead.
"""
from __future__ import annotations

import torch

from ..config import ConfigError

__all__ = ["check_precision"]


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`~mmrl.config.ConfigError` (one line) when DeepSpeed cannot train ``precision``
    on ``device``'s accelerator; ``fp32`` always passes."""
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype in accel.supported_dtypes():  # DeepSpeed's own test in deepspeed.initialize
        return
    where = "CPU" if device.type == "cpu" else f"this {device.type} device ({_device_name(device)})"
    other = "bf16 or fp32" if precision == "fp16" else "fp32"
    raise ConfigError(f"config key 'precision': precision={precision} does not run on {where}: DeepSpeed's "
                      f"{accel.device_name()} accelerator has no {precision} support; use precision={other}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)
