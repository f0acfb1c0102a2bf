"""``mmrl analyze`` time on the demo's held-out Twemoji images (the demo report's analysis; goal < 60 s
on the 2-core CPU). The analysis time does not depend on training, so the demo's architecture
(``configs/demo.yaml``'s ``train.model`` and pool) is built with random weights, saved like the trained
model, and analysed exactly as ``mmrl demo`` does (:func:`mmrl.demo.run.analyze_for_report`).

    python benchmarks/analyze.py --root data     # after `mmrl prepare emoji --root data`

The last line is JSON: ``{"seconds": S, "images": N, "forward_s": F, "dependence": {pool: [hsic, cka]}}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data", help="the demo's data root (mmrl prepare emoji --root ROOT)")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = ap.parse_args()
    import mmrl
    from mmrl.demo.run import HELDOUT_IMAGES, analyze_for_report

    if args.threads:
        torch.set_num_threads(args.threads)
    train = yaml.safe_load(Path(args.config).read_text())["train"]
    if not (Path(args.root) / HELDOUT_IMAGES).is_dir():
        raise SystemExit(f"{Path(args.root) / HELDOUT_IMAGES}: not found (mmrl prepare emoji --root {args.root})")
    torch.manual_seed(0)
    model = mmrl.create_model(train["model"], pool=train.get("pool", "ggem"))
    with tempfile.TemporaryDirectory() as tmp:
        saved = mmrl.save_model(model, Path(tmp) / "model")
        t0 = time.perf_counter()
        analysis = analyze_for_report(saved, Path(args.root), Path(tmp) / "analysis", lambda m: None)
        seconds = time.perf_counter() - t0
    print(f"{train['model']} ({train.get('pool', 'ggem')}, random init) on {analysis['data']['images']} held-out "
          f"Twemoji images: {seconds:.1f} s (forward {analysis['seconds']['forward']:.1f} s), "
          f"{torch.get_num_threads()} threads")
    dep = {k: [round(v["hsic_offdiag_mean"], 5), round(v["cka_offdiag_mean"], 4)] for k, v in
           analysis["dependence"].items()}
    print(json.dumps({"seconds": round(seconds, 2), "images": analysis["data"]["images"],
                      "forward_s": round(analysis["seconds"]["forward"], 2), "dependence": dep}))


if __name__ == "__main__":
    main()
