#!/usr/bin/env python3
"""How much an artifact's model leans on each of its mixers and MLPs, on validation text.

    DATA_PATH=... python3 tools/layer_ablation.py artifacts/run.pgz
    DATA_PATH=... python3 tools/layer_ablation.py artifacts/run.pgz --seqs 4 --seq-len 2048 --mode zero
    DATA_PATH=... python3 tools/layer_ablation.py artifacts/run.pgz --positions 0,64,256,1024

Scores the mean cross-entropy (nats per target token) of --seqs sequences of --seq-len tokens from the start of the
validation split (each read on its own, as a window is; the targets are the next tokens), then scores them again
once per module with that module's output replaced, every mixer (attention or GDN; for a P layer the whole mixer,
then its attention half and its GDN half) and every MLP in turn. `--mode mean` (the default) replaces the output by
its mean over every position of these sequences in the unablated pass, one mean per channel: what the module adds
on average stays, what it adds for this token in this context goes. `--mode zero` removes the output. A module
that several layers run (a shared mixer, a repeated group) is replaced at each of its calls, each call by its own
mean. The increase in loss is how much the rest of the model cannot do without that module; it is not what the
module would be worth in a model trained without it. The increase is also given by the target's position in its
sequence, in ranges that start at --positions (0,64,256,1024 by default, those below --seq-len): how much context
the loss is on. The forward runs the PyTorch reference paths on the CPU, or on the GPU if there is one. Figures also
print as one `layer_ablation {json}` line.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from attn_sharpness import reference_model_and_text  # noqa: E402  (this file's folder is on the path)

MODES = ("mean", "zero")


def ablation_targets(model: tg.GPT) -> list[tuple[str, str, list[int], nn.Module]]:
    """(name, kind, layers that run it, module) for every mixer, each half of a P mixer, and every MLP."""
    targets = []
    for idx, mixer in enumerate(model.mixers):
        layers = [i for i, m in enumerate(model.layer_mixer) if m == idx]
        kind = model.layer_kinds[layers[0]]
        targets.append((f"mixers.{idx}", kind, layers, mixer))
        if isinstance(mixer, tg.ParallelMixer):
            targets += [(f"mixers.{idx}.attn", "attn", layers, mixer.attn),
                        (f"mixers.{idx}.gdn", "gdn", layers, mixer.gdn)]
    for idx, mlp in enumerate(model.mlps):
        targets.append((f"mlps.{idx}", "mlp", [i for i, m in enumerate(model.layer_mlp) if m == idx], mlp))
    return targets


def output_means(model: tg.GPT, x: torch.Tensor, y: torch.Tensor,
                 modules: list[nn.Module]) -> tuple[torch.Tensor, dict[nn.Module, list[torch.Tensor]]]:
    """The unablated per-target loss (B, T) over x -> y and, for each module, the mean of its output over (batch,
    position) at each of its calls, in call order."""
    means: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}

    def record(mod, _args, out):
        means[mod].append(out.float().mean(dim=(0, 1)))

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad():
            loss = model(x, y, reduction="none")
    finally:
        for h in hooks:
            h.remove()
    return loss, means


def ablated_loss(model: tg.GPT, x: torch.Tensor, y: torch.Tensor, module: nn.Module,
                 means: list[torch.Tensor] | None) -> torch.Tensor:
    """The per-target loss (B, T) over x -> y with module's output replaced at every call: by means[call] (its
    unablated mean), or by zeros where means is None."""
    calls = []

    def replace(_mod, _args, out):
        calls.append(None)
        if means is None:
            return torch.zeros_like(out)
        return means[len(calls) - 1].to(out.dtype).expand_as(out)

    hook = module.register_forward_hook(replace)
    try:
        with torch.no_grad():
            loss = model(x, y, reduction="none")
    finally:
        hook.remove()
    if means is not None and len(calls) != len(means):
        raise RuntimeError(f"the module ran {len(calls)} times in the ablated pass and {len(means)} in the clean one")
    return loss


def position_ranges(starts: list[int], seq_len: int) -> list[tuple[int, int]]:
    """[(start, end)] of the target positions each range covers: from each start to the next, the last to seq_len."""
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= seq_len:
        raise ValueError(f"positions {starts}: need increasing starts from 0, each below the sequence length {seq_len}")
    return list(zip(starts, starts[1:] + [seq_len]))


def ablation_rows(model: tg.GPT, x: torch.Tensor, y: torch.Tensor, mode: str,
                  starts: Sequence[int] = (0,)) -> tuple[dict, list[dict]]:
    """The unablated loss (nats per target: `loss`, and `by_position`, one per range of target positions that
    `starts` begins) and one row per ablation target: module, kind, layers, loss, delta, by_position (the delta
    in each range)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    ranges = position_ranges(list(starts), x.shape[1])

    def by_position(loss: torch.Tensor) -> list[float]:
        return [float(loss[:, a:b].double().mean()) for a, b in ranges]

    targets = ablation_targets(model)
    base_tokens, means = output_means(model, x, y, [t[3] for t in targets])
    base, base_ranges = float(base_tokens.double().mean()), by_position(base_tokens)
    rows = []
    for name, kind, layers, module in targets:
        tokens = ablated_loss(model, x, y, module, means[module] if mode == "mean" else None)
        loss = float(tokens.double().mean())
        rows.append(dict(module=name, kind=kind, layers=layers, loss=round(loss, 6), delta=round(loss - base, 6),
                         by_position=[round(v - b, 6) for v, b in zip(by_position(tokens), base_ranges)]))
    unablated = dict(loss=round(base, 6), by_position=[dict(start=a, end=b, loss=round(v, 6))
                                                        for (a, b), v in zip(ranges, base_ranges)])
    return unablated, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--mode", choices=MODES, default="mean")
    ap.add_argument("--positions", help="the target positions where the by-position ranges start (default "
                                        "0,64,256,1024, those below --seq-len)")
    args = ap.parse_args(argv)
    if args.seqs < 1 or args.seq_len < 2:
        raise SystemExit(f"--seqs {args.seqs} and --seq-len {args.seq_len}: need at least one sequence of two tokens")
    try:
        starts = ([int(v) for v in args.positions.split(",")] if args.positions
                  else [v for v in (0, 64, 256, 1024) if v < args.seq_len])
        ranges = position_ranges(starts, args.seq_len)
    except ValueError as e:
        raise SystemExit(f"--positions {args.positions!r}: {e}") from None
    cfg, mc, model, tokens = reference_model_and_text(args.artifact, args.seqs * args.seq_len + 1,
                                                      "--seqs x --seq-len + 1")
    x, y = tokens[:-1].view(args.seqs, args.seq_len), tokens[1:].view(args.seqs, args.seq_len)
    unablated, rows = ablation_rows(model, x, y, args.mode, starts)
    print(f"{args.artifact}: layout {mc.layout}, {args.seqs} x {args.seq_len} tokens from {cfg.data_path}; "
          f"each module's output replaced by its {'mean' if args.mode == 'mean' else 'zeros'}")
    heads = [f"{a}-{b - 1}" for a, b in ranges]
    print(f"unablated loss {unablated['loss']:.4f} nats per token; by target position "
          + ", ".join(f"{h}: {r['loss']:.4f}" for h, r in zip(heads, unablated["by_position"])))
    print("module          kind  layers      loss  increase  " + "  ".join(f"{h:>9s}" for h in heads))
    for r in rows:
        print(f"{r['module']:14s}  {r['kind']:4s}  {','.join(map(str, r['layers'])):8s}  {r['loss']:8.4f}  "
              f"{r['delta']:+8.4f}  " + "  ".join(f"{v:+9.4f}" for v in r["by_position"]))
    print("layer_ablation " + json.dumps(dict(artifact=args.artifact, seqs=args.seqs, seq_len=args.seq_len,
                                              mode=args.mode, **unablated, modules=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
