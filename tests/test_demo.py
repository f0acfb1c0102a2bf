"""``mmrl demo`` end to end at CI size (real corpora sliced with ``limit=``, a few training steps),
its reuse of finished work, the pooling study, and the study's verdict logic."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from helpers.corpora import LIMITS, needs_apt
from mmrl.cli import main
from mmrl.config import ConfigError, load_config
from mmrl.demo import DemoConfig
from mmrl.demo.report import SECTIONS
from mmrl.demo.study import Stat, separated, verdict_sentences

REPO = Path(__file__).resolve().parents[1]
LIMIT_ARGS = "prepare_limits={" + ", ".join(f"{k}: {LIMITS[k]}"
                                            for k in ("emoji", "tuxpaint", "fashion-mnist", "glyphs")) + "}"
CI_TRAIN = ["train.max_steps=3", "train.batch_size=16", "train.warmup_steps=1", "train.save_every=2",
            "train.log_every=1", "train.workers=0", "eval_batch_size=64", "eval_workers=0", "check_floor=false"]


def _finite_metrics(path: Path) -> dict:
    data = json.loads(path.read_text())
    metrics = {k: v for k, v in data["metrics"].items() if isinstance(v, (int, float))}
    assert metrics, path
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"{path}: non-finite metrics {bad}"
    return metrics


def _trained_model_name(out: Path) -> str:
    """The model name of the demo's training run in ``out``."""
    return yaml.safe_load((out / "train" / "config.yaml").read_text())["model"]


def _demo_args(corpora: Path, out: Path) -> list:
    return ["demo", str(REPO / "configs" / "demo.yaml"), f"root={corpora}", f"out={out}",
            f"suite={REPO / 'eval' / 'suites' / 'demo.yaml'}", LIMIT_ARGS, *CI_TRAIN,
            "baselines_alongside_training=true"]


@needs_apt
def test_demo_end_to_end_and_reuse(tmp_path, corpora, emoji, tuxpaint, fashion, glyphs, capsys):
    out = tmp_path / "demo"
    assert main(_demo_args(corpora, out)) == 0
    report = (out / "report.md").read_text()
    # every section, in order
    positions = [report.index(s + "\n") for s in SECTIONS]
    assert positions == sorted(positions)
    # plots: real PNGs, linked from the report
    for name in ("loss.png", "ggem_p.png", "recall_at_k.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"(plots/{name})" in report
    # the trained model's `mmrl analyze` on the held-out Twemoji images: its plots and dependence table
    inside = report.split("## Inside the pooling\n")[1].split("## Files\n")[0]
    for name in ("exponents", "dependence", "activation_maps", "amplification"):
        assert f"(analysis/{name}.png)" in inside and (out / "analysis" / f"{name}.png").is_file()
    assert all(f"| {kind} | " in inside for kind in ("tok", "avg", "gem", "ggem"))
    # every suite entry ran for the trained and untrained models; raw pixels skip text tasks only;
    # pretrained-init leaves out the tasks of its baseline_exclude (zero-shot, linear probe)
    suite = yaml.safe_load((REPO / "eval" / "suites" / "demo.yaml").read_text())
    expected = {(e["task"], e.get("name")) for e in suite["entries"]}
    skipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["baseline_exclude"]["pretrained-init"]
    assert "zeroshot" in skipped and "retrieval" not in skipped
    for label in ("trained", "untrained", "pretrained-init", "raw-pixels"):
        summary = json.loads((out / "eval" / label / "suite_demo.json").read_text())
        got = {(e["task"], e["name"]): e for e in summary["entries"]}
        assert set(got) == ({k for k in expected if k[0] not in skipped} if label == "pretrained-init" else expected)
        for (task, _), e in got.items():
            if label == "raw-pixels" and task in ("retrieval", "zeroshot"):
                assert e["status"] == "skipped" and "text" in e["message"]
                continue
            assert e["status"] == "ok", e
            metrics = _finite_metrics(Path(e["result"]))
            assert Path(e["result"]).parent == out / "eval" / label
            assert metrics == pytest.approx(e["metrics"])
    # one evaluation encodes shared inputs once: the three emoji styles' caption list (one concept list) shares a
    # text-feature file with itself, Tux Paint's captions get the other; Fashion-MNIST test one image-feature file
    cached = out / "eval" / "trained" / ".mmrl" / "features"
    assert len(list(cached.glob("texts-*.safetensors"))) == 2
    assert len(list(cached.glob("fashion-mnist-test-*.safetensors"))) == 1
    # the results table shows trained and the three baselines; the floor table has one row per floor set,
    # the floor decided by untrained and raw pixels, pretrained-init beside it
    assert "| evaluation set | task | metric | trained | untrained | pretrained-init | raw-pixels |" in report
    assert "| trained | best floor baseline | gap | pretrained-init (gap) | verdict |" in report
    assert re.search(r"Against \*pretrained-init\* \(beside the floor, not part of it\) the trained model is ahead "
                     r"by at least 5 points on \d+ of \d+ sets", report)
    demo = json.loads((out / "demo.json").read_text())
    assert all(set(c["baselines"]) <= {"untrained", "raw-pixels"} for c in demo["checks"])
    assert any("pretrained-init" in c["beside"] for c in demo["checks"])
    floor_sets = sum(1 for e in suite["entries"] if not e.get("trained_on") and (
        e["task"] in ("retrieval", "cross-retrieval", "image-retrieval")
        or (e["task"] == "zeroshot" and e.get("name") == "fashion-mnist")))
    assert len(demo["checks"]) == floor_sets
    assert all(math.isfinite(c["trained"]) and c["baselines"] for c in demo["checks"])
    assert len(re.findall(r"^\| .* \| (pass|\*\*FAIL\*\*) \|$", report, flags=re.M)) == floor_sets
    # the training-concept sets: in the results table and the fit table, never floor sets
    seen = [e["name"] for e in suite["entries"] if e.get("trained_on")]
    assert seen and not {c["name"] for c in demo["checks"]} & set(seen)
    for name in seen:
        # one value per model: trained and the three baselines
        assert f"| {name} (training items) | cross-style image retrieval | mean R@1 |" in report
        assert re.search(rf"^\| {name} \| cross-style image retrieval \| mean R@1, both directions"
                         rf"( \| [0-9.]+){{4}} \|$", report, flags=re.M), name
    # the exported model is a regular mmrl/open_clip model folder
    import mmrl

    model, _, _ = mmrl.load_model(out / "train" / "model")
    assert model.visual.pool_type == "ggem"
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 3
    assert "batches of `concept` groups of 2 sharing their augmentation" in report
    # the recipe's concept pairs reached the loss: its image-image term saw positives
    assert all(r["image_loss"] > 0 and r["clip_loss"] > 0 for r in log if "loss" in r)
    # both training corpora were read, and the text cache held all their captions before step 1
    from mmrl.data.caption_index import shard_captions
    from mmrl.demo.steps import train_shards

    captions = shard_captions(train_shards(corpora, ["emoji", "glyphs"]), multi_caption=True, max_samples=10 ** 6)
    assert any(c.startswith("the letter ") for c in captions) and any("emoji" in c for c in captions)
    warm = json.loads((out / "train" / "summary.json").read_text())["text_cache_warm"]
    distinct_tokens = {tuple(row) for row in mmrl.get_tokenizer(_trained_model_name(out))(captions).tolist()}
    assert warm["captions"] == len(captions) and warm["computed"] == len(distinct_tokens)  # uncased: Q, q alike

    # untrained: every weight random (stem and text tower too); pretrained-init: the packaged weights loaded
    from mmrl.layers.pretrained_stem import efficientnet_lite0_state_dict

    packaged = efficientnet_lite0_state_dict()["blocks.4.2.conv_pwl.weight"]
    models = {label: mmrl.load_model(out / label)[0] for label in ("untrained", "pretrained-init", "train/model")}
    stems = {label: models[label].visual.conv1.body[-1][-1].conv_pwl.weight
             for label in ("untrained", "pretrained-init")}
    assert torch.equal(stems["pretrained-init"], packaged) and not torch.allclose(stems["untrained"], packaged)
    texts = {label: m.text.transformer.embeddings.word_embeddings.weight for label, m in models.items()}
    assert torch.equal(texts["pretrained-init"], texts["train/model"])  # locked MiniLM, as trained
    assert not torch.allclose(texts["untrained"], texts["pretrained-init"])

    # the baselines were evaluated in a second process while the model trained with one CPU thread
    assert {"evaluate untrained (alongside training)", "evaluate raw-pixels (alongside training)",
            "evaluate pretrained-init (alongside training)"} <= set(demo["timings"])
    assert "evaluate trained" in demo["timings"] and "evaluate untrained" not in demo["timings"]
    assert "[baselines] eval untrained:" in (out / "logs" / "baselines.log").read_text()
    assert json.loads((out / "train" / "summary.json").read_text())["cpu_threads"] == 1

    # second run: the finished training run and evaluations are reused, the report rewritten
    weights = out / "train" / "model" / "open_clip_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_demo_args(corpora, out)) == 0
    printed = capsys.readouterr().out
    assert "train: reusing the finished run" in printed
    assert printed.count("eval ") and "reusing" in printed
    assert "in a second process" not in printed  # nothing left for it to do
    assert weights.stat().st_mtime_ns == stamp
    # a changed recipe is not mistaken for the finished run
    from mmrl.demo.steps import finished_run, train_shards

    cfg = load_config(DemoConfig, REPO / "configs" / "demo.yaml",
                      [f"root={corpora}", f"out={out}", LIMIT_ARGS, *CI_TRAIN])
    shards = train_shards(corpora, cfg.train_corpora)
    assert shards == f"{corpora / 'emoji' / 'train'}::{corpora / 'glyphs' / 'train'}"
    assert finished_run(cfg.train_config(shards, out / "train")) is not None
    assert finished_run(cfg.train_config(shards, out / "train", {"lr": 1e-4})) is None


@needs_apt
def test_study_table_plot_and_verdict(tmp_path, corpora, emoji, tuxpaint, fashion, glyphs):
    out = tmp_path / "study"
    args = ["demo", "--study"] + _demo_args(corpora, tmp_path / "demo")[1:] + [
        f"study.out={out}", "study.pools=[avg, ggem]", "study.seeds=[0, 1]", "study.only=emoji-noto",
        "study.train.max_steps=2", "study.train.warmup_steps=1"]
    assert main(args) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["runs"] == ["avg-seed0", "avg-seed1", "ggem-seed0", "ggem-seed1"]
    for run in study["runs"]:
        cfg = yaml.safe_load((out / run / "train" / "config.yaml").read_text())
        assert cfg["pool"] == run.split("-")[0] and cfg["seed"] == int(run[-1]) and cfg["max_steps"] == 2
    table = (out / "table.md").read_text()
    assert "| dataset | task | metric | avg | ggem |" in table
    assert re.search(r"\| emoji-noto \| zeroshot_retrieval \| rsum \| [\d.]+ ± [\d.]+ \(n=2\) "
                     r"\| [\d.]+ ± [\d.]+ \(n=2\) \|", table)
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "study.md").read_text()
    assert "## Verdict" in text and "ggem vs avg:" in text and "## Runtime" in text
    # each trained model analysed on the held-out Twemoji images: its own pooling's head-wise dependence
    assert "## Head-wise dependence" in text
    for pool in ("avg", "ggem"):
        assert re.search(rf"\| {pool} \| [-\d.]+ ± [\d.]+ \| [-\d.]+ ± [\d.]+ \| 2 \|", text), text
    assert re.search(r"- HSIC[^:]*: ggem's head-wise dependence \([-\d.]+ ± [\d.]+\) is (not )?lower", text), text
    for run in study["runs"]:
        assert (out / run / "analysis" / "analysis.json").is_file()
    for metric, per in study["stats"].items():
        assert set(per) == {"avg", "ggem"} and all(s["n"] == 2 and math.isfinite(s["mean"]) for s in per.values())


def test_verdict_follows_the_numbers():
    tight = lambda m: Stat(m, 0.005, 3)  # noqa: E731
    wide = lambda m: Stat(m, 0.05, 3)    # noqa: E731
    assert separated(tight(0.50), tight(0.52)) and not separated(wide(0.50), wide(0.52))
    assert not separated(Stat(0.5, 0.0, 1), Stat(0.9, 0.0, 1))  # one seed: no spread to compare with
    clear = {"m1": {"ggem": tight(0.60), "avg": tight(0.50), "tok": tight(0.40), "gem": tight(0.55)},
             "m2": {"ggem": tight(0.70), "avg": tight(0.65), "tok": tight(0.60), "gem": tight(0.62)}}
    text = "\n".join(verdict_sentences(clear))
    assert "claim holds" in text and "ggem vs gem: higher mean on 2 of 2 metrics; clearly higher" in text
    assert "- m1: **ggem** is best" in text and "exceeds the seed spread" in text
    noisy = {"m1": {"ggem": wide(0.52), "avg": wide(0.50), "tok": wide(0.49), "gem": wide(0.51)}}
    text = "\n".join(verdict_sentences(noisy))
    assert "not confirmed" in text and "within the seed spread" in text
    losing = {"m1": {"ggem": tight(0.40), "avg": tight(0.50), "tok": tight(0.45), "gem": tight(0.55)}}
    text = "\n".join(verdict_sentences(losing))
    assert "- m1: **gem** is best" in text and "clearly lower on 1" in text and "not confirmed" in text


def test_study_recipe_pinned_or_demo():
    """``study.recipe=pinned`` trains with the study's overrides, ``demo`` with the demo's recipe."""
    def run_config(overrides):
        cfg = load_config(DemoConfig, REPO / "configs" / "demo.yaml", overrides)
        return cfg, cfg.train_config("s/{0..1}.tar", "out", extra=dict(cfg.study.overrides(), pool="gem", seed=1),
                                     prefix="study.train.")

    cfg, pinned = run_config([])
    assert cfg.study.train and pinned.max_steps == cfg.study.train["max_steps"]
    assert pinned.data.group_key is None and (pinned.pool, pinned.seed) == ("gem", 1)
    cfg, demo = run_config(["study.recipe=demo"])
    assert (demo.model, demo.max_steps, demo.data.group_key) == (
        cfg.train["model"], cfg.train["max_steps"], cfg.train["data"]["group_key"])
    assert (demo.pool, demo.seed, demo.image_loss_weight) == ("gem", 1, cfg.train["image_loss_weight"])


def test_demo_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.foo"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train.foo=1"])
    with pytest.raises(ConfigError, match="'train.output_dir': set by the demo"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train.output_dir=x"])
    with pytest.raises(ConfigError, match="study.pools"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["study.pools=[ggem, best]"])
    with pytest.raises(ConfigError, match="study.recipe"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["study.recipe=latest"])
    with pytest.raises(ConfigError, match="train_corpora"):
        load_config(DemoConfig, None, ["corpora=[emoji]", "train_corpora=[openclipart]"])
    # per-corpus sampling weights: one per training corpus
    two = load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train.data.weights=3::1"])
    assert two.train_config("a::b", "out").data.weights == "3::1"
    with pytest.raises(ConfigError, match="train.data.weights"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train.data.weights=1::2::3"])
    with pytest.raises(ConfigError, match="train.aug.invert"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train.aug.invert=2"])
    with pytest.raises(ConfigError, match="'train_threads': expected an integer >= 1 or null"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["train_threads=0"])
    assert load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["baseline_threads=null"]).baseline_threads is None
    with pytest.raises(ConfigError, match="'floor_baselines': unknown baseline 'imagenet'"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["floor_baselines=[untrained, imagenet]"])
    with pytest.raises(ConfigError, match="'baseline_exclude.pretrained-init': expected"):
        load_config(DemoConfig, REPO / "configs" / "demo.yaml", ["baseline_exclude={pretrained-init: zeroshot}"])


def test_thread_env_limits_a_childs_cpu_threads():
    from mmrl.demo.steps import thread_env

    env = thread_env(1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    import os

    assert thread_env(None).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")


@pytest.mark.slow
def test_a_failing_baseline_job_names_its_log(tmp_path):
    """The second process's error surfaces in the parent, pointing at the log that holds it."""
    from mmrl.demo.steps import BaselineJob

    said = []
    job = BaselineJob({"untrained": str(tmp_path / "no-such-model")}, REPO / "eval" / "suites" / "demo.yaml", tmp_path,
                      tmp_path / "eval", only=None, batch_size=8, workers=0, force=False, threads=1,
                      log_path=tmp_path / "logs" / "baselines.log", log=said.append)
    with pytest.raises(RuntimeError, match=re.escape(str(tmp_path / "logs" / "baselines.log"))):
        job.wait(said.append)
    assert "expected a saved model folder or raw-pixels:N" in (tmp_path / "logs" / "baselines.log").read_text()
    assert any("in a second process" in m for m in said)


def test_floor_checks_compare_with_the_best_baseline():
    from mmrl.demo.floor import floor_checks
    from mmrl.evaluation import EntryResult as EntryMetrics

    def ret(r):  # text-image retrieval entry whose six recalls all equal r
        return {f"{d}_retrieval_recall@{k}": r for d in ("image", "text") for k in (1, 5, 10)}

    trained = [EntryMetrics("emoji-noto", "retrieval", "ok", metrics=ret(0.30), floor=True),  # the suite's floor sets
               EntryMetrics("a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.40}, floor=True),
               EntryMetrics("fashion-mnist", "zeroshot", "ok", metrics={"acc1": 0.18}, floor=True),
               EntryMetrics("emoji-category", "zeroshot", "ok", metrics={"acc1": 0.5}),     # not a floor set
               EntryMetrics("fashion-mnist", "linear-probe", "ok", metrics={"lp_acc1": 0.7}),  # not a floor set
               EntryMetrics("seen-a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.2},
                            trained_on=True)]  # diagnostic
    baselines = {"untrained": [EntryMetrics("emoji-noto", "retrieval", "ok", metrics=ret(0.02)),
                               EntryMetrics("a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.10}),
                               EntryMetrics("fashion-mnist", "zeroshot", "ok", metrics={"acc1": 0.14})],
                 "raw-pixels": [EntryMetrics("emoji-noto", "retrieval", "skipped", "no text encoder"),
                                EntryMetrics("a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.37}),
                                EntryMetrics("seen-a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.3},
                                             trained_on=True)]}
    checks = {(c.task, c.name): c for c in floor_checks(trained, baselines, margin=0.05)}
    assert set(checks) == {("retrieval", "emoji-noto"), ("cross-retrieval", "a-b"), ("zeroshot", "fashion-mnist")}
    ret_check = checks[("retrieval", "emoji-noto")]
    assert ret_check.baselines == {"untrained": pytest.approx(0.02)} and ret_check.passed
    cross = checks[("cross-retrieval", "a-b")]
    assert cross.best_baseline == "raw-pixels" and cross.gap == pytest.approx(0.03) and not cross.passed
    fm = checks[("zeroshot", "fashion-mnist")]
    assert fm.gap == pytest.approx(0.04) and not fm.passed  # 4 points < the 5-point margin
    # a baseline beside the floor is recorded per set and never decides it
    beside = {"pretrained-init": [EntryMetrics("a-b", "cross-retrieval", "ok", metrics={"recall@1": 0.39})]}
    checks = {(c.task, c.name): c for c in floor_checks(trained, {"untrained": baselines["untrained"]}, 0.05, beside)}
    cross = checks[("cross-retrieval", "a-b")]
    assert (cross.passed and cross.beside == {"pretrained-init": pytest.approx(0.39)}
            and cross.best_baseline == "untrained")
    assert checks[("retrieval", "emoji-noto")].beside == {}


def test_learned_p_sentences_measure_the_spread_between_groups():
    from mmrl.demo.study import learned_p_sentences

    close = learned_p_sentences({"ggem": [[2.9, 3.1], [3.0, 3.2]], "cgem": [[1.5, 4.5]], "gem": [[3.3]]})[0:3]
    assert "in [2.90, 3.20]" in close[0] and "differ by 0.20 on average" in close[0] and "nearly what" in close[0]
    assert "differ by 3.00" in close[1] and "nearly what" not in close[1]
    assert "one exponent for all channels" in close[2]
