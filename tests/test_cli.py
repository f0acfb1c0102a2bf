"""The mmrl console script."""
import json
import subprocess
import sys

import mmrl
from mmrl.cli import main


def test_models_and_pools_listed(capsys):
    assert main(["models"]) == 0
    assert "mmrl-vit-tiny-p8-64" in capsys.readouterr().out.split()
    assert main(["pools"]) == 0
    assert capsys.readouterr().out.split() == mmrl.list_pools()


def test_info_reports_pooling_and_exponents(tmp_path, capsys):
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="ggem", pool_kwargs={"p_init": 2.5})
    mmrl.save_model(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["pool"] == "ggem" and info["p"] == [2.5] * 6 and info["name"] == "mmrl-vit-tiny-p8-64"


def test_bad_path_is_one_clear_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmrl", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("mmrl info: error:") and "open_clip_config.json" in lines[-1]
