"""``init_from``: a model starts from another's weights (matching key and shape), read safely.

The fast tests initialise models in-process from every accepted source (an mmrl model folder, an
open_clip local-dir with a ``.bin``, open_clip's ``{"state_dict": {"module.*": ...}}`` training
checkpoint, a bare ``.safetensors``); the slow ones run ``mmrl train`` with ``init_from`` and
check that a resumed checkpoint wins."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import ROOT, TINY, env, error_lines, run, shape_shards, train_cmd

import mmrl
from mmrl.config import ConfigError, load_config
from mmrl.model import InitReport, init_from_weights
from mmrl.safeload import WeightsRefused
from mmrl.train import TrainConfig

NAME = "mmrl-vit-tiny-p8-64"
POOLER = ["visual.pooler.p"]  # what a ggem model has beyond an avg (or tok) one


class Payload:
    """Unpickled with weights_only=False, this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def avg(tmp_path_factory):
    """An ``avg`` model (seed 1, so it differs from any seed-0 model) saved by mmrl, and its state dict."""
    torch.manual_seed(1)
    model = mmrl.create_model(NAME, pool="avg")
    folder = mmrl.save_model(model, tmp_path_factory.mktemp("init") / "avg-model")
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_ggem():
    torch.manual_seed(0)
    return mmrl.create_model(NAME, pool="ggem")


def open_clip_checkpoint(state: dict, path: Path) -> Path:
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, path)
    return path


def source(kind: str, avg, tmp: Path) -> tuple[Path, Path]:
    """(what init_from is given, the file it reads) for each accepted kind of source."""
    folder, state = avg
    if kind == "mmrl-folder":
        return folder, folder / "open_clip_model.safetensors"
    if kind == "open-clip-local-dir-bin":
        local = tmp / "local-dir"
        local.mkdir()
        (local / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
        torch.save(state, local / "open_clip_pytorch_model.bin")
        return local, local / "open_clip_pytorch_model.bin"
    if kind == "open-clip-training-pt":
        path = open_clip_checkpoint(state, tmp / "epoch_3.pt")
        return path, path
    path = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, path


@pytest.mark.parametrize("kind", ["mmrl-folder", "open-clip-local-dir-bin", "open-clip-training-pt", "safetensors"])
def test_a_ggem_model_starts_from_an_avg_models_weights(kind, avg, tmp_path):
    given, read = source(kind, avg, tmp_path)
    _, saved = avg
    model = fresh_ggem()
    start = fresh_ggem().state_dict()
    report = init_from_weights(model, given)
    state = model.state_dict()
    assert report == InitReport(str(read), loaded=report.loaded, missing=POOLER)
    assert sorted(report.loaded) == sorted(saved)
    differing = [k for k in saved if not torch.equal(state[k], saved[k])]
    assert not differing, differing[:5]
    assert not torch.equal(start["visual.conv1.weight"], saved["visual.conv1.weight"])  # the test can fail
    assert torch.equal(state["visual.pooler.p"], start["visual.pooler.p"])
    assert torch.allclose(state["visual.pooler.p"], torch.full_like(state["visual.pooler.p"], 3.0))  # p_init
    assert report.summary() == (f"init_from {read}: loaded {len(saved)} tensors; missing 1 (visual.pooler.p); "
                                f"unexpected 0; shape-mismatched 0")


def test_the_initialised_model_encodes_like_the_source_apart_from_pooling(avg):
    """tok-pooled source into a tok model: every key loads and the features are the source's."""
    folder, _ = avg
    torch.manual_seed(2)
    tok = mmrl.create_model(NAME, pool="tok")
    path = folder.parent / "tok.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tok.state_dict().items()}, path)
    torch.manual_seed(0)
    model = mmrl.create_model(NAME, pool="tok")
    report = init_from_weights(model, path, strict=True)
    assert report.exact and len(report.loaded) == len(tok.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), tok.eval().encode_image(images))


def altered(state: dict) -> dict:
    """Another width for one tensor, one key dropped, one extra key."""
    out = {k: v.contiguous() for k, v in state.items() if k != "text_projection"}
    out["visual.proj"] = torch.zeros(96, 256)
    out["visual.extra.weight"] = torch.ones(4)
    return out


def test_shape_mismatches_are_counted_and_kept(avg, tmp_path):
    _, saved = avg
    path = tmp_path / "altered.safetensors"
    save_file(altered(saved), path)
    model = fresh_ggem()
    start = fresh_ggem().state_dict()
    report = init_from_weights(model, path)
    assert report.mismatched == ["visual.proj"] and report.unexpected == ["visual.extra.weight"]
    assert sorted(report.missing) == sorted(POOLER + ["text_projection"])
    state = model.state_dict()
    assert torch.equal(state["visual.proj"], start["visual.proj"]) and state["visual.proj"].shape == (192, 256)
    assert torch.equal(state["text_projection"], start["text_projection"])
    assert not torch.equal(start["text_projection"], saved["text_projection"])  # kept, not loaded
    assert torch.equal(state["visual.conv1.weight"], saved["visual.conv1.weight"])
    assert report.summary() == (f"init_from {path}: loaded {len(saved) - 2} tensors; "
                                f"missing 2 (text_projection, visual.pooler.p); unexpected 1 (visual.extra.weight); "
                                f"shape-mismatched 1 (visual.proj)")


def test_init_strict_refuses_any_difference_in_one_line_and_loads_nothing(avg, tmp_path):
    _, saved = avg
    path = tmp_path / "altered.safetensors"
    save_file(altered(saved), path)
    model = fresh_ggem()
    with pytest.raises(ValueError) as err:
        init_from_weights(model, path, strict=True)
    assert str(err.value) == (f"init_from {path}: weights do not match the model (init_strict): "
                              f"missing 2 (text_projection, visual.pooler.p); unexpected 1 (visual.extra.weight); "
                              f"shape-mismatched 1 (visual.proj)")
    start = fresh_ggem().state_dict()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # untouched
    folder, _ = avg
    with pytest.raises(ValueError, match=r"init_strict\): missing 1 \(visual.pooler.p\)$"):
        init_from_weights(fresh_ggem(), folder, strict=True)  # a pool swap is not exact


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"module.visual.proj": Payload(marker)}}, path)
    torch.save({"state_dict": Payload(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()  # the payload works when unpickled the old way
    model = fresh_ggem()
    with pytest.raises(WeightsRefused) as err:
        init_from_weights(model, path)
    assert str(err.value) == (f"{path}: refused to load (it needs 'io.open', not a tensor type; "
                              f"read with torch.load(weights_only=True))")
    assert not marker.exists()


def test_missing_or_unusable_sources_are_one_line_naming_them(tmp_path):
    model = fresh_ggem()
    with pytest.raises(FileNotFoundError) as err:
        init_from_weights(model, tmp_path / "nowhere")
    assert str(err.value) == f"init_from {tmp_path / 'nowhere'}: no such file or folder"
    with pytest.raises(FileNotFoundError, match=r"no open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        init_from_weights(model, tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: expected a model folder or a .safetensors, .pt, .pth or .bin"):
        init_from_weights(model, tmp_path / "notes.txt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty.pt: holds no tensors"):
        init_from_weights(model, tmp_path / "empty.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"cut.safetensors: not a readable safetensors file"):
        init_from_weights(model, tmp_path / "cut.safetensors")


def test_config_keys_are_typed_and_validated():
    cfg = load_config(TrainConfig, TINY, ["data.train=x", "init_from=runs/a/model", "init_strict=true"])
    assert cfg.init_from == "runs/a/model" and cfg.init_strict is True
    assert load_config(TrainConfig, TINY, ["data.train=x"]).init_from is None
    with pytest.raises(ConfigError, match=r"^config key 'init_strict': expected bool"):
        load_config(TrainConfig, TINY, ["data.train=x", "init_strict=maybe"])
    with pytest.raises(ConfigError, match=r"^config key 'init_from': expected a model folder or weights file path"):
        load_config(TrainConfig, TINY, ["data.train=x", "init_from=' '"])


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return shape_shards(tmp_path_factory.mktemp("init_data"), 64, 16)


@pytest.mark.slow
def test_mmrl_train_starts_from_init_from_and_a_resumed_checkpoint_wins(tmp_path, avg, small_shards):
    folder, saved = avg
    out = tmp_path / "run"
    first = run(train_cmd(small_shards, out, "max_steps=1", f"init_from={folder}"))
    line = (f"mmrl train: init_from {folder / 'open_clip_model.safetensors'}: loaded {len(saved)} tensors; "
            f"missing 1 (visual.pooler.p); unexpected 0; shape-mismatched 0")
    assert line in first.stderr.splitlines(), first.stderr[-3000:]
    trained = load_file(out / "model" / "open_clip_model.safetensors")
    start = fresh_ggem().state_dict()
    # one Adam step at lr <= 1e-3 moves each weight by about 1e-3: the run started from the avg model
    assert all((trained[k] - saved[k]).abs().max() < 2e-3 for k in saved)
    assert (trained["visual.conv1.weight"] - start["visual.conv1.weight"]).abs().max() > 0.05
    assert (trained["visual.pooler.p"] - start["visual.pooler.p"]).abs().max() < 2e-3

    # the same run again resumes its checkpoint: the init is skipped (a missing init_from is not even read)
    again = run(train_cmd(small_shards, out, "max_steps=1", f"init_from={tmp_path / 'nowhere'}"))
    assert (f"mmrl train: init_from skipped: resuming from {out / 'checkpoints'}/step_00000001"
            in again.stderr.splitlines()), again.stderr[-3000:]
    assert "loaded" not in again.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == 1


@pytest.mark.slow
def test_mmrl_train_with_a_missing_init_from_is_one_line(tmp_path, small_shards):
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd(small_shards, out, "max_steps=1", f"init_from={tmp_path / 'nowhere'}"),
                          capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [f"mmrl train: error: init_from {tmp_path / 'nowhere'}: no such file or folder"]
    assert "Traceback" not in proc.stderr and not (out / "config.yaml").exists()
