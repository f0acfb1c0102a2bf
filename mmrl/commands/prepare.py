"""``mmrl prepare NAME --root DIR``: fetch a real corpus through package clients and lay it out."""
from __future__ import annotations

import argparse
import json

from ..prepare import RECIPES
from .registry import command

CORPORA = tuple(RECIPES)  # the registry's names (importing it loads no recipe module)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help=f"corpus: {', '.join(CORPORA)}")
    p.add_argument("--root", required=True, help="data folder; the corpus goes to ROOT/NAME/")
    p.add_argument("--limit", type=int, default=None, help="process at most this many source items (quick runs)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for rendering and sharding (default: all cores)")
    p.add_argument("--force", action="store_true", help="redo even if ROOT/NAME/manifest.json says it is done")


@command("prepare", "fetch and lay out a real corpus (" + ", ".join(CORPORA) + ")", _arguments)
def cmd_prepare(args: argparse.Namespace) -> int:
    from ..prepare import prepare

    manifest = prepare(args.name, args.root, limit=args.limit, workers=args.workers, force=args.force)
    data = json.loads(manifest.read_text())
    counts = {k: v for k, v in data.get("counts", {}).items()} if isinstance(data.get("counts"), dict) else {}
    detail = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in counts.items())
    print(f"{args.name}: ready in {manifest.parent}" + (f" ({detail})" if detail else ""))
    return 0
