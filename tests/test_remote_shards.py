"""Remote and streamed shards (mmrl.data.remote): pipe: commands, http:// from a local server on
127.0.0.1, s3:// through the AWS CLI's command line, and broken streams (cut, stalled, missing).

Every test runs under an alarm guard and every server wait is bounded: a stream that hangs fails
the test instead of blocking it.
"""
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from test_loader import simple_dataset, train_transform
from test_train import ROOT, TINY, env, read_log, shape_shards

import mmrl
from helpers.guards import fail_after
from mmrl.config import ConfigError, load_config
from mmrl.data.caption_index import shard_captions
from mmrl.data.check import expand_shards
from mmrl.data.loader import LoaderConfig, make_train_loader
from mmrl.data.shard_specs import expand_spec, parse_sources
from mmrl.data.wds_stages import LoaderStallError, StreamStats, stream_samples
from mmrl.train import TrainConfig

GUARD_S = 90
HELD_S = 30  # a stalled response is held open at most this long (the finalizer releases it sooner)


@pytest.fixture(autouse=True)
def hang_guard():
    """Fail (not block) when a test runs longer than GUARD_S seconds."""
    with fail_after(GUARD_S, "a stream hangs"):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's folder; ``server.cut[name] = n`` sends a file's full Content-Length but
    only its first ``n`` bytes, then closes; ``server.stall[name] = n`` sends ``n`` bytes and then
    holds the connection open without sending more."""

    def do_GET(self):
        self.server.requests.append(self.path)
        name = self.path.lstrip("/")
        limit = self.server.cut.get(name, self.server.stall.get(name))
        if limit is None:
            return super().do_GET()
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:limit])
        self.wfile.flush()
        if name in self.server.stall:
            self.server.release.wait(HELD_S)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """``serve(folder)`` -> (server, base URL) of a threaded HTTP server on 127.0.0.1 (port 0)."""
    started = []

    def start(folder):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(ShardHandler, directory=str(folder)))
        server.cut, server.stall, server.release, server.requests = {}, {}, threading.Event(), []
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in started:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four shards of six samples with sizes.json: (folder, brace pattern, keys)."""
    folder = tmp_path_factory.mktemp("remote_shards")
    pattern, keys = simple_dataset(folder, 4, 6)
    return folder, pattern, keys


def raw(urls, timeout=10.0):
    """Every raw sample of ``urls`` (without ``__url__``), and the stream's counts and notes."""
    stats = StreamStats(10 ** 6, 10 ** 6)
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in stream_samples(urls, stats, timeout)]
    return samples, dict(stats.counts), stats.take_notes()


def mid_image_offset(path, member_index=2):
    """A byte offset in the middle of the data of the ``member_index``-th image of tar ``path``."""
    with tarfile.open(path) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    member = images[member_index]
    return member.offset_data + member.size // 2


def truncated_copy(path, n, folder):
    """The first ``n`` bytes of ``path`` as a local file in ``folder``: what a cut stream delivered."""
    folder.mkdir(exist_ok=True)
    out = folder / Path(path).name
    out.write_bytes(Path(path).read_bytes()[:n])
    return str(out)


# --------------------------------------------------------------------------------------------
# the same samples as the plain path
# --------------------------------------------------------------------------------------------
def test_pipe_and_http_shards_read_the_samples_of_the_plain_path(dataset, serve):
    folder, pattern, keys = dataset
    _, base = serve(folder)
    local = [str(folder / f"{i:05d}.tar") for i in range(4)]
    expected, counts, _ = raw(local)
    assert [s["__key__"] for s in expected] == keys and not counts
    for spec in (f"pipe:cat {folder}/{{00000..00003}}.tar", f"{base}/{{00000..00003}}.tar"):
        shards = expand_spec(spec)
        assert len(shards) == 4
        samples, counts, notes = raw(shards)
        assert samples == expected and not counts and not notes  # keys, captions, image bytes, json


def loader_epoch(train, tokenizer, **kw):
    cfg = LoaderConfig(train=train, batch_size=4, workers=0, shuffle_buffer=8, shuffle_initial=4, seed=3, **kw)
    loader = make_train_loader(cfg, train_transform(16), tokenizer)
    batches = list(loader)
    loader.close()
    return loader, [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches]), \
        torch.cat([b["text"] for b in batches])


def test_the_loader_gives_the_same_batches_and_epoch_length_from_sizes_json_over_http(dataset, serve, tokenizer):
    """No num_samples: the epoch length comes from sizes.json next to the local files (pipe:cat)
    and at the URL's parent (http), and the shuffled batches are those of the plain path."""
    folder, pattern, keys = dataset
    _, base = serve(folder)
    plain, keys0, images0, texts0 = loader_epoch(pattern, tokenizer)
    assert plain.dataset_size == 24 and sorted(keys0) == sorted(keys)
    for train in (f"pipe:cat {folder}/{{00000..00003}}.tar", f"{base}/{{00000..00003}}.tar"):
        loader, keys1, images1, texts1 = loader_epoch(train, tokenizer)
        assert loader.dataset_size == 24 and loader.num_batches == plain.num_batches
        assert keys1 == keys0 and torch.equal(texts1, texts0) and torch.equal(images1, images0)
        assert loader.skipped["bad_shards"] == 0


def test_http_without_sizes_json_names_the_url_and_num_samples_still_works(tmp_path, serve, tokenizer):
    pattern, _ = simple_dataset(tmp_path, 2, 4)
    os.remove(tmp_path / "sizes.json")
    _, base = serve(tmp_path)
    with pytest.raises(ValueError, match=rf"epoch length unknown.*{base}/sizes.json: HTTP 404.*num_samples"):
        loader_epoch(f"{base}/{{00000..00001}}.tar", tokenizer)
    loader, keys, _, _ = loader_epoch(f"{base}/{{00000..00001}}.tar", tokenizer, num_samples=8)
    assert loader.dataset_size == 8 and len(keys) == 8


# --------------------------------------------------------------------------------------------
# broken streams
# --------------------------------------------------------------------------------------------
def test_a_connection_cut_mid_shard_keeps_the_samples_before_it_counts_the_shard_and_goes_on(dataset, serve,
                                                                                          tmp_path):
    folder, _, _ = dataset
    server, base = serve(folder)
    cut = mid_image_offset(folder / "00001.tar")
    server.cut["00001.tar"] = cut
    names = ["00000.tar", "00001.tar", "00002.tar"]
    # the reference: the same bytes as a local truncated shard
    expected, counts0, _ = raw([str(folder / names[0]), truncated_copy(folder / names[1], cut, tmp_path / "cut"),
                                str(folder / names[2])])
    assert counts0 == {"bad_shards": 1}
    samples, counts, notes = raw([f"{base}/{n}" for n in names])
    assert samples == expected and counts == {"bad_shards": 1}
    assert [s["__key__"] for s in samples[-6:]] == [f"00002{i:04d}" for i in range(6)]  # the next shard, whole
    size = (folder / names[1]).stat().st_size
    assert notes == [f"skipping the rest of shard {base}/00001.tar: ConnectionError: connection closed after "
                     f"{cut} of {size} bytes"]


def test_a_stalled_stream_is_detected_within_the_timeout_counted_and_skipped(dataset, serve, tmp_path):
    folder, _, _ = dataset
    server, base = serve(folder)
    cut = mid_image_offset(folder / "00001.tar", member_index=4)
    server.stall["00001.tar"] = cut
    expected, _, _ = raw([truncated_copy(folder / "00001.tar", cut, tmp_path / "cut"), str(folder / "00002.tar")])
    t0 = time.monotonic()
    samples, counts, notes = raw([f"{base}/00001.tar", f"{base}/00002.tar"], timeout=3.0)
    elapsed = time.monotonic() - t0
    assert elapsed < HELD_S / 2, f"the stall was not detected: {elapsed:.1f} s"
    assert samples == expected and counts == {"bad_shards": 1}
    assert len(notes) == 1 and notes[0].startswith(f"skipping the rest of shard {base}/00001.tar: TimeoutError: "
                                                   f"no data for 3 s after {cut} bytes (data.stream_timeout_s)")


def test_a_missing_url_is_counted_and_named(dataset, serve):
    folder, _, _ = dataset
    _, base = serve(folder)
    samples, counts, notes = raw([f"{base}/00000.tar", f"{base}/nope.tar", f"{base}/00002.tar"])
    assert [s["__key__"][:5] for s in samples] == ["00000"] * 6 + ["00002"] * 6 and counts == {"bad_shards": 1}
    assert notes == [f"skipping the rest of shard {base}/nope.tar: OSError: HTTP 404 File not found"]


def test_when_every_url_fails_the_stall_error_names_them(dataset, serve, tokenizer):
    folder, _, _ = dataset
    _, base = serve(folder)
    cfg = LoaderConfig(train=f"{base}/gone{{0..3}}.tar", batch_size=4, workers=0, num_samples=16,
                       max_consecutive_bad_shards=3)
    loader = make_train_loader(cfg, train_transform(16), tokenizer)
    with pytest.raises(LoaderStallError, match=rf"3 consecutive shards yielded no sample.*{base}/gone\d\.tar.*"
                                               r"HTTP 404"):
        next(iter(loader))


def test_a_server_that_is_gone_is_a_counted_shard_error(tmp_path):
    """Connection refused: a port nothing listens on."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    samples, counts, notes = raw([f"http://127.0.0.1:{port}/00000.tar"], timeout=2.0)
    assert samples == [] and counts == {"bad_shards": 1}
    assert notes[0].startswith(f"skipping the rest of shard http://127.0.0.1:{port}/00000.tar: OSError: cannot "
                               f"connect")


def test_a_pipe_command_that_fails_or_stalls_is_counted_with_its_message(dataset):
    folder, _, _ = dataset
    missing = folder / "absent.tar"
    t0 = time.monotonic()
    samples, counts, notes = raw([f"pipe:cat {missing}", f"pipe:sleep {HELD_S}", f"pipe:cat {folder}/00003.tar"],
                                 timeout=3.0)
    assert time.monotonic() - t0 < HELD_S / 2
    assert [s["__key__"][:5] for s in samples] == ["00003"] * 6 and counts == {"bad_shards": 2}
    assert notes[0].startswith(f"skipping the rest of shard pipe:cat {missing}: OSError: the command exited with "
                               f"status 1: cat: {missing}: No such file or directory")
    assert notes[1] == (f"skipping the rest of shard pipe:sleep {HELD_S}: TimeoutError: no output for 3 s from the "
                        f"command (data.stream_timeout_s)")


# --------------------------------------------------------------------------------------------
# s3:// through the AWS CLI, commands not installed
# --------------------------------------------------------------------------------------------
def test_s3_urls_are_read_with_aws_s3_cp_and_their_sizes_json_too(dataset, tmp_path, monkeypatch, tokenizer):
    """A stand-in ``aws`` on PATH serves s3://bucket/KEY from a local folder, so the test runs the
    very command lines mmrl builds (aws s3 cp URL -), for the shards and for sizes.json."""
    folder, pattern, _ = dataset
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    aws = bin_dir / "aws"
    aws.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1 $2 $4" = "s3 cp -" ] || exit 2\n'
                   f'exec cat "{folder}/${{3#s3://bucket/cc/}}"\n')
    aws.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = "s3://bucket/cc/{00000..00003}.tar"
    assert expand_spec(spec)[0] == "pipe:aws s3 cp s3://bucket/cc/00000.tar -"
    _, keys0, images0, _ = loader_epoch(pattern, tokenizer)
    loader, keys1, images1, _ = loader_epoch(spec, tokenizer)
    assert loader.dataset_size == 24 and keys1 == keys0 and torch.equal(images1, images0)
    assert "s3 cp s3://bucket/cc/sizes.json -" in calls.read_text().splitlines()


def test_a_command_not_on_path_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match=r"^s3://b/\{0\.\.1\}\.tar: s3:// shards are read with the AWS CLI .*'aws' "
                                         r"is not on PATH"):
        parse_sources("s3://b/{0..1}.tar", timeout=1.0)
    with pytest.raises(ValueError, match=r"^pipe:no-such-tool x\{0\.\.1\}: the command of its pipe: shards, "
                                         r"'no-such-tool', is not on PATH$"):
        parse_sources("pipe:no-such-tool x{0..1}", timeout=1.0)


# --------------------------------------------------------------------------------------------
# code that reads local files handles URLs
# --------------------------------------------------------------------------------------------
def test_shard_check_and_the_caption_index_leave_urls_alone(dataset, serve):
    folder, pattern, _ = dataset
    _, base = serve(folder)
    with pytest.raises(ValueError, match=r"shard check reads local shard files, not URLs"):
        expand_shards(f"{base}/{{00000..00003}}.tar")
    assert shard_captions(pattern, False, 1000) is not None  # local: read up front
    assert shard_captions(f"{base}/{{00000..00003}}.tar", False, 1000) is None  # remote: the cache fills as it trains


def test_stream_timeout_is_validated():
    with pytest.raises(ConfigError, match=r"'data.stream_timeout_s': expected a positive number of seconds, got 0"):
        load_config(TrainConfig, TINY, ["data.train=x.tar", "data.stream_timeout_s=0"])
    cfg = load_config(TrainConfig, TINY, ["data.train=x.tar", "data.stream_timeout_s=2.5"])
    assert cfg.data.stream_timeout_s == 2.5


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mmrl_train_on_http_shards(tmp_path, serve):
    (tmp_path / "data").mkdir()
    shape_shards(tmp_path / "data", 64, 16)
    server, base = serve(tmp_path / "data" / "shards")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmrl", "train", TINY, f"data.train={base}/{{00000..00003}}.tar", "batch_size=8",
           "workers=1", "max_steps=3", "warmup_steps=1", "log_every=1", "data.stream_timeout_s=20",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env(), cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert [r["step"] for r in read_log(out) if "loss" in r][-1] == 3
    assert "/sizes.json" in server.requests and {f"/{i:05d}.tar" for i in range(4)} & set(server.requests)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["skipped"]["bad_shards"] == 0 and summary["skipped_samples"] == 0

