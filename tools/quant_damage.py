#!/usr/bin/env python3
"""What each part of the export costs one run's weights: a CHECKPOINT_PATH file scored as trained, then with one
class of tensors rounded as the export rounds them (round to nearest; the others as trained), then all of them.

    python3 tools/quant_damage.py ckpt/run.pt
    QUANT_DAMAGE_EMBED_CLIPS=20,12,8,6 python3 tools/quant_damage.py ckpt/run.pt    # the embedding at other clips
    QUANT_DAMAGE_MATRIX_CLIPS=12.85,10.6,8 python3 tools/quant_damage.py ckpt/run.pt

The classes follow the export's routing (quant_plan): the small tensors stored in fp16 (norms, gates, decay
parameters, convolutions); the embedding (tied with the head, and BigramHash's table) at EMBED_BITS and
EMBED_CLIP_SIGMAS; the matrices at MATRIX_BITS and MATRIX_CLIP_SIGMAS. The export itself uses GPTQ for the
matrices, which lowers their share (the training run's own round trip is the GPTQ total); with round to nearest
everywhere, the row of all of them is exactly what an export with QUANT_METHOD=rtn scores (tested). Every
train_gpt.py setting applies (DATA_PATH, TOKENIZER_PATH, EVAL_MODE, EVAL_SEQ_LEN, EVAL_STRIDE, VAL_MAX_TOKENS; the
export's bits and clips; MATRIX_CLIP_SIGMAS needs MATRIX_CLIP_FIT=0, as for a run); no TTT; one process. The
figures also print as one `quant_damage {json}` line.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CLASSES = {"fp16": "small tensors in fp16", "embed": "embedding", "muon": "matrices"}


def tensor_class(name: str, t: torch.Tensor, cfg: tg.Config) -> str:
    kind, _, _ = tg.quant_plan(name, t, cfg)
    return "fp16" if kind == "fp16" else tg.PARAM_ROUTES[tg.route_index(name, t)][0]


def rounded(state: dict[str, torch.Tensor], mc: tg.ModelConfig, cfg: tg.Config, classes: set[str],
            embed_clip: float | None = None, matrix_clip: float | None = None) -> dict[str, torch.Tensor]:
    """`state` with the tensors of `classes` rounded by the export's own serialization (round to nearest: no
    Hessians), read back, at the configured clips unless others are given."""
    part = {name: t for name, t in state.items() if tensor_class(name, t, cfg) in classes}
    clips = dict(embed_clip_sigmas=cfg.embed_clip_sigmas if embed_clip is None else embed_clip,
                 matrix_clip_sigmas=cfg.matrix_clip_sigmas if matrix_clip is None else matrix_clip)
    frames, _ = tg.serialize_state(part, mc, dataclasses.replace(cfg, **clips))
    return {**state, **tg.deserialize_state(frames, "quant_damage")[1]}


def clips(var: str) -> list[float]:
    try:
        values = [float(c) for c in os.environ.get(var, "").split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"{var} must list clips in sigmas, separated by commas") from None
    if any(not v > 0 for v in values):
        raise SystemExit(f"{var}={os.environ[var]}: every clip must be positive (sigmas of a row's spread)")
    return values


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 tools/quant_damage.py CHECKPOINT (a file a run wrote with CHECKPOINT_PATH)")
    cfg = tg.Config.from_env({**os.environ, "TTT_ENABLED": "0"})
    embed_clips, matrix_clips = clips("QUANT_DAMAGE_EMBED_CLIPS"), clips("QUANT_DAMAGE_MATRIX_CLIPS")
    rt = tg.init_runtime(cfg)
    if rt.world_size != 1:
        raise SystemExit("quant_damage.py runs as one process (python3, not torchrun)")
    log = tg.Logger(None)
    path = Path(sys.argv[1])
    mc, state, info = tg.read_checkpoint(path)
    tg.require_model_matches(cfg, mc, "quant_damage.py", "checkpoint", path)
    tables, tokens, checked = tg.load_scoring_text(cfg, rt.device)
    print(checked)
    model = tg.build_model(mc, tg.resolve_backends(cfg, rt, mc, log, check=rt.cuda), rt)
    fwd = tg.maybe_compile(model, cfg, rt)

    def score(weights: dict[str, torch.Tensor]) -> float:
        tg.load_exported_state(model, weights, str(path), kind="checkpoint")
        return tg.evaluate_base(fwd, tokens, tables, cfg, rt).bpb

    rows = [("as trained", score(state))]
    for c, label in CLASSES.items():
        n = sum(t.numel() for name, t in state.items() if tensor_class(name, t, cfg) == c)
        if c == "embed":
            label += f" int{cfg.embed_bits} at {cfg.embed_clip_sigmas:g} sigmas"
        elif c == "muon":
            label += f" int{cfg.matrix_bits} at {cfg.matrix_clip_sigmas:g} sigmas"
        rows.append((f"{label} ({n:,} params)", score(rounded(state, mc, cfg, {c}))))
    rows.append(("all of them (an export with QUANT_METHOD=rtn)", score(rounded(state, mc, cfg, set(CLASSES)))))
    rows += [(f"embedding int{cfg.embed_bits} at {k:g} sigmas", score(rounded(state, mc, cfg, {"embed"}, embed_clip=k)))
             for k in embed_clips]
    rows += [(f"matrices int{cfg.matrix_bits} at {k:g} sigmas", score(rounded(state, mc, cfg, {"muon"}, matrix_clip=k)))
             for k in matrix_clips]
    base = rows[0][1]
    if cfg.matrix_clip_fit:
        print(f"note: the matrices are rounded at MATRIX_CLIP_SIGMAS={cfg.matrix_clip_sigmas:g}; a run's export fits "
              "its own clip (its `Serialized model` line): set MATRIX_CLIP_FIT=0 MATRIX_CLIP_SIGMAS=<that clip>")
    print(f"checkpoint {path} ({mc.layout}, {info['steps']} steps{', EMA' if info['ema'] else ''}); {len(tokens):,} "
          f"validation tokens, {tg.eval_tag(cfg).lstrip('_') or 'plain windows'}; round to nearest")
    print(f"{'weights':<64}{'val_bpb':>9}{'cost':>9}")
    for label, bpb in rows:
        print(f"{label:<64}{bpb:>9.4f}{bpb - base:>+9.4f}")
    print("quant_damage " + json.dumps(dict(checkpoint=str(path), rows=[dict(weights=k, bpb=v) for k, v in rows])))


if __name__ == "__main__":
    main()
