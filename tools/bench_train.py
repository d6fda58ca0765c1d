#!/usr/bin/env python3
"""Training-step benchmark: the default hybrid against an all-attention stack of about the same parameter count,
in one process on one device, plus a per-component breakdown so the next bottleneck is visible.

    python3 tools/bench_train.py                           # on a GPU, the default configuration
    LAYOUT=GGGSGGGSGG python3 tools/bench_train.py         # any train_gpt.py setting applies to the hybrid
    BENCH_STEPS=20 BENCH_WARMUP=5 python3 tools/bench_train.py
    BENCH_VARIANTS="4x128:GDN_HEADS=4,GDN_HEAD_DIM=128;accum4:GRAD_ACCUM_STEPS=4" python3 tools/bench_train.py
    BENCH_GDN_SHAPES=8x64,4x128,16x32 python3 tools/bench_train.py

It times whole optimizer steps (data loader, forward, backward, Muon + Adam, EMA; gradient accumulation as in
train_gpt.py on one rank) with CUDA events after warmup, and reports tokens/s, ms/step and peak memory for each
configuration. The breakdown times each component alone, forward + backward at the training shape (mixers, MLP),
the optimizer step, and the loader; the parts need not add up to the whole (fusion, overlap). DATA_PATH and
TOKENIZER_PATH are not needed: the loader is timed on synthetic shards written to a temporary folder.
BENCH_COMPARE=0 skips the all-attention stack; BENCH_BREAKDOWN=0 the breakdown; BENCH_FUSION=1 times one GDN
mixer (one matmul per input projection) against other forms of it (MIXER_VARIANTS: the projections fused into one
matmul, bf16 between kernels, the convolution's reference fused by torch.compile, and an ablation without the
short convolutions that shows what they cost);
BENCH_PROFILE=1 prints each stack's (and each BENCH_FUSION mixer's) top GPU kernels from torch.profiler.
BENCH_VARIANTS adds whole-step timings of other settings (name:KEY=VALUE,KEY=VALUE;...) in the same process.
BENCH_TTT=1,8 times one score-first TTT adaptation step (train_gpt.ttt_adapt: forward, backward, SGD) of 1 and 8
sequences of EVAL_SEQ_LEN, eager and compiled (and with CUDA graphs, torch.compile's reduce-overhead mode, with
BENCH_TTT_GRAPHS=1), with the GPU kernels' share of each step's time (a step whose kernels take a fraction of its
wall time is bound by launch latency, not by the GPU).
BENCH_GDN_SHAPES times the delta-rule kernel alone (forward + backward at the micro-batch shape) for head layouts
HEADSxDIM: our fla custom op, and fla's public entry point with each backend it can dispatch to here (flash-qla when
installed, K = V = 128), every one first checked against the float64 reference; plus the attention kernels for scale.
Figures print as a table and as one `bench {json}` line.
"""

import importlib.util
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


def print_profile(step, label: str, rows: int, out=lambda msg: print(msg, flush=True)) -> None:
    """One step under torch.profiler: the GPU kernels that took the most time, summed over the step. Only the
    kernels themselves are counted: the CPU-side records of ops (aten::mm, a custom op, Inductor's launch of a
    Triton kernel) and the GPU ranges of annotated regions (Optimizer.step) carry their kernels' time too, and
    counting them as well doubled the total."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    out(f"profile of one {label} step: {total / 1000:.1f} ms of GPU kernels; top {rows}:")
    for e in events[:rows]:
        out(f"  {e.self_device_time_total / 1000:9.2f} ms {e.count:6d}x  {e.key[:110]}")


def bench_steps(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, steps: int, warmup: int) -> dict:
    """ms per optimizer step of the whole training step, as train_gpt.py runs it on one rank."""
    base = tg.GPT(tg.ModelConfig.from_config(cfg), backends).to(rt.device)
    qat = []
    if cfg.qat_frac:  # e.g. BENCH_VARIANTS="qat:QAT_FRAC=0.15": every step of the variant timed with QAT on
        qat = tg.enable_qat(base, cfg)
        tg.set_qat(base, True)
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
    if rt.cuda and os.environ.get("BENCH_PROFILE", "0") != "0":
        print_profile(step, cfg.layout, env_int("BENCH_PROFILE_ROWS", 30))
    loader.close()
    peak = torch.cuda.max_memory_allocated() / 2**20 if rt.cuda else 0.0
    return dict(layout=cfg.layout, params=tg.count_parameters(base), ms_per_step=round(ms, 2),
                tokens_per_s=round(cfg.train_batch_tokens / (ms / 1000)), peak_mem_mib=round(peak),
                qat_matrices=len(qat))


def bench_components(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, repeat: int, report) -> dict:
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
    parts[f"mlp x{len(model.layer_mlp)}"] = (model.mlps[0], len(model.layer_mlp))  # every layer runs one (repeats too)
    for name, (module, n) in parts.items():
        fn = tg.maybe_compile(module, cfg, rt)

        def run(fn=fn):
            xi = x.detach().requires_grad_(True)
            with tg.autocast(rt):
                y = fn(tg.rms_norm(xi))
            y.float().sum().backward()

        timer(run, 2)
        out[name] = round(timer(run, repeat) * n * rt.grad_accum_steps, 2)
        report(name, out[name])
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
    report("embedding head + loss", out["embedding head + loss"])
    opts = tg.build_optimizers(model, cfg, rt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step = lambda: [o.step() for o in opts.all()]  # noqa: E731
    timer(step, 1)  # the first step creates the optimizers' state
    out["optimizer (Muon + Adam)"] = round(timer(step, repeat), 2)
    report("optimizer (Muon + Adam)", out["optimizer (Muon + Adam)"])
    loader = tg.TrainLoader(cfg, rt)
    batches = lambda: [loader.next_batch() for _ in range(rt.grad_accum_steps)]  # noqa: E731
    timer(batches, 1)  # the first call waits for the first prefetch
    out["data loader"] = round(timer(batches, repeat), 2)
    report("data loader", out["data loader"])
    loader.close()
    return out


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'name:KEY=VALUE,KEY=VALUE;name2:...' -> [(name, {KEY: VALUE})]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        name, _, body = item.partition(":")
        pairs = [kv.split("=", 1) for kv in body.split(",") if kv]
        if not name or any(len(kv) != 2 for kv in pairs):
            raise ValueError(f"BENCH_VARIANTS item {item!r} is not name:KEY=VALUE,...")
        out.append((name, {k.strip(): v.strip() for k, v in pairs}))
    return out


def variant_config(cfg: tg.Config, overrides: dict[str, str]) -> tg.Config:
    """The environment's configuration with `overrides` on top (validated as train_gpt.py would), same data."""
    unknown = set(overrides) - {f.upper() for f in cfg.__dict__}
    if unknown:
        raise ValueError(f"BENCH_VARIANTS: {sorted(unknown)} are not train_gpt.py settings")
    out = tg.Config.from_env({**os.environ, **overrides})
    return tg.Config(**{**out.__dict__, "data_path": cfg.data_path})


def _delta_rule_candidates(mc: tg.ModelConfig) -> list[tuple[str, object]]:
    """(name, fn(q, k, v, g, beta, scale) -> o) for every fast delta-rule path that can run here: the training
    custom op with fla's kernels, Triton only (fla's Hopper guard is lifted for the whole benchmark: the check
    below is what vouches for each path) and with fla's TileLang backward piece when tilelang is installed; and the
    same op with FlashQLA's kernels where they apply."""

    def fla(tilelang: str):
        def fn(q, k, v, g, b, s):
            os.environ["FLA_TILELANG"] = tilelang
            return tg.gdn_kernel(q, k, v, g, b, s, "fla")
        return fn

    out = [("fla op, triton", fla("0"))]
    if importlib.util.find_spec("tilelang") is not None:
        out.append(("fla op, tilelang dqkwg", fla("1")))
    if not tg.qla_unavailable(mc):
        out.append(("qla op (FlashQLA)", lambda q, k, v, g, b, s: tg.gdn_kernel(q, k, v, g, b, s, "qla")))
    return out


def _errors(fn, mc: tg.ModelConfig, T: int, device: torch.device) -> float:
    """Largest relative error of o and the five gradients against the float64 chunked reference."""
    inputs = tg._gdn_check_inputs(mc, 2, T, device, 0)
    scale = mc.gdn_head_dim ** -0.5
    fast = [t.clone().requires_grad_(True) for t in inputs]
    ref = [t.double().requires_grad_(True) for t in inputs]
    o, (o_ref, _) = fn(*fast, scale), tg.gdn_chunked_reference(*ref, scale=scale)
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    o.backward(do.to(o.dtype))
    o_ref.backward(do.double())
    return max([tg.rel_err(o, o_ref)] + [tg.rel_err(a.grad, b.grad) for a, b in zip(fast, ref)])


def bench_gdn_kernels(cfg: tg.Config, rt: tg.Runtime, spec: str, repeat: int, report) -> list[dict]:
    """The delta-rule kernel alone, forward + backward, at B = micro-batch / seq_len, per head layout and path."""
    mc = tg.ModelConfig.from_config(cfg)
    T = cfg.train_seq_len
    B = cfg.train_batch_tokens // rt.grad_accum_steps // T
    timer = Timer(rt.device)
    rows = []
    import fla.ops.common.chunk_o as chunk_o  # noqa: PLC0415

    guard, tilelang_env = chunk_o.TRITON_ABOVE_3_7_1, os.environ.get("FLA_TILELANG")
    chunk_o.TRITON_ABOVE_3_7_1 = True  # every path is checked against the reference before it is timed
    for item in spec.split(","):
        H, K = (int(x) for x in item.lower().split("x"))
        m = tg.ModelConfig(**{**mc.__dict__, "gdn_heads": H, "gdn_head_dim": K})
        V = int(K * m.gdn_expand_v)
        for name, fn in _delta_rule_candidates(m):
            try:
                err = _errors(fn, m, T, rt.device)
            except Exception as e:  # an optional backend that cannot run here is reported, not timed
                rows.append(dict(heads=H, dim=K, path=name, max_rel_err=None, ms=None, error=f"{type(e).__name__}: {e}"[:300]))
                report(rows[-1])
                continue
            if not err <= cfg.kernel_check_tol:
                rows.append(dict(heads=H, dim=K, path=name, max_rel_err=err, ms=None, error="fails the kernel check"))
                report(rows[-1])
                continue
            inputs = [t.requires_grad_(True) for t in tg._gdn_check_inputs(m, B, T, rt.device, 1)]
            do = torch.randn(B, T, H, V, device=rt.device, dtype=torch.bfloat16)

            def run(fn=fn, inputs=inputs, do=do, K=K):
                fn(*inputs, K ** -0.5).backward(do)

            timer(run, 2)
            rows.append(dict(heads=H, dim=K, path=name, max_rel_err=float(f"{err:.2e}"),
                             ms=round(timer(run, repeat), 3)))
            report(rows[-1])
    chunk_o.TRITON_ABOVE_3_7_1 = guard
    if tilelang_env is None:
        os.environ.pop("FLA_TILELANG", None)
    else:
        os.environ["FLA_TILELANG"] = tilelang_env
    hd = mc.model_dim // mc.num_heads
    q = torch.randn(B, T, mc.num_heads, hd, device=rt.device, dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(B, T, mc.num_kv_heads, hd, device=rt.device, dtype=torch.bfloat16, requires_grad=True)
          for _ in range(2)]
    for name, window, backend in (("attention causal (sdpa)", 0, "sdpa"),
                                  (f"attention window {mc.swa_window} ({cfg.attn_backend})", mc.swa_window,
                                   cfg.attn_backend)):
        def run(window=window, backend=backend):
            tg.attention(q, *kv, window, backend).float().sum().backward()

        timer(run, 2)
        rows.append(dict(heads=mc.num_heads, dim=hd, path=name, max_rel_err=None, ms=round(timer(run, repeat), 3)))
        report(rows[-1])
    return rows


class FusedGDN(tg.GatedDeltaNet):
    """The GDN mixer's training forward with its six input projections as one matmul and its three convolutions as
    one (weights concatenated on the fly), the layout train_gpt.py used from 7498479 until BENCH_FUSION measured it
    slower; timed against the production mixer (BENCH_FUSION=1)."""

    def forward(self, x, state=None, stream=None):
        B, T, _ = x.shape
        H, hk, hv = self.heads, self.heads * self.k_dim, self.heads * self.v_dim
        projections = (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj)
        pre = F.linear(x, torch.cat([p.weight for p in projections]))
        pre_qkv, pre_g, pre_a, pre_b = pre.split([2 * hk + hv, hv, H, H], dim=-1)
        conv_w = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight])
        qkv = [t.reshape(B, T, H, -1) for t in F.silu(tg.short_conv(pre_qkv, conv_w)).split([hk, hk, hv], dim=-1)]
        q, k = F.normalize(qkv[0].float(), dim=-1), F.normalize(qkv[1].float(), dim=-1)
        g, beta = self.gates(pre_a, pre_b)
        o, _ = tg.gdn_core(self.backend, q, k, qkv[2], g, beta, self.k_dim ** -0.5)
        gate = F.silu(pre_g.float()).view(B, T, H, self.v_dim)
        o = tg.rms_norm(o.float(), self.o_norm_weight.float()) * gate
        return self.o_proj(o.reshape(B, T, H * self.v_dim).to(x.dtype))


class BF16GDN(tg.GatedDeltaNet):
    """The production mixer without its explicit float32 casts: q, k normalized, the output norm and its gate
    computed from bf16 tensors (torch.compile still computes inside its kernels in float32, but what is stored
    between them, and saved for the backward, is bf16). Not the same rounding: a candidate, timed only."""

    def forward(self, x, state=None, stream=None):
        B, T, _ = x.shape
        H = self.heads
        q, k, v = (F.silu(tg.short_conv(p(x), c.weight)).reshape(B, T, H, -1) for p, c in (
            (self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv)))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g, beta = self.gates(self.a_proj(x), self.b_proj(x))
        o, _ = tg.gdn_core(self.backend, q, k, v, g, beta, self.k_dim ** -0.5)
        gate = F.silu(self.g_proj(x)).reshape(B, T, H, self.v_dim)
        o = tg.rms_norm(o.to(x.dtype), self.o_norm_weight.to(x.dtype)) * gate
        return self.o_proj(o.reshape(B, T, H * self.v_dim))


class NoConvGDN(tg.GatedDeltaNet):
    """Ablation for the breakdown, not a model: the production mixer with its three short convolutions skipped
    (SiLU applied to the projections directly). Its time against the production mixer's is what the convolutions
    cost, forward and backward."""

    def forward(self, x, state=None, stream=None):
        B, T, _ = x.shape
        H = self.heads
        q, k, v = (F.silu(p(x)).reshape(B, T, H, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        g, beta = self.gates(self.a_proj(x), self.b_proj(x))
        o, _ = tg.gdn_core(self.backend, q, k, v, g, beta, self.k_dim ** -0.5)
        gate = F.silu(self.g_proj(x).float()).reshape(B, T, H, self.v_dim)
        o = tg.rms_norm(o.float(), self.o_norm_weight.float()) * gate
        return self.o_proj(o.reshape(B, T, H * self.v_dim).to(x.dtype))


# (label, class, conv backend: None = what resolve_backends picked, as train_gpt.py runs)
MIXER_VARIANTS = (("train_gpt.py", tg.GatedDeltaNet, None), ("short conv by torch.compile", tg.GatedDeltaNet, "torch"),
                  ("fused projections", FusedGDN, "torch"), ("bf16 between kernels", BF16GDN, "torch"),
                  ("ablation: no short convs", NoConvGDN, "torch"))


def bench_fusion(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, repeat: int) -> list[dict]:
    """One GDN mixer, compiled, forward + backward at the micro-batch shape, in each form of MIXER_VARIANTS (the
    production mixer first); with BENCH_PROFILE=1 also each form's top GPU kernels. Every form is compiled and warmed
    up before any is timed: on an H100, whichever form was timed first after the kernel checks once took 7.9 and
    9.1 ms, against 5.3-5.5 for the same forms timed later in the same process (logs/bench/h100_j16_*, h100_j17_*)."""
    mc = tg.ModelConfig.from_config(cfg)
    B, T = cfg.train_batch_tokens // rt.grad_accum_steps // cfg.train_seq_len, cfg.train_seq_len
    x = torch.randn(B, T, mc.model_dim, device=rt.device)
    timer, forms, rows = Timer(rt.device), [], []
    for name, cls, conv in MIXER_VARIANTS:
        torch.manual_seed(0)
        name, conv = (f"{name} (conv {backends.conv})", backends.conv) if conv is None else (name, conv)
        mixer = cls(mc.model_dim, mc.gdn_heads, mc.gdn_head_dim, mc.gdn_expand_v, mc.gdn_conv_size,
                    backends.gdn, conv, neg_eigval=mc.gdn_neg_eigval).to(rt.device)
        fn = tg.maybe_compile(mixer, cfg, rt)

        def run(fn=fn):
            xi = x.detach().requires_grad_(True)
            with tg.autocast(rt):
                y = fn(xi)
            y.float().sum().backward()

        timer(run, 3)
        forms.append((name, run))
    for name, run in forms:
        timer(run, 2)
        if rt.cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = timer(run, repeat)
        peak = torch.cuda.max_memory_allocated() / 2**20 if rt.cuda else 0.0
        rows.append(dict(mixer=name, ms=round(ms, 3), peak_mem_mib=round(peak)))
        print(f"  {name:<42}{ms:>9.3f} ms  peak {peak:,.0f} MiB", flush=True)
        if rt.cuda and os.environ.get("BENCH_PROFILE", "0") != "0":
            print_profile(run, name, env_int("BENCH_PROFILE_ROWS", 30))
    return rows


def gpu_kernel_ms(fn) -> float:
    """GPU time of one call of `fn`, summed over its kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1000


def bench_ttt(cfg: tg.Config, rt: tg.Runtime, backends: tg.Backends, spec: str, repeat: int) -> list[dict]:
    """One TTT adaptation step (ttt_adapt with one epoch over exactly one step's sequences) with each module that
    TTT_COMPILE can pick here (eager, compiled, and with BENCH_TTT_GRAPHS=1 CUDA graphs), per batch size in `spec`
    (sequences of EVAL_SEQ_LEN, as one rank of one process takes them)."""
    mc = tg.ModelConfig.from_config(cfg)
    L, rows = cfg.eval_len, []
    model = tg.GPT(mc, backends).to(rt.device)
    params = tg.ttt_parameters(model, cfg.ttt_params)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.SGD(params, lr=1e-6, momentum=cfg.ttt_momentum)  # tiny steps: the weights barely move
    # the modules train_gpt.py would run TTT with (ttt_module), one per TTT_COMPILE that applies here
    modes = ("0", "1", "graphs") if os.environ.get("BENCH_TTT_GRAPHS", "0") != "0" else ("0", "1")
    compiled, variants = tg.maybe_compile(model, cfg, rt), {}
    for mode in modes:
        fwd, how = tg.ttt_module(model, compiled, tg.Config(**{**cfg.__dict__, "ttt_compile": mode}), rt)
        variants.setdefault(how, fwd if fwd is not None else model)  # a compiled module has no truth value
    timer = Timer(rt.device)
    for b in (int(x) for x in spec.split(",")):
        tcfg = tg.Config(**{**cfg.__dict__, "ttt_batch_seqs": b, "ttt_epochs": 1})
        span = torch.randint(0, mc.vocab_size, (b * L + 1,))
        for name, fwd in variants.items():
            def run(fwd=fwd):
                tg.ttt_adapt(model, opt, params, span, tcfg, rt, fwd)

            try:
                timer(run, 3)
            except Exception as e:  # an experimental variant that cannot run here is reported, not timed
                rows.append(dict(seqs=b, seq_len=L, mode=name, ms=None, error=f"{type(e).__name__}: {e}"[:300]))
                print(f"  {b:>3} x {L:<6}{name:<26} failed: {rows[-1]['error']}", flush=True)
                continue
            ms = timer(run, repeat)
            kernels = gpu_kernel_ms(run) if rt.cuda else None
            rows.append(dict(seqs=b, seq_len=L, mode=name, ms=round(ms, 2),
                             gpu_kernel_ms=None if kernels is None else round(kernels, 2)))
            share = "" if kernels is None else f"  GPU kernels {kernels:.2f} ms ({100 * kernels / ms:.0f}%)"
            print(f"  {b:>3} x {L:<6}{name:<26}{ms:>9.2f} ms/step{share}", flush=True)
    return rows


def print_kernel(r: dict) -> None:
    err = "" if r["max_rel_err"] is None else f"  max rel err {r['max_rel_err']:.1e}"
    ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
    print(f"  {r['heads']:>3}x{r['dim']:<4}{r['path']:<34}{ms:>9}{err}  {r.get('error', '')}", flush=True)


def print_run(r: dict) -> None:
    print(f"{r['layout']:<16}{r['params']:>12,}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12,}{r['peak_mem_mib']:>10,}",
          flush=True)


def main() -> int:
    """Prints each figure as soon as it is measured (a long benchmark cut short still reports what it has)."""
    cfg = tg.Config.from_env()
    steps, warmup = env_int("BENCH_STEPS", 10), env_int("BENCH_WARMUP", 3)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rt = tg.Runtime(0, 1, 0, device, cfg.grad_accum_steps or tg.default_accum(cfg, 1))
    log = tg.Logger(None)  # silent: the variants' kernel checks
    mc = tg.ModelConfig.from_config(cfg)
    backends = tg.resolve_backends(cfg, rt, mc, lambda msg, console=True: print(msg, flush=True),
                                   check=True)  # the kernel check, as before training, with its errors printed
    device_name = torch.cuda.get_device_name() if rt.cuda else "cpu"
    # each kind of layer in LAYOUT with what it runs on (full attention is always SDPA; ATTN_BACKEND is the window's)
    print(f"device: {device_name}, torch {torch.__version__}, backends "
          f"{tg.describe_backends(cfg.layout, backends, cfg.swa_window)}, batch {cfg.train_batch_tokens} tokens x seq "
          f"{cfg.train_seq_len}, {steps} timed steps", flush=True)
    kernels, ttt = [], []
    if os.environ.get("BENCH_TTT"):
        print(f"TTT adaptation step ({cfg.ttt_params} parameters, SGD):", flush=True)
        ttt = bench_ttt(cfg, rt, backends, os.environ["BENCH_TTT"], steps)
    if os.environ.get("BENCH_GDN_SHAPES"):
        print("sequence-mixer kernels alone, forward + backward per micro-batch (ms):", flush=True)
        kcfg = tg.Config(**{**cfg.__dict__, "attn_backend": backends.attn})
        kernels = bench_gdn_kernels(kcfg, rt, os.environ["BENCH_GDN_SHAPES"], steps, print_kernel)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_shards(Path(tmp), cfg.vocab_size, 4 * cfg.train_batch_tokens * (steps + warmup) + 1)
        cfg = tg.Config(**{**cfg.__dict__, "data_path": data})
        attn_cfg = tg.Config(**{**cfg.__dict__, "layout": attention_layout_like(mc, backends)})
        fusion = []
        if os.environ.get("BENCH_FUSION", "0") != "0":
            print("one GDN mixer, forward + backward per micro-batch:", flush=True)
            fusion = bench_fusion(cfg, rt, backends, steps)
        print(f"{'layout':<16}{'params':>12}{'ms/step':>10}{'tok/s':>12}{'peak MiB':>10}", flush=True)
        results, ratio = [], None
        for c in (cfg, attn_cfg) if os.environ.get("BENCH_COMPARE", "1") != "0" else (cfg,):
            results.append(bench_steps(c, rt, backends, steps, warmup))
            print_run(results[-1])
        if len(results) == 2:
            ratio = round(results[0]["tokens_per_s"] / results[1]["tokens_per_s"], 4)
            print(f"hybrid / all-attention tokens/s: {ratio:.3f}", flush=True)
        for name, overrides in parse_variants(os.environ.get("BENCH_VARIANTS", "")):
            vcfg = variant_config(cfg, overrides)
            vrt = tg.Runtime(0, 1, 0, device, vcfg.grad_accum_steps or tg.default_accum(vcfg, 1))
            vb = tg.resolve_backends(vcfg, vrt, tg.ModelConfig.from_config(vcfg), log, check=True)
            results.append({**bench_steps(vcfg, vrt, vb, steps, warmup), "layout": name})
            print_run(results[-1])
        parts = {}
        if os.environ.get("BENCH_BREAKDOWN", "1") != "0":
            print("per-step breakdown of the hybrid (each part alone, ms):", flush=True)
            parts = bench_components(cfg, rt, backends, steps,
                                     lambda name, ms: print(f"  {name:<28}{ms:>10.1f}", flush=True))
    print("bench " + json.dumps(dict(device=device_name, torch=torch.__version__, backends=backends.__dict__,
                                     runs=results, ratio=ratio, breakdown_ms=parts, kernels=kernels, fusion=fusion,
                                     ttt=ttt),
                                sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
