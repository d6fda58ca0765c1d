#!/usr/bin/env python3
"""What STATE_PATH costs: the training state of the model the settings describe, written and read back.

    python3 tools/bench_state.py                                   # the default model
    BENCH_REPEATS=3 BENCH_STATE_PATH=/scratch/s.pt python3 tools/bench_state.py

Builds the model, its optimizers and its averages from the train_gpt.py settings (on the GPU if there is one), takes
one step of both optimizers on random gradients so that all their state exists, then BENCH_REPEATS (3) times writes
the state with train_gpt.save_train_state (atomically, fsync included, as a run does) and reads it into a fresh
model with train_gpt.resume_training, checking that the weights came back. Prints the file's size and each time;
the file (BENCH_STATE_PATH, default bench_state.pt in the working directory) is removed at the end. One process; the
write's time depends on the disk, and the first write also on the page cache.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def build(cfg: tg.Config, rt: tg.Runtime, seed: int):
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa")).to(rt.device)
    emas = [tg.EMA(model, cfg.ema_decay)] if cfg.ema_decay > 0 else []
    emas += [tg.EMA(model, d) for d in cfg.ema_compare_decays if d > 0]
    return model, tg.build_optimizers(model, cfg, rt), emas


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    path = Path(os.environ.get("BENCH_STATE_PATH", "bench_state.pt"))
    cfg = tg.Config.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = tg.Runtime(0, 1, 0, device, 1)
    model, opts, emas = build(cfg, rt, 0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for o in opts.all():
        o.step()
    for e in emas:
        e.update()
    print(f"layout {cfg.layout}: {tg.count_parameters(model):,} parameters, {len(emas)} averages, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    stats = tg.TrainStats(steps=1, tokens=cfg.train_batch_tokens, train_ms=1.0)
    quiet = tg.Logger(None)
    writes, reads = [], []
    try:
        for rep in range(repeats):
            t0 = time.perf_counter()
            assert tg.save_train_state(path, model, opts, emas, stats, 0, cfg, rt, quiet), f"{path} was not written"
            writes.append(time.perf_counter() - t0)
            fresh, fresh_opts, fresh_emas = build(cfg, rt, 1)
            t0 = time.perf_counter()
            tg.resume_training(path, fresh, fresh_opts, fresh_emas, cfg, rt, quiet)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reads.append(time.perf_counter() - t0)
            same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
            print(f"pass {rep}: {path.stat().st_size:,} bytes, written in {writes[-1]:.2f} s, read back in "
                  f"{reads[-1]:.2f} s, weights back: {same}")
            if not same:
                raise SystemExit("the weights read back differ from those written")
        print(f"state: {path.stat().st_size:,} bytes ({path.stat().st_size / tg.count_parameters(model):.1f} per "
              f"parameter); write median {statistics.median(writes):.2f} s, read median {statistics.median(reads):.2f} s")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
