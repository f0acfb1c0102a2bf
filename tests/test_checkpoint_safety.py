"""Checkpoints are never unpickled as arbitrary objects, and resume falls back past unreadable ones.

The fast tests build checkpoint folders by hand (tensors plus the DeepSpeed state types
:func:`mmrl.train.checkpoint.safe_types` allows); the slow ones train for real, substitute a
malicious pickle or truncate a file, and resume with ``resume=auto``."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, env, read_log, run, shape_shards, train_cmd

from mmrl.train.checkpoint import (
    COMPLETE_MARK,
    CheckpointManager,
    CheckpointRefused,
    CheckpointUnreadable,
    verify_checkpoint,
)

REFUSAL = "refused to load (it needs 'io.open', not a tensor/state type; " \
          "checkpoints are read with torch.load(weights_only=True))"


class Payload:
    """Unpickled with weights_only=False, this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def deepspeed_like_state() -> dict:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"module": {"w": torch.randn(3, 2)}, "zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
            "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}], "step": 4, "ds_version": "0.19.8"}


def write_checkpoint(root: Path, step: int) -> Path:
    folder = root / CheckpointManager.tag_for(step)
    folder.mkdir(parents=True)
    torch.save(deepspeed_like_state(), folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(6)}}}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / COMPLETE_MARK).write_text("{}")
    (root / "latest").write_text(folder.name)
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_deepspeed_state_types_load_with_weights_only(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    assert [p.name for p in verify_checkpoint(folder)] == ["mp_rank_00_model_states.pt",
                                                           "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    torch.save({"module": Payload(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()  # the payload works when unpickled the old way
    with pytest.raises(CheckpointRefused) as err:
        verify_checkpoint(folder)
    assert str(err.value) == f"{folder / 'mp_rank_00_model_states.pt'}: {REFUSAL}"
    assert not marker.exists()
    with pytest.raises(CheckpointRefused):  # resume=auto refuses too, and does not fall back past it
        CheckpointManager(tmp_path, 2, True).resolve("auto")
    assert not marker.exists() and folder.is_dir()


def test_auto_resume_falls_back_past_an_unreadable_checkpoint(tmp_path, capsys):
    write_checkpoint(tmp_path, 2)
    newest = write_checkpoint(tmp_path, 4)
    truncate(newest / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointUnreadable, match="PytorchStreamReader failed reading zip archive"):
        verify_checkpoint(newest)
    mgr = CheckpointManager(tmp_path, 2, True)
    assert mgr.resolve("auto") == (tmp_path, "step_00000002")
    assert capsys.readouterr().err.strip() == (
        "checkpoint step_00000004 is unreadable (mp_rank_00_model_states.pt: PytorchStreamReader failed reading zip "
        "archive: failed finding central directory); resuming from step_00000002")
    assert (tmp_path / "unreadable_step_00000004").is_dir() and not newest.exists()
    assert (tmp_path / "latest").read_text() == (tmp_path / "verified").read_text() == "step_00000002"
    assert mgr.complete_tags() == ["step_00000002"]


def _two_rank_resolve(rank, root, store, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results[rank] = CheckpointManager(root, 2, rank == 0).resolve("auto")[1]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_fall_back_to_the_same_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    write_checkpoint(tmp_path / "c", 2)
    newest = write_checkpoint(tmp_path / "c", 4)
    truncate(newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    results = mp.Manager().dict()
    mp.spawn(_two_rank_resolve, args=(tmp_path / "c", tmp_path / "store", results), nprocs=2, join=True)
    assert dict(results) == {0: "step_00000002", 1: "step_00000002"}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["latest", "step_00000002",
                                                                  "unreadable_step_00000004", "verified"]


def test_explicit_tag_is_not_fallen_back_from_and_all_unreadable_is_an_error(tmp_path):
    older = write_checkpoint(tmp_path, 2)
    newest = write_checkpoint(tmp_path, 4)
    truncate(newest / "mp_rank_00_model_states.pt")
    mgr = CheckpointManager(tmp_path / "elsewhere", 2, True)
    with pytest.raises(CheckpointUnreadable, match="step_00000004 is unreadable"):
        mgr.resolve(str(newest))
    assert mgr.resolve(str(tmp_path)) == (tmp_path, "step_00000002")  # another run's folder: fallback, no renames
    assert newest.is_dir()
    truncate(older / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointUnreadable, match="no earlier checkpoint can be read"):
        CheckpointManager(tmp_path, 2, True).resolve("auto")


class FakeEngine:
    """Writes a checkpoint folder like DeepSpeed's save_checkpoint; ``broken`` truncates it."""

    def __init__(self):
        self.broken = False

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**deepspeed_like_state(), **client_state}, folder / "mp_rank_00_model_states.pt")
        if self.broken:
            truncate(folder / "mp_rank_00_model_states.pt")


def test_pruning_keeps_the_newest_readable_checkpoint(tmp_path, capsys):
    mgr, engine = CheckpointManager(tmp_path, 1, True), FakeEngine()
    mgr.save(engine, 2, {})
    assert mgr.complete_tags() == ["step_00000002"] and mgr.verified() == "step_00000002"
    engine.broken = True  # e.g. a full disk: the write does not read back, it is never marked complete
    mgr.save(engine, 4, {})
    assert "checkpoint step_00000004 does not read back" in capsys.readouterr().err
    assert mgr.complete_tags() == ["step_00000002"] and mgr.latest() == "step_00000002"
    engine.broken = False
    mgr.save(engine, 6, {})  # verified: step 2 goes
    assert mgr.complete_tags() == ["step_00000006"] and mgr.verified() == "step_00000006"
    # complete checkpoints not read back since (copied in, or written by an older mmrl): the verified one stays
    write_checkpoint(tmp_path, 8)
    write_checkpoint(tmp_path, 10)
    mgr.prune()
    assert mgr.complete_tags() == ["step_00000006", "step_00000010"]


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return shape_shards(tmp_path_factory.mktemp("ckpt_data"), 64, 16)


@pytest.mark.slow
def test_resume_refuses_a_substituted_malicious_model_states_file(tmp_path, small_shards):
    out = tmp_path / "run"
    common = ("max_steps=4", "save_every=2", "zero_stage=1")
    run(train_cmd(small_shards, out, *common))
    target = out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, target)
    resumed = subprocess.run(train_cmd(small_shards, out, *common, "resume=auto"), capture_output=True, text=True,
                             env=env(), cwd=ROOT, timeout=420)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert resumed.stderr.strip().splitlines()[-1] == f"mmrl train: error: {target}: {REFUSAL}"
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint_and_continues_exactly(tmp_path, small_shards):
    common = ("max_steps=8", "save_every=2", "keep_last=2")
    run(train_cmd(small_shards, tmp_path / "whole", *common))
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = subprocess.Popen(train_cmd(small_shards, out, *common), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((ckpts / "latest").is_file() and (ckpts / "latest").read_text() == "step_00000004"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "latest").read_text() == (ckpts / "verified").read_text() == "step_00000004"
    truncate(ckpts / "step_00000004" / "mp_rank_00_model_states.pt")  # damaged after its save
    resumed = run(train_cmd(small_shards, out, *common, "resume=auto"))
    assert ("checkpoint step_00000004 is unreadable (mp_rank_00_model_states.pt: PytorchStreamReader failed "
            "reading zip archive: failed finding central directory); resuming from step_00000002") in resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    steps = [row["step"] for row in read_log(out)]
    assert steps[-1] == 8 and steps.count(3) == 2  # steps 3-4 ran again: their checkpoint was lost
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008",
                                                                      "unreadable_step_00000004"]
    assert (ckpts / "verified").read_text() == (ckpts / "latest").read_text() == "step_00000008"
    whole = load_file(tmp_path / "whole" / "model" / "open_clip_model.safetensors")
    again = load_file(out / "model" / "open_clip_model.safetensors")
    different = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not different, f"resumed run differs in {different[:5]}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
