"""mmrl.progress: a tqdm bar on a terminal, plain periodic lines anywhere else."""
from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from mmrl.progress import ENV_INTERVAL, LineProgress, default_interval, format_duration, format_rate, progress
from mmrl.train.run_log import RunLog


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Flushes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_one_line_per_elapsed_interval_with_count_rate_eta_and_postfix():
    clock, out = Clock(), Flushes()
    bar = progress(total=100, desc="work", unit="img", interval=10, stream=out, clock=clock)
    assert isinstance(bar, LineProgress)
    bar.set_postfix(loss=0.123456, **{"samples/s": "256.0"})
    for _ in range(100):  # 2 items per second: a line every 20 items
        clock.t += 0.5
        bar.update()
    assert len(lines(out)) == 4 and out.flushes == 4  # at 20, 40, 60, 80: reaching 100 is left to close()
    clock.t += 3
    bar.close()
    bar.close()  # idempotent
    got = lines(out)
    assert "\r" not in out.getvalue()
    assert len(got) == 5 and out.flushes == 5
    assert got[0] == "work: 20/100 img (20.0%) | 2.00 img/s | elapsed 0:10 | ETA 0:40 | loss=0.1235, samples/s=256.0"
    assert got[3].startswith("work: 80/100 img (80.0%) | 2.00 img/s | elapsed 0:40 | ETA 0:10 |")
    # the final line: 100 items in 53 s, total reached so no ETA
    assert got[4] == "work: 100/100 img (100.0%) | 1.89 img/s | elapsed 0:53 | loss=0.1235, samples/s=256.0"


def test_rate_and_eta_count_from_initial_and_lines_wait_a_full_interval():
    clock, out = Clock(), io.StringIO()
    bar = progress(total=150, initial=50, desc="train", unit="step", interval=30, stream=out, clock=clock)
    clock.t += 29
    bar.update(15)
    assert out.getvalue() == ""  # not before the first interval
    clock.t += 1
    bar.update(5)  # 20 steps in 30 s since the start (the 50 resumed ones do not count): 1.5 s/step
    clock.t += 29
    bar.update(3)  # < 30 s since the last line: no line
    assert lines(out) == ["train: 70/150 step (46.7%) | 1.50 s/step | elapsed 0:30 | ETA 2:00"]
    clock.t += 1
    bar.update(0)  # 23 steps in 60 s; 77 left at 60/23 s each
    assert lines(out)[1] == "train: 73/150 step (48.7%) | 2.61 s/step | elapsed 1:00 | ETA 3:20"


def test_unknown_total_has_no_eta_or_percent():
    clock, out = Clock(), io.StringIO()
    bar = progress(iter(range(1000)), desc="scan", interval=5, stream=out, clock=clock)
    for i, _ in enumerate(bar):
        clock.t += 1
        if i == 8:
            break
    bar.close()
    got = lines(out)
    assert got[0] == "scan: 5 it | 1.00 it/s | elapsed 0:05"
    assert got[-1] == "scan: 8 it | 1.12 s/it | elapsed 0:09"  # 8 counted: the 9th item was not finished
    assert all("ETA" not in line and "%" not in line for line in got)


def test_iterating_takes_the_total_from_len_and_closes_at_the_end():
    clock, out = Clock(), io.StringIO()
    items = []
    for x in progress(list(range(4)), desc="batches", unit="batch", interval=1, stream=out, clock=clock):
        clock.t += 0.5
        items.append(x)
    assert items == [0, 1, 2, 3]
    assert lines(out) == ["batches: 2/4 batch (50.0%) | 2.00 batch/s | elapsed 0:01 | ETA 0:01",
                          "batches: 4/4 batch (100.0%) | 2.00 batch/s | elapsed 0:02"]


def test_a_bar_shorter_than_one_interval_prints_nothing():
    clock, out = Clock(), io.StringIO()
    with progress(total=10, desc="quick", interval=30, stream=out, clock=clock) as bar:
        for _ in range(10):
            clock.t += 2
            bar.update()
    assert out.getvalue() == ""
    with progress(total=10, desc="slow", interval=30, stream=out, clock=clock) as bar:
        clock.t += 31
        bar.update(10)
    assert lines(out) == ["slow: 10/10 it (100.0%) | 3.10 s/it | elapsed 0:31"]  # only the final line


def test_disabled_prints_nothing_but_still_counts_and_iterates():
    clock, out = Clock(), io.StringIO()
    bar = progress(total=10, enabled=False, interval=0.001, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 100
        bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert bar.n == 20 and out.getvalue() == ""
    assert list(progress(range(3), enabled=False, stream=FakeTTY())) == [0, 1, 2]


def test_mode_follows_the_stream(monkeypatch):
    tty = FakeTTY()
    bar = progress(total=3, desc="t", stream=tty)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "3/3" in tty.getvalue()
    assert isinstance(progress(total=3, stream=io.StringIO()), LineProgress)
    assert not isinstance(progress(total=3, stream=FakeTTY(), enabled=False), tqdm)
    monkeypatch.setattr("sys.stderr", FakeTTY())  # the default stream is sys.stderr at call time
    assert isinstance(progress(total=3), tqdm)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress(total=3), LineProgress)


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_INTERVAL, raising=False)
    assert default_interval() == 30.0
    monkeypatch.setenv(ENV_INTERVAL, "0.5")
    assert default_interval() == 0.5 and progress(total=1, stream=io.StringIO()).interval == 0.5
    assert progress(total=1, stream=io.StringIO(), interval=7).interval == 7
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(ENV_INTERVAL, bad)
        with pytest.raises(ValueError, match=ENV_INTERVAL):
            default_interval()


def test_formats():
    assert format_duration(0) == "0:00" and format_duration(59.9) == "0:59"
    assert format_duration(3725) == "1:02:05"
    assert format_rate(0.25, "step") == "4.00 s/step"
    assert format_rate(2.5, "img") == "2.50 img/s" and format_rate(25.25, "img") == "25.2 img/s"
    assert format_rate(1234.4, "img") == "1234 img/s" and format_rate(0, "it") == "0 it/s"


def test_training_log_prints_step_total_eta_and_loss_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_INTERVAL, "1e-9")  # a line at every step
    log = RunLog(tmp_path, total_steps=10, start_step=0, enabled=True, tensorboard=False)
    for step in range(1, 11):
        log.step(step, {"loss": f"{1 / step:.4f}", "samples/s": "64.0"})
    log.message("a message")
    log.close()
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert "\r" not in captured.err and "a message" in captured.out
    third = next(line for line in err if line.startswith("train: 3/10 step (30.0%) | "))
    assert " step/s | " in third and " | ETA " in third
    assert third.endswith(" | loss=0.3333, samples/s=64.0")  # this step's values, not the previous one's
    assert err[-1].startswith("train: 10/10 step (100.0%)") and "ETA" not in err[-1]
