"""Several nodes on one machine, for real: two ``torchrun`` launchers as two nodes (``--nnodes 2
--node_rank 0/1``, one process each, rendezvous on 127.0.0.1), and two processes that get only the
variables ``srun`` sets (SLURM_PROCID / NTASKS / LOCALID / NODEID / JOB_NODELIST / JOB_ID; no RANK,
WORLD_SIZE, MASTER_ADDR or MASTER_PORT). Each makes one optimizer step (ZeRO-2) on a fixed global
batch that must equal one process stepping on the whole batch (loss and every weight); and
configs/slurm/train.sbatch itself runs ``mmrl train`` as two SLURM tasks (``srun`` a shell function
that runs its command).

The SLURM node list is ``127.0.0.[1-2]``: a host list with a range, whose first host (the master)
is this machine (every 127.x address is loopback on Linux)."""
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    ROOT,
    STEP_WORKER,
    TINY,
    assert_same_update,
    env,
    free_port,
    read_log,
    save_step_batch,
    shape_shards,
)

from mmrl.train.slurm import job_port

SBATCH = ROOT / "configs" / "slurm" / "train.sbatch"
NODELIST = "127.0.0.[1-2]"
TIMEOUT = 420  # generous: other jobs may share this machine's cores


def bare_env() -> dict:
    """This process's environment without any launcher's variables (as a fresh login shell would have)."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")
    return {k: v for k, v in env().items()
            if k not in launch and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}


def slurm_task_env(rank: int, job: int) -> dict:
    """What ``srun --nodes 2 --ntasks-per-node 1`` gives task ``rank`` of job ``job`` (and nothing more)."""
    return {**bare_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(rank), "SLURM_JOB_NODELIST": NODELIST, "SLURM_JOB_ID": str(job)}


def free_job_id() -> int:
    """A job id whose rendezvous port (:func:`job_port`) is free here now."""
    rng = random.Random()
    while True:
        job = rng.randrange(1, 10**7)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", job_port(job)))
            except OSError:
                continue
        return job


def run_together(cmds, envs, logs: Path, timeout=TIMEOUT) -> list[str]:
    """Start every command at once (the nodes of one job), each writing to a file under ``logs`` (no
    pipe to fill and block); all must exit 0 within ``timeout``. Their outputs."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"process{i}.log", "w+") for i in range(len(cmds))]
    procs = [subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
             for cmd, e, f in zip(cmds, envs, files)]
    deadline = time.time() + timeout
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} of {len(procs)}: exit {proc.returncode}\n{out[-6000:]}"
    return outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process (no launcher) steps on the whole global batch."""
    tmp = tmp_path_factory.mktemp("multinode")
    save_step_batch(tmp / "batch.pt")
    run_together([[sys.executable, STEP_WORKER, str(tmp / "batch.pt"), str(tmp), "global:0:1"]], [bare_env()],
                 tmp / "logs")
    return tmp / "batch.pt", torch.load(tmp / "global.pt")


def assert_equals_one_process(result, ref):
    assert not result["skipped"]
    assert abs(result["loss"] - ref["loss"]) < 1e-5
    assert_same_update(result["state"], ref["state"])


@pytest.mark.slow
def test_two_torchrun_nodes_step_equals_one_process_with_the_global_batch(tmp_path, one_process):
    batch, ref = one_process
    port = free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             STEP_WORKER, str(batch), str(tmp_path), "nodes:2:1"] for node in (0, 1)]
    run_together(cmds, [bare_env(), bare_env()], tmp_path / "logs")
    result = torch.load(tmp_path / "nodes.pt")
    assert result["ranks"] == [{"rank": r, "world_size": 2, "local_rank": 0, "node": r, "nodes": 2,
                                "launcher": "torchrun", "master": f"127.0.0.1:{port}"} for r in (0, 1)]
    assert_equals_one_process(result, ref)


@pytest.mark.slow
def test_slurm_tasks_step_equals_one_process_with_the_global_batch(tmp_path, one_process):
    batch, ref = one_process
    job = free_job_id()
    cmd = [sys.executable, STEP_WORKER, str(batch), str(tmp_path), "slurm:2:1"]
    run_together([cmd, cmd], [slurm_task_env(0, job), slurm_task_env(1, job)], tmp_path / "logs")
    result = torch.load(tmp_path / "slurm.pt")
    # ranks from SLURM_PROCID / LOCALID / NODEID; the master from the node list, the port from the job id
    assert result["ranks"] == [{"rank": r, "world_size": 2, "local_rank": 0, "node": r, "nodes": 2,
                                "launcher": "slurm", "master": f"127.0.0.1:{10000 + job % 20000}"} for r in (0, 1)]
    assert_equals_one_process(result, ref)


@pytest.mark.slow
def test_the_sbatch_script_trains_on_two_slurm_tasks(tmp_path):
    """configs/slurm/train.sbatch, run by bash on each of two SLURM tasks with ``srun`` a function that
    runs its command: one job of two ranks that rendezvous where SLURM's variables say and train
    (the update itself is compared with one process above)."""
    launch = [line for line in SBATCH.read_text().splitlines() if line.startswith("srun ")]
    assert len(launch) == 1 and launch[0].split()[1:5] == ["python", "-m", "mmrl", "train"], launch
    shards = shape_shards(tmp_path, 64, 16)
    job = free_job_id()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # `python` is this one
    script = ["bash", "-c", 'srun() { "$@"; }; . "$0" "$@"', str(SBATCH), TINY, f"data.train={shards}",
              "batch_size=8", "workers=1", "max_steps=2", "zero_stage=1", "log_every=1",
              f"output_dir={tmp_path / 'run'}"]
    outputs = run_together([script, script], [{**slurm_task_env(rank, job), "PATH": path} for rank in (0, 1)],
                           tmp_path / "logs")
    assert f"mmrl train: 2 processes on 2 nodes (slurm; rendezvous 127.0.0.1:{job_port(job)})" in outputs[0]
    assert "model: " in outputs[0] and "model: " not in outputs[1]  # rank 0 reports the run
    log = read_log(tmp_path / "run")
    assert [row["step"] for row in log] == [1, 2] and all(np.isfinite(row["loss"]) for row in log)
    assert len(list((tmp_path / "run" / "checkpoints" / "step_00000002").glob("*optim_states.pt"))) == 2  # 2 ranks
    assert (tmp_path / "run" / "model" / "open_clip_model.safetensors").is_file()


def test_the_readme_shows_the_tested_sbatch_script():
    """The README's SLURM block is configs/slurm/train.sbatch line for line, its comment lines aside."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```bash\n#!/bin/bash\n") + len("```bash\n")
    shown = readme[start:readme.index("```", start)].splitlines()
    script = [line for line in SBATCH.read_text().splitlines()
              if line.strip() and not (line.startswith("#") and not line.startswith(("#!", "#SBATCH")))]
    assert shown == script
