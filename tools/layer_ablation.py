#!/usr/bin/env python3
"""How much an artifact's model leans on each of its mixers and MLPs, on validation text.

    DATA_PATH=... python3 tools/layer_ablation.py artifacts/run.pgz
    DATA_PATH=... python3 tools/layer_ablation.py artifacts/run.pgz --seqs 4 --seq-len 2048 --mode zero

Scores the mean cross-entropy (nats per target token) of --seqs sequences of --seq-len tokens from the start of the
validation split (each read on its own, as a window is; the targets are the next tokens), then scores them again
once per module with that module's output replaced, every mixer (attention or GDN; for a P layer the whole mixer,
then its attention half and its GDN half) and every MLP in turn. `--mode mean` (the default) replaces the output by
its mean over every position of these sequences in the unablated pass, one mean per channel: what the module adds
on average stays, what it adds for this token in this context goes. `--mode zero` removes the output. A module
that several layers run (a shared mixer, a repeated group) is replaced at each of its calls, each call by its own
mean. The increase in loss is how much the rest of the model cannot do without that module; it is not what the
module would be worth in a model trained without it. The forward runs the PyTorch reference paths on the CPU, or
on the GPU if there is one. Figures also print as one `layer_ablation {json}` line.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

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
                 modules: list[nn.Module]) -> tuple[float, dict[nn.Module, list[torch.Tensor]]]:
    """The unablated loss over x -> y and, for each module, the mean of its output over (batch, position) at each of
    its calls, in call order."""
    means: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}

    def record(mod, _args, out):
        means[mod].append(out.float().mean(dim=(0, 1)))

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad():
            loss = float(model(x, y))
    finally:
        for h in hooks:
            h.remove()
    return loss, means


def ablated_loss(model: tg.GPT, x: torch.Tensor, y: torch.Tensor, module: nn.Module,
                 means: list[torch.Tensor] | None) -> float:
    """The loss over x -> y with module's output replaced at every call: by means[call] (its unablated mean), or by
    zeros where means is None."""
    calls = []

    def replace(_mod, _args, out):
        calls.append(None)
        if means is None:
            return torch.zeros_like(out)
        return means[len(calls) - 1].to(out.dtype).expand_as(out)

    hook = module.register_forward_hook(replace)
    try:
        with torch.no_grad():
            loss = float(model(x, y))
    finally:
        hook.remove()
    if means is not None and len(calls) != len(means):
        raise RuntimeError(f"the module ran {len(calls)} times in the ablated pass and {len(means)} in the clean one")
    return loss


def ablation_rows(model: tg.GPT, x: torch.Tensor, y: torch.Tensor, mode: str) -> tuple[float, list[dict]]:
    """The unablated loss and one row per ablation target: name, kind, layers, loss, delta (nats per token)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    targets = ablation_targets(model)
    base, means = output_means(model, x, y, [t[3] for t in targets])
    rows = []
    for name, kind, layers, module in targets:
        loss = ablated_loss(model, x, y, module, means[module] if mode == "mean" else None)
        rows.append(dict(module=name, kind=kind, layers=layers, loss=round(loss, 6), delta=round(loss - base, 6)))
    return base, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--mode", choices=MODES, default="mean")
    args = ap.parse_args(argv)
    if args.seqs < 1 or args.seq_len < 2:
        raise SystemExit(f"--seqs {args.seqs} and --seq-len {args.seq_len}: need at least one sequence of two tokens")
    cfg = tg.Config.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mc, state = tg.read_artifact(Path(args.artifact))
    model = tg.GPT(mc, tg.Backends("torch", "sdpa")).to(device)
    tg.load_exported_state(model, state, args.artifact)
    model.eval()
    tokens = tg.load_val_tokens(cfg)
    need = args.seqs * args.seq_len + 1
    if len(tokens) < need:
        raise SystemExit(f"the validation split has {len(tokens):,} tokens; --seqs x --seq-len + 1 needs {need:,}")
    x = tokens[:need - 1].view(args.seqs, args.seq_len).to(device)
    y = tokens[1:need].view(args.seqs, args.seq_len).to(device)
    base, rows = ablation_rows(model, x, y, args.mode)
    print(f"{args.artifact}: layout {mc.layout}, {args.seqs} x {args.seq_len} tokens from {cfg.data_path}; "
          f"each module's output replaced by its {'mean' if args.mode == 'mean' else 'zeros'}")
    print(f"unablated loss {base:.4f} nats per token")
    print("module          kind  layers      loss     increase")
    for r in rows:
        print(f"{r['module']:14s}  {r['kind']:4s}  {','.join(map(str, r['layers'])):8s}  {r['loss']:8.4f}  "
              f"{r['delta']:+10.4f}")
    print("layer_ablation " + json.dumps(dict(artifact=args.artifact, seqs=args.seqs, seq_len=args.seq_len,
                                              mode=args.mode, loss=round(base, 6), modules=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
