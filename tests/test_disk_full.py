"""A full disk is one line naming where, the partial output removed, every earlier output intact.

The injected tests raise ``OSError(ENOSPC)`` inside a write; the others run the real commands
with their output on a small tmpfs (mounted in a private mount namespace: ``unshare``), filled
with ``fallocate`` to leave a few KiB, and copy what is left back out for the asserts."""
import errno
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_checkpoint_safety import FakeEngine, write_checkpoint
from test_train import ROOT, env, read_log, shape_shards, train_cmd

from mmrl.fileio import NoSpaceLeft, atomic_write, atomic_write_text, is_no_space
from mmrl.train.checkpoint import COMPLETE_MARK, CheckpointManager, verify_checkpoint

ARCH = "mmrl-vit-tiny-p8-64"


def _unshare_prefix() -> list[str] | None:
    """The ``unshare`` call that may mount a tmpfs here (as root, or through a user namespace)."""
    probe = Path("/tmp") / f"mmrl-tmpfs-probe-{id(object())}"
    probe.mkdir(exist_ok=True)
    try:
        for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
            try:
                ok = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
                                    capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return prefix
        return None
    finally:
        probe.rmdir()


UNSHARE = _unshare_prefix()
def needs_tmpfs(test):  # real processes on a real filesystem: slow ones
    skip = pytest.mark.skipif(UNSHARE is None, reason="no tmpfs: unshare --mount is not permitted here")
    return pytest.mark.slow(skip(test))


def on_tmpfs(mount: Path, size: str, script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run bash ``script`` with a fresh ``size`` tmpfs on ``mount``; ``fill N`` leaves N bytes free on it."""
    mount.mkdir(parents=True, exist_ok=True)
    # Never fill the real disk: stop unless the tmpfs is mounted, and fill only a tmpfs.
    prelude = (f"set -u; mount -t tmpfs -o size={size} tmpfs {mount} || exit 97\n"
               f"[ \"$(stat -f -c %T {mount})\" = tmpfs ] || exit 98\n"
               f"fill() {{ [ \"$(stat -f -c %T {mount})\" = tmpfs ] || exit 98; "
               f"free=$(df -B1 --output=avail {mount} | tail -1); "
               f"fallocate -l $((free - $1)) {mount}/filler; }}\n")
    return subprocess.run([*UNSHARE, "bash", "-c", prelude + script], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)


def mmrl(*args) -> str:
    return " ".join([sys.executable, "-m", "mmrl", *map(str, args)])  # args: split on spaces, no shell patterns


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mmrl ")]


# --- injected ---------------------------------------------------------------------------------
def test_atomic_write_on_a_full_disk_keeps_the_target_and_removes_the_temp(tmp_path):
    target = atomic_write_text(tmp_path / "result.json", "earlier\n")

    def half_then_full(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceLeft) as err:
        atomic_write(target, half_then_full)
    assert str(err.value) == f"no space left on device writing {target}"
    assert target.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(ZeroDivisionError):  # any other failure: re-raised as it is, temp removed too
        atomic_write(target, lambda tmp: (Path(tmp).write_text("x"), 1 / 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("err, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), True),  # safetensors
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), False),  # disk not full
])
def test_is_no_space(err, full, tmp_path):
    assert is_no_space(err, tmp_path) is full


def test_a_chained_enospc_counts(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as err:
        assert is_no_space(err)


class FullDiskEngine(FakeEngine):
    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_save_on_a_full_disk_removes_the_partial_folder(tmp_path):
    write_checkpoint(tmp_path, 2)
    mgr = CheckpointManager(tmp_path, 2, True)
    with pytest.raises(NoSpaceLeft) as err:
        mgr.save(FullDiskEngine(), 4, {})
    assert str(err.value) == (f"no space left on device writing checkpoint {tmp_path / 'step_00000004'}; "
                              f"the partial checkpoint was removed, step_00000002 is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
    assert mgr.latest() == "step_00000002" and verify_checkpoint(tmp_path / "step_00000002")
    with pytest.raises(NoSpaceLeft, match="there is no earlier checkpoint"):
        CheckpointManager(tmp_path / "fresh", 2, True).save(FullDiskEngine(), 2, {})
    assert list((tmp_path / "fresh").iterdir()) == []


# --- a real full filesystem -----------------------------------------------------------------
@needs_tmpfs
def test_shard_build_on_a_full_disk(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["image,caption"]
    for i in range(48):  # noise: about 6 KB a JPEG, eight to a shard
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,picture {i}")
    (tmp_path / "a.csv").write_text("\n".join(rows[:17]) + "\n")  # 16 images: two shards
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")  # the same two, then four more
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    build = "shard build --shard-size 8 --workers 1 --no-progress --out"
    proc = on_tmpfs(mount, "4m", f"""
cp {tmp_path}/a.csv {tmp_path}/pairs.csv
{mmrl(build, mount / 'shards', '--csv', tmp_path / 'pairs.csv')} || exit 9
fill 20000
cp {tmp_path}/b.csv {tmp_path}/pairs.csv
{mmrl(build, mount / 'shards', '--csv', tmp_path / 'pairs.csv')}; echo "rc=$?"
cp -a {mount}/shards {kept}
""")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    lines = error_lines(proc.stderr)
    assert lines == [f"mmrl shard: error: no space left on device writing shard {mount / 'shards' / '00002.tar'}; "
                     f"the partial shard was removed, finished shards are kept (and reused next run)"], proc.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar",
                                                      "00001_stats.json", "sizes.json"]
    assert json.loads((kept / "sizes.json").read_text()) == {"00000.tar": 8, "00001.tar": 8}
    # the shards kept are whole: a rebuild with space reuses them and writes the rest
    from mmrl.cli import main

    before = {p.name: digest(p) for p in kept.glob("*.tar")}
    assert main(["shard", *build.split()[1:], str(kept), "--csv", str(tmp_path / "pairs.csv")]) == 0
    assert {name: digest(kept / name) for name in before} == before
    assert json.loads((kept / "sizes.json").read_text()) == {f"{i:05d}.tar": 8 for i in range(6)}


SAVE_TWICE = """
import json, sys, torch
from mmrl import create_model, save_model
from mmrl.fileio import NoSpaceLeft
out = sys.argv[1]
model = create_model("{arch}", "ggem", pretrained=False)
if sys.argv[2] == "first":
    save_model(model, out + "/model")
    sys.exit(0)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
for target in ("/model", "/fresh_model"):
    try:
        save_model(model, out + target)
    except NoSpaceLeft as err:
        print("ERR", err)
"""


@needs_tmpfs
def test_model_export_on_a_full_disk_keeps_the_earlier_model(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SAVE_TWICE.format(arch=ARCH))
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    proc = on_tmpfs(mount, "256m", f"""
{sys.executable} {script} {mount} first || exit 9
fill 100000
{sys.executable} {script} {mount} again
rm {mount}/filler; cp -a {mount}/. {kept}
""")
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERR")]
    assert errors == [f"ERR no space left on device writing {mount / 'model' / 'open_clip_model.safetensors'}",
                      f"ERR no space left on device writing {mount / 'fresh_model' / 'open_clip_model.safetensors'}"
                      ], proc.stdout + proc.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["model"]  # no empty fresh_model folder
    assert sorted(p.name for p in (kept / "model").iterdir()) == ["open_clip_config.json",
                                                                   "open_clip_model.safetensors"]
    from mmrl import create_model, load_model

    torch.manual_seed(0)
    loaded, _, _ = load_model(kept / "model")  # the first model, whole
    reference = create_model(ARCH, "ggem", pretrained=False)
    assert loaded.state_dict().keys() == reference.state_dict().keys()


@needs_tmpfs
def test_eval_results_on_a_full_disk(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["red", "blue"]
    for c, name in enumerate(classes):
        (tmp_path / "data" / f"{c}-{name}").mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"{c}-{name}" / f"{k}.png")
    (tmp_path / "data" / "classnames.txt").write_text("\n".join(classes) + "\n")
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    common = f"--model {ARCH} --no-cache --workers 0 --out {mount}/res"
    proc = on_tmpfs(mount, "1m", f"""
{mmrl('eval image-retrieval --data', tmp_path / 'data', common)} > /dev/null || exit 9
cp {mount}/res/data_image_retrieval.json {tmp_path}/first.json
fill 0
{mmrl('eval image-retrieval --data', tmp_path / 'data', common)}; echo "rc=$?"
cp -a {mount}/res {kept}
""")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert error_lines(proc.stderr) == [
        f"mmrl eval: error: no space left on device writing {mount / 'res' / 'data_image_retrieval.json'}"], proc.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["data_image_retrieval.json"]
    assert digest(kept / "data_image_retrieval.json") == digest(tmp_path / "first.json")


@needs_tmpfs
def test_training_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path):
    shards = shape_shards(tmp_path, 64, 16)
    common = ("max_steps=3", "save_every=1", "keep_last=2")
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(shards, whole, *common), check=True, capture_output=True, env=env(), cwd=ROOT)
    newest = whole / "checkpoints" / (whole / "checkpoints" / "latest").read_text()
    ckpt = sum(p.stat().st_size for p in newest.iterdir())
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    size = ckpt * 3 // 2 + (4 << 20)  # room for one checkpoint and the logs, not for two checkpoints
    run = shlex.join(map(str, train_cmd(shards, mount / "run", *common)))
    proc = on_tmpfs(mount, str(size), f"""
{run}; echo "rc=$?"
cp -a {mount}/run {kept}
""")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    folder = mount / "run" / "checkpoints" / "step_00000002"
    assert error_lines(proc.stderr) == [
        f"mmrl train: error: no space left on device writing checkpoint {folder}; "
        f"the partial checkpoint was removed, step_00000001 is intact"], proc.stderr[-3000:]
    ckpts = kept / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001", "verified"]
    assert (ckpts / "latest").read_text() == "step_00000001" and (ckpts / "step_00000001" / COMPLETE_MARK).is_file()
    verify_checkpoint(ckpts / "step_00000001")
    assert not (kept / "model").exists() and not (kept / "summary.json").exists()
    # with space again, the run resumes from it and ends where the undisturbed run did
    resumed = subprocess.run(train_cmd(shards, kept, *common, "resume=auto"), capture_output=True, text=True,
                             env=env(), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in read_log(kept)] == [1, 2, 2, 3]  # step 2's checkpoint was lost: it ran again
    reference = load_file(whole / "model" / "open_clip_model.safetensors")
    resumed = load_file(kept / "model" / "open_clip_model.safetensors")
    assert [k for k in reference if not torch.equal(reference[k], resumed[k])] == []
    shutil.rmtree(kept)


class OneRankFull(FakeEngine):
    """Rank 1's part of the checkpoint runs out of space; rank 0's is written."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 1:
            (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save({"module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")


def _two_rank_save(rank, root, store, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        CheckpointManager(root, 2, rank == 0).save(OneRankFull(rank), 4, {})
        results[rank] = "saved"
    except Exception as err:  # noqa: BLE001 - reported to the parent
        results[rank] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_when_one_rank_runs_out_of_space(tmp_path):
    import torch.multiprocessing as mp

    write_checkpoint(tmp_path / "ckpt", 2)
    results = mp.Manager().dict()
    mp.spawn(_two_rank_save, args=(tmp_path / "ckpt", tmp_path / "store", results), nprocs=2, join=True)
    folder = tmp_path / "ckpt" / "step_00000004"
    kept = "the partial checkpoint was removed, step_00000002 is intact"
    assert dict(results) == {
        0: f"NoSpaceLeft: no space left on device writing checkpoint {folder} (on another rank); {kept}",
        1: f"NoSpaceLeft: no space left on device writing checkpoint {folder}; {kept}"}
    assert not folder.exists() and CheckpointManager(tmp_path / "ckpt", 2, True).latest() == "step_00000002"
