"""Gated DeltaNet + attention (full or sliding-window) hybrid for the Parameter Golf challenge.

One file trains the model under a wallclock cap, exports it as a compressed artifact, reads the artifact back into a
fresh model and scores it in canonical bits per byte on the validation split. Every setting is an environment variable
named after a field of `Config` (upper case); the defaults are the submitted configuration.

Launch:
    8 GPUs (record track):  torchrun --standalone --nproc_per_node=8 train_gpt.py
    1 GPU:                  python train_gpt.py          (or torchrun --standalone --nproc_per_node=1 train_gpt.py)
    CPU smoke test:         PRESET=tiny DATA_PATH=<shards> TOKENIZER_PATH=<model> python train_gpt.py
    rescore an artifact:    EVAL_ONLY=1 ARTIFACT_PATH=artifacts/<run>.pgz python train_gpt.py
    export again:           CHECKPOINT_PATH=ckpt/<run>.pt when training, then EXPORT_FROM=ckpt/<run>.pt (other export
                            settings) python train_gpt.py
    resume a long run:      STATE_PATH=ckpt/<run>.state STATE_EVERY=500 when training (on one process Ctrl-C writes it
                            too, and stops); then the same command with RESUME_FROM=ckpt/<run>.state goes on from it

Sections, in the order data flows:
    1 config · 2 runtime and logging · 3 data and byte tables · 4 layers · 5 sequence mixers (GDN, attention; each
    with a plain PyTorch reference) · 6 model · 7 optimizers · 8 quantization and artifact · 9 evaluation ·
    10 kernel checks · 11 training · 12 main
"""

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import platform
import random
import signal
import statistics
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------------------
# 1. Config
# ------------------------------------------------------------------------------------------------------------------

WARMDOWN_SHAPES = {  # u: the fraction of the warmdown done, 0 -> 1; each returns the LR multiplier, 1 -> 0
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
    "sqrt": lambda u: 1.0 - math.sqrt(u),
}
ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: counted code + compressed model
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
MUON_VARIANTS = ("muon", "normuon", "normuon_gdn")  # see Config.muon_variant
STREAM_RESET_SEGMENT, STREAM_RESET_MAX_SEGMENT = 2048, 8192  # STREAM_SEGMENT under STREAM_RESET=1: default, limit
MICRO_BATCH_TOKENS = 131_072  # the default accumulation: each rank's share of a step in micro-batches of this size


@dataclass(frozen=True)
class Config:
    # data and run
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    vocab_size: int = 1024
    run_id: str = ""  # "" -> a timestamp
    seed: int = 1337
    preset: str = ""  # "tiny": every code path on a CPU in seconds
    # training
    iterations: int = 20000
    train_batch_tokens: int = 262_144  # per step, all ranks; at 300 s on one GPU beats 524,288 and 131,072 (RESULTS.md)
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0 -> micro-batches of at most MICRO_BATCH_TOKENS per rank (default_accum)
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    warmup_steps: int = 20  # compile/autotune steps before the timer, undone afterwards
    lr_warmup_steps: int = 20
    warmdown_frac: float = 0.35  # fraction of the run (steps or wallclock, whichever is further) spent decaying to 0
    warmdown_shape: str = "linear"  # how the LR falls over the warmdown, u going 0 -> 1: linear 1 - u | cosine
    #                                 (1 + cos(pi u)) / 2 | sqrt 1 - sqrt(u) (the "1-sqrt" cooldown)
    grad_clip_norm: float = 0.0  # 0 = off
    val_loss_every: int = 0  # 0 = only at the end
    train_log_every: int = 50
    # model
    layout: str = "AAAAAAAGAA"  # G = Gated DeltaNet, S = sliding-window attention, A = full attention, N = full
    #   attention without position encoding (NoPE: position comes only from the causal mask and the layers before
    #   it, e.g. GDN's recurrence and short conv; AAAGNNNNNNGNNN scored 0.0086 worse at 300 s, one seed); P = full
    #   attention and a GDN side by side, outputs summed (ParallelMixer; not measured yet); lower case reuses the
    #   mixer weights of the nearest earlier upper-case layer of that kind; '(...)k' runs a group of layers k
    #   times, reusing its mixers and MLPs (depth recurrence, parse_layout). The default: one GDN layer
    #   as the 8th of 10, 576 wide (the stack of 10 beat 576 x 11 by 0.0057 and 0.0014 after TTT on seeds 1337 and
    #   1338, by 4% faster steps; two GDN layers were worse). With MUON_WEIGHT_DECAY 0.06 it is 0.0018 better after
    #   TTT than the GDN layer as the 7th at 0.08 over seeds 1337-1339, on every seed and at every stage (300 s, one
    #   H200). At sequence 2048 full attention is faster than a window (RESULTS.md)
    model_dim: int = 576  # with 11 layers: 0.0035 and 0.0067 better after TTT than 512 wide x 14 at the same size
    #                       (300 s, seeds 1337 and 1338, same machine each), most of it by 6-7% faster steps;
    #                       640 wide x 9 (AAAAAGAAA) 0.0007 better on seed 1337, about 0.006 worse per step (RESULTS.md)
    mlp_mult: float = 2128 / 576  # MLP 2,128 wide (a multiple of 16), which fills the 16 MB at 576 x 10: 34,559,888
    #                               parameters, 15,984,994 bytes with lease 39's code (576 x 11 took 3.25, 1,872)
    mlp_neg_slope: float = 0.0  # MLP activation: relu(h)^2 at 0, else leaky_relu(h, slope)^2 ("LeakyReLU(0.5)^2" in
    #                              the field's records, where it was reported 0.0015-0.003 better at 8xH100 scale;
    #                              0.5 on the two-GDN hybrid at 300 s: 0.0030 worse, one seed; RESULTS.md)
    num_heads: int = 9  # attention heads, 64 wide at MODEL_DIM 576
    num_kv_heads: int = 3  # (512 x 14 ran 8 heads over 4 KV heads)
    swa_window: int = 512  # tokens each query sees, itself included. The two-GDN hybrid with S for A layers at 300 s:
    #                        window 512 0.0075 worse, 1024 0.0088 worse (one seed each; RESULTS.md)
    rope_dims: int = 0  # 0 = the whole head dimension
    rope_base: float = 10000.0
    xsa_last: int = 0  # exclusive self attention (XSA, Zhai 2026, arXiv:2603.09078) in the last XSA_LAST attention
    #                    mixers (A, N, S or P's; in layout order, a shared mixer counted once; more than there are
    #                    = all): each head's output loses its component along the token's own value vector. 0 = off
    #                    At 300 s (RESULTS.md): on every layer, all-attention 0.0118 better (two seeds), the
    #                    two-GDN hybrid 0.0034 worse; on the hybrid's last 4, 0.0046 worse (one seed)
    qk_gain_init: float = 0.0  # a learnable gain per query head, started at this, on the RMS-normed queries of
    #                            every attention mixer (A, N, S, P's): a head's logits can reach gain x sqrt(head_dim),
    #                            not sqrt(head_dim) alone. The challenge's baseline script starts its gains at 1.5,
    #                            later records at 4-6. 0 = off: the fixed scale of every run through lease 52.
    #                            At 4 the default was 0.0086 better after TTT at 300 s (one seed; the gains
    #                            settled at 1.1-3.2). On the same batches before the warmdown they lower the
    #                            training loss more on all-attention (0.033 nats) than on the default (0.016-0.023):
    #                            the hybrid's lead there falls from about 0.017 to 0.001 (RESULTS.md, lease 54).
    #                            Off until both stacks' scores with the gains are in
    attn_head_gate: bool = False  # every attention mixer's heads gated before the output projection: head h's output
    #                               times sigmoid(w_h . x) of the mixer's input x (Qiu et al. 2025, "Gated Attention
    #                               for Large Language Models", the head-wise form; the GDN mixer has its own gate).
    #                               Starts at 0.5 (w = 0). Not measured on either stack yet (RESULTS.md)
    resid_mix: bool = False  # the challenge baseline's per-layer input mix: layer i reads a_i * x + b_i * x0, x the
    #                          residual stream and x0 the normed embedding (per-channel vectors, a = 1 and b = 0 at
    #                          the start, so the model starts as without them). Not measured yet (RESULTS.md)
    branch_scales: bool = False  # the baseline's per-channel scales on each layer's mixer and MLP outputs before they
    #                              join the stream (1 at the start). Not measured yet (RESULTS.md)
    gdn_heads: int = 8  # 8 x 64 over 4 x 128: 0.0019 better at 300 s (two GDN layers, two seeds), 3% slower steps.
    #                     One GDN layer (seed 1338): 4 x 128, 16 x 32 and 16 x 64 0.0027, 0.0028 and 0.0089 worse
    #                     (RESULTS.md)
    gdn_head_dim: int = 64  # key dimension per head (FlashQLA needs 128, so 64 runs fla's kernels; README, throughput)
    gdn_expand_v: float = 1.0  # value dimension = gdn_head_dim * gdn_expand_v
    gdn_conv_size: int = 4
    gdn_neg_eigval: bool = False  # beta = 2 sigmoid(W_b x) in (0, 2) instead of (0, 1): each step's transition
    #                               I - beta k k^T then has eigenvalues in (-1, 1], not (0, 1] (negative eigenvalues,
    #                               Grazzi et al. 2024; fla's allow_neg_eigval). The kernel check covers that range.
    #                               300 s, two GDN layers, two seeds: 0.0012 better on average, within the seeds'
    #                               spread; one GDN layer (seed 1338): 0.0006 worse after TTT (RESULTS.md)
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    bigram_buckets: int = 0  # BigramHash: 0 = off, else hashed (previous, current) token buckets added to the input.
    #                          2,048 x 64 on the default at 300 s: 0.0111 worse after TTT (one seed; at sp1024 a
    #                          pair's row is 15% its own by occurrences, tools/bigram_buckets.py; RESULTS.md)
    bigram_dim: int = 128  # BigramHash table width, projected to MODEL_DIM
    smear_gate: bool = False  # SmearGate: add a gated copy of the previous token's embedding (never across a BOS).
    #                           On the default at 300 s: 0.0018 worse after TTT over two seeds (RESULTS.md)
    unet_skips: bool = True  # U-Net skips: the first half's layer outputs feed the mirrored layers of the second half.
    #                          300 s on an H200, two seeds each: the hybrid 1.3798 with them, 1.3860 without; no gain
    #                          for all-attention (one seed; RESULTS.md)
    bos_id: int = 1  # the tokenizer's BOS (SPEC: 1); BigramHash and SmearGate never look back across it
    residual_bf16: bool = True  # under autocast (CUDA) keep the residual stream in bf16, as the field's records do,
    #                             not fp32: half the memory traffic of the norms and residual adds, 275.0 -> 257.4
    #                             ms/step on an H100 with no loss at 300 s (README, Throughput; RESULTS.md)
    # kernels
    compile: str = "auto"  # auto (on for CUDA) | 1 | 0
    compile_mode: str = "default"  # torch.compile mode of the training model: default | max-autotune-no-cudagraphs
    #                                (Triton matmul templates autotuned, element-wise code fused into them; slower to
    #                                compile, inside the warmup steps before the timer)
    ddp_overlap: bool = False  # several ranks: 1 lets dynamo's DDPOptimizer split the compiled graph at DDP's
    #                            gradient buckets so their all-reduces overlap the backward; 0 keeps one graph and
    #                            all-reduces after the backward. Two H200s: 131.8 ms/step split, 118.7 in one graph,
    #                            for an all-reduce of 0.5 ms (README, Throughput)
    gdn_backend: str = "auto"  # auto (qla where it applies, else fla, on CUDA) | fla | qla (FlashQLA, K=V=128) | torch
    gdn_conv: str = "auto"  # GDN short conv + SiLU when training: auto (fla's Triton kernel with a fast GDN backend) |
    #                         fla | torch (shifted multiply-adds, fused by torch.compile)
    attn_backend: str = "auto"  # auto | fa3 | varlen | sdpa
    kernel_check: bool = True
    kernel_check_tol: float = 2e-2  # relative error allowed between a fast kernel and its float64 reference
    # optimizers
    matrix_lr: float = 0.04  # Muon
    scalar_lr: float = 0.04  # Adam: vectors, gates, decay parameters, conv kernels
    embed_lr: float = 0.05  # Adam: tied embedding
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_ns_steps: int = 5
    muon_variant: str = "normuon"  # muon | normuon: each row (output neuron) of the orthogonalized update divided
    #                                by the root of its running mean square (MUON_BETA2), then rescaled to Muon's
    #                                norm. 300 s on one H100: the hybrid (GDN 4 x 128) 1.4198 against 1.4245 with
    #                                muon; all-attention 1.4210 against 1.4190 (RESULTS.md) | normuon_gdn:
    #                                normuon on the GDN mixers' matrices, plain Muon on the others (GDN 8 x 64:
    #                                1.4201 against 1.4167 with normuon)
    muon_beta2: float = 0.95  # normuon: decay of the per-row second moment
    muon_weight_decay: float = 0.06  # Muon matrices shrink by 1 - lr x this per step. 300 s, hybrid: 1.4176 (0),
    #                                   1.3948 (0.04), 1.3839 (0.08); 576 x 10: 0.12 0.0057 worse than 0.08, 0.06
    #                                   0.0013 and 0.0008 better on seeds 1337 and 1338, one machine each (RESULTS.md)
    embed_weight_decay: float = 0.0
    ema_decay: float = 0.997  # 0 = evaluate the raw weights
    ema_compare: str = ""  # diagnostic, e.g. "0,0.99,0.999": more decays (0 = the raw weights), each averaged beside
    #                        EMA_DECAY and scored like the pre-quant weights after training (one lerp per step each)
    # evaluation
    eval_seq_len: int = 0  # 0 -> train_seq_len
    eval_stride: int = 512  # window mode: later windows score their last EVAL_STRIDE targets (at most EVAL_SEQ_LEN;
    #                         0 or EVAL_SEQ_LEN: plain, non-overlapping windows)
    eval_mode: str = "window"  # window (plain, or sliding with EVAL_STRIDE) | stream (carried state, see section 9)
    eval_batch_tokens: int = 262_144  # tokens per forward pass per rank (windows; lanes x segment when streaming)
    stream_segment: int = 32768  # tokens per lane per forward pass (stream mode; 2048 when STREAM_RESET=1 and unset)
    stream_lanes: int = 64  # lanes in all, split over ranks, so a score does not depend on the GPU count (stream mode
    #                         without TTT; TTT streams one lane)
    stream_warmup: int = 2048  # tokens before each lane's first target it reads, unscored, to prime its state (0 = off)
    stream_reset: bool = False  # restart every layer's state at each BOS (document start)
    ttt_enabled: bool = True  # score-first test-time training on the validation stream
    ttt_chunk_tokens: int = 32768
    ttt_epochs: int = 3
    ttt_optimizer: str = "sgd"  # sgd | adamw
    ttt_lr: float = 0.005  # the hybrid's: within 0.0005 of its best at 300 s (0.01) and 600 s (0.003); RESULTS.md
    ttt_momentum: float = 0.9
    ttt_params: str = "all"  # all | mlp | scalar (norms, gates, decay parameters, convs) | gdn (GDN mixers)
    ttt_state: str = "rebuild"  # stream mode, after an update: rebuild the lane's state with the new weights from the
    #                             STREAM_WARMUP tokens before the next chunk | carry it (made by the earlier weights)
    ttt_seq_len: int = 0  # 0 -> EVAL_SEQ_LEN
    ttt_batch_seqs: int = 8  # sequences per step, all ranks together (the steps do not depend on the rank count)
    ttt_compile: str = "graphs"  # TTT's window scoring and steps: 0 eager | 1 torch.compile | graphs (+ CUDA graphs)
    eval_max_seconds: float = 540.0  # 0 = no limit; TTT adaptation stops when the evaluation would run past this
    val_max_tokens: int = 0  # 0 = the whole split; anything else is a partial, non-comparable score
    eval_only: bool = False
    artifact_path: str = ""  # "" -> artifacts/{run_id}.pgz
    checkpoint_path: str = ""  # training also saves the unquantized weights it exports here (EMA applied; not counted)
    export_from: str = ""  # no training: calibrate, quantize, export and score the weights of a CHECKPOINT_PATH file
    state_path: str = ""  # every STATE_EVERY steps, training writes here all it needs to go on (weights, averages,
    #                       optimizer state, data position, clock), atomically; RESUME_FROM continues from it
    state_every: int = 0  # steps between writes of STATE_PATH, with the clock paused (0 = none)
    resume_from: str = ""  # continue training from a STATE_PATH file: the same model, this run's settings
    # export
    quant_method: str = "gptq"  # gptq (full-Hessian, calibrated on training batches) | rtn (round to nearest)
    gptq_calib_tokens: int = 262_144  # training tokens (all ranks together) for the input statistics H = X^T X
    gptq_reserve_seconds: float = 10.0  # wallclock kept for calibration, which must happen inside the cap
    gptq_block: int = 128
    gptq_damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    quant_compare: bool = False  # also export round-to-nearest and score it, to report the GPTQ gain
    matrix_bits: int = 6
    embed_bits: int = 8
    matrix_clip_sigmas: float = 12.85
    matrix_clip_fit: bool = True  # export at the matrix clip that fills ARTIFACT_LIMIT_BYTES (fit_matrix_clip),
    #                               starting at MATRIX_CLIP_SIGMAS, within [MATRIX_CLIP_FIT_MIN, MATRIX_CLIP_FIT_MAX];
    #                               0: export at MATRIX_CLIP_SIGMAS itself (lease 12: the fit gained 0.0013 on the
    #                               two-GDN hybrid's weights and 0.0014 on all-attention's, after TTT)
    matrix_clip_fit_min: float = 8.0  # the narrowest clip measured (lease 11: better than 10; below 8 not measured)
    matrix_clip_fit_max: float = 24.0
    embed_clip_sigmas: float = 6.0  # the int8 embedding's per-row clip (lease 14, the two-GDN hybrid at 300 s: 20 -> 6
    #                                 took the round trip 1.3693 -> 1.3606 and the score after TTT 1.3582 -> 1.3558, the
    #                                 clip fit paying for its 113 KB with a wider matrix clip)
    qat_frac: float = 0.0  # quantization-aware training over the last QAT_FRAC of the run (progress as for
    #                        WARMDOWN_FRAC): the matrices exported as ints are used rounded to their int grid in the
    #                        forward, gradients straight through to the fp32 weights (section 8). 0 = off: lease 14's
    #                        QAT_FRAC=0.15 (two-GDN hybrid, 300 s) ended 0.0054 worse before quantization and 0.0010
    #                        worse after GPTQ and TTT, with the same quantization gap
    qat_clip_sigmas: float = 10.6  # the grid QAT rounds to, as MATRIX_CLIP_SIGMAS (the clip fit exported the two-GDN
    #                                hybrid and all-attention at 10.49-10.71 on leases 12 and 13)
    compressor: str = "brotli"  # brotli | zstd
    packing: str = "byte"  # byte (one quantized value per byte) | dense (bits-wide fields); see section 8

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: dict | None = None) -> "Config":
        env = os.environ if env is None else env
        values = dict(PRESETS.get(env.get("PRESET", ""), {}))
        if env.get("PRESET", "") not in PRESETS:
            raise ValueError(f"PRESET={env['PRESET']!r} is unknown; choose one of {sorted(k for k in PRESETS if k)}")
        for f in fields(cls):
            if f.name.upper() in env:
                values[f.name] = _parse_env_value(f.name.upper(), env[f.name.upper()], f.type)
        if values.get("stream_reset") and "stream_segment" not in values:  # its dense mask needs shorter segments
            values["stream_segment"] = STREAM_RESET_SEGMENT
        cfg = cls(**values)
        cfg.validate(cls.explicit_fields(env))
        return cfg

    @staticmethod
    def explicit_fields(env: dict | None = None) -> set[str]:
        env = os.environ if env is None else env
        return {f.name for f in fields(Config) if f.name.upper() in env}

    # ---- derived values -----------------------------------------------------------------------------------------
    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def model_from_file(self) -> bool:
        """EVAL_ONLY (an artifact) or EXPORT_FROM (a checkpoint): the model is the file's, not LAYOUT's."""
        return self.eval_only or bool(self.export_from)

    @property
    def stride(self) -> int:
        """The sliding-window stride: EVAL_STRIDE, at most one window (the default 512 with a shorter EVAL_SEQ_LEN
        gives plain windows; an EVAL_STRIDE set above EVAL_SEQ_LEN is refused by `validate`)."""
        return min(self.eval_stride or self.eval_len, self.eval_len)

    @property
    def ema_compare_decays(self) -> tuple[float, ...]:
        """EMA_COMPARE as numbers, without repeats or EMA_DECAY itself (already scored as pre_quant_ema)."""
        listed = [float(x) for x in self.ema_compare.split(",") if x.strip()]
        return tuple(d for d in dict.fromkeys(listed) if d != self.ema_decay)

    @property
    def train_budget_seconds(self) -> float:
        """Wallclock for the training loop: the cap less the time reserved for GPTQ calibration (0 = no cap)."""
        if self.max_wallclock_seconds == 0:
            return 0.0
        return self.max_wallclock_seconds - (self.gptq_reserve_seconds if self.quant_method == "gptq" else 0.0)

    def validate(self, explicit: set[str] = frozenset()) -> None:
        """Raises ValueError naming the bad setting. `explicit`: the fields set in the environment (some values are
        only wrong when asked for, e.g. EVAL_STRIDE in stream mode, where the default stride is simply unused)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid configuration: {msg}")

        need(1 < self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} must be in 2..65536 (uint16 shards)")
        need(self.train_seq_len > 0, f"TRAIN_SEQ_LEN={self.train_seq_len} must be positive")
        need(self.train_batch_tokens > 0, f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be positive")
        need(self.grad_accum_steps >= 0, f"GRAD_ACCUM_STEPS={self.grad_accum_steps} must be >= 0 (0 = automatic)")
        need(self.train_log_every > 0, f"TRAIN_LOG_EVERY={self.train_log_every} must be positive")
        need(self.gptq_block > 0, f"GPTQ_BLOCK={self.gptq_block} must be positive")
        need(self.gptq_damp > 0, f"GPTQ_DAMP={self.gptq_damp} must be positive (H + damp * mean(diag H) * I must be "
             "positive definite when there are fewer calibration tokens than inputs)")
        need(0 < self.kernel_check_tol <= 0.1, f"KERNEL_CHECK_TOL={self.kernel_check_tol} must be in (0, 0.1]: at 1 a "
             "kernel that returns zeros would pass (KERNEL_CHECK=0 turns the checks off, with a warning)")
        need(self.ttt_seq_len >= 0, f"TTT_SEQ_LEN={self.ttt_seq_len} must be >= 0 (0 = EVAL_SEQ_LEN)")
        need(self.iterations > 0, f"ITERATIONS={self.iterations} must be positive")
        need(self.max_wallclock_seconds >= 0, f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} must be >= 0")
        need(0.0 <= self.warmdown_frac <= 1.0, f"WARMDOWN_FRAC={self.warmdown_frac} must be in [0, 1]")
        need(self.warmdown_shape in WARMDOWN_SHAPES,
             f"WARMDOWN_SHAPE={self.warmdown_shape!r} must be one of {', '.join(WARMDOWN_SHAPES)}")
        need(self.muon_variant in MUON_VARIANTS,
             f"MUON_VARIANT={self.muon_variant!r} must be one of {', '.join(MUON_VARIANTS)}")
        need(0.0 <= self.muon_beta2 < 1.0, f"MUON_BETA2={self.muon_beta2} must be in [0, 1)")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} not divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} not divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= head_dim,
             f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {head_dim}")
        need((head_dim % 2 == 0), f"attention head dim {head_dim} must be even for rotary embeddings")
        need(self.swa_window >= 1, f"SWA_WINDOW={self.swa_window} must be >= 1")
        need(self.gdn_heads > 0 and self.gdn_head_dim > 0, "GDN_HEADS and GDN_HEAD_DIM must be positive")
        need(float(self.gdn_head_dim * self.gdn_expand_v).is_integer() and self.gdn_head_dim * self.gdn_expand_v >= 1,
             f"GDN_HEAD_DIM*GDN_EXPAND_V={self.gdn_head_dim * self.gdn_expand_v} must be a positive integer")
        need(self.logit_softcap > 0, f"LOGIT_SOFTCAP={self.logit_softcap} must be positive (logits are capped at ±it)")
        need(self.gdn_conv_size >= 1, f"GDN_CONV_SIZE={self.gdn_conv_size} must be >= 1")
        need(self.bigram_buckets == 0 or self.bigram_buckets >= 2, f"BIGRAM_BUCKETS={self.bigram_buckets} must be 0 or >= 2")
        need(self.bigram_dim > 0, f"BIGRAM_DIM={self.bigram_dim} must be positive")
        need(0 <= self.bos_id < self.vocab_size, f"BOS_ID={self.bos_id} must be a token id below VOCAB_SIZE")
        need(0.0 <= self.mlp_neg_slope <= 1.0, f"MLP_NEG_SLOPE={self.mlp_neg_slope} must be in [0, 1]")
        need(self.xsa_last >= 0, f"XSA_LAST={self.xsa_last} must be >= 0")
        need(math.isfinite(self.qk_gain_init) and self.qk_gain_init >= 0,
             f"QK_GAIN_INIT={self.qk_gain_init} must be 0 (off) or a positive gain")
        need(self.mlp_mult > 0 and float(self.mlp_mult * self.model_dim).is_integer(),
             f"MLP_MULT*MODEL_DIM={self.mlp_mult * self.model_dim} must be a positive integer")
        specs = parse_layout(self.layout)  # raises with the offending character
        kinds = {spec.kind for spec in specs}
        need(self.model_from_file or self.eval_mode != "stream" or not kinds & set(UNBOUNDED_KINDS),
             f"EVAL_MODE=stream needs layers with bounded state, and LAYOUT={self.layout} has full attention (A or N): "
             "use S (sliding window) layers, or EVAL_MODE=window")  # before training, not after it
        # the layout checks below: with EVAL_ONLY or EXPORT_FROM the model is the file's, whatever LAYOUT says
        need(self.model_from_file or self.xsa_last == 0 or bool(xsa_mixers(specs, self.xsa_last)),
             f"XSA_LAST={self.xsa_last} acts on attention layers (A, N, S or P), and LAYOUT={self.layout} has none")
        need(self.model_from_file or self.qk_gain_init == 0 or bool(kinds - {"gdn"}),
             f"QK_GAIN_INIT={self.qk_gain_init} acts on attention layers (A, N, S or P), and LAYOUT={self.layout} has none")
        need(self.model_from_file or not self.attn_head_gate or bool(kinds - {"gdn"}),
             f"ATTN_HEAD_GATE=1 acts on attention layers (A, N, S or P), and LAYOUT={self.layout} has none")
        need(self.model_from_file or not self.gdn_neg_eigval or bool(kinds & GDN_KINDS),
             f"GDN_NEG_EIGVAL=1 acts on Gated DeltaNet layers (G or P), and LAYOUT={self.layout} has none")
        need(self.model_from_file or not self.ttt_enabled or self.ttt_params != "gdn" or bool(kinds & GDN_KINDS),
             f"TTT_PARAMS=gdn adapts Gated DeltaNet layers (G or P), and LAYOUT={self.layout} has none")
        need(self.compile in ("auto", "0", "1"), f"COMPILE={self.compile!r} must be auto, 0 or 1")
        need(self.compile_mode in COMPILE_MODES,
             f"COMPILE_MODE={self.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}")
        need(self.gdn_backend in ("auto", "fla", "qla", "torch"),
             f"GDN_BACKEND={self.gdn_backend!r} must be auto, fla, qla or torch")
        need(self.gdn_conv in ("auto", "fla", "torch"), f"GDN_CONV={self.gdn_conv!r} must be auto, fla or torch")
        need(self.attn_backend in ("auto", "fa3", "varlen", "sdpa"),
             f"ATTN_BACKEND={self.attn_backend!r} must be auto, fa3, varlen or sdpa")
        need(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY={self.ema_decay} must be in [0, 1)")
        try:
            decays_ok = all(0.0 <= d < 1.0 for d in self.ema_compare_decays)
        except ValueError:  # not a number
            decays_ok = False
        need(decays_ok, f"EMA_COMPARE={self.ema_compare!r} must list decays in [0, 1), separated by commas")
        need(not (self.model_from_file and self.ema_compare.strip()),
             "EMA_COMPARE averages weights while training; EVAL_ONLY and EXPORT_FROM do not train")
        need(self.eval_len > 0 and self.eval_stride >= 0,
             f"EVAL_SEQ_LEN={self.eval_len} must be positive and EVAL_STRIDE={self.eval_stride} not negative")
        need(self.eval_mode in ("window", "stream"), f"EVAL_MODE={self.eval_mode!r} must be window or stream")
        need("eval_stride" not in explicit or self.eval_stride == 0 or self.eval_mode == "window",
             f"EVAL_STRIDE={self.eval_stride} applies to sliding windows; add EVAL_MODE=window (the mode is {self.eval_mode})")
        need("eval_stride" not in explicit or self.eval_stride <= self.eval_len,
             f"EVAL_STRIDE={self.eval_stride} must be in 0..EVAL_SEQ_LEN={self.eval_len} (0: plain windows)")
        need(self.eval_max_seconds >= 0, f"EVAL_MAX_SECONDS={self.eval_max_seconds} must be >= 0 (0: no limit)")
        need(self.eval_batch_tokens >= self.eval_len,
             f"EVAL_BATCH_TOKENS={self.eval_batch_tokens} must hold at least one window of {self.eval_len}")
        need(2 <= self.matrix_bits <= 8 and 2 <= self.embed_bits <= 8, "MATRIX_BITS and EMBED_BITS must be in 2..8")
        need(not (self.matrix_clip_fit and "matrix_clip_sigmas" in explicit and "matrix_clip_fit" not in explicit
                  and not self.eval_only),
             f"MATRIX_CLIP_SIGMAS={self.matrix_clip_sigmas:g} is only where the clip fit starts (MATRIX_CLIP_FIT is on "
             "by default and exports at the clip that fills the limit): set MATRIX_CLIP_FIT=0 to export at this "
             "clip, or MATRIX_CLIP_FIT=1 to fit from it")
        need(not self.matrix_clip_fit
             or 0 < self.matrix_clip_fit_min <= self.matrix_clip_sigmas <= self.matrix_clip_fit_max,
             f"MATRIX_CLIP_FIT starts at MATRIX_CLIP_SIGMAS={self.matrix_clip_sigmas:g}, which must lie in "
             f"MATRIX_CLIP_FIT_MIN={self.matrix_clip_fit_min:g} .. MATRIX_CLIP_FIT_MAX={self.matrix_clip_fit_max:g}"
             " (> 0)")
        need(0.0 <= self.qat_frac <= 1.0, f"QAT_FRAC={self.qat_frac} must be in [0, 1]")
        need(self.qat_clip_sigmas > 0, f"QAT_CLIP_SIGMAS={self.qat_clip_sigmas} must be positive")
        need(not (self.model_from_file and self.qat_frac),
             "QAT_FRAC acts while training; EVAL_ONLY and EXPORT_FROM do not train")
        need(self.compressor in ("brotli", "zstd"), f"COMPRESSOR={self.compressor!r} must be brotli or zstd")
        need(self.packing in ("byte", "dense"), f"PACKING={self.packing!r} must be byte or dense")
        need(self.quant_method in ("gptq", "rtn"), f"QUANT_METHOD={self.quant_method!r} must be gptq or rtn")
        need(self.gptq_calib_tokens >= self.train_seq_len, f"GPTQ_CALIB_TOKENS={self.gptq_calib_tokens} is below one sequence")
        need(self.max_wallclock_seconds == 0 or self.train_budget_seconds > 0,
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time in {self.max_wallclock_seconds}s")
        need(self.stream_segment > 0 and self.stream_lanes > 0, "STREAM_SEGMENT and STREAM_LANES must be positive")
        need(self.stream_warmup >= 0, "STREAM_WARMUP must be >= 0")
        need(not self.stream_reset or self.stream_segment <= STREAM_RESET_MAX_SEGMENT,
             f"STREAM_RESET=1 builds a dense mask per segment; STREAM_SEGMENT={self.stream_segment} must be <= "
             f"{STREAM_RESET_MAX_SEGMENT} (unset, it is {STREAM_RESET_SEGMENT})")
        need(self.ttt_optimizer in ("sgd", "adamw"), f"TTT_OPTIMIZER={self.ttt_optimizer!r} must be sgd or adamw")
        need(self.ttt_params in ("all", "mlp", "scalar", "gdn"),
             f"TTT_PARAMS={self.ttt_params!r} must be all, mlp, scalar or gdn")
        need(self.ttt_state in ("carry", "rebuild"), f"TTT_STATE={self.ttt_state!r} must be carry or rebuild")
        need(self.ttt_compile in ("0", "1", "graphs"), f"TTT_COMPILE={self.ttt_compile!r} must be 0, 1 or graphs")
        need(self.ttt_compile == "0" or "ttt_compile" not in explicit or self.compile != "0",
             f"TTT_COMPILE={self.ttt_compile} needs the model compiled; COMPILE=0 turns that off")
        need(self.ttt_chunk_tokens > 0 and self.ttt_epochs >= 0 and self.ttt_batch_seqs > 0,
             "TTT_CHUNK_TOKENS, TTT_BATCH_SEQS must be positive and TTT_EPOCHS >= 0")
        need(self.val_max_tokens == 0 or self.val_max_tokens > self.eval_len,
             f"VAL_MAX_TOKENS={self.val_max_tokens} must be 0 or more than one window")
        need(not self.eval_only or bool(self.artifact_path), "EVAL_ONLY=1 needs ARTIFACT_PATH")
        need(not (self.eval_only and self.export_from),
             "EVAL_ONLY=1 scores an artifact and EXPORT_FROM exports a checkpoint: set one of them")
        need(not (self.export_from and self.checkpoint_path),
             "EXPORT_FROM reads a checkpoint and does not train; CHECKPOINT_PATH is where a training run writes one")
        need(self.state_every >= 0 and bool(self.state_path) == (self.state_every > 0),
             f"STATE_PATH={self.state_path!r} and STATE_EVERY={self.state_every} go together: a path and steps > 0")
        need(not ((self.eval_only or self.export_from) and (self.state_path or self.resume_from)),
             "STATE_PATH and RESUME_FROM are for training; EVAL_ONLY and EXPORT_FROM do not train")


PRESETS: dict[str, dict] = {
    "": {},
    # Every code path (GDN, SWA, a shared mixer, export, round-trip) on a CPU in seconds.
    "tiny": dict(
        iterations=12, train_batch_tokens=1024, train_seq_len=64, max_wallclock_seconds=0.0, warmup_steps=2,
        lr_warmup_steps=2, train_log_every=4, layout="GSGs", model_dim=64, mlp_mult=2.0, num_heads=4,
        num_kv_heads=2, swa_window=16, gdn_heads=2, gdn_head_dim=16, compile="0", eval_batch_tokens=4096,
        ema_decay=0.9, matrix_lr=0.02, scalar_lr=0.02, embed_lr=0.05, gptq_calib_tokens=2048, eval_stride=16,
        stream_segment=64, stream_lanes=4, ttt_chunk_tokens=2048, ttt_batch_seqs=4,
        grad_accum_steps=4,  # micro-batches of 4 sequences on one process: the accumulation path runs
    ),
}


def _parse_env_value(key: str, raw: str, typ: type):
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected 0/1/true/false")
        return typ(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {key}={raw!r} is not a valid {typ.__name__}: {e}") from None


LAYER_KINDS = {"G": "gdn", "S": "swa", "A": "attn", "N": "nope", "P": "par"}
UNBOUNDED_KINDS = ("attn", "nope", "par")  # full attention: state (the keys) grows with the stream
GDN_KINDS = frozenset({"gdn", "par"})  # layers with a Gated DeltaNet in them


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # gdn | swa | attn | nope (full attention without rotary) | par (full attention and GDN side by side)
    mixer: int  # index into the model's unique mixers
    shared: bool  # reuses an earlier layer's mixer weights
    mlp: int  # index into the model's unique MLPs
    repeat: bool = False  # a later pass of a repeated group: mixer and MLP are the first pass's


def xsa_mixers(specs: list[LayerSpec], xsa_last: int) -> set[int]:
    """The mixer indices XSA_LAST gives exclusive self attention: the last `xsa_last` attention mixers (A, N, S or
    P's attention) in layout order, a shared or repeated mixer counted once; all of them if there are fewer."""
    attn = sorted({s.mixer for s in specs if s.kind != "gdn"})
    return set(attn[len(attn) - min(xsa_last, len(attn)):])


def parse_layout(layout: str) -> list[LayerSpec]:
    """'GGGGGSGGGGGs' -> one LayerSpec per layer as run. Spaces, '-' and '|' may separate groups for readability.
    Lower case reuses the mixer of the nearest earlier upper-case layer of that kind (its MLP is its own).
    '(...)k' runs the bracketed layers k times in a row (depth recurrence): 'AA(GAA)2A' runs
    A A G A A G A A A, and the second pass reuses the first pass's mixers and MLPs."""
    specs: list[LayerSpec] = []
    last_of_kind: dict[str, int] = {}
    n_mixers = n_mlps = 0
    group_start = None
    chars = [c for c in layout if c not in " -|"]
    i = 0
    while i < len(chars):
        c = chars[i]
        if c == "(":
            if group_start is not None:
                raise ValueError(f"LAYOUT={layout!r}: repeated groups cannot nest")
            group_start, i = len(specs), i + 1
            continue
        if c == ")":
            if group_start is None:
                raise ValueError(f"LAYOUT={layout!r}: ')' closes no group")
            j = i + 1
            while j < len(chars) and chars[j].isdigit():
                j += 1
            passes = int("".join(chars[i + 1: j]) or 0)
            if passes < 2 or group_start == len(specs):
                raise ValueError(f"LAYOUT={layout!r}: a repeated group needs layers and a pass count of at least 2 "
                                 "after ')', e.g. 'AA(GAA)2A'")
            group = specs[group_start:]
            for _ in range(passes - 1):
                specs.extend(dataclasses.replace(s, shared=True, repeat=True) for s in group)
            group_start, i = None, j
            continue
        pos = len(specs)
        if c.upper() not in LAYER_KINDS:
            raise ValueError(f"LAYOUT={layout!r}: layer {pos} is {c!r}; use G (GDN), S (sliding window), A (attention),"
                             " N (attention without position encoding), P (attention and GDN side by side), lower case"
                             " to share the nearest earlier layer's weights, '(...)k' to repeat layers")
        kind = LAYER_KINDS[c.upper()]
        if c.isupper():
            last_of_kind[kind] = n_mixers
            specs.append(LayerSpec(kind, n_mixers, False, n_mlps))
            n_mixers += 1
        elif kind not in last_of_kind:
            raise ValueError(f"LAYOUT={layout!r}: layer {pos} ({c!r}) shares weights but no earlier {c.upper()!r} exists")
        else:
            specs.append(LayerSpec(kind, last_of_kind[kind], True, n_mlps))
        n_mlps += 1
        i += 1
    if group_start is not None:
        raise ValueError(f"LAYOUT={layout!r}: '(' opens a group that is never closed")
    if not specs:
        raise ValueError(f"LAYOUT={layout!r} has no layers")
    return specs


# ------------------------------------------------------------------------------------------------------------------
# 2. Runtime and logging
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    grad_accum_steps: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def default_accum(cfg: Config, world_size: int) -> int:
    """Accumulation steps for GRAD_ACCUM_STEPS=0: each rank's share of TRAIN_BATCH_TOKENS split into micro-batches of
    MICRO_BATCH_TOKENS (64 sequences of 2048; a share that is not a multiple gets the floor, and at least one), or
    the next count up that splits the rank's sequences evenly. Measured on an H100 for the default: 32 sequences
    257.4 ms/step, 64 sequences 248.3 at 29 GiB peak, 128 sequences 243.4 at 56 GiB (README, Throughput). The
    step's gradient is the batch mean however it is split."""
    accum = max(1, cfg.train_batch_tokens // (world_size * MICRO_BATCH_TOKENS))
    per_rank, rest = divmod(cfg.train_batch_tokens, world_size * cfg.train_seq_len)
    if rest or per_rank == 0:
        return accum  # no count splits it: init_runtime says why
    return next(a for a in range(accum, per_rank + 1) if per_rank % a == 0)


def init_runtime(cfg: Config) -> Runtime:
    """Reads torchrun's environment, starts the process group, and fixes the gradient accumulation."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.eval_only:  # rescoring reads no training batch (EXPORT_FROM does: its calibration batches)
        accum = 1
    else:
        accum = cfg.grad_accum_steps or default_accum(cfg, world_size)
        if cfg.train_batch_tokens % (world_size * accum * cfg.train_seq_len) != 0:
            raise ValueError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must split into whole sequences of "
                             f"TRAIN_SEQ_LEN={cfg.train_seq_len} over {world_size} ranks x {accum} accumulation steps"
                             + (" (GRAD_ACCUM_STEPS)" if cfg.grad_accum_steps else ""))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, accum)


class Logger:
    """Prints on rank 0 and appends to logs/{run_id}.txt (`appends`: the file held an earlier run's lines)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.appends = path is not None and path.exists() and path.stat().st_size > 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ------------------------------------------------------------------------------------------------------------------
# 3. Data: shards, loader, byte tables
# ------------------------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


def read_shard(path: str | Path) -> np.ndarray:
    """A challenge shard: 256 little-endian int32 (magic, version, count, 0...) then `count` little-endian uint16."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"shard {path} is {size} bytes, shorter than its {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION}")
    count = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * count:
        raise ValueError(f"shard {path} header says {count} tokens ({SHARD_HEADER_BYTES + 2 * count} bytes) "
                         f"but the file has {size} bytes: truncated or corrupt")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def shard_files(data_path: str, split: str) -> list[Path]:
    if not Path(data_path).is_dir():
        raise FileNotFoundError(f"DATA_PATH={data_path} is not a directory (download or build shards first; see README)")
    files = sorted(Path(p) for p in glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise FileNotFoundError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}")
    return files


def count_tokens(files: list[Path]) -> int:
    """Tokens in these shards, from their headers (each one checked, so a bad shard fails before training)."""
    return sum(len(read_shard(f)) for f in files)


def load_val_tokens(cfg: Config) -> torch.Tensor:
    files = shard_files(cfg.data_path, "val")
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
    if cfg.val_max_tokens:
        tokens = tokens[: cfg.val_max_tokens]
    if tokens.size < 2:  # no target to score: every evaluation would fail only after training
        raise ValueError(f"the validation shards ({', '.join(str(f) for f in files)}) hold {tokens.size} token(s)"
                         + (f" (VAL_MAX_TOKENS={cfg.val_max_tokens})" if cfg.val_max_tokens else "")
                         + ": at least 2 are needed, a context and a target")
    if int(tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"validation shards contain token id {int(tokens.max())} >= VOCAB_SIZE={cfg.vocab_size}: "
                         "shards and tokenizer do not match")
    return torch.from_numpy(tokens.astype(np.int64))


class TokenStream:
    """Reads the train shards in a seeded order, end to end, wrapping around; `take(n)` returns the next n tokens.
    `skip` starts where take(skip) would have left it (RESUME_FROM), reading only the shard it lands in."""

    def __init__(self, files: list[Path], seed: int, skip: int = 0):
        sizes = [count_tokens([f]) for f in files]
        if sum(sizes) == 0:  # take() would wait forever for a token
            raise ValueError(f"the train shards ({', '.join(str(f) for f in files)}) hold no tokens")
        order = list(range(len(files)))
        random.Random(seed).shuffle(order)
        self.files = [files[i] for i in order]
        self.file_idx, self.pos = 0, skip % sum(sizes)
        while self.pos >= sizes[order[self.file_idx]]:
            self.pos -= sizes[order[self.file_idx]]
            self.file_idx += 1
        self.tokens = read_shard(self.files[self.file_idx])

    def take(self, n: int) -> np.ndarray:
        parts, left = [], n
        while left > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.file_idx]), 0
            k = min(left, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos: self.pos + k])
            self.pos += k
            left -= k
        return np.concatenate(parts)


class TrainLoader:
    """Each micro-step takes one contiguous span per rank from the shared stream; the next batch is prefetched."""

    def __init__(self, cfg: Config, rt: Runtime, skip: int = 0):
        self.rt = rt
        self.seq_len = cfg.train_seq_len
        self.micro_tokens = cfg.train_batch_tokens // (rt.world_size * rt.grad_accum_steps)
        self.stream = TokenStream(shard_files(cfg.data_path, "train"), cfg.seed, skip)
        self.consumed = skip  # stream tokens behind the batches handed out (all ranks'; the prefetched one not)
        self.vocab_size = cfg.vocab_size
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._build)

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.micro_tokens + 1
        chunk = self.stream.take(span * self.rt.world_size)
        mine = torch.from_numpy(chunk[self.rt.rank * span: (self.rt.rank + 1) * span].astype(np.int64))
        if int(mine.max()) >= self.vocab_size:
            raise ValueError(f"train shard token id {int(mine.max())} >= VOCAB_SIZE={self.vocab_size}")
        if self.rt.cuda:
            mine = mine.pin_memory()
        return mine[:-1].view(-1, self.seq_len), mine[1:].view(-1, self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.pending.result()
        self.pending = self.pool.submit(self._build)
        self.consumed += (self.micro_tokens + 1) * self.rt.world_size
        return x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)

    def close(self) -> None:
        self.pending.cancel()
        self.pool.shutdown(wait=True)


@dataclass
class ByteTables:
    """Canonical byte counting (SPEC 3): bytes(y | prev x) = base[y] + (space[y] and not boundary[x])."""

    base_bytes: torch.Tensor  # (V,) int64
    has_leading_space: torch.Tensor  # (V,) bool
    is_boundary: torch.Tensor  # (V,) bool
    bos_id: int = 1  # the document separator (streaming resets and lane cuts use it)

    def to(self, device: torch.device) -> "ByteTables":
        tensors = (t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary))
        return ByteTables(*tensors, bos_id=self.bos_id)

    def count(self, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base_bytes[target] + (self.has_leading_space[target] & ~self.is_boundary[prev]).long()


def load_tokenizer(cfg: Config):
    import sentencepiece as spm

    if not Path(cfg.tokenizer_path).is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH={cfg.tokenizer_path} does not exist")
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    if sp.vocab_size() != cfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={cfg.vocab_size}")
    if (cfg.bigram_buckets or cfg.smear_gate) and sp.bos_id() != cfg.bos_id:
        raise ValueError(f"tokenizer {cfg.tokenizer_path} has BOS id {sp.bos_id()} but BOS_ID={cfg.bos_id}; "
                         "BigramHash and SmearGate must know the document starts")
    return sp


def check_tokenizer_wrote(sp, tokens: torch.Tensor, tokenizer_path: str, max_docs: int = 64) -> str:
    """Refuses validation shards written with another tokenizer whose ids are all below VOCAB_SIZE (sp1024 shards
    with sp8192's model and VOCAB_SIZE=8192): nothing else would notice, and the byte tables would count the wrong
    pieces (13% fewer bytes on this text). A shard's document is [BOS] + encode(text), and re-encoding the decoded
    ids of such a document gives the same ids back; with another model almost never. Checks up to `max_docs` whole
    documents (followed by a BOS) without an unknown piece (whose text is lost): among the first 64 documents of the
    shared validation text, each one without one (37 with sp1024, sp2048 and sp4096, all 64 with sp8192) round-trips
    with its own model and none with another of the four. Returns the line to log."""
    bos, unk = sp.bos_id(), sp.unk_id()
    if bos < 0:
        return f"tokenizer check: not made (tokenizer {tokenizer_path} has no BOS piece to split documents at)"
    starts = torch.nonzero(tokens == bos).flatten().tolist()
    docs = [tokens[a + 1: b].tolist() for a, b in zip(starts, starts[1:])][:max_docs]
    docs = [d for d in docs if d and unk not in d]
    if len(docs) < 4:
        return (f"tokenizer check: not made (only {len(docs)} whole validation document(s) without unknown pieces; "
                "it needs 4)")
    same = sum(sp.encode(sp.decode(d)) == d for d in docs)
    if 2 * same < len(docs):
        raise ValueError(f"the validation shards were not written with TOKENIZER_PATH={tokenizer_path}: only {same} "
                         f"of {len(docs)} documents re-encode to their own ids (a shard's documents are [BOS] + "
                         "encode(text)); bits per byte would count the wrong pieces' bytes. Point DATA_PATH and "
                         "TOKENIZER_PATH at the same vocabulary")
    return f"tokenizer check: {same} of {len(docs)} whole validation documents re-encode to their own ids"


def load_scoring_text(cfg: Config, device: torch.device) -> tuple[ByteTables, torch.Tensor, str]:
    """The byte tables (on `device`) and the validation tokens, checked to be one tokenizer's, and the check's line
    to log: what every score is computed from."""
    sp = load_tokenizer(cfg)
    tokens = load_val_tokens(cfg)
    return build_byte_tables(sp).to(device), tokens, check_tokenizer_wrote(sp, tokens, cfg.tokenizer_path)


def build_byte_tables(sp) -> ByteTables:
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=bool)
    boundary = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True  # 0 bytes
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                space[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary), sp.bos_id())


# ------------------------------------------------------------------------------------------------------------------
# 4. Layers
# ------------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class Linear(nn.Linear):
    """A bias-free linear layer with fp32 master weights (autocast computes in bf16 on the GPU). Under
    quantization-aware training (QAT_FRAC; `enable_qat` sets qat_bits, qat_clip_sigmas and the shared switch) its
    forward uses the weight as the export would round it, while the switch is on (`fake_quantize`)."""

    qat_bits = 0  # 0: a plain layer, no fake quantization
    qat_clip_sigmas = 0.0

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False):
        super().__init__(d_in, d_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.qat_bits:
            return F.linear(x, self.weight)
        return F.linear(x, fake_quantize(self.weight, self.qat_switch, self.qat_bits, self.qat_clip_sigmas))


class ShortConv(nn.Module):
    """The kernel (channels, size) of a causal depthwise convolution over time, the GDN 'short convolution', which
    the mixer applies with short_conv (streaming passes it the carried inputs)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, size))
        nn.init.uniform_(self.weight, -size ** -0.5, size ** -0.5)


def short_conv(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None = None,
               since_bos: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C), weight (C, K) -> (B, T, C), written as K shifted multiply-adds (torch.compile fuses them) so that
    streaming can pass the previous inputs and mask document starts. tail (B, K-1, C): the inputs just before x
    (None: zeros, a sequence start). since_bos (B, T): tokens since the latest BOS; tap j is dropped where it would
    reach into the previous document."""
    K, T = weight.shape[1], x.shape[1]
    xe = with_tail(tail, x, K)
    w = weight.to(x.dtype)
    out = xe[:, K - 1:] * w[:, K - 1]
    for j in range(1, K):  # tap j looks j steps back
        term = xe[:, K - 1 - j: K - 1 - j + T] * w[:, K - 1 - j]
        out = out + (term if since_bos is None else term * (since_bos >= j)[..., None].to(x.dtype))
    return out


def with_tail(tail: torch.Tensor | None, x: torch.Tensor, size: int) -> torch.Tensor:
    """x (B, T, C) preceded by the size-1 inputs before it (zeros at a sequence start)."""
    return F.pad(x, (0, 0, size - 1, 0)) if tail is None else torch.cat([tail.to(x.dtype), x], dim=1)


def next_tail(tail: torch.Tensor | None, x: torch.Tensor, size: int) -> torch.Tensor:
    """The last size-1 inputs after appending x (B, T, C) to tail."""
    xe = with_tail(tail, x, size)
    return xe[:, -(size - 1):] if size > 1 else xe[:, :0]


class Rotary(nn.Module):
    """Rotary position embedding on the first `dims` channels of each head; angles in float64 for long streams."""

    def __init__(self, head_dim: int, dims: int, base: float):
        super().__init__()
        self.dims = dims or head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dims, 2, dtype=torch.float64) / self.dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T, H, D)
        T = x.shape[1]
        pos = torch.arange(offset, offset + T, dtype=torch.float64, device=x.device)
        ang = torch.outer(pos, self.inv_freq)  # (T, dims/2)
        cos, sin = ang.cos().to(x.dtype)[None, :, None, :], ang.sin().to(x.dtype)[None, :, None, :]
        rot, rest = x[..., : self.dims], x[..., self.dims:]
        x1, x2 = rot[..., : self.dims // 2], rot[..., self.dims // 2:]
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rot, rest], dim=-1)


class MLP(nn.Module):
    """proj(act(fc(x))^2), act = relu, or leaky_relu with negative slope `neg_slope` (MLP_NEG_SLOPE)."""

    def __init__(self, dim: int, mult: float, neg_slope: float = 0.0):
        super().__init__()
        hidden = int(dim * mult)
        self.fc = Linear(dim, hidden)
        self.proj = Linear(hidden, dim, zero_init=True)
        self.neg_slope = neg_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.neg_slope) if self.neg_slope else F.relu(h)
        return self.proj(h.square())


# ------------------------------------------------------------------------------------------------------------------
# 5. Sequence mixers
# ------------------------------------------------------------------------------------------------------------------
# Gated DeltaNet, per head (key dim K, value dim V), state S (K x V) starting at 0:
#     S_t = exp(g_t) * S_{t-1} + beta_t * k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,     o_t = scale * S_t^T q_t
# i.e. S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T. Three implementations of this one function:
#   gdn_recurrent_reference  step by step, the oracle the tests use;
#   gdn_chunked_reference    the chunked (WY) form in plain PyTorch, used on the CPU and as the kernel check's reference;
#   gdn_kernel               fast kernels in one torch custom op (CUDA only): flash-linear-attention's Triton
#                            kernels ("fla") or FlashQLA's fused TileLang kernels ("qla", head dims 128 only).
# All take q, k (B, T, H, K), v (B, T, H, V), g, beta (B, T, H) and an optional initial state (B, H, K, V), and
# return (o (B, T, H, V), final state).


def gdn_recurrent_reference(q, k, v, g, beta, scale: float, initial_state=None):
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - pred))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


def gdn_chunked_reference(q, k, v, g, beta, scale: float, initial_state=None, chunk: int = 64):
    """Within a chunk with cumulative log-decay G and start state S0, the corrections d = beta (v - decayed S^T k) solve
    (I + L) d = beta v - beta e^G K S0 with L_ij = beta_i e^(G_i - G_j) k_i.k_j (j < i); so d = U - W S0 with
    U, W from one triangular solve each, o = scale (e^G Q S0 + (Q K^T * M) d), S_next = e^G_last S0 + (K e^(G_last-G))^T d.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % chunk  # padded steps have g = 0, beta = 0: the state passes through unchanged
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(B, n, chunk, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # (B, H, N, C, *)
    g, beta = (t.reshape(B, n, chunk, H).permute(0, 3, 1, 2) for t in (g, beta))  # (B, H, N, C)
    G = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, N, C, C)
    strict = decay * (~torch.eye(chunk, dtype=torch.bool, device=q.device))
    L = beta[..., :, None] * (k @ k.transpose(-1, -2)) * strict
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    solve = lambda rhs: torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)  # noqa: E731
    U = solve(beta[..., None] * v)
    W = solve((beta * G.exp())[..., None] * k)
    qk = (q @ k.transpose(-1, -2)) * decay
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for i in range(n):
        d = U[:, :, i] - W[:, :, i] @ S  # (B, H, C, V)
        outs.append(scale * (G[:, :, i, :, None].exp() * (q[:, :, i] @ S) + qk[:, :, i] @ d))
        g_last = G[:, :, i, -1:]  # (B, H, 1)
        S = g_last[..., None].exp() * S + (k[:, :, i] * (g_last - G[:, :, i]).exp()[..., None]).transpose(-1, -2) @ d
    o = torch.stack(outs, dim=2).reshape(B, H, n * chunk, V)[:, :, :T].transpose(1, 2)
    return o, S


FAST_GDN_BACKENDS = ("fla", "qla")
_KERNELS: dict[str, object] = {}  # "fla" -> fla.ops.gated_delta_rule.chunk, "qla" -> flash_qla; imported on first use


def _kernel_module(impl: str):
    if impl not in _KERNELS:
        if impl == "fla":
            import fla.ops.gated_delta_rule.chunk as mod  # noqa: PLC0415 (CUDA only)
        elif impl == "qla":
            import flash_qla as mod  # noqa: PLC0415 (Hopper/Blackwell, head dims 128 only)
        else:
            raise ValueError(f"unknown delta-rule kernel {impl!r}")
        _KERNELS[impl] = mod
    return _KERNELS[impl]


def _kernel_chunk(impl: str) -> int:
    """The chunk length of the kernel's intra-chunk matrix A (B, T, H, chunk)."""
    if impl == "qla":
        import flash_qla.ops.gated_delta_rule.chunk as qla_chunk  # noqa: PLC0415

        return qla_chunk.CHUNK_SIZE
    return 64


# The chunked kernels as one custom op with its own backward: torch.compile then sees one opaque node per GDN layer
# instead of a graph break, and nothing in the op depends on the layer, so there is no recompilation per layer.
# `impl` picks the kernels: "fla" (flash-linear-attention's Triton kernels) or "qla" (FlashQLA's fused TileLang
# kernels, K = V = 128). Both compute g_cum = chunk-local cumsum(g) and A = the chunk's (I + L)^-1 in the forward and
# reuse them in the backward.
@torch.library.custom_op("pgolf::gdn_fwd", mutates_args=())
def _gdn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mod = _kernel_module(impl)
    if impl == "qla":
        g_cum, A, o, _, _, _ = mod.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False, auto_cp=False)
    else:
        g_cum, o, A, _, _, _ = mod.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False)
    return o.to(q.dtype), g_cum, A


@_gdn_fwd_op.register_fake
def _(q, k, v, g, beta, scale, impl):
    B, T, H, _ = q.shape
    return (v.new_empty(v.shape, dtype=q.dtype), g.new_empty(g.shape, dtype=torch.float32),
            k.new_empty(B, T, H, _kernel_chunk(impl)))


@torch.library.custom_op("pgolf::gdn_bwd", mutates_args=())
def _gdn_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cum: torch.Tensor, beta: torch.Tensor,
                A: torch.Tensor, do: torch.Tensor, scale: float, impl: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mod = _kernel_module(impl)
    if impl == "qla":
        dq, dk, dv, db, dg, _ = mod.chunk_gated_delta_rule_bwd(
            q=q, k=k, v=v, g=g_cum, beta=beta, A=A, do=do.contiguous(), scale=scale, auto_cp=False)
    else:
        dq, dk, dv, db, dg, _, _, _ = mod.chunk_gated_delta_rule_bwd(
            q=q, k=k, v=v, g=g_cum, beta=beta, A=A, scale=scale, initial_state=None, do=do.contiguous(), dht=None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_cum.dtype), db.to(beta.dtype)


@_gdn_bwd_op.register_fake
def _(q, k, v, g_cum, beta, A, do, scale, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g_cum), torch.empty_like(beta)


def _gdn_setup_context(ctx, inputs, output):
    q, k, v, _, beta, scale, impl = inputs
    _, g_cum, A = output
    ctx.save_for_backward(q, k, v, g_cum, beta, A)
    ctx.scale, ctx.impl = scale, impl


def _gdn_backward(ctx, do, _dg_cum, _dA):
    q, k, v, g_cum, beta, A = ctx.saved_tensors
    dq, dk, dv, dg, db = _gdn_bwd_op(q, k, v, g_cum, beta, A, do, ctx.scale, ctx.impl)
    return dq, dk, dv, dg, db, None, None


_gdn_fwd_op.register_autograd(_gdn_backward, setup_context=_gdn_setup_context)


def gdn_kernel(q, k, v, g, beta, scale: float, impl: str = "fla"):
    """The training path's fast kernels: q, k, v, beta in bf16, g (log decay) in fp32; no carried state."""
    bf = torch.bfloat16
    o, _, _ = _gdn_fwd_op(q.to(bf).contiguous(), k.to(bf).contiguous(), v.to(bf).contiguous(),
                          g.float().contiguous(), beta.to(bf).contiguous(), scale, impl)
    return o


def gdn_core(backend: str, q, k, v, g, beta, scale: float, initial_state=None):
    """backend: fla | qla (the custom op's kernels; no carried state) | torch (the chunked reference)."""
    if backend in FAST_GDN_BACKENDS:
        if initial_state is not None:
            raise NotImplementedError("the training kernels carry no state; streaming evaluation uses gdn_stream")
        return gdn_kernel(q, k, v, g, beta, scale, backend), None
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o, state = gdn_chunked_reference(q.to(dt), k.to(dt), v.to(dt), g.to(dt), beta.to(dt), scale, initial_state)
    return o.to(q.dtype), state


# The GDN short convolution + SiLU of the training path as one custom op around fla's Triton kernels (forward: conv and
# SiLU in one pass; backward: dx and the per-chunk conv-weight partial sums in one pass), for the same reason as the
# delta rule's op: one opaque node for torch.compile. short_conv + F.silu is its reference (GDN_CONV=torch), and the
# kernel check compares the two on the GPU in use before training.
@torch.library.custom_op("pgolf::conv_silu_fwd", mutates_args=())
def _conv_silu_fwd_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from fla.modules.causal_conv1d.ops import causal_conv1d_fwd  # noqa: PLC0415 (CUDA only)

    y, _ = causal_conv1d_fwd(x=x, weight=weight, bias=None, residual=None, activation="silu")
    return y


@_conv_silu_fwd_op.register_fake
def _(x, weight):
    return torch.empty_like(x)


@torch.library.custom_op("pgolf::conv_silu_bwd", mutates_args=())
def _conv_silu_bwd_op(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fla.modules.causal_conv1d.ops import causal_conv1d_bwd  # noqa: PLC0415 (CUDA only)

    dx, dw, _, _, _ = causal_conv1d_bwd(x=x, dy=dy.contiguous(), dht=None, weight=weight, bias=None, residual=None,
                                        initial_state=None, activation="silu")
    return dx, dw.to(weight.dtype)


@_conv_silu_bwd_op.register_fake
def _(x, weight, dy):
    return torch.empty_like(x), torch.empty_like(weight)


def _conv_silu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_silu_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    return _conv_silu_bwd_op(x, weight, dy)


_conv_silu_fwd_op.register_autograd(_conv_silu_backward, setup_context=_conv_silu_setup_context)


def conv_silu(x: torch.Tensor, weight: torch.Tensor, impl: str) -> torch.Tensor:
    """silu(short_conv(x, weight)) over whole sequences (no carried inputs, no document masks): x (B, T, C) in the
    compute dtype, weight (C, K) fp32. impl: fla (the custom op) | torch (the reference)."""
    if impl == "fla":
        return _conv_silu_fwd_op(x.contiguous(), weight)
    return F.silu(short_conv(x, weight))


@dataclass
class StreamContext:
    """What the layers need to continue B parallel lanes of the validation stream across segments (streaming
    evaluation). layers[i] is layer i's carried state (a dict the layer fills): GDN keeps its short-conv tails and
    its recurrent state S, sliding-window attention its last SWA_WINDOW - 1 keys and values."""

    layers: list[dict]
    offset: int = 0  # lane-local position of the current segment's first token (rotary positions)
    since_bos: torch.Tensor | None = None  # (B, T) tokens since the latest BOS; None = never reset at documents
    prev_ids: torch.Tensor | None = None  # (B,) the token before this segment (BigramHash, SmearGate); None = none


def gdn_stream(backend: str, q, k, v, g, beta, scale: float, S: torch.Tensor | None, restarts: torch.Tensor | None):
    """The delta rule over a segment of B lanes, continuing each lane from its state S (B, H, K, V), restarting
    from zero where `restarts` (B, T) is True (a BOS when documents reset). Returns o (B, T, H, V) and the new S."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, V, dtype=dt) if S is None else S.to(dt)
    seqs = [(b, 0) for b in range(B)]
    if restarts is not None:
        seqs = [(b, t) for b in range(B) for t in [0] + [int(i) for i in restarts[b].nonzero().flatten() if i > 0]]
    ends = [t2 if b2 == b else T for (b, _), (b2, t2) in zip(seqs, seqs[1:] + [(B, 0)])]
    fresh = [t > 0 or (restarts is not None and bool(restarts[b, 0])) for b, t in seqs]
    init = torch.stack([torch.zeros_like(S[b]) if f else S[b] for (b, _), f in zip(seqs, fresh)])
    if backend in FAST_GDN_BACKENDS:  # one varlen call: every (lane, restart) piece is a sequence of its own
        flat = [t.reshape(1, B * T, *t.shape[2:]).contiguous() for t in (q, k, v, g, beta)]
        cu = torch.tensor([b * T + t for b, t in seqs] + [B * T], dtype=torch.long, device=q.device)
        bf = torch.bfloat16
        args = (flat[0].to(bf), flat[1].to(bf), flat[2].to(bf), flat[3].float(), flat[4].to(bf))
        if backend == "qla":
            o, final = _kernel_module("qla").chunk_gated_delta_rule(
                *args, scale=scale, initial_state=init.float(), output_final_state=True, cu_seqlens=cu, auto_cp=False)
        else:  # fla's public entry point (its own backend dispatch; the kernel check covers whatever it picks)
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415 (CUDA only)

            o, final = chunk_gated_delta_rule(*args, scale=scale, initial_state=init.float(), output_final_state=True,
                                              cu_seqlens=cu)
        o = o.view(B, T, H, V)
    else:
        o = q.new_zeros(B, T, H, V, dtype=dt)
        finals = []
        for (b, t0), t1, s0 in zip(seqs, ends, init):
            piece = [x[b: b + 1, t0:t1].to(dt) for x in (q, k, v, g, beta)]
            o_piece, s1 = gdn_chunked_reference(*piece, scale=scale, initial_state=s0[None])
            o[b, t0:t1] = o_piece[0]
            finals.append(s1[0])
        final = torch.stack(finals)
    last = [max(i for i, (b2, _) in enumerate(seqs) if b2 == b) for b in range(B)]
    return o, final[last].to(dt)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer (SPEC 5): q, k, v projections -> short causal conv -> SiLU; q, k L2-normalized;
    beta = sigmoid(W_b x) (twice that with neg_eigval); g = -exp(A_log) softplus(W_a x + dt_bias); delta rule;
    per-head RMSNorm gated by silu(W_g x); output projection.

    Parameters for dim D, H heads, key dim K, value dim V: 2*D*H*K (q, k) + 2*D*H*V (v, gate) + H*V*D (out)
    + 2*D*H (a, b) + conv (2*H*K + H*V) * conv_size + 2*H (A_log, dt_bias) + V (norm weight).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, expand_v: float, conv_size: int, backend: str,
                 conv_backend: str = "torch", neg_eigval: bool = False):
        super().__init__()
        self.heads, self.k_dim, self.v_dim = heads, head_dim, int(head_dim * expand_v)
        self.backend, self.conv_backend = backend, conv_backend
        self.beta_max = 2.0 if neg_eigval else 1.0
        hk, hv = heads * self.k_dim, heads * self.v_dim
        self.q_proj, self.k_proj, self.v_proj = Linear(dim, hk), Linear(dim, hk), Linear(dim, hv)
        self.q_conv, self.k_conv, self.v_conv = ShortConv(hk, conv_size), ShortConv(hk, conv_size), ShortConv(hv, conv_size)
        self.a_proj, self.b_proj = Linear(dim, heads), Linear(dim, heads)
        self.g_proj = Linear(dim, hv)
        self.o_proj = Linear(hv, dim, zero_init=True)
        self.o_norm_weight = nn.Parameter(torch.ones(self.v_dim))
        # decay rates exp(A_log) in [1, 16], step sizes softplus(dt_bias) log-uniform in [1e-3, 1e-1] (Mamba-2 init)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def gates(self, pre_a: torch.Tensor, pre_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the a and b projections (B, T, H): the log decay g = -exp(A_log) softplus(a + dt_bias) and the step
        size beta = beta_max sigmoid(b), both float32."""
        g = -self.A_log.float().exp() * F.softplus(pre_a.float() + self.dt_bias.float())
        return g, self.beta_max * torch.sigmoid(pre_b.float())

    def forward(self, x: torch.Tensor, state: dict | None = None, stream: StreamContext | None = None):
        """x (B, T, D) -> (B, T, D). With `state` (streaming), continues from and updates the carried state.
        One matmul per projection and one convolution per branch: on an H100 that was faster (5.25 against 5.44 ms
        forward + backward per micro-batch) and lighter than concatenating the weights into one matmul and one
        convolution (tools/bench_train.py, BENCH_FUSION=1)."""
        B, T, _ = x.shape
        H = self.heads
        since = stream.since_bos if stream is not None else None
        qkv = []
        for name, proj, conv in (("q", self.q_proj, self.q_conv), ("k", self.k_proj, self.k_conv),
                                 ("v", self.v_proj, self.v_conv)):
            pre = proj(x)
            if state is None:  # whole sequences: the training path (GDN_CONV picks the kernel)
                qkv.append(conv_silu(pre, conv.weight, self.conv_backend).reshape(B, T, H, -1))
                continue
            tail = state.get(name)
            qkv.append(F.silu(short_conv(pre, conv.weight, tail, since)).reshape(B, T, H, -1))
            state[name] = next_tail(tail, pre, conv.weight.shape[1])
        q, k = F.normalize(qkv[0].float(), dim=-1), F.normalize(qkv[1].float(), dim=-1)
        v = qkv[2]
        g, beta = self.gates(self.a_proj(x), self.b_proj(x))
        if state is None:
            o, _ = gdn_core(self.backend, q, k, v, g, beta, self.k_dim ** -0.5)
        else:
            restarts = None if since is None else since == 0
            o, state["S"] = gdn_stream(self.backend, q, k, v, g, beta, self.k_dim ** -0.5, state.get("S"), restarts)
        gate = F.silu(self.g_proj(x).float()).reshape(B, T, H, self.v_dim)
        o = rms_norm(o.float(), self.o_norm_weight.float()) * gate
        return self.o_proj(o.reshape(B, T, H * self.v_dim).to(x.dtype))


# Causal attention with an optional sliding window (each query sees itself and the window-1 tokens before it).
# The backend is chosen once (select_attention_backend) and verified against attention_reference on the GPU.


def attention_reference(q, k, v, window: int):
    """Masked SDPA, the oracle. q (B, Tq, H, D), k, v (B, Tk, KV, D) with Tk >= Tq: the queries are the last Tq
    positions of the keys (a streaming segment after its cached keys). window <= 0 means full causal."""
    Tq, Tk = q.shape[1], k.shape[1]
    iq = torch.arange(Tq, device=q.device) + (Tk - Tq)
    ik = torch.arange(Tk, device=q.device)
    allowed = ik[None, :] <= iq[:, None]
    if window > 0:
        allowed = allowed & (iq[:, None] - ik[None, :] < window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


def attention(q, k, v, window: int, backend: str):
    """Causal (windowed) attention; q (B, Tq, H, D) are the last Tq positions of k, v (B, Tk, KV, D)."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    if window <= 0 or window >= Tk:  # the band covers every earlier token: plain causal attention
        if Tq != Tk:  # SDPA's is_causal aligns at the start, not the end
            return attention_reference(q, k, v, 0)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=H != k.shape[2])
        return y.transpose(1, 2)
    if backend == "fa3":  # FlashAttention aligns the causal band at the end when Tk > Tq
        import flash_attn_interface  # noqa: PLC0415 (optional)

        y = flash_attn_interface.flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
        return y[0] if isinstance(y, tuple) else y
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415

        if k.shape[2] != H:
            k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
        cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (B + 1) * Tk, Tk, dtype=torch.int32, device=q.device)
        y = varlen_attn(q.reshape(B * Tq, H, D), k.reshape(B * Tk, H, D), v.reshape(B * Tk, H, D), cu_q, cu_k, Tq, Tk,
                        window_size=(window - 1, 0))
        return y.view(B, Tq, H, D)
    return attention_reference(q, k, v, window)


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: each head's output y (B, T, H, D) minus its projection on the token's own value v (B, T, KV, D), the
    value of the head's KV group (query heads are grouped as in SDPA's enable_gqa: head h uses KV head h // (H/KV))."""
    B, T, H, D = y.shape
    KV = v.shape[2]
    dtype = torch.promote_types(y.dtype, torch.float32)  # bf16 under autocast: the projection in fp32
    yg = y.to(dtype).view(B, T, KV, H // KV, D)
    vn = F.normalize(v.to(dtype), dim=-1)[:, :, :, None]  # (B, T, KV, 1, D)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D).to(y.dtype)


class Attention(nn.Module):
    """Grouped-query causal attention with QK RMSNorm and (partial) rotary embeddings, or none (rope=False: NoPE);
    window 0 = full causal. Parameters: D*(H*hd) (q) + 2*D*(KV*hd) (k, v) + (H*hd)*D (out), with qk_gain > 0 one
    learnable gain per query head on the normed queries, started at qk_gain (QK_GAIN_INIT), and with head_gate a
    sigmoid gate per head from the input, D*H (ATTN_HEAD_GATE)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, window: int, rope_dims: int, rope_base: float, backend: str,
                 rope: bool = True, xsa: bool = False, qk_gain: float = 0.0, head_gate: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.window, self.backend, self.xsa = window, backend, xsa
        self.q_proj = Linear(dim, heads * self.head_dim)
        self.k_proj = Linear(dim, kv_heads * self.head_dim)
        self.v_proj = Linear(dim, kv_heads * self.head_dim)
        self.o_proj = Linear(heads * self.head_dim, dim, zero_init=True)
        self.rotary = Rotary(self.head_dim, rope_dims, rope_base) if rope else None
        self.q_gain = nn.Parameter(torch.full((heads,), float(qk_gain))) if qk_gain > 0 else None
        self.head_gate = Linear(dim, heads, zero_init=True) if head_gate else None  # sigmoid(0): every head at 0.5

    def forward(self, x: torch.Tensor, state: dict | None = None, stream: StreamContext | None = None):
        """x (B, T, D) -> (B, T, D). With `state` (streaming), attends over the carried keys too and updates them."""
        B, T, _ = x.shape
        q, k = self.queries_keys(x, 0 if stream is None else stream.offset)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if state is None:
            y = attention(q, k, v, self.window, self.backend)
        else:
            y = self._attend_with_cache(q, k, v, state, stream)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.head_gate is not None:
            gate = self.head_gate(x)  # (B, T, H); the sigmoid in fp32 at least (bf16 under autocast)
            y = y * torch.sigmoid(gate.to(torch.promote_types(gate.dtype, torch.float32))).to(y.dtype)[..., None]
        return self.o_proj(y.reshape(B, T, self.heads * self.head_dim))

    def queries_keys(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B, T, H, hd), k (B, T, KV, hd)) as attention uses them: RMS-normed, rotated from position `offset`,
        q times its head's gain."""
        B, T, _ = x.shape
        q = rms_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        k = rms_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim))
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if self.q_gain is not None:
            # (H, 1): each head's queries. After the rotation torch.compile keeps the rotated q for the gain's
            # gradient (1.3 GB more at the default's micro-batch); before it (the same function) it keeps nothing
            # more but the step was 19% slower on an H200 (252.6 against 213.0 ms, lease 54, RESULTS.md).
            q = q * self.q_gain[:, None]
        return q, k

    def _attend_with_cache(self, q, k, v, state: dict, stream: StreamContext) -> torch.Tensor:
        """Keys are the carried ones (up to window-1, fewer at the stream start), then this segment's. Without
        document resets this is the same banded attention as training (any backend); with resets a mask adds
        each query's document start."""
        if self.window <= 0:
            raise ValueError("streaming evaluation needs layers with bounded state; full attention (A or N) has none")
        B, T = q.shape[:2]
        C = self.window - 1
        n_cached = min(C, stream.offset)
        keys = torch.cat([state["k"][:, C - n_cached:], k], dim=1) if n_cached else k
        vals = torch.cat([state["v"][:, C - n_cached:], v], dim=1) if n_cached else v
        state["k"] = F.pad(keys, (0, 0, 0, 0, max(0, C - keys.shape[1]), 0))[:, -C:]
        state["v"] = F.pad(vals, (0, 0, 0, 0, max(0, C - vals.shape[1]), 0))[:, -C:]
        if stream.since_bos is None:
            return attention(q, keys, vals, self.window, self.backend)
        pq = stream.offset + torch.arange(T, device=q.device)
        pk = stream.offset - n_cached + torch.arange(n_cached + T, device=q.device)
        allowed = (pk[None] <= pq[:, None]) & (pq[:, None] - pk[None] < self.window)  # (T, n_cached + T)
        allowed = allowed & (pk[None, None] >= (pq[None] - stream.since_bos)[..., None])  # (B, T, n_cached + T)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                           attn_mask=allowed[:, None], enable_gqa=self.heads != self.kv_heads)
        return y.transpose(1, 2)


class ParallelMixer(nn.Module):
    """P layers: full attention and a Gated DeltaNet read the same normed input side by side and their outputs, each
    through its own output projection, are summed (the parallel hybrid of Hymba and Falcon-H1, in its plainest form:
    one projection of the two outputs concatenated). Parameters: the attention mixer's plus the GDN mixer's. The
    attention half is an attention mixer like A's (XSA_LAST, QK_GAIN_INIT and ATTN_HEAD_GATE act on it), the GDN half
    a GDN mixer like G's (GDN_HEADS, GDN_HEAD_DIM, GDN_NEG_EIGVAL); both output projections start at zero."""

    def __init__(self, attn: Attention, gdn: GatedDeltaNet):
        super().__init__()
        self.attn, self.gdn = attn, gdn

    def forward(self, x: torch.Tensor, state: dict | None = None, stream: StreamContext | None = None):
        """x (B, T, D) -> (B, T, D); no streaming (full attention's state is unbounded)."""
        if state is not None:  # both halves would keep their carried keys and conv tails under the same names
            raise ValueError("a P layer (full attention and GDN side by side) cannot stream")
        return self.attn(x, state, stream) + self.gdn(x, state, stream)


# ------------------------------------------------------------------------------------------------------------------
# 6. Model
# ------------------------------------------------------------------------------------------------------------------

MODEL_FIELDS = ("vocab_size", "layout", "model_dim", "mlp_mult", "num_heads", "num_kv_heads", "swa_window", "rope_dims",
                "rope_base", "gdn_heads", "gdn_head_dim", "gdn_expand_v", "gdn_conv_size", "logit_softcap",
                "tied_embed_init_std", "bigram_buckets", "bigram_dim", "smear_gate", "unet_skips", "bos_id",
                "residual_bf16", "gdn_neg_eigval", "mlp_neg_slope", "xsa_last", "qk_gain_init",
                "attn_head_gate", "resid_mix", "branch_scales")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: what an artifact must record to be rebuilt without the training environment."""

    vocab_size: int
    layout: str
    model_dim: int
    mlp_mult: float
    num_heads: int
    num_kv_heads: int
    swa_window: int
    rope_dims: int
    rope_base: float
    gdn_heads: int
    gdn_head_dim: int
    gdn_expand_v: float
    gdn_conv_size: int
    logit_softcap: float
    tied_embed_init_std: float
    # added later: defaults keep older artifacts readable (they were trained without these)
    bigram_buckets: int = 0
    bigram_dim: int = 128
    smear_gate: bool = False
    unet_skips: bool = False
    bos_id: int = 1
    residual_bf16: bool = False  # artifacts from before the setting were trained with an fp32 residual stream
    gdn_neg_eigval: bool = False
    mlp_neg_slope: float = 0.0
    xsa_last: int = 0
    qk_gain_init: float = 0.0
    attn_head_gate: bool = False
    resid_mix: bool = False
    branch_scales: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> "ModelConfig":
        return cls(**{name: getattr(cfg, name) for name in MODEL_FIELDS})


@dataclass(frozen=True)
class Backends:
    gdn: str  # fla | qla | torch
    attn: str  # fa3 | varlen | sdpa
    conv: str = "torch"  # the GDN short conv + SiLU when training: fla | torch


class GPT(nn.Module):
    """Token embedding -> layers (pre-norm mixer + pre-norm ReLU^2 or LeakyReLU^2 MLP, residual) -> RMSNorm -> tied
    head with a tanh logit softcap. Mixers and MLPs live once in `self.mixers` and `self.mlps`; `self.layer_mixer[i]`
    and `self.layer_mlp[i]` say which ones layer i (as run) uses, so shared and repeated weights are stored, optimized
    and exported once."""

    def __init__(self, mc: ModelConfig, backends: Backends):
        super().__init__()
        self.mc = mc
        specs = parse_layout(mc.layout)
        self.layer_mixer = [s.mixer for s in specs]
        self.layer_kinds = [s.kind for s in specs]
        self.layer_mlp = [s.mlp for s in specs]
        self.tok_emb = nn.Embedding(mc.vocab_size, mc.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=mc.tied_embed_init_std)
        xsa = xsa_mixers(specs, mc.xsa_last)
        self.mixers = nn.ModuleList([self._make_mixer(s.kind, backends, s.mixer in xsa) for s in specs if not s.shared])
        self.mlps = nn.ModuleList([MLP(mc.model_dim, mc.mlp_mult, mc.mlp_neg_slope) for s in specs if not s.repeat])
        if mc.bigram_buckets:
            self.bigram = BigramHash(mc.bigram_buckets, mc.bigram_dim, mc.model_dim)
        if mc.smear_gate:  # per channel; sigmoid(-3) = 0.05 of the previous token's embedding at the start
            self.smear = nn.Parameter(torch.full((mc.model_dim,), -3.0))
        self.n_skips = len(specs) // 2 if mc.unet_skips else 0
        if self.n_skips:
            self.skip_weights = nn.Parameter(torch.ones(self.n_skips, mc.model_dim))
        # RESID_MIX, BRANCH_SCALES: vectors per layer as run (each pass of a repeated group has its own), at values
        # that leave the model as it is without them: (L, 2, D) stream / embedding weights 1 / 0, mixer / MLP scales 1
        L, D = len(specs), mc.model_dim
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(L, D), torch.zeros(L, D)], 1)) if mc.resid_mix else None
        self.branch_scale = nn.Parameter(torch.ones(L, 2, D)) if mc.branch_scales else None

    def _make_mixer(self, kind: str, backends: Backends, xsa: bool = False) -> nn.Module:
        mc = self.mc
        if kind == "par":
            return ParallelMixer(self._make_mixer("attn", backends, xsa), self._make_mixer("gdn", backends))
        if kind == "gdn":
            return GatedDeltaNet(mc.model_dim, mc.gdn_heads, mc.gdn_head_dim, mc.gdn_expand_v, mc.gdn_conv_size,
                                 backends.gdn, backends.conv, neg_eigval=mc.gdn_neg_eigval)
        window = mc.swa_window if kind == "swa" else 0
        return Attention(mc.model_dim, mc.num_heads, mc.num_kv_heads, window, mc.rope_dims, mc.rope_base, backends.attn,
                         rope=kind != "nope", xsa=xsa, qk_gain=mc.qk_gain_init,
                         head_gate=mc.attn_head_gate)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                stream: StreamContext | None = None):
        """input_ids (B, T) -> logits (B, T, V) if no targets, else the cross-entropy ('mean' or per token (B, T)).
        With `stream`, every layer continues from (and updates) its carried state."""
        x = rms_norm(self.embed(input_ids, stream))
        if self.mc.residual_bf16 and torch.is_autocast_enabled(x.device.type):  # the mixers and MLPs return bf16
            x = x.to(torch.get_autocast_dtype(x.device.type))
        skips, L, x0 = [], len(self.layer_mixer), x
        for i, m in enumerate(self.layer_mixer):
            if i >= L - self.n_skips:  # second half: the mirrored first-half layer's output (U-Net)
                x = x + self.skip_weights[i - (L - self.n_skips)].to(x.dtype) * skips.pop()
            if self.resid_mix is not None:  # (2, D): this layer's weights on the stream and on the embedding
                mix = self.resid_mix[i].to(x.dtype)
                x = mix[0] * x + mix[1] * x0
            y = self.mixers[m](rms_norm(x), None if stream is None else stream.layers[i], stream)
            x = x + (y if self.branch_scale is None else self.branch_scale[i, 0].to(x.dtype) * y)
            y = self.mlps[self.layer_mlp[i]](rms_norm(x))
            x = x + (y if self.branch_scale is None else self.branch_scale[i, 1].to(x.dtype) * y)
            if i < self.n_skips:
                skips.append(x)
        logits = F.linear(rms_norm(x), self.tok_emb.weight).float()
        logits = self.mc.logit_softcap * torch.tanh(logits / self.mc.logit_softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)

    def embed(self, input_ids: torch.Tensor, stream: StreamContext | None = None) -> torch.Tensor:
        """Token embedding, plus BigramHash and SmearGate when enabled. Both use only the previous token, which is
        the carried one at a streaming segment's start, and none at a sequence start or where the token is a BOS."""
        x = self.tok_emb(input_ids)
        if not (self.mc.bigram_buckets or self.mc.smear_gate):
            return x
        carried = None if stream is None else stream.prev_ids
        first = torch.full_like(input_ids[:, :1], -1) if carried is None else carried[:, None]
        prev = torch.cat([first, input_ids[:, :-1]], dim=1)
        prev = prev.masked_fill(input_ids == self.mc.bos_id, -1)  # -1: no previous token
        if stream is not None:
            stream.prev_ids = input_ids[:, -1].clone()
        if self.mc.bigram_buckets:
            x = x + self.bigram(prev, input_ids)
        if self.mc.smear_gate:
            has_prev = (prev >= 0)[..., None].to(x.dtype)
            x = x + torch.sigmoid(self.smear).to(x.dtype) * self.tok_emb(prev.clamp_min(0)) * has_prev
        return x


class BigramHash(nn.Module):
    """An embedding of the hashed (previous, current) token pair, projected to the model width. Bucket 0 is kept
    for 'no previous token'; the projection starts at zero, so the model starts as if the feature were off."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        self.proj = Linear(dim, model_dim, zero_init=True)

    def bucket(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        mixed = (prev * 1_000_003 + cur * 10_007) % (self.buckets - 1)  # int64: no overflow for 16-bit ids
        return torch.where(prev >= 0, 1 + mixed, torch.zeros_like(mixed))

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(self.bucket(prev, cur)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# 7. Optimizers: Muon for matrices, Adam for the rest, one routing table, EMA
# ------------------------------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz iteration tuned for speed of convergence near 0


def newton_schulz(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize G (the U V^T of its SVD) with a quintic Newton-Schulz iteration. G is one matrix
    (rows, cols) or a stack of them (n, rows, cols), each orthogonalized on its own."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then the update orthogonalized by Newton-Schulz and scaled by sqrt(max(1, rows/cols)).
    Matrices of one shape go through Newton-Schulz together, as one batched product per iteration. With several
    ranks each shape's matrices are split into contiguous runs, one per rank; each rank writes its run's updates
    into one bf16 buffer that is zero elsewhere, and one all-reduce of that buffer gives every rank all updates
    (exact: each element is nonzero on one rank only). A step launches a few kernels per shape, not per matrix.
    row_beta2 > 0 (MUON_VARIANT=normuon, after NorMuon, Li et al. 2025): each row of the orthogonalized update is
    divided by the root of a running mean (decay row_beta2) of its mean square, then the matrix is rescaled to the
    Frobenius norm it had, so the learning rates keep their meaning; rows that Newton-Schulz left large shrink."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, weight_decay: float, rt: Runtime,
                 row_beta2: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                                      row_beta2=row_beta2))
        self.rt = rt

    def _plan(self, params: list) -> list[tuple[tuple, list, int, int, int]]:
        """(shape, its matrices, offset of the shape's block in the flat buffer, this rank's first and end index)."""
        by_shape: dict[tuple, list] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        plan, offset, W, r = [], 0, self.rt.world_size, self.rt.rank
        for shape, ps in by_shape.items():
            n = len(ps)
            plan.append((shape, ps, offset, r * n // W, (r + 1) * n // W))
            offset += n * math.prod(shape)
        return plan

    def _normalize_rows(self, ortho: torch.Tensor, ps: list, beta2: float, eps: float = 1e-8) -> torch.Tensor:
        """ortho (n, rows, cols), the updates of ps: each row over the root of its running mean square, each
        matrix rescaled to its Frobenius norm before."""
        second = [self.state[p].setdefault("row_second_moment", torch.zeros(p.shape[0], device=p.device))
                  for p in ps]
        torch._foreach_lerp_(second, list(ortho.square().mean(dim=-1).unbind(0)), 1.0 - beta2)
        normed = ortho / (torch.stack(second).sqrt()[..., None] + eps)
        return normed * (ortho.norm(dim=(-2, -1), keepdim=True) / (normed.norm(dim=(-2, -1), keepdim=True) + eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            plan = self._plan([p for p in group["params"] if p.grad is not None])
            if not plan:
                continue
            device = plan[0][1][0].device
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            size = sum(len(ps) * math.prod(shape) for shape, ps, *_ in plan)
            flat = torch.zeros(size, dtype=dtype, device=device) if self.rt.distributed else None
            updates = []
            for shape, ps, offset, lo, hi in plan:
                block = (flat[offset: offset + len(ps) * math.prod(shape)].view(len(ps), *shape) if flat is not None
                         else torch.empty(len(ps), *shape, dtype=dtype, device=device))
                if hi > lo:
                    grads = [p.grad for p in ps[lo:hi]]
                    bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                            for p, g in zip(ps[lo:hi], grads)]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, grads)
                    nesterov = torch.stack(torch._foreach_add(grads, bufs, alpha=group["momentum"]))
                    ortho = newton_schulz(nesterov, group["ns_steps"])
                    if group["row_beta2"]:
                        ortho = self._normalize_rows(ortho.float(), ps[lo:hi], group["row_beta2"])
                    block[lo:hi] = ortho
                updates.append((shape, ps, block))
            if flat is not None:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for shape, ps, block in updates:
                if group["weight_decay"]:
                    torch._foreach_mul_(ps, 1.0 - group["lr"] * group["weight_decay"])
                scaled = block.float() * max(1.0, shape[0] / shape[1]) ** 0.5
                torch._foreach_add_(ps, list(scaled.unbind(0)), alpha=-group["lr"])

    def _own(self) -> set[int]:
        """ids of the matrices whose state this rank keeps (every matrix has a gradient at every step)."""
        return {id(p) for g in self.param_groups for _, ps, _, lo, hi in self._plan(g["params"]) for p in ps[lo:hi]}

    def full_state_dict(self) -> dict:
        """state_dict() with every matrix's state, on every rank: each rank holds its own runs' only, so their sum over
        the ranks is exact (RESUME_FROM may then run on another number of ranks). A collective on several ranks."""
        sd = self.state_dict()
        if not self.rt.distributed:
            return sd
        params, own = [p for g in self.param_groups for p in g["params"]], self._own()
        device = params[0].device
        for key, shape in (("momentum_buffer", lambda p: p.shape), ("row_second_moment", lambda p: p.shape[:1])):
            sizes = [math.prod(shape(p)) for p in params]
            flat, held = torch.zeros(sum(sizes), device=device), torch.zeros(len(params), device=device)
            for i, (p, piece) in enumerate(zip(params, flat.split(sizes))):
                if id(p) in own and key in self.state[p]:
                    piece.copy_(self.state[p][key].flatten())
                    held[i] = 1
            dist.all_reduce(flat)
            dist.all_reduce(held)
            for i, (p, piece) in enumerate(zip(params, flat.split(sizes))):
                if held[i]:
                    sd["state"].setdefault(i, {})[key] = piece.view(shape(p)).clone()
        return sd

    def load_full_state_dict(self, sd: dict) -> None:
        """A `full_state_dict` loaded; each rank keeps only its own runs' state."""
        self.load_state_dict(sd)
        own = self._own()
        for p in [p for p in self.state if id(p) not in own]:
            del self.state[p]


# First matching rule wins. Every parameter must match one rule (checked by route_parameters).
PARAM_ROUTES = (
    ("embed", "token embedding (tied with the head)", lambda name, p: name == "tok_emb.weight"),
    ("embed", "BigramHash table", lambda name, p: name == "bigram.table.weight"),
    ("scalar", "U-Net skip weights (one vector per skip)", lambda name, p: name == "skip_weights"),
    ("scalar", "residual mixes with the embedding (RESID_MIX; two vectors per layer)", lambda name, p: name == "resid_mix"),
    ("scalar", "branch output scales (BRANCH_SCALES; two vectors per layer)", lambda name, p: name == "branch_scale"),
    ("scalar", "GDN gate projections a_proj, b_proj (one output per head)",
     lambda name, p: name.endswith(("a_proj.weight", "b_proj.weight"))),
    ("scalar", "GDN short-convolution kernels", lambda name, p: name.endswith("_conv.weight")),
    ("scalar", "attention query gains (QK_GAIN_INIT; one per query head)", lambda name, p: name.endswith(".q_gain")),
    ("scalar", "attention head gates (ATTN_HEAD_GATE; one output per head)",
     lambda name, p: name.endswith("head_gate.weight")),
    ("muon", "2-D weight matrices", lambda name, p: p.ndim == 2),
    ("scalar", "vectors: norm weights, A_log, dt_bias", lambda name, p: p.ndim != 2),
)


def route_index(name: str, p: torch.Tensor) -> int:
    """Index of the first PARAM_ROUTES rule that matches the parameter."""
    idx = next((i for i, (_, _, rule) in enumerate(PARAM_ROUTES) if rule(name, p)), None)
    if idx is None:
        raise RuntimeError(f"parameter {name} {tuple(p.shape)} matches no optimizer route")
    return idx


def route_parameters(model: nn.Module) -> list[tuple[int, str, nn.Parameter]]:
    """(index of the first matching PARAM_ROUTES rule, name, parameter) for every parameter."""
    return [(route_index(name, p), name, p) for name, p in model.named_parameters()]


def params_of_group(routed: list, group: str) -> list[nn.Parameter]:
    return [p for i, _, p in routed if PARAM_ROUTES[i][0] == group]


def unaligned_shapes(model: nn.Module, align: int = 8) -> dict[tuple, int]:
    """{shape: count} of the Muon and embedding matrices with a dimension not a multiple of `align`, whose bf16
    matmuls can be slower (all-attention at 576 x 11, H200: MLP width 1,908 stepped 6% slower than 1,872; README)."""
    routed = route_parameters(model)
    shapes = [tuple(p.shape) for group in ("muon", "embed") for p in params_of_group(routed, group)]
    return {s: shapes.count(s) for s in sorted(set(shapes)) if any(d % align for d in s)}


def describe_routes(model: nn.Module) -> list[str]:
    routed = route_parameters(model)
    lines = []
    for i, (group, desc, _) in enumerate(PARAM_ROUTES):
        members = [p for j, _, p in routed if j == i]
        lines.append(f"  {group:6s} {desc}: {len(members)} tensors, {sum(p.numel() for p in members):,} params")
    return lines


@dataclass
class Optimizers:
    muon: Muon
    adam: torch.optim.Optimizer

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.all()]

    def load_state_dict(self, states: list[dict]) -> None:
        for o, s in zip(self.all(), states):
            o.load_state_dict(s)


def gdn_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every GDN mixer (G layers' and P layers' GDN halves)."""
    return {id(p) for m in model.modules() if isinstance(m, GatedDeltaNet) for p in m.parameters()}


def muon_param_groups(model: nn.Module, matrices: list[nn.Parameter], cfg: Config) -> list[dict]:
    """Muon's groups for MUON_VARIANT: one group, plain (row_beta2 0) or normuon; or, for normuon_gdn, the GDN
    mixers' matrices with normuon and the rest plain (a group left empty by the layout is dropped)."""
    if cfg.muon_variant != "normuon_gdn":
        return [dict(params=matrices, row_beta2=cfg.muon_beta2 if cfg.muon_variant == "normuon" else 0.0)]
    in_gdn = gdn_parameter_ids(model)
    groups = [dict(params=[p for p in matrices if id(p) in in_gdn], row_beta2=cfg.muon_beta2),
              dict(params=[p for p in matrices if id(p) not in in_gdn], row_beta2=0.0)]
    return [g for g in groups if g["params"]]


def build_optimizers(model: nn.Module, cfg: Config, rt: Runtime) -> Optimizers:
    routed = route_parameters(model)
    muon = Muon(muon_param_groups(model, params_of_group(routed, "muon"), cfg), cfg.matrix_lr, cfg.muon_momentum,
                cfg.muon_ns_steps, cfg.muon_weight_decay, rt)
    adam = torch.optim.AdamW(
        [dict(params=params_of_group(routed, "embed"), lr=cfg.embed_lr, weight_decay=cfg.embed_weight_decay),
         dict(params=params_of_group(routed, "scalar"), lr=cfg.scalar_lr, weight_decay=0.0)],
        betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.cuda)
    opts = Optimizers(muon, adam)
    for o in opts.all():
        for g in o.param_groups:
            g["base_lr"] = g["lr"]
    check_optimizer_coverage(model, opts)
    return opts


def check_optimizer_coverage(model: nn.Module, opts: Optimizers) -> None:
    """Every parameter in exactly one optimizer group (one earlier submission never trained its conv kernels)."""
    owned = [id(p) for o in opts.all() for g in o.param_groups for p in g["params"]]
    dup = len(owned) - len(set(owned))
    missing = [n for n, p in model.named_parameters() if id(p) not in set(owned)]
    if dup or missing or len(owned) != len(list(model.parameters())):
        raise RuntimeError(f"optimizer groups are wrong: {dup} parameters in two groups, missing {missing}")


class EMA:
    """Exponential moving average of the (fp32) weights; evaluation and export use it. The decay warms up as
    min(EMA_DECAY, (1 + t) / (10 + t)) so a short run is not dominated by its initialization. The bound stays below a
    decay d until update (10d - 1) / (1 - d): 2,990 for 0.997, so a run of fewer updates averages the same for every
    EMA_DECAY above its last bound (logged after training)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @staticmethod
    def warmup_bound(updates: int) -> float:
        return (1 + updates) / (10 + updates)

    def binds_from(self) -> int:
        """The first update whose decay is EMA_DECAY rather than the warmup bound."""
        t = max(1, int((10 * self.decay - 1) / (1 - self.decay)) - 2)  # the closed form, less any rounding
        while self.warmup_bound(t) < self.decay:
            t += 1
        return t

    def describe(self) -> str:
        first = self.binds_from()
        if self.updates == 0:
            return f"ema: no updates, the initial weights; EMA_DECAY={self.decay:g} would bind from update {first}"
        if first > self.updates:
            return (f"ema: {self.updates} updates, all under the warmup bound (1+t)/(10+t), the last "
                    f"{self.warmup_bound(self.updates):.5f}; EMA_DECAY={self.decay:g} would bind from update {first}")
        return f"ema: {self.updates} updates, EMA_DECAY={self.decay:g} in force from update {first}"

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, self.warmup_bound(self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


# ------------------------------------------------------------------------------------------------------------------
# 8. Quantization and the artifact
# ------------------------------------------------------------------------------------------------------------------
# File: MAGIC | version u16 | compressor u8 | crc32 u32 | frame count u32 | frame lengths u64 each | frames.
# The crc covers everything after the header. Frame 0 decompresses to the json metadata: the ModelConfig (so the
# artifact rebuilds its model alone), the packing and one record per tensor (name, shape, kind, bits, bytes). The
# other frames decompress to the tensor blobs, concatenated in record order; they are grouped into frames of at
# least FRAME_MIN_BYTES and compressed on parallel threads (the compressors release the GIL; splitting the stream
# this way cost nothing measurable in size).
# Quantized values are stored one per byte by default (PACKING=byte): measured with brotli-11 on int6 Gaussian
# weights, 3.38 bits/value against 4.03 for dense 6-bit packing (PACKING=dense), whose bit boundaries defeat the
# compressor's byte-wise modelling; the entropy of the values was 3.33 bits.

ARTIFACT_MAGIC = b"PGOLFGDN"
ARTIFACT_VERSION = 1
ARTIFACT_HEADER = struct.Struct("<8sHBII")
COMPRESSOR_IDS = {"brotli": 1, "zstd": 2}
BROTLI_QUALITY = 11
ZSTD_LEVEL = 22
FRAME_MIN_BYTES = 1 << 20
MIN_SCALE = 1e-7  # keeps an all-zero row's fp16 scale positive


def quant_plan(name: str, t: torch.Tensor, cfg: Config) -> tuple[str, int, float]:
    """(kind, bits, clip_sigmas) for one tensor, following the optimizer's routing table: the embedding gets
    EMBED_BITS, Muon's matrices MATRIX_BITS, everything small (gates, norms, decay parameters, convs) fp16."""
    group = PARAM_ROUTES[route_index(name, t)][0]
    if group == "embed":
        return "int", cfg.embed_bits, cfg.embed_clip_sigmas
    if group == "muon":
        return "int", cfg.matrix_bits, cfg.matrix_clip_sigmas
    return "fp16", 16, 0.0


def row_scales(w: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Per-row symmetric scale = clip_sigmas * std(row) / qmax, rounded to fp16 (as stored)."""
    return row_scales_fp32(w, bits, clip_sigmas).half()


def row_scales_fp32(w: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return (clip_sigmas * w.float().std(dim=1, unbiased=False) / qmax).clamp_min(MIN_SCALE)


def quantize_rows(w: torch.Tensor, bits: int, clip_sigmas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per-row quantization: (q int8 in [-qmax, qmax], scale fp16)."""
    qmax = 2 ** (bits - 1) - 1
    scale = row_scales(w, bits, clip_sigmas)
    q = torch.round(w.float() / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# Quantization-aware training (QAT_FRAC): over the last part of the run the matrices the export stores as ints are
# used, in the forward, as round-to-nearest would store them (quantize_rows' grid, at QAT_CLIP_SIGMAS), and their
# gradients pass straight through to the fp32 weights, which the optimizers, the EMA and the export keep using. One
# 0-d tensor switches it for every layer: a tensor, not a Python flag, so that turning it on in the middle of a
# compiled run changes what the compiled graph computes, with no recompile (a flag read in forward can be
# specialized into the graph and never seen to change). Evaluations run with the switch off.


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 x (below fp16's largest value) rounded to the nearest fp16 value, kept in float32: what
    x.half().float() gives, written out because torch.compile drops a cast down and back up (Inductor does not
    emulate precision casts by default, so a compiled fake quantization would use unrounded scales). fp16 carries
    11 significant bits; below 2^-14 its values are multiples of 2^-24."""
    _, exponent = torch.frexp(x)  # x = m 2^exponent, m in [0.5, 1)
    spacing = torch.ldexp(torch.ones_like(x), (exponent - 11).clamp_min(-24))
    return torch.round(x / spacing) * spacing  # half to even, as the cast rounds


def fake_quantize(w: torch.Tensor, switch: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Where `switch` is 1: w rounded to nearest on the per-row grid of quantize_rows (the same fp16 scales), i.e.
    dequantize_rows(*quantize_rows(w, bits, clip_sigmas)); where 0: w itself. The gradient reaches w unchanged."""
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach()
    scale = round_to_fp16(row_scales_fp32(wd, bits, clip_sigmas))[:, None]
    rounded = torch.round(wd.float() / scale).clamp_(-qmax, qmax) * scale
    return w + switch * (rounded.to(w.dtype) - wd)


def enable_qat(model: nn.Module, cfg: Config) -> list[str]:
    """Gives every Linear whose weight the export stores as ints (quant_plan) fake quantization at its bits and
    QAT_CLIP_SIGMAS, behind one switch, off until `set_qat` turns it on; returns those weights' names. Call it once
    the model is on its device: the layers share the switch tensor, which moving the model would copy apart."""
    switch = torch.zeros((), device=next(model.parameters()).device)
    names = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        name = f"{mod_name}.weight"
        kind, bits, _ = quant_plan(name, mod.weight, cfg)
        if kind == "int":
            mod.qat_bits, mod.qat_clip_sigmas = bits, cfg.qat_clip_sigmas
            mod.register_buffer("qat_switch", switch, persistent=False)  # not in state dicts, checkpoints, artifacts
            names.append(name)
    model.qat_switch = switch
    return names


def set_qat(model: nn.Module, on: bool) -> None:
    model.qat_switch.fill_(1.0 if on else 0.0)


def qat_is_on(model: nn.Module | None) -> bool:
    switch = getattr(model, "qat_switch", None)
    return switch is not None and bool(switch.item())


@contextlib.contextmanager
def qat_paused(model: nn.Module | None):
    """The switch off inside (an evaluation during training scores the weights themselves), as it was afterwards."""
    was_on = qat_is_on(model)
    if was_on:
        set_qat(model, False)
    try:
        yield
    finally:
        if was_on:
            set_qat(model, True)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, block: int = 128,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-Hessian GPTQ (Frantar et al. 2022) with the same per-row scales as quantize_rows. w (rows, cols) acts on
    inputs x as w @ x; H = sum x x^T (cols, cols). Columns go in descending diag(H) order; each one is rounded and its
    error, weighted by the inverse Hessian's Cholesky factor, is spread over the columns not yet quantized (inside a
    block of `block` columns at once, then onto the rest). Dead inputs (H_ii = 0) get H_ii = 1 and a zero column."""
    qmax = 2 ** (bits - 1) - 1
    W, H = w.detach().float().clone(), H.detach().float().clone()
    scale = row_scales(W, bits, clip_sigmas)
    s = scale.float()[:, None]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q = torch.round(W1[:, i: i + 1] / s).clamp_(-qmax, qmax)
            Q[:, i1 + i: i1 + i + 1] = q
            e = (W1[:, i: i + 1] - q * s) / Hinv1[i, i]
            W1[:, i:] -= e * Hinv1[i: i + 1, i:]
            err[:, i: i + 1] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8), scale


@torch.no_grad()
def collect_hessians(model: nn.Module, batches, cfg: Config, rt: Runtime) -> tuple[dict[str, torch.Tensor], int]:
    """H = sum of x x^T over the inputs of every Linear that GPTQ will quantize, from training batches (never
    validation data). A shared mixer's layers see both of their uses. Summed over ranks. Returns (H by weight name,
    tokens seen on all ranks)."""
    names = {id(mod.weight): f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, Linear)}
    targets = {mod: names[id(mod.weight)] for mod in model.modules() if isinstance(mod, Linear)
               and quant_plan(names[id(mod.weight)], mod.weight, cfg)[0] == "int"}
    H = {name: torch.zeros(mod.in_features, mod.in_features, device=rt.device) for mod, name in targets.items()}

    def hook(mod, inputs, _output):
        x = inputs[0].reshape(-1, mod.in_features).float()
        H[targets[mod]].addmm_(x.T, x)

    handles = [mod.register_forward_hook(hook) for mod in targets]
    seen = 0
    try:
        for x, _ in batches:
            with autocast(rt):
                model(x)
            seen += x.numel()
    finally:
        for h in handles:
            h.remove()
    if rt.distributed:
        for t in H.values():
            dist.all_reduce(t)
    return H, int(all_reduce_sum([seen], rt)[0])


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned values < 2**bits, densely packed, most significant bit first (int6: 4 values in 3 bytes)."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    if bits == 8:
        return v.tobytes()
    return np.packbits(np.unpackbits(v[:, None], axis=1)[:, 8 - bits:].reshape(-1)).tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:n].copy()
    b = np.unpackbits(raw)[: n * bits].reshape(n, bits)
    return np.packbits(np.pad(b, ((0, 0), (8 - bits, 0))), axis=1).reshape(-1)


def int_nbytes(bits: int, n: int, packing: str) -> int:
    return n if packing == "byte" else (n * bits + 7) // 8


def encode_ints(q: torch.Tensor, bits: int, packing: str) -> bytes:
    if packing == "byte":
        return q.numpy().astype(np.int8).tobytes()
    return pack_bits((q.numpy().astype(np.int16) + 2 ** (bits - 1) - 1).astype(np.uint8), bits)


def decode_ints(data: bytes, bits: int, n: int, packing: str) -> np.ndarray:
    if packing == "byte":
        return np.frombuffer(data, dtype=np.int8, count=n).copy()
    return (unpack_bits(data, bits, n).astype(np.int16) - (2 ** (bits - 1) - 1)).astype(np.int8)


def serialize_state(state: dict[str, torch.Tensor], mc: ModelConfig, cfg: Config,
                    hessians: dict[str, torch.Tensor] | None = None) -> tuple[list[bytes], list[dict]]:
    """Quantize and pack a state dict: returns the raw frames (metadata, then tensor blobs) and the records. With
    `hessians`, matrices that have one are quantized by GPTQ, the rest by rounding to nearest."""
    records, blobs = [], []
    for name in sorted(state):
        t = state[name].detach()
        kind, bits, clip = quant_plan(name, t, cfg)
        method = "fp16"
        if kind == "int":
            if hessians is not None and name in hessians:
                q, scale = gptq_quantize(t.reshape(t.shape[0], -1), hessians[name], bits, clip, cfg.gptq_block,
                                         cfg.gptq_damp)
                method = "gptq"
            else:
                q, scale = quantize_rows(t.reshape(t.shape[0], -1), bits, clip)
                method = "rtn"
            blob = encode_ints(q.cpu(), bits, cfg.packing) + scale.cpu().numpy().tobytes()
        else:
            blob = t.cpu().half().numpy().tobytes()
        records.append(dict(name=name, shape=list(t.shape), kind=kind, bits=bits, clip_sigmas=clip, nbytes=len(blob),
                            method=method))
        blobs.append(blob)
    meta = json.dumps(dict(model=dataclasses.asdict(mc), packing=cfg.packing, tensors=records), sort_keys=True)
    frames, current = [meta.encode()], b""
    for blob in blobs:
        current += blob
        if len(current) >= FRAME_MIN_BYTES:
            frames.append(current)
            current = b""
    return frames + ([current] if current else []), records


def _read_metadata(frame: bytes, source: str) -> tuple[dict, ModelConfig]:
    """An artifact's first frame, decompressed: its metadata (with its packing and tensor list, checked present) and
    the model it describes."""
    try:
        meta = json.loads(frame)
        _ = meta["packing"], meta["tensors"]  # present, or the metadata is unreadable
        return meta, ModelConfig(**meta["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"artifact {source}: unreadable metadata ({e})") from None


def deserialize_state(frames: list[bytes], source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    meta, mc = _read_metadata(frames[0], source)
    packing = meta["packing"]
    body = b"".join(frames[1:])
    state, offset = {}, 0
    for rec in meta["tensors"]:
        blob = body[offset: offset + rec["nbytes"]]
        if len(blob) != rec["nbytes"]:
            raise ValueError(f"artifact {source}: tensor {rec['name']} is cut short")
        offset += rec["nbytes"]
        state[rec["name"]] = _decode_tensor(rec, blob, packing, source)
    if offset != len(body):
        raise ValueError(f"artifact {source}: {len(body) - offset} bytes after the last tensor")
    return mc, state


def _decode_tensor(rec: dict, blob: bytes, packing: str, source: str) -> torch.Tensor:
    shape, n = rec["shape"], math.prod(rec["shape"])
    if rec["kind"] == "fp16":
        if len(blob) != 2 * n:
            raise ValueError(f"artifact {source}: tensor {rec['name']} has {len(blob)} bytes, expected {2 * n}")
        return torch.from_numpy(np.frombuffer(blob, dtype=np.float16).copy()).float().view(shape)
    if rec["kind"] != "int":
        raise ValueError(f"artifact {source}: tensor {rec['name']} has unknown kind {rec['kind']!r}")
    bits, rows = rec["bits"], shape[0]
    qbytes = int_nbytes(bits, n, packing)
    if len(blob) != qbytes + 2 * rows:
        raise ValueError(f"artifact {source}: tensor {rec['name']} has {len(blob)} bytes, expected {qbytes + 2 * rows}")
    q = torch.from_numpy(decode_ints(blob[:qbytes], bits, n, packing)).view(rows, -1)
    scale = torch.from_numpy(np.frombuffer(blob[qbytes:], dtype=np.float16).copy())
    return dequantize_rows(q, scale).view(shape)


def compress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli  # noqa: PLC0415

        return brotli.compress(data, quality=BROTLI_QUALITY)
    import zstandard  # noqa: PLC0415

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli  # noqa: PLC0415

        return brotli.decompress(data)
    import zstandard  # noqa: PLC0415

    return zstandard.ZstdDecompressor().decompress(data)


def _parallel(fn, items: list) -> list:
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def pack_artifact(frames: list[bytes], compressor: str) -> bytes:
    """The artifact file's bytes: the header, then the frames compressed in parallel (written by
    `write_atomically`)."""
    packed = _parallel(lambda f: compress(f, compressor), frames)
    rest = struct.pack(f"<{len(packed)}Q", *(len(p) for p in packed)) + b"".join(packed)
    header = ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSOR_IDS[compressor], zlib.crc32(rest),
                                  len(packed))
    return header + rest


def write_atomically(path: Path, write: Callable) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, rename over `path`: a failure leaves what was at
    `path` before, and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _artifact_frames(path: Path) -> tuple[str, list[bytes]]:
    """(the compressor its header names, its frames still compressed), every check of the file's layout passed."""
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    data = path.read_bytes()
    if len(data) < ARTIFACT_HEADER.size:
        raise ValueError(f"artifact {path} is {len(data)} bytes, shorter than its header: truncated")
    magic, version, comp_id, crc, n_frames = ARTIFACT_HEADER.unpack_from(data)
    if magic != ARTIFACT_MAGIC:
        raise ValueError(f"artifact {path} starts with {magic!r}, expected {ARTIFACT_MAGIC!r}: not an artifact of this script")
    if version != ARTIFACT_VERSION:
        raise ValueError(f"artifact {path} has format version {version}; this script reads version {ARTIFACT_VERSION}")
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    if comp_id not in names:
        raise ValueError(f"artifact {path} names unknown compressor id {comp_id}")
    rest = data[ARTIFACT_HEADER.size:]
    if zlib.crc32(rest) != crc:
        raise ValueError(f"artifact {path} fails its checksum: truncated or corrupted")
    # The checksum covers what follows the header; the header's frame count and compressor are checked by use.
    if not 1 <= n_frames <= len(rest) // 8:
        raise ValueError(f"artifact {path}: its header's frame count {n_frames} does not fit the file: corrupted")
    lengths = struct.unpack_from(f"<{n_frames}Q", rest)
    offsets = np.cumsum([8 * n_frames, *lengths]).tolist()
    if offsets[-1] != len(rest):
        raise ValueError(f"artifact {path}: frame table does not match the file size")
    return names[comp_id], [rest[offsets[i]: offsets[i + 1]] for i in range(n_frames)]


def _decompress_frame(path: Path, frame: bytes, compressor: str) -> bytes:
    try:
        return decompress(frame, compressor)
    except Exception as err:  # brotli.error, zstandard.ZstdError: the header names the wrong compressor
        raise ValueError(f"artifact {path}: a frame does not decompress with {compressor}, the compressor its header "
                         f"names ({type(err).__name__}: {err}): corrupted header") from err


def read_artifact(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    compressor, frames = _artifact_frames(path)
    return deserialize_state(_parallel(lambda f: _decompress_frame(path, f, compressor), frames), str(path))


def artifact_model_and_label(path: Path) -> tuple[ModelConfig, str]:
    """From the header and the metadata frame alone (the checksum is still checked over the whole file): the model
    the artifact holds, and `int{bits}_{compressor}` of the file itself (its matrices' bits), as the training run's
    score tags name them; a rescoring's settings do not change what is in the file."""
    compressor, frames = _artifact_frames(path)
    meta, mc = _read_metadata(_decompress_frame(path, frames[0], compressor), str(path))
    bits = sorted({r["bits"] for r in meta["tensors"] if r["kind"] == "int"
                   and PARAM_ROUTES[route_index(r["name"], torch.empty(r["shape"], device="meta"))][0] == "muon"})
    return mc, f"int{'/'.join(map(str, bits))}_{compressor}"


def load_exported_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, kind: str = "artifact") -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{kind} {source} does not fit the model: missing {missing}, unexpected {unexpected}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{kind} {source}: tensor {name} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


CHECKPOINT_FORMAT = "pgolf-gdn-checkpoint-1"
# what the training run did: steps, training time, EMA applied or not, and the wallclock cap it ran under
CHECKPOINT_INFO = ("steps", "train_ms", "ema", "max_wallclock_seconds")


def write_checkpoint(path: Path, model: nn.Module, info: dict) -> int:
    """The weights a training run is about to export, unquantized (as trained, EMA applied), with the architecture and
    `info` (CHECKPOINT_INFO: steps, training time, whether they are the EMA's, the cap), so that EXPORT_FROM can
    calibrate, quantize and score them again without training. Written atomically; returns the file size. Not part
    of the submission."""
    if set(info) != set(CHECKPOINT_INFO):
        raise ValueError(f"checkpoint info {sorted(info)} must be {sorted(CHECKPOINT_INFO)}")
    payload = dict(format=CHECKPOINT_FORMAT, model_config=dataclasses.asdict(model.mc),
                   state={k: v.detach().cpu() for k, v in model.state_dict().items()}, **info)
    write_atomically(path, lambda f: torch.save(payload, f))
    return path.stat().st_size


def load_torch_file(path: Path, name: str, kind: str, fmt: str, device: str | torch.device = "cpu",
                    foreign: str = "") -> dict:
    """The dict a torch file of this script holds (its "format" is `fmt`), on `device`; a clear error, led by `name`
    (how the run refers to the file) and naming the `kind` expected, for a missing, unreadable or foreign file
    (`foreign` adds to that last message)."""
    if not path.is_file():
        raise FileNotFoundError(f"{name} does not exist")
    try:  # tensors and plain values only: nothing in the file is executed
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"{name} cannot be read, truncated or not a {kind} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{name} is not a {kind} of this script (format {fmt}){foreign}")
    return payload


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(architecture, weights, info) of a CHECKPOINT_PATH file; a clear error for anything else."""
    payload = load_torch_file(path, f"checkpoint {path}", "checkpoint", CHECKPOINT_FORMAT)
    try:
        mc = ModelConfig(**payload["model_config"])
    except TypeError as err:
        raise ValueError(f"checkpoint {path} records an architecture this script cannot build: {err}") from None
    missing = [k for k in ("state", *CHECKPOINT_INFO) if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: not written by this script's CHECKPOINT_PATH")
    return mc, payload["state"], {k: payload[k] for k in CHECKPOINT_INFO}


@functools.cache
def script_source() -> bytes:
    """This script's bytes, read once (the run's header logs them first): the code a run logs and counts is the code
    it runs, even if the file is edited while it trains."""
    return Path(__file__).read_bytes()


def code_bytes() -> int:
    return len(script_source())


CLIP_FIT_SLACK_BYTES = 40_000  # MATRIX_CLIP_FIT stops this close under the limit: at lease 11's ~6 MB of artifact per
#                                unit of ln(clip), 0.7% of the clip, worth about 0.00004 bpb by that lease's exports
CLIP_FIT_MAX_TRIALS = 8  # exports, each a GPTQ pass and a compression (default model, H200: about 9 s + 7 s)


def fit_matrix_clip(size_at: Callable[[float], int], start: float, lo: float, hi: float, budget: int, slope: float,
                    slack: int = CLIP_FIT_SLACK_BYTES, max_trials: int = CLIP_FIT_MAX_TRIALS
                    ) -> tuple[float, list[tuple[float, int]]]:
    """The narrowest matrix clip in [lo, hi] (sigmas) whose size fits `budget` bytes, found to within `slack` bytes.

    A narrower clip is a finer grid: better quality, more bytes (lease 11, one run's weights: clip 16 -> 12.85 -> 10
    -> 8 took the round trip 1.3705 -> 1.3682 -> 1.3663 -> 1.3655 and the model 13.6 -> 14.8 -> 16.2 -> 17.7 MB).
    The size falls nearly linearly in ln(clip), by about `slope` bytes per unit (each value's entropy falls by
    log2(e) bits per unit of ln(clip)). So the search steps along that line from `start` (then along the line
    through its last two sizes), and once it has sizes on both sides of the budget, takes the secant between the
    nearest two, kept inside them. `size_at(clip)` -> bytes, called with the clips it returns. Returns (clip,
    trials [(clip, bytes)]): the narrowest clip that fitted, or the widest tried when none did (at `hi`, or after
    `max_trials`)."""
    trials = []
    fit = over = None  # (ln clip, clip, bytes): the narrowest that fitted, the widest that did not
    clip, x_lo, x_hi = start, math.log(lo), math.log(hi)
    aim = budget - slack / 2
    while True:
        x = math.log(clip)
        size = size_at(clip)
        trials.append((clip, size))
        if size <= budget and (fit is None or x < fit[0]):
            fit = (x, clip, size)
        if size > budget and (over is None or x > over[0]):
            over = (x, clip, size)
        if fit is not None and (budget - fit[2] <= slack or fit[0] <= x_lo):
            break  # full enough, or as fine as allowed
        if (fit is None and over[0] >= x_hi) or len(trials) >= max_trials:
            break  # even the widest clip is over, or out of trials
        if fit is not None and over is not None:
            (xo, _, so), (xf, _, sf) = over, fit
            x = xo + (so - aim) * (xf - xo) / (so - sf)
            x = min(max(x, xo + 0.1 * (xf - xo)), xf - 0.1 * (xf - xo))
        else:  # one side only: along the slope the last two trials show (or the guess), at most to the bound
            x0, _, s0 = fit or over
            if len(trials) >= 2:
                (c1, s1), (c2, s2) = trials[-2:]
                seen = (s1 - s2) / math.log(c2 / c1) if c1 != c2 else 0.0
                if seen > 0:
                    slope = seen
            x = min(max(x0 + (s0 - aim) / slope, x_lo), x_hi)
        clip = lo if x <= x_lo else hi if x >= x_hi else math.exp(x)  # a bound exactly, as given
    return (fit or over)[1], trials


# ------------------------------------------------------------------------------------------------------------------
# 9. Evaluation
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: int  # first input token
    length: int  # inputs tokens[start : start+length], targets tokens[start+1 : start+length+1]
    score_from: int  # positions >= score_from are scored


def make_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows start at 0, stride, 2*stride, ...; each scores only targets no earlier window scored, so every target
    (token 1 .. n-1) is scored exactly once, with at least seq_len - stride tokens of context after the first window.
    stride == seq_len is plain evaluation (the last window may be shorter)."""
    n_targets, scored, start, windows = n_tokens - 1, 0, 0, []
    while scored < n_targets:
        length = min(seq_len, n_targets - start)
        windows.append(Window(start, length, scored - start))
        scored, start = start + length, start + stride
    return windows


@dataclass
class EvalResult:
    loss: float
    bpb: float
    tokens: int
    bytes: int
    seconds: float

    def line(self, tag: str) -> str:
        return (f"{tag} val_loss:{self.loss:.4f} val_bpb:{self.bpb:.4f} val_tokens:{self.tokens} "
                f"val_bytes:{self.bytes} eval_time:{1000 * self.seconds:.0f}ms")

    def exact_line(self, tag: str) -> str:
        return f"{tag}_exact val_loss:{self.loss:.8f} val_bpb:{self.bpb:.8f}"


def autocast(rt: Runtime):
    return torch.autocast("cuda", dtype=torch.bfloat16) if rt.cuda else contextlib.nullcontext()


def rank_share(items: list, rt: Runtime) -> list:
    """This rank's contiguous share of `items` (windows, lanes); the shares cover `items` once."""
    return items[len(items) * rt.rank // rt.world_size: len(items) * (rt.rank + 1) // rt.world_size]


class Tally:
    """Running sums of one rank's scored targets; `result` adds them over ranks. With `track=n` it also keeps, per
    target position, how often it was scored and its loss (tests use this to prove the scoring rules)."""

    def __init__(self, device: torch.device, track: int = 0):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.bytes = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.hits = torch.zeros(track, dtype=torch.int64) if track else None
        self.nll_at = torch.zeros(track, dtype=torch.float64) if track else None

    def add(self, nll: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, tables: ByteTables,
            pos: torch.Tensor) -> None:
        """nll, x, y, mask, pos (B, T); pos is each target's index in the token stream."""
        self.nll += nll[mask].double().sum()
        self.bytes += tables.count(x[mask], y[mask]).sum()
        self.count += mask.sum()
        if self.hits is not None:
            where = pos[mask].cpu()
            self.hits.index_add_(0, where, torch.ones_like(where))
            self.nll_at.index_add_(0, where, nll[mask].double().cpu())

    def result(self, rt: Runtime, tokens: torch.Tensor, tables: ByteTables, seconds: float) -> EvalResult:
        """The scores over all ranks, after checking that they cover every target of `tokens` (SPEC 4) and every
        byte the tables give the whole stream (SPEC 3)."""
        nll, nbytes, n = all_reduce_sum([self.nll.item(), float(self.bytes.item()), float(self.count.item())], rt)
        if int(n) != len(tokens) - 1:
            raise RuntimeError(f"evaluation scored {int(n)} targets, expected {len(tokens) - 1}")
        stream_bytes = int(tables.count(tokens[:-1].to(tables.base_bytes.device),
                                        tokens[1:].to(tables.base_bytes.device)).sum())
        if int(nbytes) != stream_bytes:
            raise RuntimeError(f"evaluation counted {int(nbytes)} bytes, the stream's targets hold {stream_bytes}")
        return EvalResult(nll / n, nll / (math.log(2) * nbytes), int(n), int(nbytes), seconds)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: Config, rt: Runtime,
             tally: Tally | None = None) -> EvalResult:
    """Scores every target of `tokens` once (windows of EVAL_SEQ_LEN, stride EVAL_STRIDE), split over ranks."""
    t0 = time.perf_counter()
    tally = tally or Tally(rt.device)
    windows = make_windows(len(tokens), cfg.eval_len, cfg.stride)
    score_windows(model, tokens, rank_share(windows, rt), tables, cfg, rt, tally)
    return tally.result(rt, tokens, tables, time.perf_counter() - t0)


@torch.no_grad()
def score_windows(model: nn.Module, tokens: torch.Tensor, windows: list[Window], tables: ByteTables, cfg: Config,
                  rt: Runtime, tally: Tally, pad_to: int = 0) -> None:
    """Scores `windows` in batches of as many as EVAL_BATCH_TOKENS holds, at most `pad_to` (default: all of them),
    every batch padded to that one shape so that a compiled model compiles once (callers with several window lists
    pass one `pad_to` for all)."""
    if not windows:  # a rank's share can be empty
        return
    batch = min(cfg.eval_batch_tokens // cfg.eval_len, pad_to or len(windows))
    was_training = model.training
    model.eval()
    for b in range(0, len(windows), batch):
        x, y, mask, pos = (t.to(rt.device) for t in _window_batch(tokens, windows[b: b + batch], batch, cfg.eval_len))
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs (TTT_COMPILE=graphs): the last batch's nll is tallied
        with autocast(rt):
            nll = model(x, y, reduction="none")
        tally.add(nll, x, y, mask, tables, pos)
    model.train(was_training)


def _window_batch(tokens: torch.Tensor, ws: list[Window], batch: int, seq_len: int):
    """Pads to a fixed (batch, seq_len) shape so a compiled model sees one shape; padding is never scored."""
    x = torch.zeros(batch, seq_len, dtype=torch.int64)
    y = torch.zeros(batch, seq_len, dtype=torch.int64)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    pos = torch.zeros(batch, seq_len, dtype=torch.int64)
    for j, w in enumerate(ws):
        seg = tokens[w.start: w.start + w.length + 1]
        x[j, : w.length], y[j, : w.length] = seg[:-1], seg[1:]
        mask[j, w.score_from: w.length] = True
        pos[j] = w.start + 1 + torch.arange(seq_len)
    return x, y, mask, pos


# Streaming: the validation stream is cut into equal lanes; each lane is walked once,
# segment by segment, carrying every layer's state, so every target is scored once with all of its lane's earlier
# tokens as GDN context, for about one forward pass per token.

NO_BOS_YET = 1 << 40  # "tokens since the latest BOS" before any BOS was seen


def stream_lanes(n_tokens: int, n_lanes: int) -> list[tuple[int, int]]:
    """Cuts the inputs [0, n-1) into at most n_lanes equal contiguous (start, end) lanes. The cuts must not depend on
    the tokens: moving a cut to the next document start would make the context of the tokens before it depend on
    where a later document begins (a future token), which the legality test catches."""
    n_in = n_tokens - 1
    cuts = sorted({i * n_in // n_lanes for i in range(n_lanes)})
    return list(zip(cuts, cuts[1:] + [n_in]))


class StreamScorer:
    """Walks lanes segment by segment with a StreamContext; `run` may be called again to continue the same lanes."""

    def __init__(self, model: nn.Module, n_lanes: int, cfg: Config, rt: Runtime, bos_id: int):
        if set(UNBOUNDED_KINDS) & set(model.layer_kinds):
            raise ValueError(f"EVAL_MODE=stream needs bounded-state layers; LAYOUT={model.mc.layout} has full attention")
        self.model, self.cfg, self.rt, self.bos_id = model, cfg, rt, bos_id
        self.ctx = StreamContext(layers=[{} for _ in model.layer_mixer])
        self.since = torch.full((n_lanes,), NO_BOS_YET, dtype=torch.long, device=rt.device)
        self.padded = False  # a lane shorter than the longest has read padding into its state: it cannot go on

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, lanes: list[tuple[int, int]], tables: ByteTables, tally: Tally | None,
            score_from: list[int] | None = None) -> None:
        """Walks the inputs [a, e) of each lane (a, e) and scores the targets of inputs from `score_from` (default a)
        on: inputs before it only prime the lane's state (a warmup on tokens that are all earlier in the stream).
        The last piece ends where the longest lane does, so a lane of that length has read exactly its inputs and
        a later `run` continues it as one long forward would; shorter lanes read padding and end here."""
        if self.padded:
            raise RuntimeError("StreamScorer.run: a lane of the previous call was shorter than the others and read "
                               "padding into its state; give every lane the same length to continue them")
        longest = max(e - s for s, e in lanes)
        self.padded = any(e - s != longest for s, e in lanes)
        first = torch.tensor(score_from if score_from is not None else [a for a, _ in lanes])[:, None]
        self.model.eval()
        for off in range(0, longest, self.cfg.stream_segment):
            T = min(self.cfg.stream_segment, longest - off)
            x = torch.zeros(len(lanes), T, dtype=torch.int64)
            y = torch.zeros(len(lanes), T, dtype=torch.int64)
            mask = torch.zeros(len(lanes), T, dtype=torch.bool)
            pos = torch.tensor([s + off + 1 for s, _ in lanes])[:, None] + torch.arange(T)
            for i, (s, e) in enumerate(lanes):
                n = max(0, min(T, e - s - off))
                x[i, :n], y[i, :n] = tokens[s + off: s + off + n], tokens[s + off + 1: s + off + n + 1]
                mask[i, :n] = True
            mask &= pos > first  # pos is the target's index, one past its input's
            x, y, mask, pos = (t.to(self.rt.device) for t in (x, y, mask, pos))
            self.ctx.since_bos = self._since_bos(x) if self.cfg.stream_reset else None
            with autocast(self.rt):
                nll = self.model(x, y, reduction="none", stream=self.ctx)
            self.ctx.offset += T
            if tally is not None:
                tally.add(nll, x, y, mask, tables, pos)

    def run_warmed(self, tokens: torch.Tensor, spans: list[tuple[int, int]], tables: ByteTables,
                   tally: Tally | None) -> None:
        """`run` over spans (s, e) that each first read the STREAM_WARMUP tokens before s, unscored."""
        warm = self.cfg.stream_warmup
        self.run(tokens, [(max(0, s - warm), e) for s, e in spans], tables, tally, [s for s, _ in spans])

    def _since_bos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens since the latest BOS at or before each position, carried across segments."""
        idx = torch.arange(x.shape[1], device=x.device).expand_as(x)
        last = torch.where(x == self.bos_id, idx, torch.full_like(idx, -1)).cummax(dim=1).values
        since = torch.where(last >= 0, idx - last, self.since[:, None] + 1 + idx)
        self.since = since[:, -1].clone()
        return since


def evaluate_stream(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: Config, rt: Runtime,
                    tally: Tally | None = None) -> EvalResult:
    """Each lane scores its span; it starts reading STREAM_WARMUP tokens earlier (inside the previous lane's span),
    so that its first targets do not see an empty state where windows would have given them context."""
    t0 = time.perf_counter()
    # STREAM_LANES in all, not per rank: the cuts, so the score, are the same on any number of GPUs
    lanes = stream_lanes(len(tokens), cfg.stream_lanes)
    mine = rank_share(lanes, rt)
    tally = tally or Tally(rt.device)
    group = max(1, cfg.eval_batch_tokens // cfg.stream_segment)  # lanes per forward pass: bounds the memory
    for g in range(0, len(mine), group):
        spans = mine[g: g + group]
        StreamScorer(model, len(spans), cfg, rt, tables.bos_id).run_warmed(tokens, spans, tables, tally)
    return tally.result(rt, tokens, tables, time.perf_counter() - t0)


# Score-first test-time training: the stream is split into chunks in order; each chunk is scored completely with no
# gradient, then (except the last) the model trains on that chunk's tokens, every rank in step; so every token is
# scored once, by a model that has only trained on tokens before it.


@dataclass
class TTTChunk:
    lo: int  # the chunk scores targets lo+1 .. hi
    hi: int
    windows: list[Window] = field(default_factory=list)  # window mode: the windows that score those targets


def ttt_chunks(n_tokens: int, cfg: Config) -> list[TTTChunk]:
    """Window mode: consecutive windows grouped until they score TTT_CHUNK_TOKENS targets. Stream mode: spans of
    TTT_CHUNK_TOKENS inputs."""
    if cfg.eval_mode == "stream":
        C = cfg.ttt_chunk_tokens
        return [TTTChunk(a, min(a + C, n_tokens - 1)) for a in range(0, n_tokens - 1, C)]
    chunks, current = [], []
    for w in make_windows(n_tokens, cfg.eval_len, cfg.stride):
        current.append(w)
        if sum(v.length - v.score_from for v in current) >= cfg.ttt_chunk_tokens:
            chunks.append(current)
            current = []
    chunks += [current] if current else []
    return [TTTChunk(ws[0].start + ws[0].score_from, ws[-1].start + ws[-1].length, ws) for ws in chunks]


def ttt_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    routed = route_parameters(model)
    in_gdn = gdn_parameter_ids(model)
    chosen = {
        "all": lambda i, n, p: True,
        "mlp": lambda i, n, p: n.startswith("mlps."),
        "scalar": lambda i, n, p: PARAM_ROUTES[i][0] == "scalar",
        "gdn": lambda i, n, p: id(p) in in_gdn,
    }[which]
    params = [p for i, n, p in routed if chosen(i, n, p)]
    if not params:  # which parameters a model has is known only once it is built (an artifact's: EVAL_ONLY)
        raise ValueError(f"TTT_PARAMS={which} selects no parameters of this model (layout {model.mc.layout})")
    return params


def require_ttt_selection(model: nn.Module, cfg: Config) -> None:
    """Refuses, as soon as the model is built and before anything is trained or scored, a TTT_PARAMS that selects
    none of its parameters (e.g. `scalar` on all-attention without U-Net skips, which has none), rather than when TTT
    starts, after the training and the scoring without TTT."""
    if cfg.ttt_enabled:
        ttt_parameters(model, cfg.ttt_params)


def ttt_adapt(model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], span: torch.Tensor,
              cfg: Config, rt: Runtime, fwd: nn.Module) -> None:
    """TTT_EPOCHS passes over the chunk's sequences, TTT_BATCH_SEQS of them per step whatever the number of ranks:
    each rank takes its share of the step's sequences and the gradients are summed over ranks, so all ranks take
    identical steps, and the same steps as one process would (a rescore on other hardware adapts alike).
    `fwd` runs the forward and backward: `model` itself, or it compiled (same parameters). One flat all-reduce
    per step."""
    L = cfg.ttt_seq_len or cfg.eval_len
    rows = [(a, min(a + L, len(span) - 1)) for a in range(0, len(span) - 1, L)]
    local = -(-cfg.ttt_batch_seqs // rt.world_size)  # this rank's sequences per step (the last ranks may idle)
    # One host-to-device copy per chunk: a copy from pageable memory per step would wait for the previous step's
    # kernels, and the host could not queue a step while the device runs the one before.
    span = span.to(rt.device)
    model.train()
    for _ in range(cfg.ttt_epochs):
        for b in range(0, len(rows), cfg.ttt_batch_seqs):
            step_rows = rows[b: b + cfg.ttt_batch_seqs]
            total = sum(e - a for a, e in step_rows)
            x = torch.zeros(local, L, dtype=torch.int64, device=rt.device)
            y = torch.full((local, L), -100, dtype=torch.int64, device=rt.device)  # -100: ignored by the loss
            for j, (a, e) in enumerate(step_rows[rt.rank * local: (rt.rank + 1) * local]):
                x[j, : e - a], y[j, : e - a] = span[a:e], span[a + 1: e + 1]
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are no longer read
            with autocast(rt):
                nll = fwd(x, y.clamp_min(0), reduction="none")
            ((nll * (y >= 0)).sum() / total).backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if rt.distributed:
                all_reduce_grads(params)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()


def _median_ms(seconds: list[float]) -> str:
    """'12.3ms', or 'none' for no times (e.g. TTT adapted on one chunk only: no adaptation after the first)."""
    return f"{1000 * statistics.median(seconds):.1f}ms" if seconds else "none"


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sums the gradients over ranks in one collective (one per parameter cost more than the TTT step's compute)."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(synced.view_as(g))


def evaluate_ttt(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: Config, rt: Runtime, log: Logger,
                 observer=None, tally: Tally | None = None, spent_s: float = 0.0,
                 compiled: nn.Module | None = None) -> EvalResult:
    """Score-first TTT over chunks in stream order. Window mode: each chunk's windows are split over ranks. Stream
    mode: one lane carries its state across chunks (more lanes would let later tokens train the model before earlier
    ones are scored), or with TTT_STATE=rebuild recomputes it after each update from the STREAM_WARMUP tokens before
    the chunk; every rank computes it and rank 0 counts it. EVAL_MAX_SECONDS (counting `spent_s` already used
    by the evaluation) stops adaptation, never scoring. `compiled` (the model compiled, same parameters) runs the
    window scoring and the adaptation steps; the streaming scorer, whose state varies, runs `model`.
    `observer(event, lo, hi)` sees every 'score' and 'train' of a chunk (for tests)."""
    fwd = model if compiled is None else compiled  # (a compiled module has no truth value: no `or`)
    t0 = time.perf_counter()
    params = ttt_parameters(model, cfg.ttt_params)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = (torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum) if cfg.ttt_optimizer == "sgd"
           else torch.optim.AdamW(params, lr=cfg.ttt_lr, weight_decay=0.0))
    chunks = ttt_chunks(len(tokens), cfg)
    per_rank = max(len(rank_share(c.windows, rt)) for c in chunks)  # window mode: one padded batch shape
    tally = tally or Tally(rt.device)
    scorer = StreamScorer(model, 1, cfg, rt, tables.bos_id) if cfg.eval_mode == "stream" else None
    score_times, adapt_times, adapting, stale = [], [], True, False  # stale: weights changed since the state
    for c, chunk in enumerate(chunks):
        ts = time.perf_counter()
        if scorer is not None and cfg.ttt_state == "rebuild" and stale:  # the state anew, from the new weights
            stale = False
            scorer = StreamScorer(model, 1, cfg, rt, tables.bos_id)
            scorer.run_warmed(tokens, [(chunk.lo, chunk.hi)], tables, tally if rt.is_main else None)
        elif scorer is not None:
            scorer.run(tokens, [(chunk.lo, chunk.hi)], tables, tally if rt.is_main else None)
        else:
            score_windows(fwd, tokens, rank_share(chunk.windows, rt), tables, cfg, rt, tally, pad_to=per_rank)
        score_times.append(time.perf_counter() - ts)
        if observer:
            observer("score", chunk.lo, chunk.hi)
        if c == len(chunks) - 1:
            break
        if adapting and cfg.eval_max_seconds:
            # rates from the second chunk on: the first one's times include compiling its shapes
            per_score = sum(score_times[1:]) / c if c else 0.0
            per_adapt = sum(adapt_times[1:]) / (len(adapt_times) - 1) if len(adapt_times) > 1 else sum(adapt_times)
            elapsed = spent_s + time.perf_counter() - t0
            over = elapsed + per_score * (len(chunks) - c - 1) + per_adapt > cfg.eval_max_seconds
            if _any_rank(over, rt):
                adapting = False
                log(f"ttt: EVAL_MAX_SECONDS={cfg.eval_max_seconds:.0f} would be exceeded; adaptation stops after "
                    f"{len(adapt_times)}/{len(chunks) - 1} chunks, scoring continues")
        if adapting:
            ta = time.perf_counter()
            if observer:
                observer("train", chunk.lo, chunk.hi)
            ttt_adapt(model, opt, params, tokens[chunk.lo: chunk.hi + 1], cfg, rt, fwd)
            adapt_times.append(time.perf_counter() - ta)
            stale = True
    log(f"ttt: {cfg.eval_mode} mode, {len(chunks)} chunks of {cfg.ttt_chunk_tokens} tokens, adapted on "
        f"{len(adapt_times)} ({sum(p.numel() for p in params):,} parameters, {cfg.ttt_params}); scoring "
        f"{sum(score_times):.1f}s, adaptation {sum(adapt_times):.1f}s; per chunk after the first (which compiles): "
        f"scoring {_median_ms(score_times[1:])}, adaptation {_median_ms(adapt_times[1:])} (medians)")
    return tally.result(rt, tokens, tables, time.perf_counter() - t0)


def evaluate_base(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: Config, rt: Runtime,
                  tally: Tally | None = None) -> EvalResult:
    """The configured evaluation without TTT: windows (plain or sliding) or streaming."""
    if cfg.eval_mode == "stream":
        return evaluate_stream(model, tokens, tables, cfg, rt, tally)
    return evaluate(model, tokens, tables, cfg, rt, tally)


def evaluate_final(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: Config, rt: Runtime,
                   log: Logger) -> EvalResult:
    """The configured evaluation, with score-first TTT when TTT_ENABLED."""
    if cfg.ttt_enabled:
        return evaluate_ttt(model, tokens, tables, cfg, rt, log)
    return evaluate_base(model, tokens, tables, cfg, rt)


def eval_tag(cfg: Config) -> str:
    """How the score was computed, for the log lines: '', '_sliding64', '_stream', '_stream_reset', plus '_ttt'."""
    if cfg.eval_mode == "stream":
        mode = "_stream_reset" if cfg.stream_reset else "_stream"
    else:
        mode = "" if cfg.stride == cfg.eval_len else f"_sliding{cfg.stride}"
    return mode + ("_ttt" if cfg.ttt_enabled else "")


# ------------------------------------------------------------------------------------------------------------------
# 10. Backends and kernel checks: a fast kernel is used only after it matches its reference on this GPU
# ------------------------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _gdn_check_inputs(mc: ModelConfig, B: int, T: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Inputs for the kernel checks: unit q, k; beta over the layer's range, (0, 2) with GDN_NEG_EIGVAL; decays
    g = -A softplus(n - 3), A uniform in [1, 16], n normal: median -0.47, about ten times the layer's at its
    initialization (-0.05), so a state fades within a few tokens (what gdn_stream_kernel_errors allows for). These
    inputs are what the checks measured on the H100 and H200 (3-5e-3); slower decays are not yet measured there."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H, K, V = mc.gdn_heads, mc.gdn_head_dim, int(mc.gdn_head_dim * mc.gdn_expand_v)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    if mc.gdn_neg_eigval:  # uniform over (0, 2), so that both ends (eigenvalues near 1 and near -1) are checked
        beta = 2 * torch.rand(B, T, H, generator=gen)
    else:
        beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    A = torch.empty(H).uniform_(1, 16, generator=gen)
    g = -A * F.softplus(torch.randn(B, T, H, generator=gen) - 3.0)
    bf = torch.bfloat16
    return [q.to(device, bf), k.to(device, bf), v.to(device, bf), g.to(device), beta.to(device, bf)]


def gdn_kernel_errors(mc: ModelConfig, T: int, device: torch.device, seed: int = 0, impl: str = "fla"
                      ) -> dict[str, float]:
    """Relative errors of the kernel's output and gradients against the float64 chunked reference, same inputs."""
    inputs = _gdn_check_inputs(mc, 2, T, device, seed)
    scale = mc.gdn_head_dim ** -0.5
    fast_in = [t.clone().requires_grad_(True) for t in inputs]
    ref_in = [t.double().requires_grad_(True) for t in inputs]
    o_fast = gdn_kernel(*fast_in, scale=scale, impl=impl)
    o_ref, _ = gdn_chunked_reference(*ref_in, scale=scale)
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    o_fast.backward(do.to(o_fast.dtype))
    o_ref.backward(do.double())
    errs = {"o": rel_err(o_fast, o_ref)}
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), (t.grad for t in fast_in), (t.grad for t in ref_in)):
        errs[name] = rel_err(a, b)
    return errs


@torch.no_grad()
def gdn_stream_kernel_errors(mc: ModelConfig, T: int, device: torch.device, seed: int = 0, impl: str = "fla"
                             ) -> dict[str, float]:
    """Streaming's fast path (carried initial state, restarts through cu_seqlens) against the float64 reference."""
    q, k, v, g, beta = _gdn_check_inputs(mc, 3, T, device, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    S = 0.3 * torch.randn(3, mc.gdn_heads, q.shape[-1], v.shape[-1], generator=gen).to(device)
    restarts = torch.zeros(3, T, dtype=torch.bool, device=device)
    restarts[0, T // 3], restarts[1, 0], restarts[1, T // 2], restarts[1, T // 2 + 1] = True, True, True, True
    scale = mc.gdn_head_dim ** -0.5
    o, s1 = gdn_stream(impl, q, k, v, g, beta, scale, S, restarts)
    o_ref, s_ref = gdn_stream("torch", *(t.double() for t in (q, k, v, g, beta)), scale, S.double(), restarts)
    # The carried state and a restart reach only a piece's first tokens (the check's decays forget within a few):
    # over a whole segment of 32,768 a kernel that dropped the state or ignored restarts stayed within 2e-2, so the
    # first 64 outputs of every piece (a lane's start, and after each restart) are also compared on their own.
    starts = torch.zeros(3, T, dtype=torch.bool, device=device)
    for b, t0 in [(0, 0), (0, T // 3), (1, 0), (1, T // 2), (1, T // 2 + 1), (2, 0)]:
        starts[b, t0: t0 + 64] = True
    return {"o": rel_err(o, o_ref), "o_piece_starts": rel_err(o[starts], o_ref[starts]), "state": rel_err(s1, s_ref)}


def gdn_conv_channels(mc: ModelConfig) -> list[int]:
    """The channel counts of a GDN layer's short convolutions: q and k, and v (different with GDN_EXPAND_V)."""
    return sorted({mc.gdn_heads * mc.gdn_head_dim, mc.gdn_heads * int(mc.gdn_head_dim * mc.gdn_expand_v)})


def conv_kernel_errors(mc: ModelConfig, T: int, device: torch.device, seed: int = 0, impl: str = "fla",
                       channels: int = 0) -> dict[str, float]:
    """The training path's short conv + SiLU (conv_silu) against the float64 reference at a GDN branch's shape
    (`channels`, default q's and k's): relative errors of y, dx and the conv-weight gradient dw."""
    gen = torch.Generator().manual_seed(seed)
    C = channels or mc.gdn_heads * mc.gdn_head_dim
    x = torch.randn(2, T, C, generator=gen).to(device, torch.bfloat16)
    w = (torch.rand(C, mc.gdn_conv_size, generator=gen) * 2 - 1).mul(mc.gdn_conv_size ** -0.5).to(device)
    fast_in = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    ref_in = [x.double().requires_grad_(True), w.double().requires_grad_(True)]
    y_fast = conv_silu(*fast_in, impl)
    y_ref = conv_silu(*ref_in, "torch")
    dy = torch.randn(y_ref.shape, generator=gen).to(device)
    y_fast.backward(dy.to(y_fast.dtype))
    y_ref.backward(dy.double())
    return {"y": rel_err(y_fast, y_ref), "dx": rel_err(fast_in[0].grad, ref_in[0].grad),
            "dw": rel_err(fast_in[1].grad, ref_in[1].grad)}


@contextlib.contextmanager
def fla_hopper_guard_lifted(lift: bool):
    """fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (fla #640, wrong gradients seen on another
    Hopper part). Inside this context that refusal is switched off; callers must verify the kernel themselves."""
    import fla.ops.common.chunk_o as chunk_o  # noqa: PLC0415

    saved = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = saved or lift
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = saved


def guarded_gdn_kernel_errors(mc: ModelConfig, T: int) -> tuple[dict[str, float], bool]:
    """The kernel's errors, and whether fla's Hopper guard had to be lifted to measure them."""
    try:
        return gdn_kernel_errors(mc, T, torch.device("cuda")), False
    except RuntimeError as e:
        if "#640" not in str(e):
            raise
    with fla_hopper_guard_lifted(True):
        return gdn_kernel_errors(mc, T, torch.device("cuda")), True


def require_close(log: Logger, label: str, errs: dict[str, float], tol: float, what: str, advice: str = "") -> None:
    """Logs a kernel check's relative errors and refuses to go on when any exceeds tol."""
    log(f"kernel_check {label}: " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items()))
    if not all(v <= tol for v in errs.values()):
        raise RuntimeError(f"{what} disagrees with the reference: {errs}" + (f"; {advice}" if advice else ""))


def check_gdn_kernel(mc: ModelConfig, cfg: Config, log: Logger, impl: str) -> None:
    """Refuses to train unless the kernel's forward and backward match the float64 reference at the configured shapes.
    If fla's Hopper guard blocked the backward (and tilelang is absent), the guard is lifted only after the check
    passes."""
    if impl == "fla":
        errs, needs_lift = guarded_gdn_kernel_errors(mc, cfg.train_seq_len)
    else:
        errs, needs_lift = gdn_kernel_errors(mc, cfg.train_seq_len, torch.device("cuda"), impl=impl), False
    if needs_lift:
        log("kernel_check: fla refused the gated backward on this GPU (Hopper guard, fla #640); "
            "checked the Triton kernel against the float64 reference with the guard lifted")
    log(f"kernel_check gdn({impl}) vs float64 reference: " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items())
        + f" tol:{cfg.kernel_check_tol:.0e}")
    bad = {k: v for k, v in errs.items() if not v <= cfg.kernel_check_tol}
    if bad:
        other = "GDN_BACKEND=fla runs fla's kernels (checked the same way); " if impl == "qla" else ""
        raise RuntimeError(f"GDN kernel check ({impl}) failed on {torch.cuda.get_device_name()}: {bad} exceed "
                           f"{cfg.kernel_check_tol}; refusing to train ({other}GDN_BACKEND=torch runs the slow "
                           "reference)")
    if needs_lift:
        import fla.ops.common.chunk_o as chunk_o  # noqa: PLC0415

        chunk_o.TRITON_ABOVE_3_7_1 = True
        log("kernel_check: passed; fla's Hopper guard is lifted for this run")


def qla_unavailable(mc: ModelConfig) -> str:
    """Why FlashQLA cannot run this model here ('' if it can): it needs the package, K = V = 128, and a GPU it
    implements both directions for (sm90, sm100, sm103)."""
    if importlib.util.find_spec("flash_qla") is None:
        return "flash_qla is not installed"
    if mc.gdn_head_dim != 128 or mc.gdn_expand_v != 1.0:
        return f"it needs GDN_HEAD_DIM=128 and GDN_EXPAND_V=1 (have {mc.gdn_head_dim}, {mc.gdn_expand_v})"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() not in ((9, 0), (10, 0), (10, 3)):
        return "it trains only on sm90/sm100/sm103 GPUs"
    return ""


def attention_kernel_errors(mc: ModelConfig, backend: str, T: int, device: torch.device, seed: int = 0,
                            cached: int = 0) -> dict:
    """The backend's output and gradients against fp32 masked SDPA; `cached` extra keys before the queries (the
    streaming case, where the band is aligned at the end)."""
    gen = torch.Generator().manual_seed(seed)
    hd = mc.model_dim // mc.num_heads
    shapes = [(2, T, mc.num_heads, hd), (2, T + cached, mc.num_kv_heads, hd), (2, T + cached, mc.num_kv_heads, hd)]
    inputs = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    fast_in = [t.clone().requires_grad_(True) for t in inputs]
    ref_in = [t.float().requires_grad_(True) for t in inputs]
    y_fast = attention(*fast_in, mc.swa_window, backend)
    y_ref = attention_reference(*ref_in, mc.swa_window)
    dy = torch.randn(y_ref.shape, generator=gen).to(device)
    y_fast.backward(dy.to(y_fast.dtype))
    y_ref.backward(dy)
    errs = {"o": rel_err(y_fast, y_ref)}
    errs.update({n: rel_err(a.grad, b.grad) for n, a, b in zip(("dq", "dk", "dv"), fast_in, ref_in)})
    return errs


def _varlen_has_window() -> bool:
    try:
        import inspect  # noqa: PLC0415

        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415

        return "window_size" in inspect.signature(varlen_attn).parameters
    except ImportError:
        return False


def resolve_backends(cfg: Config, rt: Runtime, mc: ModelConfig, log: Logger, check: bool) -> Backends:
    """Chooses the GDN and attention implementations in one place, checks them on this GPU, and logs the choice."""
    gdn, no_qla = cfg.gdn_backend, qla_unavailable(mc)
    if gdn == "auto":  # FlashQLA where it applies (measured fastest, README), else fla's Triton kernels
        gdn = "torch" if not rt.cuda else ("fla" if no_qla else "qla")
    if gdn in FAST_GDN_BACKENDS and not rt.cuda:
        raise ValueError(f"GDN_BACKEND={gdn} needs a CUDA GPU")
    if gdn == "qla" and no_qla:
        raise ValueError(f"GDN_BACKEND=qla cannot be used: {no_qla}")
    if gdn == "fla" and layer_kinds(mc.layout) & GDN_KINDS and importlib.util.find_spec("fla") is None:
        raise ValueError(f"GDN_BACKEND={cfg.gdn_backend} chose fla's kernels, and fla is not installed: pip install "
                         "flash-linear-attention (README, Quick start), or GDN_BACKEND=torch for the PyTorch reference "
                         "(much slower)")
    attn = cfg.attn_backend
    if attn == "auto":
        attn = "sdpa"
        if rt.cuda:
            try:
                import flash_attn_interface  # noqa: F401, PLC0415

                attn = "fa3"
            except ImportError:
                attn = "varlen" if _varlen_has_window() else "sdpa"
    if attn in ("fa3", "varlen") and not rt.cuda:
        raise ValueError(f"ATTN_BACKEND={attn} needs a CUDA GPU")
    kinds = layer_kinds(mc.layout)
    has_gdn, has_swa = bool(kinds & GDN_KINDS), "swa" in kinds
    conv = cfg.gdn_conv
    if conv == "auto":  # fla's kernel wherever the delta rule runs on a fast kernel (README, throughput)
        conv = "fla" if gdn in FAST_GDN_BACKENDS and importlib.util.find_spec("fla") is not None else "torch"
    if conv == "fla" and not rt.cuda:
        raise ValueError("GDN_CONV=fla needs a CUDA GPU")
    t0 = time.perf_counter()
    checked = check and cfg.kernel_check and rt.cuda
    if checked:
        if gdn in FAST_GDN_BACKENDS and has_gdn:
            check_gdn_kernel(mc, cfg, log, gdn)
        if conv == "fla" and has_gdn:
            for C in gdn_conv_channels(mc):  # q and k's, and v's when GDN_EXPAND_V makes it another count
                require_close(log, f"conv_silu(fla) vs float64 reference, {C} channels",
                              conv_kernel_errors(mc, cfg.train_seq_len, rt.device, channels=C), cfg.kernel_check_tol,
                              f"fla's short-convolution kernel on {torch.cuda.get_device_name()}",
                              "refusing to train (GDN_CONV=torch runs the reference, fused by torch.compile)")
        if gdn in FAST_GDN_BACKENDS and has_gdn and cfg.eval_mode == "stream":
            require_close(log, f"gdn_stream({gdn}, state + restarts) vs float64 reference",
                          gdn_stream_kernel_errors(mc, cfg.stream_segment, rt.device, impl=gdn), cfg.kernel_check_tol,
                          f"the streaming path of GDN_BACKEND={gdn}")
        if attn != "sdpa" and has_swa:
            for label, T, cached in attention_check_cases(cfg, mc.swa_window):
                require_close(log, f"swa({attn}){label} vs fp32 masked SDPA",
                              attention_kernel_errors(mc, attn, T, rt.device, cached=cached), cfg.kernel_check_tol,
                              f"attention backend {attn}{label}", "set ATTN_BACKEND=sdpa")
    if check and rt.cuda and not cfg.kernel_check:
        log(f"WARNING: KERNEL_CHECK=0: the fast kernels ({gdn}, {conv}, {attn}) run unchecked on this GPU")
    took = f"; kernel checks {time.perf_counter() - t0:.1f}s (first kernel compiles included)" if checked else ""
    backends = Backends(gdn, attn, conv)
    log(f"backends: {describe_backends(mc.layout, backends, mc.swa_window)}{took}")
    return backends


def attention_check_cases(cfg: Config, window: int) -> list[tuple[str, int, int]]:
    """(label, sequence length, cached keys) of every shape in which this run sends sliding-window attention to
    ATTN_BACKEND's windowed kernel: a forward over T tokens uses it when T > SWA_WINDOW (shorter ones are plain
    causal attention), at the training length, the evaluation windows' and TTT's; streaming always does, its
    segments attending to SWA_WINDOW - 1 keys carried from the one before."""
    lengths = sorted({cfg.train_seq_len, cfg.eval_len, cfg.ttt_seq_len or cfg.eval_len})
    cases = [("" if T == cfg.train_seq_len else f" at {T}", T, 0) for T in lengths if T > window]
    if cfg.eval_mode == "stream" and not cfg.stream_reset:  # (STREAM_RESET runs a dense mask through SDPA)
        cases.append((" streaming", min(cfg.stream_segment, 4096), window - 1))
    return cases


def layer_kinds(layout: str) -> set[str]:
    return {spec.kind for spec in parse_layout(layout)}


def describe_backends(layout: str, backends: Backends, window: int) -> str:
    """What each kind of layer in LAYOUT runs on, for the log: full causal attention (A, N) always runs SDPA's causal
    kernel, and ATTN_BACKEND only the sliding window (S), so a layout names only the kinds it has."""
    kinds = layer_kinds(layout)
    parts = [f"gdn:{backends.gdn} conv:{backends.conv}"] if kinds & GDN_KINDS else []
    if kinds & set(UNBOUNDED_KINDS):
        parts.append("full attention:sdpa")
    if "swa" in kinds:
        parts.append(f"swa:{backends.attn} (window {window})")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# 11. Training
# ------------------------------------------------------------------------------------------------------------------


def run_progress(step: int, elapsed_s: float, cfg: Config) -> float:
    """How far the run is: the larger of steps done / ITERATIONS and wallclock used / the training budget (the cap
    less GPTQ_RESERVE_SECONDS); 1 at the end. WARMDOWN_FRAC and QAT_FRAC are fractions of it."""
    progress = step / cfg.iterations
    if cfg.train_budget_seconds > 0:
        progress = max(progress, elapsed_s / cfg.train_budget_seconds)
    return progress


def lr_multiplier(step: int, elapsed_s: float, cfg: Config) -> float:
    """Linear warmup over LR_WARMUP_STEPS, then flat, then a decay to 0 over the last WARMDOWN_FRAC of the run
    (WARMDOWN_SHAPE, `run_progress`)."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    progress = run_progress(step, elapsed_s, cfg)
    if cfg.warmdown_frac <= 0 or progress < 1.0 - cfg.warmdown_frac:
        return 1.0
    if progress >= 1.0:
        return 0.0
    return WARMDOWN_SHAPES[cfg.warmdown_shape]((progress - (1.0 - cfg.warmdown_frac)) / cfg.warmdown_frac)


def muon_momentum(step: int, cfg: Config) -> float:
    frac = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def train_step(model: nn.Module, opts: Optimizers, loader: TrainLoader, cfg: Config, rt: Runtime, step: int,
               lr_mult: float, mark: Callable[[str], None] | None = None) -> torch.Tensor:
    """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (a tensor, not synced).
    mark (benchmarks) is called with a phase's name as each phase has been launched."""
    mark = mark or (lambda phase: None)
    total = torch.zeros((), device=rt.device)
    for micro in range(rt.grad_accum_steps):
        x, y = loader.next_batch()
        mark("data")
        sync = micro == rt.grad_accum_steps - 1
        with (contextlib.nullcontext() if sync or not rt.distributed else model.no_sync()):
            with autocast(rt):
                loss = model(x, y)
            mark("forward")
            (loss / rt.grad_accum_steps).backward()
        mark("backward (gradient all-reduce included)" if sync and rt.distributed else "backward")
        total += loss.detach()
    for o in opts.all():
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
    for g in opts.muon.param_groups:
        g["momentum"] = muon_momentum(step, cfg)
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        mark("gradient clipping")
    for name, o in (("Muon", opts.muon), ("Adam", opts.adam)):
        o.step()
        o.zero_grad(set_to_none=True)
        mark(name)
    return total / rt.grad_accum_steps


def sync(rt: Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize()


def warmup_then_restore(base: nn.Module, model: nn.Module, opts: Optimizers, cfg: Config, rt: Runtime,
                        log: Logger) -> None:
    """Runs WARMUP_STEPS real steps so compilation and autotuning happen before the timer, then puts the weights,
    the optimizer state and the data position back as they were."""
    if cfg.warmup_steps <= 0:
        return
    t0 = time.perf_counter()
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    opt_state = [_clone_state(s) for s in opts.state_dict()]
    loader = TrainLoader(cfg, rt)
    for step in range(cfg.warmup_steps):
        train_step(model, opts, loader, cfg, rt, step, lr_multiplier(step, 0.0, cfg))
    sync(rt)
    loader.close()
    base.load_state_dict(weights)
    opts.load_state_dict(opt_state)
    log(f"warmup: {cfg.warmup_steps} steps in {time.perf_counter() - t0:.1f}s (compile/autotune), then restored "
        "weights, optimizer state and data position")


def _clone_state(state: dict) -> dict:
    return {k: (_clone_state(v) if isinstance(v, dict) else
                [_clone_state(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else
                v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


@dataclass
class TrainStats:
    steps: int = 0
    train_ms: float = 0.0
    tokens: int = 0
    stopped_by_cap: bool = False
    qat_from_step: int | None = None  # the first step trained with fake quantization (QAT_FRAC)

    @property
    def step_avg_ms(self) -> float:
        return self.train_ms / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_ms / 1000, 1e-9)


STATE_FORMAT = "pgolf-gdn-train-state-1"
STATE_RUN = ("steps", "tokens", "train_ms", "qat_from_step", "data_tokens")  # where the run was, besides its tensors


def save_train_state(path: Path, base: nn.Module, opts: Optimizers, emas: list[EMA], stats: TrainStats,
                     data_tokens: int, cfg: Config, rt: Runtime, log: Logger) -> bool:
    """STATE_PATH: everything RESUME_FROM needs to go on as if never stopped: the weights, every average, both
    optimizers' state (Muon's gathered from the ranks that hold it), the steps, tokens and clock so far, the QAT
    switch, the stream position. Rank 0 writes it atomically; a write that fails (disk full) is a warning, the last
    state stays, and training goes on. All ranks take part; returns whether it was written (on rank 0). Not part of
    the submission."""
    t0, written = time.perf_counter(), True
    muon = opts.muon.full_state_dict()
    if rt.is_main:
        payload = dict(format=STATE_FORMAT, model_config=dataclasses.asdict(base.mc), config=dataclasses.asdict(cfg),
                       weights=base.state_dict(), muon=muon, adam=opts.adam.state_dict(),
                       emas=[dict(decay=e.decay, updates=e.updates, shadow=e.shadow) for e in emas],
                       steps=stats.steps, tokens=stats.tokens, train_ms=stats.train_ms,
                       qat_from_step=stats.qat_from_step, data_tokens=data_tokens)
        try:
            write_atomically(path, lambda f: torch.save(payload, f))
            log(f"state: {path} ({path.stat().st_size:,} bytes) after step {stats.steps} in "
                f"{time.perf_counter() - t0:.1f}s, not timed; RESUME_FROM={path} goes on from here")
        except OSError as err:
            written = False
            log(f"WARNING: STATE_PATH={path} was not written after step {stats.steps} ({type(err).__name__}: {err}); "
                "training goes on, and the last state written stays")
    if rt.distributed:
        dist.barrier()
    return written


def read_train_state(path: Path, device: torch.device) -> dict:
    """A STATE_PATH file's contents, on `device`; a clear error for anything else."""
    state = load_torch_file(path, f"RESUME_FROM={path}", "training state", STATE_FORMAT, device,
                            "; CHECKPOINT_PATH files hold only the final weights (EXPORT_FROM reads those)")
    missing = [k for k in ("model_config", "config", "weights", "muon", "adam", "emas", *STATE_RUN) if k not in state]
    if missing:
        raise ValueError(f"RESUME_FROM={path} lacks {missing}")
    return state


def resume_training(path: Path, base: nn.Module, opts: Optimizers, emas: list[EMA], cfg: Config, rt: Runtime,
                    log: Logger) -> tuple[TrainStats, int]:
    """RESUME_FROM: the weights, averages and optimizer state put back as STATE_PATH wrote them; returns where the run
    was and its stream position. The model and its averages must be the file's; every other setting is this run's
    (the learning rates, the schedule, the cap), and those that differ from the file's are named in the log."""
    state = read_train_state(path, rt.device)
    saved = state["model_config"]
    if saved != dataclasses.asdict(base.mc):
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(base.mc).items() if saved.get(k) != v}
        raise ValueError(f"RESUME_FROM={path} holds another model: (file, this run) differ in {diff}")
    if state["qat_from_step"] is not None and not cfg.qat_frac:
        raise ValueError(f"RESUME_FROM={path} trained with fake quantization from step {state['qat_from_step']} on; "
                         "set QAT_FRAC (and QAT_CLIP_SIGMAS) as that run did")
    decays = [e["decay"] for e in state["emas"]]
    if decays != [e.decay for e in emas]:
        raise ValueError(f"RESUME_FROM={path} holds averages of decays {decays}; this run keeps "
                         f"{[e.decay for e in emas]} (EMA_DECAY, then EMA_COMPARE's): set them as that run did")
    base.load_state_dict(state["weights"])
    for opt, sd, load in ((opts.muon, state["muon"], opts.muon.load_full_state_dict),
                          (opts.adam, state["adam"], opts.adam.load_state_dict)):
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            load(sd)
        except ValueError as err:  # another grouping of the parameters (MUON_VARIANT, the routing)
            raise ValueError(f"RESUME_FROM={path}: its optimizer state does not fit this run's ({err})") from None
        for g, kept in zip(opt.param_groups, settings):
            g.update(kept)  # the file's param groups give the shapes; the settings stay this run's
    with torch.no_grad():
        for e, saved_ema in zip(emas, state["emas"]):
            torch._foreach_copy_(e.shadow, saved_ema["shadow"])
            e.updates = saved_ema["updates"]
    changed = [f"{k.upper()}={v!r}->{getattr(cfg, k)!r}" for k, v in state["config"].items()
               if k not in ("resume_from", "run_id") and hasattr(cfg, k) and v != getattr(cfg, k)]
    log(f"resume: {path} after step {state['steps']} ({state['train_ms']:.0f}ms trained, {state['data_tokens']:,} "
        "stream tokens read); " + (f"settings changed since (then->now): {', '.join(changed)}" if changed
                                   else "the settings are the same as then"))
    stats = TrainStats(steps=state["steps"], tokens=state["tokens"], train_ms=state["train_ms"],
                       qat_from_step=state["qat_from_step"])
    return stats, state["data_tokens"]


@contextlib.contextmanager
def stop_signals(cfg: Config, rt: Runtime):
    """With STATE_PATH on one process, SIGINT (Ctrl-C) and SIGTERM during training are recorded in the list this
    yields, for the loop to write the state after the step in progress and stop; a second one stops at once. The
    handlers before are put back afterwards. Under torchrun the ranks would first have to agree on a step, so there
    the signals act as always."""
    got: list[int] = []

    def record(signum, frame):
        if got:
            raise KeyboardInterrupt(f"signal {signum} again: stopped without writing the state")
        got.append(signum)

    if not cfg.state_path or rt.distributed:
        yield got
        return
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def train(base: nn.Module, model: nn.Module, opts: Optimizers, emas: list[EMA], cfg: Config, rt: Runtime,
          log: Logger, val_tokens: torch.Tensor, tables: ByteTables, start: TrainStats | None = None,
          data_tokens: int = 0) -> TrainStats:
    """The timed loop; every average in `emas` is updated after each step. The timer excludes validation and
    STATE_PATH writes; the budget (MAX_WALLCLOCK_SECONDS less the GPTQ reserve) is checked before each step against
    the slowest rank's clock, so training stops before the next step would cross it, and the schedule reads the same
    clock on every rank. With QAT_FRAC, the fake quantization `enable_qat` gave `base` is switched on at the first
    step in the run's last QAT_FRAC, off for validation, and off again when training ends. A resumed run (`start`,
    RESUME_FROM) goes on from its steps, clock and QAT switch, reading the stream from `data_tokens` on."""
    with stop_signals(cfg, rt) as stop:
        return _train(base, model, opts, emas, cfg, rt, log, val_tokens, tables, start, data_tokens, stop)


def _train(base: nn.Module, model: nn.Module, opts: Optimizers, emas: list[EMA], cfg: Config, rt: Runtime,
           log: Logger, val_tokens: torch.Tensor, tables: ByteTables, start: TrainStats | None, data_tokens: int,
           stop: list[int]) -> TrainStats:
    """`train`'s loop; `stop` holds the signals received (stop_signals)."""
    stats, loader = dataclasses.replace(start or TrainStats()), TrainLoader(cfg, rt, data_tokens)
    cap_ms = 1000 * cfg.train_budget_seconds
    loss_sum, window = torch.zeros((), device=rt.device), 0
    if stats.qat_from_step is not None:
        set_qat(base, True)
    sync(rt)
    t_start, paused_ms = time.perf_counter(), -stats.train_ms

    def elapsed_ms() -> float:
        return 1000 * (time.perf_counter() - t_start) - paused_ms

    def log_window() -> None:  # the mean training loss of the steps since the last line, over every rank's batches
        nonlocal window
        now = elapsed_ms()
        if rt.distributed:  # every rank logs at the same steps (the cap stops all of them at one step)
            dist.all_reduce(loss_sum)
            loss_sum.div_(rt.world_size)
        log(f"step:{stats.steps}/{cfg.iterations} train_loss:{loss_sum.item() / window:.4f} train_time:{now:.0f}ms "
            f"step_avg:{now / stats.steps:.2f}ms tok/s:{stats.tokens / (now / 1000):.0f}")
        loss_sum.zero_()
        window = 0

    while stats.steps < cfg.iterations:
        if cfg.val_loss_every and stats.steps and stats.steps % cfg.val_loss_every == 0:
            sync(rt)
            p0 = time.perf_counter()
            with qat_paused(base):
                result = evaluate(base, val_tokens, tables, cfg, rt)  # the raw weights; the final scores use the EMA
                log(result.line(f"step:{stats.steps}/{cfg.iterations} raw_weights"))
            paused_ms += 1000 * (time.perf_counter() - p0)
        # Under a cap the schedule reads the clock: every rank reads the slowest rank's, so all take the same learning
        # rate, switch QAT on and stop at the same step (each rank's clock started at its own moment). Without a cap
        # the schedule counts steps only.
        elapsed_s = (_rank_max(elapsed_ms(), rt) if cap_ms else elapsed_ms()) / 1000
        step_avg = 1000 * elapsed_s / stats.steps if stats.steps else 0.0
        if cap_ms and 1000 * elapsed_s + step_avg > cap_ms:
            stats.stopped_by_cap = True
            break
        if (cfg.qat_frac > 0 and stats.qat_from_step is None
                and run_progress(stats.steps, elapsed_s, cfg) >= 1 - cfg.qat_frac):
            set_qat(base, True)
            stats.qat_from_step = stats.steps
            log(f"qat: fake quantization on from step {stats.steps} (train_time {1000 * elapsed_s:.0f}ms, the last "
                f"QAT_FRAC={cfg.qat_frac:g} of the run)")
        loss_sum += train_step(model, opts, loader, cfg, rt, stats.steps, lr_multiplier(stats.steps, elapsed_s, cfg))
        for ema in emas:
            ema.update()
        stats.steps += 1
        stats.tokens += cfg.train_batch_tokens
        window += 1
        sync(rt)
        if stats.steps % cfg.train_log_every == 0 or stats.steps == cfg.iterations:
            log_window()
        if stop or (cfg.state_every and stats.steps % cfg.state_every == 0 and stats.steps < cfg.iterations):
            p0, stats.train_ms = time.perf_counter(), elapsed_ms()
            written = save_train_state(Path(cfg.state_path), base, opts, emas, stats, loader.consumed, cfg, rt, log)
            paused_ms += 1000 * (time.perf_counter() - p0)
            if stop:
                loader.close()
                raise SystemExit(f"stopped by signal {stop[0]} after step {stats.steps}: " + (
                    f"RESUME_FROM={cfg.state_path} goes on from it" if written else
                    f"its state was not written (above); RESUME_FROM={cfg.state_path} goes on from the last one"))
    if window:  # the steps since the last line: the end of training under the cap
        log_window()
    stats.train_ms = _rank_max(elapsed_ms(), rt)  # the slowest rank's clock, the one the cap was checked against
    loader.close()
    if stats.qat_from_step is not None:  # what follows (scores, calibration, export) sees the weights themselves
        set_qat(base, False)
        log(f"qat: off after training, {stats.steps - stats.qat_from_step} steps with fake quantization")
    return stats


def score_ema_compare(base: nn.Module, fwd: nn.Module, others: dict[float, EMA | None], cfg: Config, rt: Runtime,
                      log: Logger, val_tokens: torch.Tensor, tables: ByteTables) -> dict[str, float]:
    """EMA_COMPARE: the pre-quant evaluation of each other average (None: the raw weights, as training left them),
    logged as `ema_compare decay:D ...` after the average's `ema:` line; returns {f"{decay:g}": val_bpb}. The raw
    weights are back in `base` afterwards."""
    if not others:
        return {}
    raw = [p.detach().clone() for p in base.parameters()]
    scores = {}
    with torch.no_grad():
        for decay, avg in others.items():
            if avg is None:
                torch._foreach_copy_(list(base.parameters()), raw)
            else:
                log(avg.describe())
                avg.copy_to_model()
            result = evaluate_base(fwd, val_tokens, tables, cfg, rt)
            log(result.line(f"ema_compare decay:{decay:g}"))
            scores[f"{decay:g}"] = result.bpb
        torch._foreach_copy_(list(base.parameters()), raw)
    return scores


def _rank_max(value: float, rt: Runtime) -> float:
    """The largest of the ranks' values, on every rank (one collective): the slowest rank's clock, or any flag."""
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if `flag` is true on any (each rank reads its own clock)."""
    return _rank_max(float(flag), rt) > 0


# ------------------------------------------------------------------------------------------------------------------
# 12. Main
# ------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_run_id(cfg: Config, rt: Runtime) -> str:
    """RUN_ID, or a timestamp chosen on rank 0 and shared, so every rank names the same artifact."""
    ids = [cfg.run_id or time.strftime("%Y%m%d_%H%M%S")]
    if rt.distributed:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def log_header(cfg: Config, rt: Runtime, log: Logger, run_id: str) -> None:
    log(script_source().decode("utf-8"), console=False)
    log("=" * 100, console=False)
    log(f"run_id:{run_id}")
    for f in sorted(fields(cfg), key=lambda f: f.name):
        log(f"config {f.name.upper()}={getattr(cfg, f.name)}")
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "fla"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    device = torch.cuda.get_device_name(rt.device) if rt.cuda else "cpu"
    log(f"runtime: world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} device:{device} "
        + " ".join(versions))
    if cfg.val_max_tokens:
        log(f"WARNING: VAL_MAX_TOKENS={cfg.val_max_tokens}: partial validation, not a challenge score")


def maybe_compile(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    if cfg.compile == "1" or (cfg.compile == "auto" and rt.cuda):
        return torch.compile(model, dynamic=False, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return model


def wrap_ddp(compiled: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """The training model on several ranks: DDP around the compiled module (gradients averaged at each step's last
    micro-batch); on one rank the compiled module itself. Dynamo reads DDP_OVERLAP when it first compiles the model
    inside DDP's forward: split at the gradient buckets or not."""
    if not rt.distributed:
        return compiled
    torch._dynamo.config.optimize_ddp = "ddp_optimizer" if cfg.ddp_overlap else "no_optimization"
    return nn.parallel.DistributedDataParallel(compiled, device_ids=[rt.local_rank] if rt.cuda else None,
                                               broadcast_buffers=False)


def build_model(mc: ModelConfig, backends: Backends, rt: Runtime) -> nn.Module:
    return GPT(mc, backends).to(rt.device)


def calibrate(base: nn.Module, cfg: Config, rt: Runtime, log: Logger, train_ms: float) -> tuple[dict, float]:
    """GPTQ's input statistics from fresh training batches, timed: this is part of the wallclock budget."""
    sync(rt)
    t0 = time.perf_counter()
    loader = TrainLoader(cfg, rt)
    per_step = loader.micro_tokens * rt.world_size
    batches = (loader.next_batch() for _ in range(max(1, math.ceil(cfg.gptq_calib_tokens / per_step))))
    hessians, seen = collect_hessians(base, batches, cfg, rt)
    loader.close()
    sync(rt)
    calib_ms = 1000 * (time.perf_counter() - t0)
    log(f"calibration: {seen} training tokens, {len(hessians)} matrices in {calib_ms:.0f}ms; train_time + "
        f"calibration = {train_ms + calib_ms:.0f}ms (cap {1000 * cfg.max_wallclock_seconds:.0f}ms)")
    if cfg.max_wallclock_seconds and train_ms + calib_ms > 1000 * cfg.max_wallclock_seconds:
        log("WARNING: calibration ran past MAX_WALLCLOCK_SECONDS; raise GPTQ_RESERVE_SECONDS")
    return hessians, calib_ms


def export_artifact(base: nn.Module, cfg: Config, rt: Runtime, log: Logger, path: Path,
                    hessians: dict | None) -> dict:
    """Rank 0 quantizes (GPTQ where there are Hessians), compresses and writes the artifact atomically, with
    MATRIX_CLIP_FIT after choosing the matrix clip that fills the limit; every rank gets the sizes and timings."""
    sizes = [None]
    if rt.is_main:
        state, code = base.state_dict(), code_bytes()
        seconds = dict(quantize=0.0, compress=0.0)
        built = {}  # matrix clip -> (artifact bytes, raw bytes, frames, records)

        def build(clip: float) -> int:  # the artifact + code bytes with this matrix clip
            t0 = time.perf_counter()
            frames, records = serialize_state(state, base.mc, dataclasses.replace(cfg, matrix_clip_sigmas=clip),
                                              hessians)
            sync(rt)
            t1 = time.perf_counter()
            data = pack_artifact(frames, cfg.compressor)
            seconds["quantize"] += t1 - t0
            seconds["compress"] += time.perf_counter() - t1
            built[clip] = (data, sum(map(len, frames)), len(frames), records)
            return len(data) + code

        if cfg.matrix_clip_fit:
            clip = fit_export_clip(build, state, cfg, log)
        else:
            clip = cfg.matrix_clip_sigmas
            build(clip)
        data, raw_bytes, n_frames, records = built[clip]
        t2 = time.perf_counter()
        write_atomically(path, lambda f: f.write(data))
        seconds["compress"] += time.perf_counter() - t2
        for r in records:
            log(f"export {r['name']} {tuple(r['shape'])} {r['kind']} bits:{r['bits']} method:{r['method']} "
                f"clip:{r['clip_sigmas']} bytes:{r['nbytes']}", console=False)
        label = lambda r: "fp16" if r["kind"] == "fp16" else f"int{r['bits']}-{r['method']}"  # noqa: E731
        log("export routing: " + ", ".join(
            f"{k}: {sum(1 for r in records if label(r) == k)} tensors "
            f"{sum(math.prod(r['shape']) for r in records if label(r) == k):,} params"
            for k in sorted({label(r) for r in records})))
        model_bytes = len(data)
        total = model_bytes + code
        n_params = sum(math.prod(r["shape"]) for r in records)
        sizes[0] = dict(model_bytes=model_bytes, code_bytes=code, total_bytes=total, matrix_clip_sigmas=clip,
                        quantize_seconds=round(seconds["quantize"], 2), compress_seconds=round(seconds["compress"], 2))
        tag = f"int{cfg.matrix_bits}+{cfg.compressor}"
        log(f"Serialized model {tag}: {model_bytes} bytes (raw {raw_bytes} bytes in {n_frames} frames, "
            f"{8 * model_bytes / n_params:.3f} bits/param, matrix clip {clip:.4g} sigmas) to {path}; quantize "
            f"{seconds['quantize']:.1f}s, compress+write {seconds['compress']:.1f}s"
            + (f" ({len(built)} exports tried)" if len(built) > 1 else ""))
        log(f"Code size: {code} bytes")
        log(f"Total submission size {tag}: {total} bytes (limit {ARTIFACT_LIMIT_BYTES})")
        if total > ARTIFACT_LIMIT_BYTES:
            log(f"WARNING: ARTIFACT OVER THE LIMIT by {total - ARTIFACT_LIMIT_BYTES} bytes: this run is NOT COMPLIANT")
    if rt.distributed:
        dist.broadcast_object_list(sizes, src=0)
    return sizes[0]


def fit_export_clip(build: Callable[[float], int], state: dict[str, torch.Tensor], cfg: Config, log: Logger) -> float:
    """MATRIX_CLIP_FIT: `fit_matrix_clip` over full exports (`build(clip)` -> artifact + code bytes), each logged."""
    t0 = time.perf_counter()
    n_matrix = sum(t.numel() for name, t in state.items() if PARAM_ROUTES[route_index(name, t)][0] == "muon")
    clip, trials = fit_matrix_clip(build, cfg.matrix_clip_sigmas, cfg.matrix_clip_fit_min, cfg.matrix_clip_fit_max,
                                   ARTIFACT_LIMIT_BYTES, slope=n_matrix * math.log2(math.e) / 8,
                                   slack=CLIP_FIT_SLACK_BYTES, max_trials=CLIP_FIT_MAX_TRIALS)
    for c, size in trials:
        log(f"clip_fit: MATRIX_CLIP_SIGMAS={c:.4f}: {size:,} bytes with the code "
            f"({'fits' if size <= ARTIFACT_LIMIT_BYTES else 'over the limit'})")
    size = dict(trials)[clip]
    fits = size <= ARTIFACT_LIMIT_BYTES
    why = ("the widest tried, and over the limit" if not fits
           else "the narrowest allowed (MATRIX_CLIP_FIT_MIN)" if clip <= cfg.matrix_clip_fit_min
           else f"{ARTIFACT_LIMIT_BYTES - size:,} bytes under the limit")
    log(f"clip_fit: matrix clip {clip:.4f} sigmas ({why}) after {len(trials)} exports in "
        f"{time.perf_counter() - t0:.1f}s")
    return clip


def score_artifact(path: Path, cfg: Config, rt: Runtime, log: Logger, val_tokens: torch.Tensor, tables: ByteTables,
                   tag: str, with_ttt: bool = True) -> tuple[EvalResult, EvalResult]:
    """Reads the artifact from disk into a fresh model and scores it: (the configured evaluation, the same without
    TTT). Window scoring runs compiled; TTT's scoring and steps as TTT_COMPILE says (`ttt_module`); streaming, whose
    state varies, eagerly."""
    mc, state = read_artifact(path)
    backends = resolve_backends(cfg, rt, mc, log, check=False)
    model = build_model(mc, backends, rt)
    load_exported_state(model, state, str(path))
    if with_ttt:
        require_ttt_selection(model, cfg)
    compiled = maybe_compile(model, cfg, rt)
    # the score without TTT, before TTT changes the weights
    base = evaluate_base(compiled if cfg.eval_mode == "window" else model, val_tokens, tables, cfg, rt)
    base_tag = tag.removesuffix("_ttt")
    log(base.line(base_tag))
    log(base.exact_line(base_tag))
    if not (cfg.ttt_enabled and with_ttt):
        return base, base
    fast, how = ttt_module(model, compiled, cfg, rt)
    log(f"ttt: {'window scoring and ' if cfg.eval_mode == 'window' else ''}steps run {how} "
        f"(TTT_COMPILE={cfg.ttt_compile})")
    final = evaluate_ttt(model, val_tokens, tables, cfg, rt, log, spent_s=base.seconds, compiled=fast)
    final.seconds += base.seconds  # the whole evaluation: the score without TTT is part of it
    log(final.line(tag))
    log(final.exact_line(tag))
    log(f"ttt_gain: {final.bpb - base.bpb:+.5f} bpb")
    return final, base


def ttt_module(model: nn.Module, compiled: nn.Module, cfg: Config,
               rt: Runtime) -> tuple[nn.Module | None, str]:
    """What runs TTT's window scoring and steps, with `model`'s parameters, and how, for the log: None (the eager
    model) for TTT_COMPILE=0 or a model that is not compiled at all; `compiled` for TTT_COMPILE=1; for
    TTT_COMPILE=graphs on CUDA the model compiled again in torch.compile's reduce-overhead mode, which replays each
    shape's kernels as one CUDA graph (a step of one sequence per rank is bound by kernel-launch latency, not by the
    GPU). The optimizer updates the parameters in place between replays, which the graphs read at their fixed
    addresses."""
    if cfg.ttt_compile == "0" or compiled is model:
        return None, "eager"
    if cfg.ttt_compile == "graphs" and rt.cuda:
        return torch.compile(model, dynamic=False, mode="reduce-overhead"), "compiled with CUDA graphs"
    return compiled, "compiled"


def require_model_matches(cfg: Config, mc: ModelConfig, mode: str, kind: str, path: Path) -> None:
    """Model settings given in the environment must agree with the file's architecture (they cannot change it), and
    its vocabulary must be the one this run's tokenizer and shards were checked against (VOCAB_SIZE, set or not):
    a model of another vocabulary would score these tokens without an error, and wrongly."""
    conflicts = {n: (getattr(cfg, n), getattr(mc, n)) for n in Config.explicit_fields() & set(MODEL_FIELDS)
                 if getattr(cfg, n) != getattr(mc, n)}
    if conflicts:
        raise ValueError(f"{mode}: settings {conflicts} (environment, {kind}) contradict the {kind} {path}")
    if mc.vocab_size != cfg.vocab_size:
        raise ValueError(f"{mode}: the {kind} {path} has a vocabulary of {mc.vocab_size} tokens, and this run's "
                         f"tokenizer and shards are for VOCAB_SIZE={cfg.vocab_size}: set VOCAB_SIZE, TOKENIZER_PATH "
                         f"and DATA_PATH for the {kind}'s vocabulary")


def eval_only(cfg: Config, rt: Runtime, log: Logger, val_tokens: torch.Tensor, tables: ByteTables) -> dict:
    path = Path(cfg.artifact_path)
    mc, label = artifact_model_and_label(path)  # the tensors are read once, by score_artifact
    require_model_matches(cfg, mc, "EVAL_ONLY", "artifact", path)
    if cfg.kernel_check and rt.cuda:
        resolve_backends(cfg, rt, mc, log, check=True)
    size = path.stat().st_size
    code = code_bytes()
    log(f"eval_only: artifact {path} {size} bytes + code {code} bytes = {size + code} bytes (limit "
        f"{ARTIFACT_LIMIT_BYTES}; the code counted is this script, which scores it)")
    if size + code > ARTIFACT_LIMIT_BYTES:
        log(f"WARNING: ARTIFACT OVER THE LIMIT by {size + code - ARTIFACT_LIMIT_BYTES} bytes: a submission of it with "
            "this script is NOT COMPLIANT")
    final, base = score_artifact(path, cfg, rt, log, val_tokens, tables, _final_tag(cfg, label))
    return dict(final=dataclasses.asdict(final), final_no_ttt=dataclasses.asdict(base), artifact_bytes=size,
                code_bytes=code, total_bytes=size + code)


def export_from(cfg: Config, rt: Runtime, log: Logger, run_id: str, val_tokens: torch.Tensor,
                tables: ByteTables) -> dict:
    """EXPORT_FROM: the end of a training run without the training. The checkpoint's weights are calibrated on
    training batches, scored, quantized and exported under this run's export settings (MATRIX_BITS,
    MATRIX_CLIP_SIGMAS, GPTQ_*, COMPRESSOR, ...), read back and scored: one run's weights under other export
    settings, or an export that failed after hours of training, without training again. Calibration is checked
    against the cap the checkpoint's run trained under, whatever MAX_WALLCLOCK_SECONDS says now."""
    src = Path(cfg.export_from)
    mc, state, info = read_checkpoint(src)
    require_model_matches(cfg, mc, "EXPORT_FROM", "checkpoint", src)
    log(f"export_from: checkpoint {src}, layout {mc.layout}, {info['steps']} steps in {info['train_ms'] / 1000:.1f}s"
        f"{', EMA applied' if info['ema'] else ''} (cap {info['max_wallclock_seconds']:g}s)")
    cfg = dataclasses.replace(cfg, max_wallclock_seconds=info["max_wallclock_seconds"])
    backends = resolve_backends(cfg, rt, mc, log, check=True)
    base = build_model(mc, backends, rt)
    require_ttt_selection(base, cfg)
    load_exported_state(base, state, str(src), kind="checkpoint")
    path = artifact_destination(cfg, run_id, log)
    fwd = maybe_compile(base, cfg, rt) if cfg.eval_mode == "window" else base
    summary = dict(export_from=str(src), steps=info["steps"], train_time_ms=round(info["train_ms"]),
                   params=count_parameters(base))
    return summary | export_and_score(base, fwd, cfg, rt, log, path, val_tokens, tables, info["train_ms"], info["ema"])


def _final_tag(cfg: Config, label: str = "") -> str:
    """The final score's tag; `label` (EVAL_ONLY: the artifact's own, from `artifact_model_and_label`) instead of
    this run's export settings."""
    return f"final_{label or f'int{cfg.matrix_bits}_{cfg.compressor}'}_roundtrip{eval_tag(cfg)}"


def train_and_eval(cfg: Config, rt: Runtime, log: Logger, run_id: str, val_tokens: torch.Tensor,
                   tables: ByteTables) -> dict:
    mc = ModelConfig.from_config(cfg)
    backends = resolve_backends(cfg, rt, mc, log, check=True)
    base = build_model(mc, backends, rt)
    require_ttt_selection(base, cfg)
    opts = build_optimizers(base, cfg, rt)
    log(f"model: {count_parameters(base):,} parameters, layout {mc.layout} ({len(base.layer_mixer)} layers, "
        f"{len(base.mixers)} distinct mixers, {len(base.mlps)} distinct MLPs); optimizer routing:")
    for line in describe_routes(base):
        log(line)
    if slow := unaligned_shapes(base):
        log("note: bf16 matmuls can be slower on dimensions not a multiple of 8: "
            + ", ".join(f"{n} x {'x'.join(map(str, s))}" for s, n in slow.items()))
    if cfg.qat_frac:
        qat = enable_qat(base, cfg)
        log(f"qat: {len(qat)} matrices ({sum(base.get_parameter(n).numel() for n in qat):,} params) trained rounded "
            f"to int{cfg.matrix_bits} at {cfg.qat_clip_sigmas:g} sigmas over the last QAT_FRAC={cfg.qat_frac:g} of "
            "the run (gradients straight through)")
    path = artifact_destination(cfg, run_id, log)
    train_files = shard_files(cfg.data_path, "train")
    train_tokens = count_tokens(train_files)
    log(f"train_data: {len(train_files)} shard{'s' * (len(train_files) != 1)}, {train_tokens:,} tokens")
    compiled = maybe_compile(base, cfg, rt)
    model = wrap_ddp(compiled, cfg, rt)
    if rt.distributed:
        log("ddp: " + ("compiled graph split at the gradient buckets, all-reduces overlapping the backward"
                       if cfg.ddp_overlap else "one compiled graph, the gradient all-reduce after the backward")
            + f" (DDP_OVERLAP={int(cfg.ddp_overlap)})")
    warmup_then_restore(base, model, opts, cfg, rt, log)
    ema = EMA(base, cfg.ema_decay) if cfg.ema_decay > 0 else None
    others = {d: EMA(base, d) if d > 0 else None for d in cfg.ema_compare_decays}  # None: the raw weights
    emas = [e for e in (ema, *others.values()) if e is not None]
    start, data_tokens = (resume_training(Path(cfg.resume_from), base, opts, emas, cfg, rt, log) if cfg.resume_from
                          else (None, 0))
    stats = train(base, model, opts, emas, cfg, rt, log, val_tokens, tables, start, data_tokens)
    peak = torch.cuda.max_memory_allocated() / 2**20 if rt.cuda else 0.0
    log(f"train_done steps:{stats.steps} train_time:{stats.train_ms:.0f}ms step_avg:{stats.step_avg_ms:.2f}ms "
        f"tok/s:{stats.tokens_per_s:.0f} stopped_by_cap:{stats.stopped_by_cap} peak_mem:{peak:.0f}MiB")
    passes = stats.tokens / train_tokens  # how often the timed steps read the training text (TokenStream: > 0 tokens)
    log(f"train_passes:{passes:.2f} ({stats.tokens:,} tokens read of {train_tokens:,})")
    if ema is not None:
        log(ema.describe())
    fwd = compiled if cfg.eval_mode == "window" else base  # what scores the weights before quantization
    compared = score_ema_compare(base, fwd, others, cfg, rt, log, val_tokens, tables)
    if ema is not None:
        ema.copy_to_model()
    if cfg.checkpoint_path:
        save_checkpoint(base, cfg, rt, log, dict(steps=stats.steps, train_ms=stats.train_ms, ema=ema is not None,
                                                 max_wallclock_seconds=cfg.max_wallclock_seconds))
    summary = dict(steps=stats.steps, train_time_ms=round(stats.train_ms), step_avg_ms=round(stats.step_avg_ms, 2),
                   tokens_per_s=round(stats.tokens_per_s), stopped_by_cap=stats.stopped_by_cap, peak_mem_mib=round(peak),
                   params=count_parameters(base), train_tokens=train_tokens, train_passes=round(passes, 4),
                   qat_from_step=stats.qat_from_step, resumed_from_step=start.steps if start else None)
    if compared:
        summary["ema_compare"] = compared
    return summary | export_and_score(base, fwd, cfg, rt, log, path, val_tokens, tables, stats.train_ms,
                                      ema is not None)


def artifact_path(cfg: Config, run_id: str) -> Path:
    """Where a run writes its artifact: ARTIFACT_PATH, or artifacts/{RUN_ID}.pgz."""
    return Path(cfg.artifact_path or f"artifacts/{run_id}.pgz")


def rtn_artifact_path(path: Path) -> Path:
    """QUANT_COMPARE's round-to-nearest export, beside the artifact at `path`."""
    return path.with_name(path.stem + "_rtn" + path.suffix)


def artifact_destination(cfg: Config, run_id: str, log: Logger) -> Path:
    path = artifact_path(cfg, run_id)
    if path.exists():  # said at the start, not found out afterwards
        log(f"WARNING: {path} exists and this run replaces it at export (choose another RUN_ID to keep it)")
    return path


def save_checkpoint(base: nn.Module, cfg: Config, rt: Runtime, log: Logger, info: dict) -> None:
    """CHECKPOINT_PATH: rank 0 writes the weights about to be exported; the others wait for the file. A write that
    fails (disk full, a bad path) is a warning, not the end of the run: the export it protects still happens."""
    if rt.is_main:
        t0 = time.perf_counter()
        try:
            size = write_checkpoint(Path(cfg.checkpoint_path), base, info)
            log(f"checkpoint: {cfg.checkpoint_path} ({size:,} bytes, unquantized, after {info['steps']} steps"
                f"{', EMA applied' if info['ema'] else ''}) in {time.perf_counter() - t0:.1f}s; EXPORT_FROM reads it")
        except OSError as err:
            log(f"WARNING: CHECKPOINT_PATH={cfg.checkpoint_path} was not written ({type(err).__name__}: {err}); "
                "the export goes on without it")
    if rt.distributed:
        dist.barrier()


def export_and_score(base: nn.Module, fwd: nn.Module, cfg: Config, rt: Runtime, log: Logger, path: Path,
                     val_tokens: torch.Tensor, tables: ByteTables, train_ms: float, ema: bool) -> dict:
    """After training (or EXPORT_FROM's checkpoint): calibrate, score the weights before quantization, export, read
    the artifact back and score it; with QUANT_COMPARE, round-to-nearest too. Returns the summary's entries."""
    hessians, calib_ms = calibrate(base, cfg, rt, log, train_ms) if cfg.quant_method == "gptq" else (None, 0.0)
    pre = evaluate_base(fwd, val_tokens, tables, cfg, rt)
    pre_tag = ("pre_quant_ema" if ema else "pre_quant") + eval_tag(dataclasses.replace(cfg, ttt_enabled=False))
    log(pre.line(pre_tag))
    sizes = export_artifact(base, cfg, rt, log, path, hessians)
    if rt.distributed:
        dist.barrier()
    final, final_base = score_artifact(path, cfg, rt, log, val_tokens, tables, _final_tag(cfg))
    log(f"quantization_gap {cfg.quant_method}: {final_base.bpb - pre.bpb:+.5f} bpb")
    summary = dict(calib_ms=round(calib_ms), budget_used_ms=round(train_ms + calib_ms), pre_quant=dataclasses.asdict(pre),
                   final=dataclasses.asdict(final), final_no_ttt=dataclasses.asdict(final_base),
                   artifact_path=str(path), **sizes)
    if cfg.quant_compare and hessians is not None:
        rtn_path = rtn_artifact_path(path)
        same_clip = dataclasses.replace(cfg, matrix_clip_fit=False, matrix_clip_sigmas=sizes["matrix_clip_sigmas"])
        export_artifact(base, same_clip, rt, log, rtn_path, None)  # the methods compared at one clip
        if rt.distributed:
            dist.barrier()
        rtn = score_artifact(rtn_path, cfg, rt, log, val_tokens, tables, "compare_rtn_roundtrip", with_ttt=False)[1]
        log(f"quantization_gap rtn: {rtn.bpb - pre.bpb:+.5f} bpb (gptq {final_base.bpb - pre.bpb:+.5f})")
        summary["compare_rtn"] = dataclasses.asdict(rtn)
    return summary


def main() -> None:
    cfg = Config.from_env()
    rt = init_runtime(cfg)
    run_id = resolve_run_id(cfg, rt)
    log_path = Path("logs") / f"{run_id}.txt"
    log = Logger(log_path if rt.is_main else None)
    if rt.distributed and rt.is_main:  # torchrun stops the other ranks with SIGTERM when one fails: say so
        signal.signal(signal.SIGTERM, _terminated)
    try:
        run_job(cfg, rt, log, run_id)
    except BaseException as err:  # the run's log says why it ended (the traceback still reaches stderr)
        why = f"{type(err).__name__}: {err}\n{traceback.format_exc().rstrip()}"
        if rt.is_main:
            log(f"run failed: {why}", console=False)
        else:  # only rank 0 logs; a failure of another rank (its GPU's kernel check, its shard) is its own to tell
            with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as f:
                f.write(f"run failed: rank {rt.rank}: {why}\n")
        raise
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()
        # The run is over: its artifact, checkpoint and log are written and closed. A torchrun rank ends here without
        # the interpreter's teardown, in which torch's native threads now and then abort the process ("terminate
        # called without an active exception" after the summary line, seen on CPU/gloo in 1 of ~120 two-rank runs),
        # turning a finished run into a failed one for torchrun.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _terminated(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum} (torchrun stops every rank when one fails: see that rank's "
                     "'run failed: rank N' line, if there is none the job was stopped from outside)")


def run_job(cfg: Config, rt: Runtime, log: Logger, run_id: str) -> None:
    """The run after its log exists: the header, data, training or EVAL_ONLY, and the summary line."""
    log_header(cfg, rt, log, run_id)
    if log.appends:
        log(f"WARNING: {log.path} holds an earlier run; this one is appended after it (the tools read a log's last "
            "run only; choose another RUN_ID to keep one run per log)")
    seed_everything(cfg.seed)
    tables, val_tokens, checked = load_scoring_text(cfg, rt.device)
    log(f"val_tokens:{len(val_tokens)} from {cfg.data_path}")
    log(checked)
    t0 = time.perf_counter()
    if cfg.eval_only:
        summary = eval_only(cfg, rt, log, val_tokens, tables)
    elif cfg.export_from:
        summary = export_from(cfg, rt, log, run_id, val_tokens, tables)
    else:
        summary = train_and_eval(cfg, rt, log, run_id, val_tokens, tables)
    total = summary["total_bytes"]
    summary.update(run_id=run_id, seed=cfg.seed, world_size=rt.world_size, eval_only=cfg.eval_only,
                   device=torch.cuda.get_device_name(rt.device) if rt.cuda else "cpu", torch=torch.__version__,
                   partial_validation=bool(cfg.val_max_tokens), wall_seconds=round(time.perf_counter() - t0, 1),
                   artifact_under_limit=total <= ARTIFACT_LIMIT_BYTES)
    log("summary " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
