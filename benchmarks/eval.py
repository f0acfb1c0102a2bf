"""Evaluation benchmark: retrieval metrics and the linear probe against the reference paths.

1. Retrieval metrics for 5,000 images x 25,000 captions (random unit embeddings, D=512, five
   captions per image, captions correlated with their image so that the recalls are not near 0):
   mmrl's chunked ranking (``retrieval_metrics``) against CLIP_benchmark's ``recall_at_k`` path as
   its ``zeroshot_retrieval.evaluate`` runs it (full ``scores`` and ``positive_pairs`` matrices,
   ``batchify(recall_at_k, ...)`` in blocks of the dataloader batch size, for K = 1, 5, 10 in both
   directions), both starting from the same embeddings. Each runs in its own process; peak memory
   is the process's peak resident set size minus its size once the embeddings are built, measured
   twice: with glibc's default allocator (freed blocks may stay resident) and with
   ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks returned at once, so the peak is that of the live
   tensors; times come from the default runs). The reported ratio uses the live-tensor peaks.
2. Linear probe on a fixed synthetic feature set: mmrl's L-BFGS probe (coarse-to-fine sweep on a
   validation split, refit) against the same protocol with scikit-learn's ``LogisticRegression``
   (lbfgs) as the solver; test accuracies are printed next to the times.

The last line is JSON: ``{"retrieval_speedup": R, "retrieval_peak_mem_ratio": M, "probe_speedup": P}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

N_IMAGES, N_CAPTIONS, DIM = 5000, 25000, 512
NOISE = 8.0  # caption = normalise(image + NOISE * random unit vector): R@1 about 0.2-0.45


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _embeddings(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N_IMAGES, DIM, generator=g)
    images /= images.norm(dim=1, keepdim=True)
    owner = torch.arange(N_CAPTIONS) // (N_CAPTIONS // N_IMAGES)
    texts = torch.randn(N_CAPTIONS, DIM, generator=g)
    texts /= texts.norm(dim=1, keepdim=True)
    texts *= NOISE
    texts += images[owner]  # in place: no second copy
    texts /= texts.norm(dim=1, keepdim=True)
    return images, texts, owner


def _child(method: str, batch_size: int) -> None:
    """Runs in a subprocess: one method, prints its metrics, time and peak memory as JSON."""
    import torch
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    from mmrl.evaluation.retrieval import retrieval_metrics

    images, texts, owner = _embeddings()
    owner_list = owner.tolist()
    base = _rss_bytes()  # after imports and embeddings: only the method's own memory counts
    t0 = time.perf_counter()
    if method == "mmrl":
        metrics = retrieval_metrics(texts, images, owner_list)
    else:
        scores = texts @ images.t()
        positive_pairs = torch.zeros_like(scores, dtype=bool)
        positive_pairs[torch.arange(len(scores)), owner] = True
        metrics = {}
        for k in (1, 5, 10):
            metrics[f"image_retrieval_recall@{k}"] = (
                batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0).float().mean().item()
            metrics[f"text_retrieval_recall@{k}"] = (
                batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0).float().mean().item()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "seconds": seconds, "peak_bytes": peak - base, "metrics": metrics}))


def _run_child(method: str, batch_size: int, live: bool = False) -> dict:
    env = dict(os.environ)
    if live:  # every large block mmapped and unmapped when freed: RSS follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, __file__, "--child", method, "--batch-size", str(batch_size)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def retrieval(batch_size: int, repeats: int) -> dict:
    methods = ("clip_benchmark", "mmrl")
    timed = {m: min((_run_child(m, batch_size) for _ in range(repeats)), key=lambda x: x["seconds"]) for m in methods}
    live = {m: _run_child(m, batch_size, live=True) for m in methods}
    cb, ours = timed["clip_benchmark"], timed["mmrl"]
    keys = sorted(cb["metrics"])
    equal = all(abs(cb["metrics"][k] - ours["metrics"][k]) < 1e-6 for k in keys)
    print(f"retrieval: {N_IMAGES:,} images x {N_CAPTIONS:,} captions, D={DIM}, K=1/5/10 both directions "
          f"(CLIP_benchmark blocks of {batch_size} rows, its CLI default; best of {repeats} run(s) each)")
    print(f"  {'method':<16} {'seconds':>9} {'peak MiB (glibc default)':>25} {'peak MiB (live tensors)':>24}")
    for m in methods:
        print(f"  {m:<16} {timed[m]['seconds']:>9.2f} {timed[m]['peak_bytes'] / 2**20:>25.0f} "
              f"{live[m]['peak_bytes'] / 2**20:>24.0f}")
    print(f"  {'metric':<28} {'clip_benchmark':>14} {'mmrl':>10}")
    for k in keys:
        print(f"  {k:<28} {cb['metrics'][k]:>14.6f} {ours['metrics'][k]:>10.6f}")
    print(f"  numbers equal (|diff| < 1e-6; CLIP_benchmark averages in float32): {equal}")
    # the memory ratio uses the live-tensor peaks, the less flattering of the two measurements
    return {"speedup": cb["seconds"] / ours["seconds"],
            "mem_ratio": live["mmrl"]["peak_bytes"] / live["clip_benchmark"]["peak_bytes"], "equal": equal}


def probe(n_train: int, n_test: int, dim: int, classes: int) -> dict:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from mmrl.evaluation.linear_probe import LinearProbeOptions, coarse_to_fine, linear_probe, stratified_split

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 0.01
    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return centres[y] + torch.randn(n, dim, generator=g) / dim ** 0.5 * 3, y
    x, y = sample(n_train)
    xt, yt = sample(n_test)
    opts = LinearProbeOptions()

    t0 = time.perf_counter()
    metrics, details = linear_probe(x, y, xt, yt, classes, opts)
    ours_s = time.perf_counter() - t0

    # the same protocol (split, grid, coarse-to-fine, refit) with scikit-learn as the solver
    t0 = time.perf_counter()
    tr, va = stratified_split(y, opts.val_proportion, opts.seed)
    grid = opts.grid()
    xn, yn = x.double().numpy(), y.numpy()

    def fit(i, rows):
        return LogisticRegression(C=1.0 / (grid[i] * len(rows)), max_iter=opts.max_iter).fit(xn[rows], yn[rows])

    best, trace = coarse_to_fine(len(grid), lambda i: fit(i, tr.numpy()).score(xn[va.numpy()], yn[va.numpy()]))
    ref = fit(best, np.arange(len(yn)))
    sk_acc = ref.score(xt.double().numpy(), yt.numpy())
    sk_s = time.perf_counter() - t0
    print(f"linear probe: {n_train:,} train / {n_test:,} test features, D={dim}, {classes} classes; "
          f"coarse-to-fine sweep over logspace(-6, 2, 97) on a 20% val split, refit on train+val")
    print(f"  {'solver':<28} {'seconds':>9} {'fits':>5} {'test acc1':>10} {'chosen lambda':>14}")
    print(f"  {'mmrl (torch L-BFGS)':<28} {ours_s:>9.2f} {details['fits']:>5} {metrics['lp_acc1']:>10.4f} "
          f"{details['chosen_l2_lambda']:>14.3g}")
    print(f"  {'scikit-learn (lbfgs)':<28} {sk_s:>9.2f} {len(trace) + 1:>5} {sk_acc:>10.4f} {grid[best]:>14.3g}")
    return {"speedup": sk_s / ours_s, "acc_gap": metrics["lp_acc1"] - sk_acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64, help="CLIP_benchmark's block size (its CLI default 64)")
    p.add_argument("--repeats", type=int, default=1, help="runs per retrieval method (best time kept)")
    p.add_argument("--probe-train", type=int, default=20000)
    p.add_argument("--probe-test", type=int, default=5000)
    p.add_argument("--probe-dim", type=int, default=512)
    p.add_argument("--probe-classes", type=int, default=10)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.batch_size)
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    r = retrieval(args.batch_size, args.repeats)
    pr = probe(args.probe_train, args.probe_test, args.probe_dim, args.probe_classes)
    print(json.dumps({"retrieval_speedup": round(r["speedup"], 2), "retrieval_peak_mem_ratio": round(r["mem_ratio"], 3),
                      "probe_speedup": round(pr["speedup"], 2)}))


if __name__ == "__main__":
    main()
