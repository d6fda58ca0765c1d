#!/usr/bin/env python3
"""Where streaming evaluation gains or loses against windows: one artifact scored both ways, target by target, with
the targets grouped by how many earlier tokens of its lane the streaming scorer had seen (with STREAM_RESET, which
restarts the state at each BOS, the tokens since the latest BOS when they are fewer).

    ARTIFACT_PATH=artifacts/run.pgz python3 tools/eval_by_context.py                 # stream vs sliding windows (512)
    ARTIFACT_PATH=artifacts/run.pgz EVAL_STRIDE=0 python3 tools/eval_by_context.py   # stream vs plain windows
    ARTIFACT_PATH=... EVAL_SEQ_LEN=8192 VAL_MAX_TOKENS=131072 STREAM_LANES=8 python3 tools/eval_by_context.py

Every train_gpt.py setting applies (DATA_PATH, TOKENIZER_PATH, EVAL_SEQ_LEN, EVAL_STRIDE, STREAM_LANES,
STREAM_SEGMENT, STREAM_WARMUP, STREAM_RESET (segments of 2048 unless set), VAL_MAX_TOKENS). The windows' length is
EVAL_SEQ_LEN, or TRAIN_SEQ_LEN when unset: set it to the length the artifact was trained at. A window gives each
target at most EVAL_SEQ_LEN - 1 tokens of context; a lane gives its GDN layers every earlier token of the lane, so
the rows past EVAL_SEQ_LEN show what the unbounded context is worth, or costs where the recurrent state was never
trained that far. Per row: targets, bytes, bpb of each mode and their difference; the totals are the two modes'
whole scores. No TTT; one process. Figures also print as one `by_context {json}` line.
"""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

EDGES = (0, 128, 512, 2048, 4096, 8192, 16384, 32768)


def lane_context(tokens: torch.Tensor, cfg: tg.Config, bos_id: int) -> torch.Tensor:
    """For every target index 1..n-1: how many earlier inputs the stream scorer's state holds for its input, the
    lane's warmup included (index 0 unused): those read in its lane, and with STREAM_RESET, which restarts every
    layer at each BOS, at most those since the latest BOS (0 at the BOS itself)."""
    n_tokens = len(tokens)
    ctx = torch.zeros(n_tokens, dtype=torch.long)
    for s, e in tg.stream_lanes(n_tokens, cfg.stream_lanes):
        ctx[s + 1: e + 1] = torch.arange(e - s) + min(s, cfg.stream_warmup)
    if cfg.stream_reset:  # the input's own position in its document: the target's, less one
        from compare_artifacts import positions_in_document  # noqa: PLC0415 (it imports this file)

        ctx[1:] = torch.minimum(ctx[1:], positions_in_document(tokens.cpu(), bos_id)[1:] - 1)
    return ctx


def buckets(key: torch.Tensor, edges: tuple) -> list[tuple[str, torch.Tensor]]:
    """(label, mask over the target indices) of each non-empty bucket [edges[i], edges[i+1]) of `key`, the last
    open-ended, over targets 1..n-1 (index 0 is no target)."""
    out = []
    for lo, hi in zip(edges, edges[1:] + (None,)):
        sel = key >= lo if hi is None else (key >= lo) & (key < hi)
        sel[0] = False
        if sel.any():
            out.append((f"{lo}+" if hi is None else f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}", sel))
    return out


def bucket_rows(ctx: torch.Tensor, nll_w: torch.Tensor, nll_s: torch.Tensor, nbytes: torch.Tensor) -> list[dict]:
    """Sums per context bucket over targets 1..n-1; bpb of each mode within the bucket."""
    rows = []
    for label, sel in buckets(ctx, EDGES):
        b = int(nbytes[sel].sum())
        w, s = float(nll_w[sel].sum()), float(nll_s[sel].sum())
        rows.append(dict(context=label, targets=int(sel.sum()), bytes=b, nll_window=w, nll_stream=s,
                         bpb_window=w / (math.log(2) * b), bpb_stream=s / (math.log(2) * b)))
    return rows


def load_artifact_model(path: Path, cfg: tg.Config, rt: tg.Runtime, log: tg.Logger,
                        tool: str) -> tuple[tg.ModelConfig, torch.nn.Module]:
    """The artifact's model on this device, its vocabulary checked against this run's tokenizer (as EVAL_ONLY)."""
    if not path.is_file():
        raise SystemExit(f"artifact {path} is not a file")
    mc, state = tg.read_artifact(path)
    tg.require_model_matches(cfg, mc, tool, "artifact", path)
    model = tg.build_model(mc, tg.resolve_backends(cfg, rt, mc, log, check=rt.cuda), rt)
    tg.load_exported_state(model, state, str(path))
    return mc, model


def require_streamable(mc: tg.ModelConfig, path: Path, context: str = "") -> None:
    """Refuses, before anything is scored, to stream an artifact with full attention (its state, the keys, grows
    with the stream); `context` says who asked."""
    if tg.layer_kinds(mc.layout) & set(tg.UNBOUNDED_KINDS):
        raise SystemExit(f"{context}artifact {path} has layout {mc.layout}, with full attention (A or N): streaming "
                         "needs layers with bounded state (G, S)")


def require_scored_once(tally: tg.Tally, what: str) -> None:
    if not bool((tally.hits[1:] == 1).all()) or int(tally.hits[0]) != 0:
        raise RuntimeError(f"{what} did not score every target exactly once")


def target_bytes(tokens: torch.Tensor, tables: tg.ByteTables, rt: tg.Runtime) -> torch.Tensor:
    """Each target's canonical byte count (index 0, no target: 0)."""
    nbytes = torch.zeros(len(tokens), dtype=torch.long)
    nbytes[1:] = tables.count(tokens[:-1].to(rt.device), tokens[1:].to(rt.device)).cpu()
    return nbytes


def main() -> None:
    window_cfg = tg.Config.from_env({**os.environ, "EVAL_MODE": "window", "TTT_ENABLED": "0"})
    stream_cfg = dataclasses.replace(window_cfg, eval_mode="stream", eval_stride=0)
    rt = tg.init_runtime(window_cfg)
    if rt.world_size != 1:
        raise SystemExit("eval_by_context.py runs as one process (python3, not torchrun)")
    log = tg.Logger(None)
    if not window_cfg.artifact_path:
        raise SystemExit("set ARTIFACT_PATH to the artifact to score")
    path = Path(window_cfg.artifact_path)
    tables, tokens, checked = tg.load_scoring_text(window_cfg, rt.device)
    print(checked)
    n = len(tokens)
    mc, model = load_artifact_model(path, window_cfg, rt, log, "eval_by_context")
    require_streamable(mc, path)  # before the window pass, not after it
    tally_w, tally_s = tg.Tally(rt.device, track=n), tg.Tally(rt.device, track=n)
    res_w = tg.evaluate(model, tokens, tables, window_cfg, rt, tally_w)
    res_s = tg.evaluate_stream(model, tokens, tables, stream_cfg, rt, tally_s)
    require_scored_once(tally_w, "window mode")
    require_scored_once(tally_s, "stream mode")
    rows = bucket_rows(lane_context(tokens, stream_cfg, tables.bos_id), tally_w.nll_at, tally_s.nll_at,
                       target_bytes(tokens, tables, rt))
    sliding = window_cfg.stride < window_cfg.eval_len
    window_name = f"window {window_cfg.eval_len}" + (f" stride {window_cfg.stride}" if sliding else "")
    print(f"artifact {path} ({mc.layout}); {n} validation tokens; {window_name}; stream: {stream_cfg.stream_lanes} lanes "
          f"of about {(n - 1) // stream_cfg.stream_lanes} tokens, warmup {stream_cfg.stream_warmup}, segments "
          f"{stream_cfg.stream_segment}, reset at BOS: {stream_cfg.stream_reset}")
    print(f"{'lane context':>14} {'targets':>9} {'bytes':>9} {'bpb window':>11} {'bpb stream':>11} {'stream-window':>14}")
    for r in rows:
        print(f"{r['context']:>14} {r['targets']:>9} {r['bytes']:>9} {r['bpb_window']:>11.4f} {r['bpb_stream']:>11.4f} "
              f"{r['bpb_stream'] - r['bpb_window']:>+14.4f}")
    print(f"{'all':>14} {res_w.tokens:>9} {res_w.bytes:>9} {res_w.bpb:>11.4f} {res_s.bpb:>11.4f} "
          f"{res_s.bpb - res_w.bpb:>+14.4f}")
    print("by_context " + json.dumps(dict(artifact=str(path), window=window_name, lanes=stream_cfg.stream_lanes,
                                          bpb_window=res_w.bpb, bpb_stream=res_s.bpb, rows=rows)))


if __name__ == "__main__":
    main()
