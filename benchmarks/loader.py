"""Training-loader throughput: decoded, preprocessed, tokenized samples per second per worker.

Builds its own shards in a temporary folder (img2dataset layout: ``{key}.jpg`` 256 px,
``{key}.txt``, ``{key}.json``, ``sizes.json``; photo content from scikit-learn's two bundled
sample photos, randomly cropped, flipped and colour-shifted, or noise + gradients without
scikit-learn), then times, with ONE DataLoader worker each (the per-worker rate), at model
input 224 px (ViT-B-16's open_clip train transform, tokenizer context 77) and 64 px
(mmrl-vit-tiny-p8-64, context 32):

  mmrl            mmrl.data.make_train_loader (default settings)
  mmrl exact-PIL  the same with fast_resize=False (the transform's own PIL resize and crop)
  open_clip       open_clip_train.data.get_wds_dataset, if it runs (with webdataset 1.x it
                  crashes on the first shard boundary with KeyError: 'fname'; its module
                  imports pandas, unused by this function: a stub stands in when it is missing)
  webdataset      the plain pipeline: wds.WebDataset(urls).shuffle().decode("pilrgb")
                  .to_tuple("jpg", "txt").map_tuple(transform, tokenizer(t)[0]).batched(B)

All pipelines use the same shards, transform, tokenizer, batch size and shuffle buffer. Each
run covers one pass over the shards; the clock starts at the first batch (worker start-up
excluded). Pipelines alternate in rounds (the order rotates from round to round); a ratio
is the median over rounds of the two pipelines' rates in the same round, which cancels most
of the drift when other processes share the cores. The baseline of the ratios is open_clip's
pipeline when it runs, otherwise the plain webdataset pipeline. The last line printed is JSON:
  {"loader_over_baseline_224": R1, "loader_over_baseline_64": R2}
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
import types
from argparse import Namespace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import mmrl
from mmrl.data.loader import LoaderConfig, make_train_loader

WORDS = ("a photo of the red flower garden temple roof tree sky old city street person dog cat small large "
         "blue green sunny cloudy view near beautiful bright dark close up with and in on at").split()


def photo_sources():
    try:
        from sklearn.datasets import load_sample_images
        return [np.asarray(im) for im in load_sample_images().images], "scikit-learn sample photos"
    except Exception:  # noqa: BLE001 -- no scikit-learn: synthetic content
        rng = np.random.default_rng(1)
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([x / 640 * 255, y / 480 * 255, (x + y) / 1120 * 255], -1)
        noise = rng.normal(0, 25, base.shape)
        return [np.clip(base + noise, 0, 255).astype(np.uint8)], "noise + gradients"


def build_shards(folder: str, n_samples: int, n_shards: int, size: int = 256, quality: int = 95) -> str:
    photos, _ = photo_sources()
    rng = np.random.default_rng(0)
    per = -(-n_samples // n_shards)
    sizes, key = {}, 0
    for s in tqdm(range(n_shards), desc="building shards", unit="shard"):
        name = f"{s:05d}.tar"
        count = 0
        with tarfile.open(os.path.join(folder, name), "w") as tar:
            for _ in range(min(per, n_samples - key)):
                src = photos[key % len(photos)]
                side = int(rng.integers(size, min(src.shape[:2]) + 1))
                y0 = int(rng.integers(0, src.shape[0] - side + 1))
                x0 = int(rng.integers(0, src.shape[1] - side + 1))
                crop = src[y0:y0 + side, x0:x0 + side].astype(np.float32)
                crop = crop * rng.uniform(0.7, 1.3, 3) + rng.uniform(-20, 20, 3)
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
                k = f"{s:05d}{count:04d}"
                caption = " ".join(rng.choice(WORDS, int(rng.integers(5, 16))))
                meta = {"key": k, "caption": caption, "width": size, "height": size, "status": "success"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
                key += 1
        sizes[name] = count
    with open(os.path.join(folder, "sizes.json"), "w") as fh:
        json.dump(sizes, fh)
    return os.path.join(folder, "{%05d..%05d}.tar" % (0, n_shards - 1))  # noqa: UP031  (brace pattern)


def time_batches(batches, n_samples: int, desc: str) -> float:
    """Samples per second from the first batch to the end of the pass."""
    bar = tqdm(total=n_samples, desc=desc, unit="sample", leave=False)
    it = iter(batches)
    first = next(it)
    n0 = len(first[0] if isinstance(first, (tuple, list)) else first["image"])
    bar.update(n0)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        b = len(batch[0] if isinstance(batch, (tuple, list)) else batch["image"])
        n += b
        bar.update(b)
    dt = time.perf_counter() - t0
    bar.close()
    return n / dt


def run_mmrl(urls, transform, tokenizer, args, **overrides):
    cfg = LoaderConfig(train=urls, batch_size=args.batch_size, workers=1, shuffle_buffer=args.shuffle_buffer,
                       shuffle_initial=args.shuffle_buffer // 10, round_up=False, **overrides)
    loader = make_train_loader(cfg, transform, tokenizer)
    try:
        return time_batches(loader, loader.num_samples, "mmrl" + (" exact-PIL" if overrides else ""))
    finally:
        loader.close()


def run_webdataset(urls, transform, tokenizer, args):
    import webdataset as wds
    dataset = (wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
               .shuffle(args.shuffle_buffer, initial=args.shuffle_buffer // 10)
               .decode("pilrgb", handler=wds.warn_and_continue)
               .to_tuple("jpg", "txt")
               .map_tuple(transform, lambda text: tokenizer(text)[0])
               .batched(args.batch_size, partial=False))
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=1, persistent_workers=False)
    return time_batches(loader, args.samples, "webdataset")


def run_open_clip(urls, transform, tokenizer, args):
    """open_clip's own train pipeline; returns (rate, None) or (None, why it could not run)."""
    if "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:  # get_wds_dataset never uses pandas; open_clip_train.data imports it
            sys.modules["pandas"] = types.ModuleType("pandas")
    try:
        from open_clip_train.data import get_wds_dataset
    except Exception as exn:  # noqa: BLE001
        return None, f"import failed: {exn!r}"
    ns = Namespace(train_data=urls, val_data=None, train_num_samples=args.samples, dataset_resampled=False,
                   train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size, workers=1, world_size=1)
    info, rate, why = None, None, None
    try:
        info = get_wds_dataset(ns, transform, is_train=True, epoch=0, tokenizer=tokenizer)
        rate = time_batches(info.dataloader, args.samples, "open_clip")
    except Exception as exn:  # noqa: BLE001
        lines = [line.strip() for line in str(exn).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else repr(exn)   # a worker's error: its traceback's last line
        if not last.startswith(type(exn).__name__):
            last = f"{type(exn).__name__}: {last}"
        why = f"crashed: {last[:120]}"
    finally:
        # stop its persistent worker now: a crashed loader left for the garbage collector would
        # be finalised inside the next loaders' forked workers (harmless but noisy)
        it = getattr(getattr(info, "dataloader", None), "_iterator", None)
        if it is not None:
            it._shutdown_workers()
        del info
        gc.collect()
    return rate, why


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    models = {224: "ViT-B-16", 64: "mmrl-vit-tiny-p8-64"}
    rates = {}   # (size, pipeline) -> [samples/s per round]
    notes = {}
    with tempfile.TemporaryDirectory(prefix="mmrl-loader-bench-") as tmp:
        urls = build_shards(tmp, args.samples, args.shards)
        for size, model in models.items():
            _, transform, _ = mmrl.create_model_and_transforms(model, pool="tok")
            tokenizer = mmrl.get_tokenizer(model)
            rate, why = run_open_clip(urls, transform, tokenizer, args)
            notes[size] = why
            pipelines = {
                "mmrl": lambda: run_mmrl(urls, transform, tokenizer, args),
                "mmrl exact-PIL": lambda: run_mmrl(urls, transform, tokenizer, args, fast_resize=False),
                "webdataset": lambda: run_webdataset(urls, transform, tokenizer, args),
            }
            if rate is not None:
                pipelines["open_clip"] = lambda: run_open_clip(urls, transform, tokenizer, args)[0]
            names = list(pipelines)
            for r in tqdm(range(args.rounds), desc=f"{size} px rounds", unit="round"):
                for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                    rates.setdefault((size, name), []).append(pipelines[name]())

    medians = {k: statistics.median(v) for k, v in rates.items()}
    result = {}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; "
          f"{args.samples} samples of 256 px JPEG in {args.shards} shards ({photo_sources()[1]}), "
          f"batch {args.batch_size}, 1 worker, median of {args.rounds} rounds")
    for size in models:
        base_name = "open_clip" if notes[size] is None else "webdataset"
        print(f"\nmodel input {size} px ({models[size]}); open_clip get_wds_dataset: "
              f"{'ran' if notes[size] is None else notes[size]}")
        print(f"{'pipeline':<16}{'median samples/s':>17}   {'per round':<32}{'vs ' + base_name:>16}")
        base_runs = rates[(size, base_name)]
        for (s, name), value in medians.items():
            if s != size:
                continue
            runs = " ".join(f"{v:.0f}" for v in rates[(s, name)])
            paired = statistics.median(a / b for a, b in zip(rates[(s, name)], base_runs))
            print(f"{name:<16}{value:>17.1f}   {runs:<32}{paired:>15.2f}x")
            if name == "mmrl":
                result[f"loader_over_baseline_{size}"] = round(paired, 3)
    for key, value in result.items():
        print(f"target {key} >= 1.5: {'met' if value >= 1.5 else 'NOT met'} ({value})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**result, "samples_per_s": {f"{s}/{n}": v for (s, n), v in medians.items()},
                       "open_clip": notes}, fh, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
