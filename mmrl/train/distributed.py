"""Process group set-up and the in-memory DeepSpeed config.

Launchers: none (one process), ``torchrun``, the ``deepspeed`` launcher (both set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) or SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``; ``MASTER_ADDR`` the first host of
``SLURM_JOB_NODELIST``, ``MASTER_PORT`` from ``SLURM_JOB_ID``: :mod:`.slurm`). The backend
is nccl when CUDA is available, gloo otherwise (one CPU process skips DeepSpeed's shared-memory
op, which it would compile for nothing). The DeepSpeed config is a dict handed to
``deepspeed.initialize``; nothing is written to the working directory.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .config import TrainConfig
from .slurm import slurm_task

__all__ = ["DistInfo", "dist_info_from_env", "init_distributed", "deepspeed_config", "device_for",
           "worst_on_any_rank", "on_main_rank", "OtherRankFailed"]

T = TypeVar("T")


class OtherRankFailed(ValueError):
    """Work done by the main rank alone failed there; the other ranks raise this (the main rank names why)."""


def worst_on_any_rank(code: int, device: Any = "cpu") -> int:
    """The largest ``code`` over all ranks (one all-reduce; ``code`` itself without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return code
    value = torch.tensor([code], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def on_main_rank(is_main: bool, device: Any, work: Callable[[], T], what: str) -> T | None:
    """``work()`` on the main rank only (``None`` elsewhere); then every rank learns whether it failed
    (one all-reduce), so no rank waits for one that died: the main rank re-raises its error, the
    others raise :class:`OtherRankFailed` ("rank 0 failed to WHAT (its error names why)")."""
    result, error = None, None
    if is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
            error = err
    if worst_on_any_rank(int(error is not None), device):
        if error is not None:
            raise error
        raise OtherRankFailed(f"rank 0 failed to {what} (its error names why)")
    return result


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: int = 0            # this process's node (torchrun's GROUP_RANK, SLURM_NODEID, DeepSpeed's CROSS_RANK)
    nodes: int = 1
    launcher: str = ""       # "torchrun", "deepspeed", "slurm", "env" (RANK/WORLD_SIZE set by hand), "": one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """``"2 processes on 2 nodes (slurm; rendezvous 127.0.0.1:11234)"``, for the start of a run's output."""
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"{self.world_size} process{'es' * (self.world_size != 1)} on {self.nodes} "
                f"node{'s' * (self.nodes != 1)} ({self.launcher or 'no launcher'}; rendezvous {where})")


def dist_info_from_env() -> DistInfo:
    """This process's place in the job: from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, DeepSpeed's
    launcher) or else from a SLURM task's variables (:func:`mmrl.train.slurm.slurm_task`, which also sets
    those for torch.distributed, with ``MASTER_ADDR``/``PORT``); one process otherwise. An inconsistent
    SLURM environment is a ``ValueError`` naming the variables."""
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    from_slurm = (env.get("SLURM_PROCID"), env.get("SLURM_NTASKS")) == (env.get("RANK"), env.get("WORLD_SIZE"))
    if launched and ("GROUP_RANK" in env or "CROSS_RANK" in env or not from_slurm):
        torchrun = "GROUP_RANK" in env
        node, nodes = ("GROUP_RANK", "GROUP_WORLD_SIZE") if torchrun else ("CROSS_RANK", "CROSS_SIZE")
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        int(env.get(node, 0)), int(env.get(nodes, 1)),
                        "torchrun" if torchrun else "deepspeed" if "CROSS_RANK" in env else "env")
    # not launched, or launched by an earlier call here: RANK and WORLD_SIZE are the SLURM task's own
    task = slurm_task({k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")})
    if task is None:
        return DistInfo()
    os.environ.update(task.launch_env())
    return DistInfo(task.rank, task.world_size, task.local_rank, task.node, task.nodes, "slurm")


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(info: DistInfo, timeout_s: float = 1800.0) -> None:
    """Create the default process group (also for one process: DeepSpeed expects one). Every collective
    times out after ``timeout_s`` (``dist_timeout_s``: :mod:`.lost_peer` names the silent rank); on nccl,
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (unless set) lets torch's watchdog end a process whose
    collective timed out instead of leaving it blocked."""
    from datetime import timedelta

    import deepspeed

    if info.world_size == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:  # a free port, so parallel single-process runs do not collide
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _skip_shm_comm_op()
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = timedelta(seconds=timeout_s)
    if info.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_in_attempt_store(info, backend, timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def _init_in_attempt_store(info: DistInfo, backend: str, timeout) -> None:
    """Under torchrun, the group's rendezvous keys live in the agent's store, which a restarted group
    (``--max-restarts``) shares with the attempt before it: torch reads the dead attempt's peer
    addresses there and fails to connect (pytorch/pytorch#135712). Each attempt
    (``TORCHELASTIC_RESTART_COUNT``, the same on every node of a group restarted together) gets its own
    key prefix instead; DeepSpeed then adopts the group."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    kwargs = {}
    if backend == "nccl" and not "2.6.0" < torch.__version__ < "2.7.1":  # as DeepSpeed: device_id hangs there
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    dist.init_process_group(backend, store=dist.PrefixStore(f"mmrl/attempt_{attempt}", store), rank=info.rank,
                            world_size=info.world_size, timeout=timeout, **kwargs)


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory collectives op in ``init_distributed`` (~30 s
    on a fresh machine, per virtual environment; every process takes the build folder's lock in turn, and
    one left waiting there past ``dist_timeout_s`` fails a restarted group's start-up), though only its
    inference all-reduce uses it: training's collectives are torch.distributed's either way. Marking the op
    incompatible makes DeepSpeed use plain torch.distributed, as it does wherever the op cannot be built;
    DeepSpeed versions without this table are left alone."""
    try:
        import deepspeed.ops

        compatible = deepspeed.ops.__compatible_ops__
    except Exception:  # noqa: BLE001 - an internal table; without it DeepSpeed builds as usual
        return
    if isinstance(compatible, dict) and "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
