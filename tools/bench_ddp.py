#!/usr/bin/env python3
"""Training-step benchmark on several ranks: where a step's time goes when the batch is shared out.

    torchrun --standalone --nproc_per_node=2 tools/bench_ddp.py     # any train_gpt.py setting applies
    torchrun --standalone --nproc_per_node=1 tools/bench_ddp.py     # the same parts on one rank, for comparison
    BENCH_STEPS=20 BENCH_WARMUP=5 torchrun --standalone --nproc_per_node=8 tools/bench_ddp.py
    BENCH_PROFILE=1 torchrun ...    # also rank 0's top GPU kernels in one step (torch.profiler)

It builds the model as train_gpt.py does (compiled, then DDP around it on several ranks), times whole optimizer
steps (loader, forward, backward with the gradient all-reduce, Muon + Adam, EMA) after warmup, twice: back to
back, and as the training loop runs them (the cap check agreed across ranks and a device sync after each step).
Then the step's phases in place: a timestamp on the GPU's stream as each phase has been launched (data, forward,
backward, Muon, Adam, EMA), so a phase's figure is the GPU time from the previous mark to its own, idle time
included. Then each part alone on every rank:
  forward + backward     the rank's micro-batches, read from the loader, with DDP's gradient sync turned off;
  gradient all-reduce    one all-reduce of as many fp32 values as the model has parameters (what DDP moves);
  optimizer step         Muon (including the all-reduce that shares its orthogonalized updates) and Adam;
  Muon's all-reduce      that all-reduce alone (bf16 on the GPU, as Muon sends it);
  EMA update, data loader.
Each figure is the slowest rank's. What the whole step takes beyond the parts that a second rank does not share
(everything but forward + backward) shows how much of the communication overlaps with computation. DATA_PATH is
not needed: the loader reads synthetic shards written to a temporary folder. Figures print as a table and as one
`bench {json}` line (rank 0).
"""

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from bench_train import Timer, env_int, print_profile, write_synthetic_shards  # noqa: E402


def slowest(ms: float, rt: tg.Runtime) -> float:
    """The largest of the ranks' figures."""
    if not rt.distributed:
        return ms
    t = torch.tensor([ms], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def bench_parts(model, base, opts, ema, loader, cfg: tg.Config, rt: tg.Runtime, repeat: int) -> dict:
    """ms per optimizer step of each part alone (slowest rank)."""
    timer = Timer(rt.device)

    def forward_backward():
        for _ in range(rt.grad_accum_steps):
            x, y = loader.next_batch()
            with model.no_sync() if rt.distributed else contextlib.nullcontext(), tg.autocast(rt):
                loss = model(x, y)
            (loss / rt.grad_accum_steps).backward()
        for p in base.parameters():
            p.grad = None

    def all_reduce(n: int, dtype: torch.dtype):
        flat = torch.zeros(n, dtype=dtype, device=rt.device)
        return lambda: dist.all_reduce(flat) if rt.distributed else None

    muon_numel = sum(p.numel() for g in opts.muon.param_groups for p in g["params"])
    parts = {"forward + backward (no gradient sync)": forward_backward,
             "gradient all-reduce": all_reduce(tg.count_parameters(base), torch.float32),
             "Muon's update all-reduce": all_reduce(muon_numel, torch.bfloat16 if rt.cuda else torch.float32)}
    out = {}
    for name, fn in parts.items():
        timer(fn, 1)
        out[name] = slowest(timer(fn, repeat), rt)
    for p in base.parameters():
        p.grad = torch.randn_like(p)
    out["optimizer step (Muon + Adam)"] = slowest(timer(lambda: [o.step() for o in opts.all()], repeat), rt)
    out["EMA update"] = slowest(timer(ema.update, repeat), rt) if ema is not None else 0.0
    out["data loader"] = slowest(timer(lambda: [loader.next_batch() for _ in range(rt.grad_accum_steps)], repeat), rt)
    return {k: round(v, 2) for k, v in out.items()}


class PhaseClock:
    """Timestamps taken as each phase of a step has been launched: CUDA events on the GPU's stream (so a phase's
    time is GPU time, idle included), wall time on the CPU. Sums ms per phase over the steps it sees."""

    def __init__(self, rt: tg.Runtime):
        self.cuda, self.marks, self.totals = rt.cuda, [], {}

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self.now())]

    def __call__(self, phase: str) -> None:
        self.marks.append((phase, self.now()))

    def finish(self) -> None:
        """Adds the step's phases to the totals (call after a sync)."""
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else 1000 * (b - a)
            self.totals[phase] = self.totals.get(phase, 0.0) + ms


def bench_phases(model, opts, ema, loader, cfg: tg.Config, rt: tg.Runtime, steps: int) -> dict:
    """ms per step of each phase of real steps (slowest rank), as the training loop runs them."""
    clock = PhaseClock(rt)
    for _ in range(steps):
        tg.sync(rt)
        clock.start()
        tg.train_step(model, opts, loader, cfg, rt, 100, 1.0, mark=clock)
        if ema is not None:
            ema.update()
            clock("EMA")
        tg.sync(rt)
        clock.finish()
    return {phase: round(slowest(ms / steps, rt), 2) for phase, ms in clock.totals.items()}


def main() -> int:
    cfg = tg.Config.from_env()
    steps, warmup = env_int("BENCH_STEPS", 10), env_int("BENCH_WARMUP", 3)
    rt = tg.init_runtime(cfg)
    say = (lambda msg, console=True: print(msg, flush=True)) if rt.is_main else (lambda msg, console=True: None)
    mc = tg.ModelConfig.from_config(cfg)
    backends = tg.resolve_backends(cfg, rt, mc, say, check=True)
    with tempfile.TemporaryDirectory() as tmp:  # each rank its own copy of the same synthetic tokens
        data = write_synthetic_shards(Path(tmp), cfg.vocab_size, 4 * cfg.train_batch_tokens * (steps + warmup) + 1)
        cfg = tg.Config(**{**cfg.__dict__, "data_path": data})
        base = tg.build_model(mc, backends, rt)
        opts = tg.build_optimizers(base, cfg, rt)
        model = tg.wrap_ddp(tg.maybe_compile(base, cfg, rt), cfg, rt)
        ema = tg.EMA(base, cfg.ema_decay) if cfg.ema_decay > 0 else None
        loader = tg.TrainLoader(cfg, rt)

        def step():
            tg.train_step(model, opts, loader, cfg, rt, 100, 1.0)
            if ema is not None:
                ema.update()

        def loop_step():  # as train_gpt.train runs a step under a cap: the ranks' clocks agreed first, a sync after
            tg._rank_max(0.0, rt)
            step()
            tg.sync(rt)

        timer = Timer(rt.device)
        timer(step, warmup)
        if rt.cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = round(slowest(timer(step, steps), rt), 2)
        loop_ms = round(slowest(timer(loop_step, steps), rt), 2)
        peak = slowest(torch.cuda.max_memory_allocated() / 2**20 if rt.cuda else 0.0, rt)
        phases = bench_phases(model, opts, ema, loader, cfg, rt, steps)
        if rt.cuda and os.environ.get("BENCH_PROFILE", "0") != "0":  # every rank runs it: the step has collectives
            print_profile(step, f"rank {rt.rank} of {rt.world_size}", env_int("BENCH_PROFILE_ROWS", 30),
                          out=say)
        parts = bench_parts(model, base, opts, ema, loader, cfg, rt, steps)
        loader.close()
    fb = parts["forward + backward (no gradient sync)"]
    unshared = round(ms - fb, 2)
    device = torch.cuda.get_device_name() if rt.cuda else "cpu"
    say(f"device: {device} x{rt.world_size}, torch {torch.__version__}, layout {mc.layout}, batch "
        f"{cfg.train_batch_tokens} tokens ({rt.grad_accum_steps} micro-batches of {loader.micro_tokens} per rank), "
        f"{steps} timed steps")
    say(f"whole step: {ms:.2f} ms, {cfg.train_batch_tokens / (ms / 1000):,.0f} tok/s, peak {peak:,.0f} MiB")
    say(f"as the training loop runs it (agreed cap check, sync each step): {loop_ms:.2f} ms, "
        f"{cfg.train_batch_tokens / (loop_ms / 1000):,.0f} tok/s")
    say("phases in place (GPU time from the previous phase's launch to this one's, idle included):")
    for name, v in phases.items():
        say(f"  {name:<40}{v:>10.2f} ms")
    say("parts alone:")
    for name, v in parts.items():
        say(f"  {name:<40}{v:>10.2f} ms")
    say(f"  {'whole step - forward + backward':<40}{unshared:>10.2f} ms (what more ranks do not divide)")
    if rt.is_main:
        print("bench " + json.dumps(dict(device=device, world_size=rt.world_size, layout=mc.layout,
                                         grad_accum_steps=rt.grad_accum_steps, ms_per_step=ms,
                                         loop_ms_per_step=loop_ms, phases_ms=phases,
                                         tokens_per_s=round(cfg.train_batch_tokens / (ms / 1000)),
                                         peak_mem_mib=round(peak), parts_ms=parts, unshared_ms=unshared),
                                    sort_keys=True), flush=True)
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
