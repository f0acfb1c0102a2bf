"""``mmrl models``, ``mmrl pools``, ``mmrl info``: what architectures and models there are."""
from __future__ import annotations

import argparse
import json

from .registry import command


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also list open_clip's ViT configs")


@command("models", "list model architectures", _models_args)
def cmd_models(args: argparse.Namespace) -> int:
    from ..model import list_models

    for name in list_models(include_open_clip=args.all):
        print(name)
    return 0



@command("pools", "list pooling kinds")
def cmd_pools(args: argparse.Namespace) -> int:
    from ..pooling import list_pools

    print("\n".join(list_pools()))
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="folder written by mmrl.save_model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("info", "describe a saved model: architecture, pooling, learned exponents", _info_args)
def cmd_info(args: argparse.Namespace) -> int:
    from ..model import describe_model, load_model

    model, _, _ = load_model(args.path)
    info = describe_model(model).as_dict()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0



