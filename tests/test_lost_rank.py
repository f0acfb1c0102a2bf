"""A lost rank (SIGKILLed mid-run) never hangs the job: the survivor exits 4 with one line naming it,
within ``dist_timeout_s``; under ``torchrun --max-restarts 1`` the restarted group resumes from the
last complete checkpoint and ends with the weights of an uninterrupted run (gloo, 2 processes, tiny model)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import (
    ROOT,
    TINY,
    assert_same_exported_weights,
    env,
    free_port,
    read_log,
    run,
    shape_shards,
    torchrun,
    train_cmd,
)

from mmrl.config import ConfigError, load_config
from mmrl.train import TrainConfig
from mmrl.train.lost_peer import LOST_PEER, Peers, describe, is_peer_failure
from mmrl.train.trainer import check_same_run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shape_shards(tmp_path_factory.mktemp("lost_rank_data"), 96, 24)


def wait_for(condition, procs, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended and time.time() < deadline, f"{what}: not reached (ended: {ended})"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return log.read_text().count("\n") if log.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_survivor_of_a_lost_rank_exits_with_one_line_naming_it(tmp_path, shards, sig):
    """Two plain processes (no launcher agent to tear the job down): after two steps, rank 1 is killed
    (gloo sees its connection close) or stopped (it never answers); rank 0 ends by itself, exit 4, one
    error line naming rank 1 and the step, within dist_timeout_s (plus start-up and exit margin)."""
    out, timeout_s = tmp_path / "run", 20
    port = free_port()
    cmd = train_cmd(shards, out, "max_steps=500", "save_every=1000", f"dist_timeout_s={timeout_s}")
    procs = []
    for rank in (0, 1):
        rank_env = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(tmp_path / f"stderr{rank}", "w") as err:  # files, not pipes: nobody reads while it runs
            procs.append(subprocess.Popen(cmd, env=rank_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
    try:
        wait_for(lambda: logged_steps(out) >= 2, procs, "two logged steps")
        procs[1].send_signal(sig)
        killed = time.time()
        procs[0].wait(timeout=timeout_s + 60)
        took = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # also ends a stopped process
                p.wait()
    stderr = (tmp_path / "stderr0").read_text()
    assert procs[0].returncode == LOST_PEER, stderr[-3000:]
    assert took < timeout_s + 15, f"rank 0 took {took:.0f} s to end (dist_timeout_s={timeout_s})"
    errors = [line for line in stderr.splitlines() if line.startswith("mmrl train: error:")]
    assert len(errors) == 1, stderr[-3000:]
    if sig == signal.SIGKILL:
        assert errors[0].startswith("mmrl train: error: lost contact with rank 1 (its process ended) during step ")
    else:  # a silent peer: only the timeout tells
        assert took >= timeout_s - 1, f"rank 0 ended {took:.0f} s after rank 1 stopped, before the timeout"
        assert errors[0].startswith(f"mmrl train: error: no answer from rank 1 within dist_timeout_s={timeout_s} "
                                    "(its process ended, hangs, or the network failed) during step "), errors
    assert "resume=auto" in errors[0] and "Traceback" not in stderr, stderr[-3000:]
    step = int(errors[0].split("during step ")[1].split(";")[0])
    assert step > 2 and not (out / "summary.json").exists()
    assert not (out / ".mmrl.lock").exists()  # rank 0 released the run folder


@pytest.mark.slow
def test_torchrun_restart_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, shards):
    """``torchrun --max-restarts 1``: SIGKILL rank 1 after the step-2 checkpoint; the restarted group
    resumes from the newest complete checkpoint and its exported weights equal an uninterrupted run's."""
    common = ("batch_size=16", "max_steps=6", "save_every=2", "resume=auto", "dist_timeout_s=60")
    base = train_cmd(shards, tmp_path / "whole", *common)[2:]  # after "python -m"
    run(torchrun(2, "--max-restarts", "1", "-m", *base))
    out = tmp_path / "killed"
    cmd = torchrun(2, "--max-restarts", "1", "-m", *train_cmd(shards, out, *common)[2:])
    with open(tmp_path / "stdout", "w") as out_file, open(tmp_path / "stderr", "w") as err:
        agent = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=out_file, stderr=err, start_new_session=True)
    try:
        latest = out / "checkpoints" / "latest"
        wait_for(lambda: latest.is_file() and latest.read_text() == "step_00000002", [agent], "the step-2 checkpoint")
        os.kill(rank_1_worker(agent.pid), signal.SIGKILL)
        resumable = latest.read_text()
        agent.wait(timeout=400)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert agent.returncode == 0, stderr[-4000:]
    # the survivor (rank 0), SIGTERMed by the agent with its loader workers, ends in its one line, not a
    # traceback (the killed rank's orphaned loader worker may print one as its parent vanishes)
    assert "DataLoader worker" not in stderr and "[rank0]: Traceback" not in stderr, stderr[-4000:]
    assert "mmrl train: error: lost contact with rank 1" in stderr or "no answer from rank 1" in stderr, stderr[-4000:]
    resumed = f"resumed from {out / 'checkpoints' / resumable} at step"
    assert resumed in (tmp_path / "stdout").read_text(), stderr[-4000:]
    steps = [row["step"] for row in read_log(out)]
    assert steps[-1] == 6 and 3 in steps
    assert_same_exported_weights(tmp_path / "whole", out, "the restarted run")


def rank_1_worker(agent_pid: int) -> int:
    """The pid of the torchrun worker with RANK=1 (a child of the agent; its environment says its rank)."""
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ:
            return int(child)
    raise AssertionError(f"no RANK=1 child of torchrun agent {agent_pid}")


def test_dist_timeout_is_validated_and_may_change_on_resume(tmp_path):
    for bad in ("0", "-5", "inf", "nan", "soon"):
        with pytest.raises(ConfigError, match="dist_timeout_s"):
            load_config(TrainConfig, TINY, ["data.train=x.tar", f"dist_timeout_s={bad}"])
    cfg = load_config(TrainConfig, TINY, ["data.train=x.tar", f"output_dir={tmp_path}", "dist_timeout_s=90"])
    assert cfg.dist_timeout_s == 90.0 and TrainConfig().dist_timeout_s == 1800.0
    from mmrl.config import save_config

    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    check_same_run(load_config(TrainConfig, TINY, ["data.train=x.tar", f"output_dir={tmp_path}",
                                                    "dist_timeout_s=600"]))
    with pytest.raises(ValueError, match="max_steps"):
        check_same_run(load_config(TrainConfig, TINY, ["data.train=x.tar", f"output_dir={tmp_path}", "max_steps=3"]))


def test_the_lost_rank_is_named_from_what_the_ranks_exchanged():
    """gloo's own words for a dead peer and for a silent one, mapped to ranks."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    reset = RuntimeError("[/x/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:46775: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging")
    silent = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation "
                          "to complete")
    assert is_peer_failure(reset) and is_peer_failure(silent)
    assert not is_peer_failure(RuntimeError("CUDA out of memory")) and not is_peer_failure(ValueError("Timed out"))
    # four ranks on this host; rank 2's process is gone
    peers = Peers(0, (host,) * 4, (os.getpid(), os.getppid(), dead.pid, os.getpid()), (frozenset(),) * 4)
    assert peers.lost(str(reset)) == ([2], "its process ended")
    line = describe(reset, peers, "step 7", 20)
    assert line.startswith("lost contact with rank 2 (its process ended) during step 7; backend: Read error "
                           "[127.0.0.1]:46775: Connection reset by peer; restart the job with resume=auto")
    # two ranks: the other one, whatever the error says
    two = Peers(1, ("a", "b"), (1, 2), (frozenset({"10.0.0.1"}), frozenset({"10.0.0.2"})))
    assert describe(silent, two, "the checkpoint save at step 4", 20).startswith(
        "no answer from rank 0 within dist_timeout_s=20 (its process ended, hangs, or the network failed) during "
        "the checkpoint save at step 4; backend: Timed out waiting 20000ms for recv operation to complete;")
    # ranks on other hosts, all alive: the host of the address gloo names
    many = Peers(0, ("a", "b", "c"), (1, 2, 3), (frozenset({"10.0.0.1"}), frozenset({"10.0.0.2"}),
                                                 frozenset({"10.0.0.3"})))
    remote = RuntimeError("Connection closed by peer [10.0.0.3]:5555")
    assert many.lost(str(remote))[0] == [2]
    assert many.lost(str(silent)) == ([], "a peer ended, hangs, or the network failed")
    assert describe(silent, many, "step 1", 5).startswith("no answer from a peer rank within dist_timeout_s=5 ")
