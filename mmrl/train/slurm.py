"""SLURM's launch environment: a task's rank, world and rendezvous from the variables ``srun`` sets.

``srun`` starts one task per GPU with ``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (rank on its node), ``SLURM_NODEID`` (its node's index) and ``SLURM_JOB_NODELIST``
(the job's hosts in SLURM's compact form, ``gpu[01-04]``; ``SLURM_STEP_NODELIST`` for the step, when
set, comes first). :func:`slurm_task` reads them; :meth:`SlurmTask.launch_env` gives torch.distributed's
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``:

* ``MASTER_ADDR``: the first host of the node list (task 0 runs there), expanded by
  :func:`expand_hostlist` -- no ``scontrol`` needed, so every task derives the same name the same way;
* ``MASTER_PORT``: :func:`job_port`, ``10000 + SLURM_JOB_ID % 20000`` -- every task of a job agrees
  without talking, two jobs sharing a node do not collide (unless their ids differ by a multiple of
  20000), and the range stays below Linux's ephemeral ports (32768-60999);
* a ``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment is kept.

A variable that is not a number, or a set that no ``srun`` would produce (``SLURM_PROCID >=
SLURM_NTASKS``, a node index past the node list), is one ``ValueError`` naming the variables.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["expand_hostlist", "job_port", "slurm_task", "SlurmTask", "DEFAULT_PORT"]

DEFAULT_PORT = 29500  # torch.distributed's default, when SLURM_JOB_ID is absent
_GROUP = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _split_top_level(hostlist: str) -> list[str]:
    """``hostlist`` split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"host list {hostlist!r}: unbalanced brackets")
    if depth:
        raise ValueError(f"host list {hostlist!r}: unbalanced brackets")
    return items + [hostlist[start:]]


def _expand_range(hostlist: str, group: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``: a range keeps the width of its lower bound."""
    values = []
    for part in group.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"host list {hostlist!r}: expected numbers or ranges like 01-04 in "
                             f"brackets, got [{group}]")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"host list {hostlist!r}: range {low}-{high} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list as host names, in order (what ``scontrol show hostnames`` prints).

    ``"gpu[01-03,7],login1,n[1-2]-ib"`` -> ``gpu01 gpu02 gpu03 gpu7 login1 n1-ib n2-ib``: commas
    outside brackets separate entries; a bracket holds numbers and ranges (zero padding kept from the
    lower bound); several brackets in one entry expand left to right (``r[1-2]n[1-2]`` -> ``r1n1 r1n2
    r2n1 r2n2``). A malformed list is a ``ValueError`` naming it."""
    if not hostlist.strip():
        raise ValueError("host list is empty")
    hosts = []
    for item in _split_top_level(hostlist.strip()):
        item = item.strip()
        if not item:
            raise ValueError(f"host list {hostlist!r}: empty entry")
        literals = _GROUP.split(item)  # literal, group, literal, group, ..., literal
        if any("[" in text or "]" in text for text in literals[::2]):
            raise ValueError(f"host list {hostlist!r}: unbalanced brackets")
        choices = [[text] if i % 2 == 0 else _expand_range(hostlist, text) for i, text in enumerate(literals)]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def job_port(job_id: int) -> int:
    """The rendezvous port of SLURM job ``job_id``: ``10000 + job_id % 20000``."""
    return 10000 + job_id % 20000


def _count(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    return number


@dataclass(frozen=True)
class SlurmTask:
    """One task of a SLURM job step, as :func:`slurm_task` reads it."""

    rank: int
    world_size: int
    local_rank: int
    node: int          # SLURM_NODEID
    nodes: int         # hosts in the node list
    master_addr: str
    master_port: int

    def launch_env(self) -> dict[str, str]:
        """torch.distributed's ``env://`` variables for this task."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def slurm_task(env: Mapping[str, str]) -> SlurmTask | None:
    """The SLURM task that ``env`` (a process's environment) describes, or ``None`` when it holds no
    task of a step with several tasks, or a launcher already set ``RANK`` and ``WORLD_SIZE`` (torchrun
    or DeepSpeed's launcher, even started by ``srun``, come first). ``MASTER_ADDR`` / ``MASTER_PORT``
    already in ``env`` are kept."""
    if ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" not in env:
        return None
    world = _count(env, "SLURM_NTASKS", 1)
    if world <= 1:
        return None
    rank, local, node = _count(env, "SLURM_PROCID"), _count(env, "SLURM_LOCALID", 0), _count(env, "SLURM_NODEID", 0)
    if rank >= world:
        raise ValueError(f"SLURM_PROCID={rank} with SLURM_NTASKS={world}: a task's rank must be below the task "
                         f"count (run the command under srun, not with these variables copied)")
    if local > rank:
        raise ValueError(f"SLURM_LOCALID={local} with SLURM_PROCID={rank}: a task's rank on its node cannot "
                         f"exceed its global rank")
    name = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
    if name not in env and "MASTER_ADDR" not in env:
        raise ValueError("SLURM_JOB_NODELIST is not set: no host to rendezvous on (run under srun, or set "
                         "MASTER_ADDR)")
    hosts: list[str] = []
    if name in env:
        try:
            hosts = expand_hostlist(env[name])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if node >= len(hosts):
            raise ValueError(f"SLURM_NODEID={node} with {name}={env[name]!r}: only {len(hosts)} node(s) listed")
    if "MASTER_PORT" in env:
        port = _count(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = job_port(_count(env, "SLURM_JOB_ID"))
    else:
        port = DEFAULT_PORT
    return SlurmTask(rank, world, local, node, max(len(hosts), node + 1), env.get("MASTER_ADDR") or hosts[0], port)
