#!/usr/bin/env python3
"""Where one artifact beats another: both scored on the same validation tokens, target by target, and the
difference split by where the target sits in its document, by how common its token is, and by document.

    DATA_PATH=... TOKENIZER_PATH=... python3 tools/compare_artifacts.py artifacts/hyb.pgz artifacts/attn.pgz
    VAL_MAX_TOKENS=131072 EVAL_STRIDE=0 python3 tools/compare_artifacts.py A.pgz B.pgz     # a quick look on a CPU
    python3 tools/compare_artifacts.py --a "TTT_ENABLED=1 TTT_LR=0.003" --b "TTT_ENABLED=1 TTT_LR=0.001" A.pgz B.pgz
    python3 tools/compare_artifacts.py --b "TTT_ENABLED=1" A.pgz A.pgz          # where TTT gains, on one artifact

Every train_gpt.py setting applies (DATA_PATH, TOKENIZER_PATH, VOCAB_SIZE, EVAL_SEQ_LEN, EVAL_STRIDE,
VAL_MAX_TOKENS, TTT_*); the evaluation is by default the window mode without TTT (sliding windows of stride 512),
the score the script logs before TTT. `--a` and `--b` add evaluation settings (EVAL_*, TTT_*, STREAM_*) for one side
only: with TTT_ENABLED=1 that side is scored with score-first TTT as EVAL_ONLY scores it (eagerly, as with
TTT_COMPILE=0), each target's loss the one it had when its chunk was scored. Both artifacts must have the
tokenizer's vocabulary, and each side's settings must suit its artifact's model (streaming needs layers with bounded
state; TTT_PARAMS must select some of its parameters): both are checked before either side is scored. Rows, each with its targets, bytes, each side's bpb over those bytes and A - B:
- position in the document: how many tokens of the target's document come before it, its BOS included (1 = the
  first token after the BOS; before the stream's first BOS, the stream's first token stands for one);
- token frequency: the target token's rank by how often it occurs among the validation targets (ranks 1-64 are the
  commonest tokens);
- documents: how many documents (and how many of their bytes) each artifact scores better, the median
  per-document difference, and A - B over the tenth of documents where A does worst against B, and best.
The rows of a grouping partition the targets, so the bytes-weighted mean of their differences is the total's.
Figures also print as one `compare {json}` line. One process (python3, not torchrun).
"""

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval_by_context as ebc  # noqa: E402 (this directory: its bucketing and artifact loading)
import train_gpt as tg  # noqa: E402

POSITION_EDGES = (1, 2, 17, 129, 513, 2049)  # rows 1, 2-16, 17-128, 129-512, 513-2048, 2049+
RANK_EDGES = (1, 65, 257, 1025)  # rows 1-64, 65-256, 257-1024, 1025+


def positions_in_document(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """For every target index t >= 1: how many tokens of its document precede it, its BOS included (so 1 for the
    first token after a BOS); before the stream's first BOS the stream's first token stands for it. Index 0 unused."""
    n = len(tokens)
    idx = torch.arange(n)
    first = torch.cummax(torch.where(tokens == bos_id, idx, torch.zeros_like(idx)), 0).values  # latest BOS at or before
    pos = torch.zeros(n, dtype=torch.long)
    pos[1:] = idx[1:] - first[:-1]  # tokens first[t - 1] .. t - 1
    return pos


def frequency_ranks(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """For every target index t >= 1: the rank (1 = commonest) of tokens[t] by its count among targets 1..n-1;
    ties broken by token id. Index 0 unused."""
    counts = torch.bincount(tokens[1:], minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    rank_of = torch.empty(vocab_size, dtype=torch.long)
    rank_of[torch.tensor(order)] = torch.arange(1, vocab_size + 1)
    ranks = torch.zeros(len(tokens), dtype=torch.long)
    ranks[1:] = rank_of[tokens[1:]]
    return ranks


def split_rows(key: torch.Tensor, edges: tuple, nll_a: torch.Tensor, nll_b: torch.Tensor,
               nbytes: torch.Tensor) -> list[dict]:
    """One row per bucket [edges[i], edges[i+1]) of `key` (the last open-ended) over targets 1..n-1."""
    return [summed(label, sel, nll_a, nll_b, nbytes) for label, sel in ebc.buckets(key, edges)]


def summed(name: str, sel: torch.Tensor, nll_a: torch.Tensor, nll_b: torch.Tensor, nbytes: torch.Tensor) -> dict:
    b = int(nbytes[sel].sum())
    a_sum, b_sum = float(nll_a[sel].sum()), float(nll_b[sel].sum())
    per_byte = (lambda nll: nll / (math.log(2) * b)) if b else (lambda nll: None)  # e.g. targets that are all BOS
    return dict(row=name, targets=int(sel.sum()), bytes=b, nll_a=a_sum, nll_b=b_sum, bpb_a=per_byte(a_sum),
                bpb_b=per_byte(b_sum))


def document_figures(tokens: torch.Tensor, bos_id: int, nll_a: torch.Tensor, nll_b: torch.Tensor,
                     nbytes: torch.Tensor) -> dict:
    """Per document (targets grouped by the latest BOS before them; a BOS target belongs to the document it ends):
    how many each artifact scores better (in nats per byte) and their bytes, the median per-document A - B, and the
    tenth of documents where A - B per byte is largest (`worst_tenth`) and smallest (`best_tenth`): their count,
    bytes and A - B in bpb over those bytes. Documents without bytes (a BOS right after a BOS) are left out."""
    doc = torch.cumsum((tokens == bos_id).long(), 0)  # a BOS at i starts document doc[i]
    of_target = doc[:-1]  # target t belongs to the document of token t - 1
    count = int(of_target.max()) + 1
    d_nats = torch.zeros(count, dtype=torch.float64).index_add_(0, of_target, (nll_a - nll_b)[1:])
    d_bytes = torch.zeros(count, dtype=torch.long).index_add_(0, of_target, nbytes[1:])
    present = d_bytes > 0
    d_nats, d_bytes = d_nats[present], d_bytes[present]
    per_byte = d_nats / d_bytes
    order = torch.argsort(per_byte, descending=True)
    tenth = max(1, len(order) // 10)

    def part(sel: torch.Tensor) -> dict:
        b = int(d_bytes[sel].sum())
        return dict(documents=len(sel), bytes=b, bpb_difference=float(d_nats[sel].sum()) / (math.log(2) * b))

    return dict(documents=len(per_byte), a_better=int((per_byte < 0).sum()), b_better=int((per_byte > 0).sum()),
                bytes_a_better=int(d_bytes[per_byte < 0].sum()), bytes_b_better=int(d_bytes[per_byte > 0].sum()),
                median_bpb_difference=float(per_byte.median()) / math.log(2),
                worst_tenth=part(order[:tenth]), best_tenth=part(order[-tenth:]))


SIDE_PREFIXES = ("EVAL_", "TTT_", "STREAM_")  # what --a and --b may set: how a side is scored, not on what


def side_settings(text: str, flag: str) -> dict[str, str]:
    """`--a`/`--b`'s 'KEY=VALUE ...': evaluation settings only, since both sides must score the same tokens."""
    settings = {}
    for item in shlex.split(text):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"{flag}: {item!r} is not KEY=VALUE")
        if not key.startswith(SIDE_PREFIXES) or key == "EVAL_ONLY":
            raise SystemExit(f"{flag}: {key} is not an evaluation setting ({', '.join(p + '*' for p in SIDE_PREFIXES)}"
                             "); the data, the tokenizer and VAL_MAX_TOKENS are the same for both sides")
        settings[key] = value
    return settings


def side_config(settings: dict[str, str], flag: str, path: Path) -> tg.Config:
    """The side's settings read as EVAL_ONLY reads them for the artifact at `path`: the model is the file's, so the
    checks against LAYOUT (which one cannot set here) are left to the artifact's layout (`check_side`)."""
    env = {**os.environ, "EVAL_MODE": "window", "TTT_ENABLED": "0", **settings, "EVAL_ONLY": "1",
           "ARTIFACT_PATH": str(path)}
    try:
        return tg.Config.from_env(env)
    except ValueError as e:
        raise SystemExit(f"{flag}: {e}") from None


def check_side(model: torch.nn.Module, cfg: tg.Config, flag: str, path: Path) -> None:
    """What the side's settings ask of the artifact's model, checked before either side is scored."""
    if cfg.eval_mode == "stream":
        ebc.require_streamable(model.mc, path, f"{flag}: EVAL_MODE=stream: ")
    try:
        tg.require_ttt_selection(model, cfg)  # nothing to check with TTT off
    except ValueError as e:
        raise SystemExit(f"{flag}: {path}: {e}") from None


def describe(cfg: tg.Config) -> str:
    if cfg.eval_mode == "stream":
        how = f"streaming{' with resets at BOS' if cfg.stream_reset else ''}"
    else:
        how = f"windows of {cfg.eval_len}" + (f", stride {cfg.stride}" if cfg.stride < cfg.eval_len else "")
    if not cfg.ttt_enabled:
        return how + ", no TTT"
    return (how + f", TTT {cfg.ttt_optimizer} lr {cfg.ttt_lr:g}, {cfg.ttt_epochs} epochs, chunks of "
            f"{cfg.ttt_chunk_tokens}, {cfg.ttt_params} parameters")


def console_log(msg: str, console: bool = True) -> None:
    """train_gpt's log lines on the console: backends and kernel checks, TTT's summary, an EVAL_MAX_SECONDS stop."""
    print(msg, flush=True)


def score(model: torch.nn.Module, path: Path, cfg: tg.Config, rt: tg.Runtime, log: Callable[..., None],
          tokens: torch.Tensor, tables: tg.ByteTables) -> tuple[tg.EvalResult, torch.Tensor]:
    """One artifact's score under `cfg` and its per-target losses (every target scored exactly once, checked)."""
    tally = tg.Tally(rt.device, track=len(tokens))
    if cfg.ttt_enabled:
        result = tg.evaluate_ttt(model, tokens, tables, cfg, rt, log, tally=tally)
    else:
        result = tg.evaluate_base(model, tokens, tables, cfg, rt, tally)
    ebc.require_scored_once(tally, f"{path}: the evaluation")
    return result, tally.nll_at


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="artifact A")
    p.add_argument("b", type=Path, help="artifact B (may be A again, under other settings)")
    p.add_argument("--a", dest="a_settings", default="", metavar="'KEY=VALUE ...'", help="settings for A only")
    p.add_argument("--b", dest="b_settings", default="", metavar="'KEY=VALUE ...'", help="settings for B only")
    args = p.parse_args(argv)
    sides = [(path, flag, side_config(side_settings(text, flag), flag, path))
             for path, text, flag in ((args.a, args.a_settings, "--a"), (args.b, args.b_settings, "--b"))]
    cfg_a, cfg_b = sides[0][2], sides[1][2]
    rt = tg.init_runtime(cfg_a)
    if rt.world_size != 1:
        raise SystemExit("compare_artifacts.py runs as one process (python3, not torchrun)")
    tables, tokens, checked = tg.load_scoring_text(cfg_a, rt.device)
    print(checked)
    models = []
    for path, flag, cfg in sides:  # both read and checked before either is scored
        models.append(ebc.load_artifact_model(path, cfg, rt, console_log, "compare_artifacts")[1])
        check_side(models[-1], cfg, flag, path)
    (res_a, nll_a), (res_b, nll_b) = (score(model, path, cfg, rt, console_log, tokens, tables)
                                      for model, (path, _, cfg) in zip(models, sides))
    layout_a, layout_b = (model.mc.layout for model in models)
    n = len(tokens)
    nbytes = ebc.target_bytes(tokens, tables, rt)
    groups = {"position in document": split_rows(positions_in_document(tokens, tables.bos_id), POSITION_EDGES,
                                                  nll_a, nll_b, nbytes),
              "token frequency rank": split_rows(frequency_ranks(tokens, cfg_a.vocab_size), RANK_EDGES,
                                                 nll_a, nll_b, nbytes)}
    docs = document_figures(tokens, tables.bos_id, nll_a, nll_b, nbytes)
    eval_a, eval_b = describe(cfg_a), describe(cfg_b)
    print(f"A {args.a} ({layout_a}): {eval_a}")
    print(f"B {args.b} ({layout_b}): {eval_b}")
    print(f"{n} validation tokens")
    for name, rows in groups.items():
        print(f"{name:>22} {'targets':>9} {'bytes':>9} {'bpb A':>8} {'bpb B':>8} {'A-B':>8} {'share of A-B':>13}")
        total = res_a.bpb - res_b.bpb
        for r in rows:
            if not r["bytes"]:  # no bytes, so no bpb; its losses still count in the total
                print(f"{r['row']:>22} {r['targets']:>9} {0:>9} {'—':>8} {'—':>8} {'—':>8} {'—':>13}")
                continue
            d = r["bpb_a"] - r["bpb_b"]
            share = d * r["bytes"] / (total * res_a.bytes) if total else 0.0
            print(f"{r['row']:>22} {r['targets']:>9} {r['bytes']:>9} {r['bpb_a']:>8.4f} {r['bpb_b']:>8.4f} {d:>+8.4f} "
                  f"{share:>13.0%}")
        print(f"{'all':>22} {res_a.tokens:>9} {res_a.bytes:>9} {res_a.bpb:>8.4f} {res_b.bpb:>8.4f} {total:>+8.4f}")
    print(f"documents: {docs['documents']}; A better on {docs['a_better']} ({docs['bytes_a_better']:,} bytes), "
          f"B better on {docs['b_better']} ({docs['bytes_b_better']:,} bytes); median per-document A-B "
          f"{docs['median_bpb_difference']:+.4f} bpb")
    for name, key in (("worst", "worst_tenth"), ("best", "best_tenth")):
        part = docs[key]
        print(f"  the tenth of documents where A does {name} against B: {part['documents']} documents, "
              f"{part['bytes']:,} bytes, A-B {part['bpb_difference']:+.4f} bpb over them")
    print("compare " + json.dumps(dict(a=str(args.a), b=str(args.b), eval_a=eval_a, eval_b=eval_b, bpb_a=res_a.bpb,
                                       bpb_b=res_b.bpb, tokens=res_a.tokens, bytes=res_a.bytes, groups=groups,
                                       documents=docs)))


if __name__ == "__main__":
    main()
