"""SLURM launch environment without SLURM: the host-list expander (SLURM's documented forms, and a
round trip through an independent compressor), the rank / rendezvous derivation from the variables
``srun`` sets, torchrun's precedence, and one error line for an environment no ``srun`` produces."""
import os
import random
import re
from pathlib import Path

import pytest

from mmrl.cli import main
from mmrl.train.distributed import DistInfo, dist_info_from_env
from mmrl.train.slurm import DEFAULT_PORT, expand_hostlist, job_port, slurm_task

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "CROSS_RANK", "CROSS_SIZE")


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),                       # no padding: widths grow
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),             # padding from the lower bound
    ("gpu[01-03,7],login1,n[1-2]-ib", ["gpu01", "gpu02", "gpu03", "gpu7", "login1", "n1-ib", "n2-ib"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),     # several brackets: left one outermost
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ("x[5]", ["x5"]),
])
def test_expand_hostlist_documented_forms(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def compress(hosts: list[str]) -> str:
    """An independent inverse: runs of consecutive same-width numbers after one prefix become ranges."""
    entries, i = [], 0
    while i < len(hosts):
        prefix, digits = re.fullmatch(r"(.*?)(\d+)", hosts[i]).groups()
        j = i + 1
        while j < len(hosts):
            m = re.fullmatch(r"(.*?)(\d+)", hosts[j])
            if not (m and m.group(1) == prefix and len(m.group(2)) == len(digits)
                    and int(m.group(2)) == int(digits) + (j - i)):
                break
            j += 1
        last = hosts[j - 1][len(prefix):]
        entries.append(f"{prefix}[{digits}-{last}]" if j - i > 1 else hosts[i])
        i = j
    return ",".join(entries)


def test_expand_hostlist_round_trips_random_clusters():
    rng = random.Random(0)
    for _ in range(200):
        hosts = []
        for _ in range(rng.randint(1, 4)):
            prefix, width, start = rng.choice(["gpu", "node-", "a100n", "c"]), rng.randint(1, 4), rng.randint(0, 990)
            hosts += [f"{prefix}{n:0{width}d}" for n in range(start, start + rng.randint(1, 12))]
        text = compress(hosts)
        assert expand_hostlist(text) == hosts, text


@pytest.mark.parametrize("hostlist, why", [
    ("", "empty"), ("n[1-", "unbalanced"), ("n1]", "unbalanced"), ("n[[1]]", "unbalanced"),
    ("a,,b", "empty entry"), ("n[a-b]", "expected numbers"), ("n[3-1]", "backwards"), ("n[1-2-3]", "expected numbers"),
])
def test_expand_hostlist_malformed_is_one_error_naming_it(hostlist, why):
    with pytest.raises(ValueError, match=why) as err:
        expand_hostlist(hostlist)
    assert "\n" not in str(err.value)


def srun_env(procid, ntasks, localid, nodeid, nodelist="gpu[07-08]", job="123456", **extra):
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": job, **extra}


def test_every_task_of_a_job_derives_the_same_rendezvous():
    tasks = [slurm_task(srun_env(r, 8, r % 4, r // 4)) for r in range(8)]
    assert [(t.rank, t.local_rank, t.node) for t in tasks] == [(r, r % 4, r // 4) for r in range(8)]
    assert {(t.master_addr, t.master_port, t.world_size, t.nodes) for t in tasks} == {("gpu07", 10000 + 123456 % 20000,
                                                                                        8, 2)}
    assert tasks[5].launch_env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                     "MASTER_PORT": str(job_port(123456))}


def test_job_ports_differ_between_jobs_and_stay_below_ephemeral_ports():
    ports = [job_port(j) for j in range(7_000_000, 7_020_000)]
    assert len(set(ports)) == len(ports) and min(ports) == 10000 and max(ports) == 29999


def test_step_nodelist_master_and_port_overrides():
    env = srun_env(1, 2, 0, 1, SLURM_STEP_NODELIST="gpu[02,05]")
    assert slurm_task(env).master_addr == "gpu02"  # the step's first node, not the job's
    env = srun_env(1, 2, 0, 1, MASTER_ADDR="head", MASTER_PORT="4000")
    assert slurm_task(env).launch_env()["MASTER_ADDR"] == "head" and slurm_task(env).master_port == 4000
    env = srun_env(1, 2, 0, 1)
    del env["SLURM_JOB_ID"]
    assert slurm_task(env).master_port == DEFAULT_PORT


def test_not_a_multi_task_slurm_step():
    assert slurm_task({}) is None
    assert slurm_task(srun_env(0, 1, 0, 0)) is None  # one task: no process group to join
    assert slurm_task(srun_env(1, 2, 0, 1, RANK="1", WORLD_SIZE="2")) is None  # torchrun under srun


@pytest.mark.parametrize("env, message", [
    (srun_env(2, 2, 0, 1), "SLURM_PROCID=2 with SLURM_NTASKS=2: a task's rank must be below the task count"),
    (srun_env(1, 2, 3, 1), "SLURM_LOCALID=3 with SLURM_PROCID=1"),
    (srun_env(1, 2, 0, 2), "SLURM_NODEID=2 with SLURM_JOB_NODELIST='gpu[07-08]': only 2 node(s) listed"),
    (srun_env("x", 2, 0, 0), "SLURM_PROCID='x': expected an integer >= 0"),
    (srun_env(0, 2, 0, 0, job="-4"), "SLURM_JOB_ID='-4': expected an integer >= 0"),
    (srun_env(0, 2, 0, 0, nodelist="gpu[1-"), "SLURM_JOB_NODELIST: host list 'gpu[1-': unbalanced brackets"),
    ({k: v for k, v in srun_env(0, 2, 0, 0).items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST is not set"),
])
def test_inconsistent_slurm_environment_is_one_error_naming_it(env, message):
    with pytest.raises(ValueError) as err:
        slurm_task(env)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; afterwards the environment is restored whole: dist_info_from_env sets
    RANK, MASTER_ADDR, ... itself, and those must not reach later tests' subprocesses."""
    saved = dict(os.environ)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_dist_info_from_slurm_sets_torch_distributed_variables(clean_env):
    for name, value in srun_env(3, 4, 1, 1, nodelist="n[1-2]", job="42").items():
        clean_env.setenv(name, value)
    assert dist_info_from_env() == DistInfo(3, 4, 1, node=1, nodes=2, launcher="slurm")
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "10042"}
    # a second call (mmrl.commands.train asks again at the end) reads what the first one set
    assert dist_info_from_env().rank == 3
    assert "4 processes on 2 nodes (" in dist_info_from_env().describe()


def test_torchrun_variables_take_precedence_over_slurm(clean_env):
    for name, value in {**srun_env(3, 4, 1, 1), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "2"}.items():
        clean_env.setenv(name, value)
    assert dist_info_from_env() == DistInfo(0, 2, 0, node=0, nodes=2, launcher="torchrun")


def test_mmrl_train_in_an_inconsistent_slurm_environment_is_one_error_line(clean_env, tmp_path, capsys):
    for name, value in srun_env(4, 4, 0, 1).items():
        clean_env.setenv(name, value)
    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    assert main(["train", tiny, "data.synthetic=true", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == ("mmrl train: error: SLURM_PROCID=4 with SLURM_NTASKS=4: a task's rank must "
                                       "be below the task count (run the command under srun, not with these "
                                       "variables copied)\n")
    assert not (tmp_path / "run").exists()  # nothing written before the error
