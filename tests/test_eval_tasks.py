"""The evaluation task registry: a task added by one module (here: registered by a fixture) is a
``mmrl eval`` subcommand with flags derived from its options, a suite task with the same keys and
checks, runs in a suite and has default rows in ``mmrl eval table``; the built-in tasks' flags and
suite keys are the same options."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmrl.cli import main
from mmrl.evaluation import (
    EntryResult,
    Headline,
    Metric,
    RunOptions,
    Task,
    TaskOptions,
    get_task,
    load_eval_model,
    load_suite,
    option,
    read_suite_results,
    register,
    run_suite,
    task_of_result,
    tasks,
    unregister,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ToyOptions(TaskOptions):
    needs = (("data",),)

    data: str | None = option(metavar="DIR", path="data", help="a folder of anything")
    name: str | None = option(help="dataset name in the result")
    scale: float = option(1.0, help="score multiplier")
    count: int = option(3, metavar="N", help="how many")
    loud: bool = option(True, help="the noise")

    def validate(self) -> None:
        super().validate()
        self.require(self.count >= 1, "count", "a positive integer")


def _run_toy(em, opts, o: ToyOptions):
    from mmrl.evaluation.results import write_result

    metrics = {"toy_score": 0.25 * o.scale, "toy_extra": float(len(list(Path(o.data).iterdir())))}
    path = write_result(opts.out_dir, o.name or Path(o.data).name, "toy_task", metrics, em.info,
                        {"count": o.count, "loud": o.loud})
    return path, metrics


@pytest.fixture
def toy():
    task = register(Task(name="toytask", result_task="toy_task", title="toy scoring", help="score a folder, toyishly",
                         options=ToyOptions, run=_run_toy, headline=Headline("toy score", ("toy_score",)),
                         metrics=(Metric("toy_score", "toy score"), Metric("toy_extra", "extra", report=False))))
    yield task
    unregister("toytask")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data" / "things"
    d.mkdir(parents=True)
    for i in range(4):
        (d / f"{i}.txt").write_text("x")
    return d


def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *args, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_registered_task_is_a_subcommand_with_derived_flags(toy, folder, tmp_path, capsys):
    assert "toytask" in _help(capsys) and "score a folder, toyishly" in _help(capsys)
    text = _help(capsys, "toytask")
    for flag in ("--data DIR", "--name NAME", "--scale SCALE", "--count N", "--no-loud", "--model M", "--no-cache"):
        assert flag in text, flag
    assert "(default 1.0)" in text and "turn off the noise" in text
    common = ["--model", "raw-pixels:8", "--out", tmp_path / "res", "--no-cache"]
    assert main(["eval", "toytask", "--data", str(folder), "--scale", "2", "--no-loud", *map(str, common)]) == 0
    r = json.loads((tmp_path / "res" / "things_toy_task.json").read_text())
    assert r["task"] == "toy_task" and r["metrics"] == {"toy_score": 0.5, "toy_extra": 4.0}
    assert r["protocol"] == {"count": 3, "loud": False}
    # the same checks as a suite entry, naming the flag
    assert main(["eval", "toytask", "--data", str(folder), "--count", "many", *map(str, common)]) == 2
    assert _error_line(capsys).endswith("error: --count: expected int, got 'many'")
    assert main(["eval", "toytask", "--data", str(folder), "--count", "0", *map(str, common)]) == 2
    assert _error_line(capsys).endswith("error: --count: expected a positive integer, got 0")
    assert main(["eval", "toytask", *map(str, common)]) == 2
    assert _error_line(capsys).endswith("error: missing --data")


def _suite(tmp_path, *entries: str) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(f"suite: toy\nroot: {tmp_path / 'data'}\nentries:\n" + "".join(f"  - {e}\n" for e in entries))
    return path


@pytest.mark.parametrize("entry, message", [
    ("{task: toytask, data: things, volume: 11}", r"entries\[0\] \(toytask\): unknown keys \['volume'\]"),
    ("{task: toytask, data: things, count: many}",
     r"toy\.yaml: entries\[0\] \(toytask\): config key 'count': expected int, got 'many'$"),
    ("{task: toytask, data: things, loud: maybe}", r"entries\[0\] \(toytask\): config key 'loud': expected bool"),
    ("{task: toytask, name: x}", r"entries\[0\] \(toytask\): missing config key 'data'"),
    ("{task: toytask, data: things, floor: true, trained_on: true}", r"cannot be both floor: true and trained_on"),
    ("{task: toytask, data: things, floor: 1}", r"entries\[0\] \(toytask\): floor must be true or false"),
])
def test_suite_entries_of_a_registered_task_are_checked_by_its_options(toy, tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        load_suite(_suite(tmp_path, entry))


def test_a_registered_task_runs_in_a_suite_and_in_a_table(toy, folder, tmp_path, capsys):
    path = _suite(tmp_path, "{task: toytask, data: things, scale: 3, loud: false, floor: true}",
                  "{task: toytask, name: gone, data: nowhere, hint: 'make it'}",
                  "{task: zeroshot, name: text, data: things}")
    suite = load_suite(path)
    assert [e.floor for e in suite.entries] == [True, False, False]
    assert suite.entries[0].options == ToyOptions(data="things", scale=3.0, loud=False)
    em = load_eval_model("raw-pixels:8")
    opts = RunOptions(device="cpu", progress=False, cache_dir=None, out_dir=tmp_path / "res")
    results = run_suite(em, opts, suite, log=lambda m: None)
    assert [(r.name, r.status) for r in results] == [("things", "ok"), ("gone", "skipped"), ("text", "skipped")]
    assert "make it" in results[1].message and "no text encoder" in results[2].message  # zeroshot needs text
    ok = results[0]
    assert ok.key == ("toytask", "things") and ok.floor and not ok.trained_on
    assert ok.headline() == pytest.approx(0.75) and ok.metrics == {"toy_score": 0.75, "toy_extra": 4.0}
    assert Path(ok.result) == tmp_path / "res" / "things_toy_task.json"
    assert results[1].headline() is None
    # the summary file reads back as the same results
    summary = tmp_path / "res" / "suite_toy.json"
    assert read_suite_results(summary) == results
    assert [e["floor"] for e in json.loads(summary.read_text())["entries"]] == [True, False, False]
    # mmrl eval table: the task's declared metrics are its default rows
    assert main(["eval", "table", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "| things | toy_task | toy_score | 75.00 |" in out and "| things | toy_task | toy_extra | 400.00 |" in out
    assert task_of_result("toy_task") is toy and get_task("toytask") is toy


def test_the_registry_is_left_as_it_was():
    assert list(tasks()) == ["retrieval", "zeroshot", "linear-probe", "image-retrieval", "cross-retrieval"]
    assert task_of_result("toy_task") is None


# --- the built-in tasks --------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["retrieval", "zeroshot", "linear-probe", "image-retrieval", "cross-retrieval"])
def test_every_suite_key_is_a_flag(task, capsys):
    from mmrl.evaluation.options import suite_keys

    text = _help(capsys, task)
    for key in suite_keys(get_task(task).options):
        flag = key.replace("_", "-")
        assert f"--{flag} " in text or f"--no-{flag} " in text or f"--{flag}\n" in text, (task, key)


def test_linear_probe_options_both_ways(tmp_path, capsys):
    entry = ("{task: linear-probe, train: a, test: b, val_proportion: 0.3, probe_seed: 2, grid_points: 9, "
             "max_iter: 10, train_limit: 50, features: embedding}")
    (o,) = [e.options for e in load_suite(_suite(tmp_path, entry)).entries]
    assert o.probe().val_proportion == 0.3 and o.probe().seed == 2 and o.probe().grid_points == 9
    assert (o.max_iter, o.train_limit, o.features) == (10, 50, "embedding")
    with pytest.raises(ValueError, match=r"entries\[0\] \(linear-probe\): config key 'train_limit': expected int, "
                                         r"got 'many'"):
        load_suite(_suite(tmp_path, "{task: linear-probe, dataset: cifar10, train_limit: many}"))
    with pytest.raises(ValueError, match=r"config key 'features': expected one of pooled, embedding, got 'raw'"):
        load_suite(_suite(tmp_path, "{task: linear-probe, dataset: cifar10, features: raw}"))
    with pytest.raises(ValueError, match=r"config keys 'dataset' or 'train' \+ 'test': give one of them"):
        load_suite(_suite(tmp_path, "{task: linear-probe, dataset: cifar10, train: a, test: b}"))
    common = ["--train", "a", "--test", "b", "--model", "raw-pixels", "--no-cache"]
    assert main(["eval", "linear-probe", "--train-limit", "many", *common]) == 2
    assert _error_line(capsys).endswith("error: --train-limit: expected int, got 'many'")
    assert main(["eval", "linear-probe", "--features", "raw", *common]) == 2
    assert _error_line(capsys).endswith("error: --features: expected one of pooled, embedding, got 'raw'")
    assert main(["eval", "linear-probe", "--dataset", "cifar10", *common]) == 2
    assert "--dataset or --train + --test: give one of them" in _error_line(capsys)


def test_retrieval_keys_and_headline(tmp_path):
    (o,) = [e.options for e in load_suite(_suite(
        tmp_path, "{task: retrieval, annotations: x.json, eccv: false, recall_k: [1, 10], "
                  "count_check: false}")).entries]
    assert (o.eccv, o.recall_k, o.count_check, o.duplicate_captions) == (False, [1, 10], False, "auto")
    with pytest.raises(ValueError, match=r"config key 'duplicate_captions': expected one of auto, own, shared"):
        load_suite(_suite(tmp_path, "{task: retrieval, annotations: x.json, duplicate_captions: mine}"))
    # one headline per task, for the suite summary and the demo alike: mean of the six R@1/5/10
    recalls = {f"{d}_retrieval_recall@{k}": k / 20 for d in ("image", "text") for k in (1, 5, 10)}
    r = EntryResult("x", "retrieval", "ok", metrics=dict(recalls, rsum=999.0))
    assert r.headline() == pytest.approx(16 / 60)
    assert get_task("retrieval").headline.label == "mean R@1/5/10, both directions"
    from mmrl.evaluation.suite import format_summary

    assert "mean R@1/5/10, both directions: 26.67%" in format_summary([r])


def test_demo_suite_marks_the_floor_sets():
    """floor: true on every held-out retrieval set (text-image, cross-style, image) and Fashion-MNIST zero-shot."""
    entries = yaml.safe_load((ROOT / "eval" / "suites" / "demo.yaml").read_text())["entries"]
    want = {(e["task"], e["name"]) for e in entries if not e.get("trained_on") and (
        e["task"] in ("retrieval", "cross-retrieval", "image-retrieval")
        or (e["task"], e["name"]) == ("zeroshot", "fashion-mnist"))}
    assert {(e.task, e.label) for e in load_suite(ROOT / "eval" / "suites" / "demo.yaml").entries if e.floor} == want
