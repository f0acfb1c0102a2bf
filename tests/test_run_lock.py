"""One writer per run folder (``OUTPUT/.mmrl.lock``) and the same-run check of a folder's
checkpoints, without training (the real ``mmrl train`` processes: tests/test_train.py)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmrl.config import load_config, save_config
from mmrl.train import TrainConfig
from mmrl.train.run_lock import LOCK_NAME, RunFolderInUse, RunLock, pid_alive
from mmrl.train.trainer import check_same_run

ROOT = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(proc.stdout)
    assert not pid_alive(pid)
    return pid


def test_lock_file_holds_the_holder_and_is_removed_on_release(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["host"] == socket.gethostname() and pid_alive(info["pid"]) and info["started"]
        assert lock.took_over is None
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):  # free again
        pass


def test_a_folder_locked_by_a_live_process_is_refused_naming_it(tmp_path):
    code = ("import sys, time\nfrom mmrl.train.run_lock import RunLock\n"
            "lock = RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(RunFolderInUse) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path} is in use by another mmrl train (pid {holder.pid} on host "
                              f"{socket.gethostname()}, started ")
        assert msg.endswith("; wait for it or pick another output_dir")
        assert (tmp_path / LOCK_NAME).read_text() == before
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the holder was killed: its lock file is stale
    assert lock.took_over and f"pid {holder.pid}" in lock.took_over
    lock.release()


def test_a_stale_lock_naming_a_dead_pid_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with RunLock(tmp_path) as lock:
        assert f"taking over the stale lock of another mmrl train (pid {pid} on host" in lock.took_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != pid
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunFolderInUse, match="on host elsewhere.*if that run is gone"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


def test_checkpoints_of_a_different_config_are_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", "data.train=x.tar"])
    check_same_run(cfg)  # an empty folder
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    check_same_run(cfg)  # a config but no checkpoints
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    check_same_run(cfg)
    same = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml",
                       [f"output_dir={out}", "data.train=x.tar", "resume=null"])
    check_same_run(same)  # resume aside
    same = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml",
                       [f"output_dir={out}", "data.train=x.tar", "init_from=elsewhere/model", "init_strict=true"])
    check_same_run(same)  # init_from aside: a resumed run skips the init
    other = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml",
                        [f"output_dir={out}", "data.train=x.tar", "model=mmrl-vit-small-p8-64"])
    with pytest.raises(ValueError) as err:
        check_same_run(other)
    assert str(err.value) == (f"{out} holds a run with model=mmrl-vit-tiny-p8-64 (this config: "
                              f"model=mmrl-vit-small-p8-64); use another output_dir, or remove {out / 'checkpoints'} "
                              "to start over there")
    other = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", "data.train=y.tar"])
    with pytest.raises(ValueError, match=r"holds a run with data.train=x.tar \(this config: data.train=y.tar\)"):
        check_same_run(other)
    (out / "config.yaml").write_text("modle: 3\n")
    with pytest.raises(ValueError, match="holds checkpoints whose config.yaml no longer loads"):
        check_same_run(cfg)
