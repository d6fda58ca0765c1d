#!/usr/bin/env python3
"""Muon's optimizer step alone, per variant, on the matrices of the model that the settings describe.

    python3 tools/bench_muon.py                     # the default model, every MUON_VARIANT
    BENCH_PASSES=6 BENCH_STEPS=100 python3 tools/bench_muon.py

Builds the model from the train_gpt.py settings (no kernels: only its parameters matter), gives every Muon
matrix a random gradient, and times BENCH_STEPS steps of each variant (muon, normuon, and normuon_gdn with its two
parameter groups, as train_gpt.py builds them) after 5 warmup steps, the variants taking
turns for BENCH_PASSES passes so that drift in the machine's speed falls on all of them. One process, one rank. On a GPU
the times come from CUDA events around the steps; on a CPU from the wall clock. Prints each pass, then the median
and the fastest pass of each variant.
"""

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def time_steps(opt: tg.Muon, steps: int, device: torch.device) -> float:
    """Milliseconds per step over `steps` steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) * 1000 / steps


def main() -> None:
    passes, steps = int(os.environ.get("BENCH_PASSES", "6")), int(os.environ.get("BENCH_STEPS", "100"))
    cfg = tg.Config.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa")).to(device)
    rt = tg.Runtime(0, 1, 0, device, 1)
    mats = tg.params_of_group(tg.route_parameters(model), "muon")
    print(f"layout {cfg.layout}: {len(mats)} Muon matrices, {sum(p.numel() for p in mats):,} parameters, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for p in mats:
        p.grad = torch.randn_like(p) * 1e-3
    groups = {name: tg.muon_param_groups(model, mats, dataclasses.replace(cfg, muon_variant=name))
              for name in tg.MUON_VARIANTS}
    described = {name: " + ".join(f"{len(g['params'])} {'normuon' if g['row_beta2'] else 'plain'}" for g in gs)
                 for name, gs in groups.items()}
    print("groups: " + "; ".join(f"{name} {text}" for name, text in described.items()))
    times: dict[str, list[float]] = {name: [] for name in groups}
    for rep in range(passes):
        for name, param_groups in groups.items():
            opt = tg.Muon(param_groups, lr=1e-4, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                          weight_decay=0.0, rt=rt)
            time_steps(opt, 5, device)
            times[name].append(time_steps(opt, steps, device))
            print(f"pass {rep}: {name:11s} {times[name][-1]:.3f} ms per step ({steps} steps)")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.3f} ms, fastest pass {min(ts):.3f} ms")


if __name__ == "__main__":
    main()
