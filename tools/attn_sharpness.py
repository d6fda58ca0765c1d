#!/usr/bin/env python3
"""How sharply each attention layer of an artifact attends, on validation text.

    DATA_PATH=... python3 tools/attn_sharpness.py artifacts/run.pgz
    DATA_PATH=... python3 tools/attn_sharpness.py artifacts/run.pgz --seqs 4 --seq-len 2048 --skip 256

With q and k RMS-normed, a head's logit q·k/sqrt(head_dim) is at most sqrt(head_dim) (8 at 64 wide) times its
query gain (QK_GAIN_INIT; 1 without), however sharply it needs to attend. For every query at or past position
--skip of --seqs sequences of --seq-len tokens from the start of the validation split (each sequence read on its own,
as a window is), this scores its largest logit, its largest attention probability and its attention entropy (nats),
over the keys its layer lets it see (causal, within SWA_WINDOW for S layers). Per attention mixer as run (a shared
or repeated mixer once per use): the bound, the median / 90th / 99th percentile of the largest logit, the median and
90th percentile of the top probability, the median entropy, and each head's 99th percentile of the largest logit.
The forward runs the PyTorch reference paths (GDN, attention) on the CPU, or on the GPU if there is one; q and k
come from the mixer's own `queries_keys`. Figures also print as one `attn_sharpness {json}` line.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def query_stats(q: torch.Tensor, k: torch.Tensor, window: int, skip: int) -> tuple[torch.Tensor, ...]:
    """q (B, T, H, hd), k (B, T, KV, hd) as attention uses them: for queries skip..T-1, (largest logit, top
    probability, entropy), each (B, H, T - skip), over the causal keys within `window` (0: all earlier)."""
    B, T, H, hd = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q[:, skip:].double(), k.double()) / math.sqrt(hd)
    t, s = torch.arange(skip, T)[:, None], torch.arange(T)[None]
    seen = (s <= t) & ((s > t - window) if window > 0 else True)
    logits = logits.masked_fill(~seen.to(q.device), float("-inf"))
    p = logits.softmax(-1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return logits.amax(-1), p.amax(-1), entropy


def layer_rows(model: tg.GPT, x: torch.Tensor, skip: int) -> list[dict]:
    """One row per attention mixer call of the forward pass over x (B, T)."""
    rows = []

    def hook(mod, args, _out):
        q, k = mod.queries_keys(args[0])
        top_logit, top_p, entropy = query_stats(q.float(), k.float(), mod.window, skip)
        gain = float(mod.q_gain.abs().max()) if mod.q_gain is not None else 1.0  # a gain may be negative
        per_head = top_logit.transpose(0, 1).flatten(1).quantile(0.99, dim=1)
        flat = top_logit.flatten()
        rows.append(dict(window=mod.window, bound=round(math.sqrt(mod.head_dim) * gain, 3),
                         top_logit=[round(float(v), 3) for v in (flat.median(), flat.quantile(0.9), flat.quantile(0.99))],
                         top_p=[round(float(v), 4) for v in (top_p.flatten().median(), top_p.flatten().quantile(0.9))],
                         entropy=round(float(entropy.flatten().median()), 3),
                         head_p99=[round(float(v), 2) for v in per_head]))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, tg.Attention)]
    try:
        with torch.no_grad():
            model(x, x)
    finally:
        for h in hooks:
            h.remove()
    return rows


def reference_model_and_text(artifact: str, need: int,
                             what: str) -> tuple[tg.Config, tg.ModelConfig, tg.GPT, torch.Tensor]:
    """For the analysis tools (this one, layer_ablation.py): the settings from the environment, the artifact's model
    on the PyTorch reference paths in eval mode (on the GPU if there is one), and the first `need` tokens of the
    validation split on the same device; too few tokens is an error naming `what` asked for them."""
    cfg = tg.Config.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mc, state = tg.read_artifact(Path(artifact))
    model = tg.GPT(mc, tg.Backends("torch", "sdpa")).to(device)
    tg.load_exported_state(model, state, artifact)
    tokens = tg.load_val_tokens(cfg)
    if len(tokens) < need:
        raise SystemExit(f"the validation split has {len(tokens):,} tokens; {what} needs {need:,}")
    return cfg, mc, model.eval(), tokens[:need].to(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--skip", type=int, default=256, help="queries before this position are left out")
    args = ap.parse_args(argv)
    if not 0 <= args.skip < args.seq_len:
        raise SystemExit(f"--skip {args.skip} must be in [0, --seq-len {args.seq_len})")
    cfg, mc, model, tokens = reference_model_and_text(args.artifact, args.seqs * args.seq_len, "--seqs x --seq-len")
    x = tokens.view(args.seqs, args.seq_len)
    rows = layer_rows(model, x, args.skip)
    print(f"{args.artifact}: layout {mc.layout}, {args.seqs} x {args.seq_len} tokens from {cfg.data_path}, queries "
          f"from position {args.skip}")
    print("mixer  bound  largest logit median / p90 / p99  top probability median / p90  entropy median  "
          "each head's p99 largest logit")
    for i, r in enumerate(rows):
        print(f"{i:5d}  {r['bound']:5.2f}  {' / '.join(f'{v:.2f}' for v in r['top_logit']):>28s}  "
              f"{' / '.join(f'{v:.3f}' for v in r['top_p']):>28s}  {r['entropy']:14.2f}  "
              + " ".join(f"{v:.1f}" for v in r["head_p99"]))
    print("attn_sharpness " + json.dumps(dict(artifact=args.artifact, seqs=args.seqs, seq_len=args.seq_len,
                                              skip=args.skip, mixers=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
