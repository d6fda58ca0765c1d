#!/usr/bin/env python3
"""How crowded BigramHash's buckets are on a text: for each bucket count asked for, the share of a bucket's
occurrences that belong to the (previous, current) token pair that looks it up, averaged over every occurrence.

    python3 tools/bigram_buckets.py data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    python3 tools/bigram_buckets.py SHARD [SHARD ...] --buckets 2048,4096,16384 --bos-id 1

A share of 1.0 means each pair the text uses has its bucket to itself; at 0.15 the table row a pair reads and trains
is, by occurrences, 85% other pairs' (BigramHash's table is one vector per bucket, so colliding pairs share it).
Pairs are counted as the model forms them (train_gpt.GPT.embed): the shards read as one stream, and a pair whose
current token is the BOS (`--bos-id`, the tokenizer's, as BOS_ID) is no pair, the model's "no previous token"
(bucket 0, which no pair shares). The hash is train_gpt.BigramHash.bucket itself, so the figures are the model's.

Why (RESULTS.md, lease 32): BigramHash at 2,048 buckets scored 0.011 worse after TTT on the one-GDN default, its
training loss 0.018-0.045 higher; this says how much of such a table can hold a pair's own statistics at all.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def pair_counts(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The distinct (previous, current) pairs of a token stream and how often each occurs, leaving out pairs whose
    current token is the BOS; also how many such BOS positions there were."""
    prev = np.asarray(tokens[:-1], dtype=np.int64)
    cur = np.asarray(tokens[1:], dtype=np.int64)
    keep = cur != bos_id
    keys, counts = np.unique(prev[keep] * 65536 + cur[keep], return_counts=True)
    return keys // 65536, keys % 65536, counts, int((~keep).sum())


def own_share(prev: np.ndarray, cur: np.ndarray, counts: np.ndarray, buckets: int) -> float:
    """Mean over occurrences of (this pair's count / its bucket's count), with the model's hash."""
    bucket = tg.BigramHash(buckets, 1, 1).bucket(torch.from_numpy(prev), torch.from_numpy(cur)).numpy()
    if (bucket == 0).any():
        raise AssertionError("a pair with a previous token hashed to bucket 0, the model's 'no previous token'")
    totals = np.bincount(bucket, weights=counts, minlength=buckets)
    return float((counts.astype(np.float64) ** 2 / totals[bucket]).sum() / counts.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+", help="challenge-format token shards, read as one stream")
    ap.add_argument("--buckets", default="2048,4096,8192,16384",
                    help="bucket counts, comma-separated (BIGRAM_BUCKETS: each at least 2)")
    ap.add_argument("--bos-id", type=int, default=tg.Config.bos_id, help="the tokenizer's BOS id (BOS_ID)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(b) for b in args.buckets.split(",")]
    except ValueError:
        ap.error(f"--buckets {args.buckets!r} is not a comma-separated list of integers")
    if any(b < 2 for b in sizes):
        ap.error(f"--buckets {args.buckets}: every count must be at least 2 (bucket 0 is 'no previous token')")
    tokens = np.concatenate([np.asarray(tg.read_shard(p)) for p in args.shards])
    if len(tokens) < 2:
        ap.error(f"{len(tokens)} tokens: no pairs to count")
    prev, cur, counts, at_bos = pair_counts(tokens, args.bos_id)
    if counts.sum() == 0:
        ap.error("every token after the first is the BOS: no pairs to count")
    ranked = np.sort(counts)[::-1]
    half = int(np.searchsorted(np.cumsum(ranked), ranked.sum() / 2) + 1)
    print(f"{len(tokens):,} tokens, {int(counts.sum()):,} pairs ({at_bos:,} positions at a BOS left out), "
          f"{len(counts):,} distinct; the {half:,} commonest hold half the occurrences")
    print("| buckets | distinct pairs per bucket | own share of the bucket, per occurrence |")
    print("|---|---|---|")
    for b in sizes:
        print(f"| {b:,} | {len(counts) / (b - 1):.1f} | {own_share(prev, cur, counts, b):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
