"""``mmrl analyze --model M --data D [--out DIR] [--max-images N]``: what a model's pooling learned
(exponents, head-wise dependence per pool kind, activation maps), see :mod:`mmrl.analysis`."""
from __future__ import annotations

import argparse

from .registry import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="M",
                   help="a folder written by mmrl.save_model, or an architecture NAME (random init, see --pool)")
    p.add_argument("--data", required=True, metavar="D",
                   help="an image folder (flat or ROOT/<class>/<image>) or webdataset shards (.tar, {a..b}, a "
                        "folder of .tar files)")
    p.add_argument("--out", default="analysis", metavar="DIR", help="output folder (default analysis/)")
    p.add_argument("--max-images", type=int, default=500, metavar="N", help="images read (default 500)")
    p.add_argument("--pool", default=None, metavar="KIND", help="pooling for an architecture NAME (default ggem)")
    p.add_argument("--seed", type=int, default=0, help="random-init seed for an architecture NAME (default 0)")
    p.add_argument("--maps", type=int, default=4, metavar="K", help="images in the activation-map figure (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


@command("analyze", "inside a pooling: learned exponents, head-wise dependence (HSIC, CKA) per pool kind and "
                    "activation maps -> DIR/analysis.json, analysis.md and plots", _arguments)
def cmd_analyze(args: argparse.Namespace) -> int:
    import sys

    from ..analysis.run import run_analysis
    from ..evaluation.context import default_device

    if args.batch_size < 1 or args.maps < 1:
        raise ValueError(f"--batch-size and --maps must be >= 1, got {args.batch_size} and {args.maps}")
    run_analysis(args.model, args.data, args.out, pool=args.pool, max_images=args.max_images,
                 batch_size=args.batch_size, maps=args.maps, seed=args.seed, device=args.device or default_device(),
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
