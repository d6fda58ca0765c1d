#!/usr/bin/env python3
"""Training-step benchmark: the default hybrid against an all-attention stack of about the same parameter count,
in one process on one device, plus a per-component breakdown so the next bottleneck is visible.

    python3 tools/bench_train.py                           # on a GPU, the default configuration
    LAYOUT=GGGSGGGSGG python3 tools/bench_train.py         # any train_gpt.py setting applies to the hybrid
    BENCH_STEPS=20 BENCH_WARMUP=5 python3 tools/bench_train.py

It times whole optimizer steps (data loader, forward, backward, Muon + Adam, EMA; gradient accumulation as in
train_gpt.py on one rank) with CUDA events after warmup, and reports tokens/s, ms/step and peak memory for each
configuration. The breakdown times each component alone, forward + backward at the training shape (mixers, MLP),
the optimizer step, and the loader; the parts need not add up to the whole (fusion, overlap). DATA_PATH and
TOKENIZER_PATH are not needed: the loader is timed on synthetic shards written to a temporary folder.
Figures print as a table and as one `bench {json}` line.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def attention_layout_like(mc: tg.ModelConfig, backends: tg.Backends) -> str:
    """An all-attention (full causal) layout whose parameter count is closest to the hybrid's."""
    target = tg.count_parameters(tg.GPT(mc, backends))
    best = None
    for n in range(1, 4 * len(tg.parse_layout(mc.layout)) + 1):
        params = tg.count_parameters(tg.GPT(tg.ModelConfig(**{**mc.__dict__, "layout": "A" * n}), backends))
        if best is None or abs(params - target) < abs(best[1] - target):
            best = ("A" * n, params)
    return best[0]


def write_synthetic_shards(folder: Path, vocab: int, tokens: int) -> str:
    rng = np.random.default_rng(0)
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, tokens
    data = rng.integers(0, vocab, tokens, dtype=np.uint16)
    (folder / "fineweb_train_000000.bin").write_bytes(header.tobytes() + data.astype("<u2").tobytes())
    return str(folder)


class Timer:
    """Wall time of a region, with the device synchronized on both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, repeat: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeat
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return 1000 * (time.perf_counter() - t0) / repeat


def bench_steps(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, steps: int, warmup: int) -> dict:
    """ms per optimizer step of the whole training step, as train_gpt.py runs it on one rank."""
    base = tg.GPT(tg.ModelConfig.from_config(cfg), backends).to(rt.device)
    opts = tg.build_optimizers(base, cfg, rt)
    model = tg.maybe_compile(base, cfg, rt)
    ema = tg.EMA(base, cfg.ema_decay)
    loader = tg.TrainLoader(cfg, rt)

    def step():
        tg.train_step(model, opts, loader, cfg, rt, 100, 1.0)
        ema.update()

    timer = Timer(rt.device)
    timer(step, warmup)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = timer(step, steps)
    loader.close()
    peak = torch.cuda.max_memory_allocated() / 2**20 if rt.cuda else 0.0
    return dict(layout=cfg.layout, params=tg.count_parameters(base), ms_per_step=round(ms, 2),
                tokens_per_s=round(cfg.train_batch_tokens / (ms / 1000)), peak_mem_mib=round(peak))


def bench_components(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, repeat: int) -> dict:
    """ms per optimizer step spent in each component alone (forward + backward at the micro-batch shape, times
    the layers that use it and the accumulation steps)."""
    mc = tg.ModelConfig.from_config(cfg)
    model = tg.GPT(mc, backends).to(rt.device)
    micro = cfg.train_batch_tokens // rt.grad_accum_steps
    B, T, D = micro // cfg.train_seq_len, cfg.train_seq_len, mc.model_dim
    x = torch.randn(B, T, D, device=rt.device)
    timer = Timer(rt.device)
    out = {}
    counts = {}
    for kind, m in zip(model.layer_kinds, model.layer_mixer):
        counts.setdefault(kind, [m, 0])[1] += 1
    parts = {f"{kind} mixer x{n}": (model.mixers[m], n) for kind, (m, n) in counts.items()}
    parts[f"mlp x{len(model.mlps)}"] = (model.mlps[0], len(model.mlps))
    for name, (module, n) in parts.items():
        fn = tg.maybe_compile(module, cfg, rt)

        def run(fn=fn):
            xi = x.detach().requires_grad_(True)
            with tg.autocast(rt):
                y = fn(tg.rms_norm(xi))
            y.float().sum().backward()

        timer(run, 2)
        out[name] = round(timer(run, repeat) * n * rt.grad_accum_steps, 2)
    head = tg.maybe_compile(lambda h, y: F.cross_entropy(
        (mc.logit_softcap * torch.tanh(F.linear(h, model.tok_emb.weight).float() / mc.logit_softcap)).flatten(0, 1),
        y.flatten()), cfg, rt)
    ids = torch.randint(0, mc.vocab_size, (B, T), device=rt.device)

    def run_head():
        h = x.detach().requires_grad_(True)
        with tg.autocast(rt):
            loss = head(h, ids)
        loss.backward()

    timer(run_head, 2)
    out["embedding head + loss"] = round(timer(run_head, repeat) * rt.grad_accum_steps, 2)
    opts = tg.build_optimizers(model, cfg, rt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out["optimizer (Muon + Adam)"] = round(timer(lambda: [o.step() for o in opts.all()], repeat), 2)
    loader = tg.TrainLoader(cfg, rt)
    out["data loader"] = round(timer(lambda: [loader.next_batch() for _ in range(rt.grad_accum_steps)], repeat), 2)
    loader.close()
    return out


def main() -> int:
    cfg = tg.Config.from_env()
    steps, warmup = env_int("BENCH_STEPS", 10), env_int("BENCH_WARMUP", 3)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rt = tg.Runtime(0, 1, 0, device, cfg.grad_accum_steps or tg.GPU_COUNT_OF_RECORD)
    log = tg.Logger(None)
    mc = tg.ModelConfig.from_config(cfg)
    backends = tg.resolve_backends(cfg, rt, mc, log, check=True)  # the kernel check, as before training
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_shards(Path(tmp), cfg.vocab_size, 4 * cfg.train_batch_tokens * (steps + warmup) + 1)
        cfg = tg.Config(**{**cfg.__dict__, "data_path": data})
        attn_layout = attention_layout_like(mc, backends)
        attn_cfg = tg.Config(**{**cfg.__dict__, "layout": attn_layout})
        results = [bench_steps(cfg, rt, backends, steps, warmup), bench_steps(attn_cfg, rt, backends, steps, warmup)]
        parts = bench_components(cfg, rt, backends, steps)
    device_name = torch.cuda.get_device_name() if rt.cuda else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, backends gdn:{backends.gdn} attention:{backends.attn}, "
          f"batch {cfg.train_batch_tokens} tokens x seq {cfg.train_seq_len}, {steps} timed steps")
    print(f"{'layout':<16}{'params':>12}{'ms/step':>10}{'tok/s':>12}{'peak MiB':>10}")
    for r in results:
        print(f"{r['layout']:<16}{r['params']:>12,}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12,}{r['peak_mem_mib']:>10,}")
    ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"hybrid / all-attention tokens/s: {ratio:.3f}")
    print("per-step breakdown of the hybrid (each part alone, ms):")
    for name, ms in parts.items():
        print(f"  {name:<28}{ms:>10.1f}")
    print("bench " + json.dumps(dict(device=device_name, torch=torch.__version__, backends=backends.__dict__,
                                     runs=results, ratio=round(ratio, 4), breakdown_ms=parts), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
