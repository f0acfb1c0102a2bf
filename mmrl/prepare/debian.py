"""Debian packages as data sources: ``apt-get download PKG`` + extraction into ``root/_debs``.

Nothing is installed system-wide: the ``.deb`` is downloaded with apt's own client (so it comes
from the machine's configured Debian mirror) and unpacked with ``dpkg-deb`` into
``root/_debs/PKG/``. A marker file there records the package version; a later run that finds
it reuses the unpacked tree without touching the network. Delete ``root/_debs/PKG`` to fetch
again. The downloaded ``.deb`` is removed once unpacked.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import PrepareError, log

__all__ = ["DebPackage", "fetch_deb"]

MARKER = ".mmrl-unpacked.json"


@dataclass
class DebPackage:
    """An unpacked Debian package: ``dir`` is the root of its file tree (``dir/usr/share/...``)."""

    name: str
    version: str
    dir: Path

    def source(self, licence: str, what: str, **extra: Any) -> dict[str, Any]:
        """Manifest entry for this package."""
        copyright_file = self.dir / "usr/share/doc" / self.name / "copyright"
        return {"name": self.name, "client": "apt", "version": self.version, "license": licence, "what": what,
                "copyright_file": str(copyright_file) if copyright_file.exists() else None, **extra}


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise PrepareError(f"{cmd[0]} not found: the Debian data sources need apt-get and dpkg-deb "
                           f"(a Debian or Ubuntu machine)") from err


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("W:")]
    return lines[-1] if lines else "no output"


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download package`` into ``dest``; runs ``apt-get update`` once when the package
    lists are missing. Returns the ``.deb`` path."""
    cmd = ["apt-get"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-o", "APT::Sandbox::User=root"]  # root may write where the _apt user cannot
    cmd += ["download", package]
    proc = _run(cmd, cwd=dest)
    if proc.returncode != 0:
        log(f"apt-get download {package} failed ({_last_line(proc.stderr)}); running apt-get update")
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise PrepareError(f"apt-get update failed ({_last_line(update.stderr)}); run it as root "
                               f"(sudo apt-get update) and try again")
        proc = _run(cmd, cwd=dest)
        if proc.returncode != 0:
            raise PrepareError(f"apt-get download {package} failed: {_last_line(proc.stderr)}")
    debs = sorted(dest.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise PrepareError(f"apt-get download {package} reported success but wrote no {package}_*.deb in {dest}")
    return debs[-1]


def fetch_deb(package: str, root: Path, *, exclude: Sequence[str] = ()) -> DebPackage:
    """Download and unpack Debian ``package`` under ``root/_debs`` (reused when already there).

    ``exclude`` lists tar wildcard patterns of members not to unpack (e.g. ``"*.ogg"``)."""
    debs_dir = Path(root) / "_debs"
    target = debs_dir / package
    marker = target / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("exclude", []) == list(exclude):
            return DebPackage(package, info["version"], target)
    debs_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs_dir.glob(f"{package}_*.deb"))
    if existing:
        deb = existing[-1]
    else:
        log(f"downloading Debian package {package} (apt-get download)")
        deb = _apt_download(package, debs_dir)
    proc = _run(["dpkg-deb", "--field", str(deb), "Version"])
    if proc.returncode != 0:
        raise PrepareError(f"{deb}: not a readable Debian package ({_last_line(proc.stderr)}); delete it and retry")
    version = proc.stdout.strip()
    log(f"unpacking {deb.name}")
    tmp = debs_dir / f".{package}.unpacking-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if exclude:
        # dpkg-deb -x cannot skip members; stream the data tarball through tar instead
        excludes = " ".join(f"--exclude={shlex.quote(pattern)}" for pattern in exclude)
        script = f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -x -C {shlex.quote(str(tmp))} {excludes}"
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True)
    else:
        proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(f"{deb}: unpacking failed ({_last_line(proc.stderr)}); delete it and retry")
    (tmp / MARKER).write_text(json.dumps({"package": package, "version": version, "deb": deb.name,
                                          "exclude": list(exclude)}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    deb.unlink()
    return DebPackage(package, version, target)
