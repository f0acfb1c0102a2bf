"""The real demo corpora, prepared once per test session on small slices of the real packages
(the fixtures ``corpora``, ``emoji``, ``tuxpaint``, ``fashion``, ``openclipart``, ``glyphs`` in conftest.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmrl.prepare import prepare

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                               reason="the Debian-packaged corpora need apt-get and dpkg-deb")

LIMITS = {"emoji": 150, "tuxpaint": 80, "fashion-mnist": 120, "openclipart": 60, "glyphs": 40}


def prepared(root: Path, name: str) -> dict:
    path = prepare(name, root, limit=LIMITS[name], workers=2)
    assert path == root / name / "manifest.json"
    return json.loads(path.read_text())
