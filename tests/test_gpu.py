"""Fast paths against their references on the GPU in use. Skipped where there is no CUDA GPU (or no fla)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _has_fla() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


needs_fla = pytest.mark.skipif(not (torch.cuda.is_available() and _has_fla()), reason="needs CUDA and fla")


def model_config(**kw) -> tg.ModelConfig:
    cfg = tg.Config(**kw)
    return tg.ModelConfig.from_config(cfg)


@needs_fla
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("T", [2048, 333])
def test_fla_matches_float64_reference(head_dim, T):
    mc = model_config(gdn_heads=512 // head_dim, gdn_head_dim=head_dim)
    errs, lifted = tg.guarded_gdn_kernel_errors(mc, T)
    print(f"head_dim={head_dim} T={T} guard_lifted={lifted} " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items()))
    assert all(v <= 2e-2 for v in errs.values()), errs


@needs_fla
@pytest.mark.parametrize("T", [2048, 333])
def test_fla_matches_float64_reference_with_beta_up_to_two(T):
    """GDN_NEG_EIGVAL: the kernel check's inputs then span beta in (0, 2), forward, backward and streaming."""
    mc = model_config(gdn_neg_eigval=True)
    errs, lifted = tg.guarded_gdn_kernel_errors(mc, T)
    with tg.fla_hopper_guard_lifted(lifted):
        errs.update({f"stream_{k}": v for k, v in tg.gdn_stream_kernel_errors(mc, T, torch.device("cuda")).items()})
    print(f"neg_eigval T={T} guard_lifted={lifted} " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items()))
    assert all(v <= 2e-2 for v in errs.values()), errs


def skip_unless_qla(mc: tg.ModelConfig) -> None:
    reason = tg.qla_unavailable(mc)
    if reason:
        pytest.skip(f"FlashQLA: {reason}")


@needs_fla
@pytest.mark.parametrize("T", [2048, 333])
def test_qla_matches_float64_reference(T):
    mc = model_config(gdn_heads=4, gdn_head_dim=128)
    skip_unless_qla(mc)
    errs = tg.gdn_kernel_errors(mc, T, torch.device("cuda"), impl="qla")
    print(f"qla T={T} " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items()))
    assert all(v <= 2e-2 for v in errs.values()), errs


@needs_fla
@pytest.mark.parametrize("impl", ["fla", "qla"])
def test_custom_op_registration_passes_opcheck(impl):
    mc = model_config(gdn_heads=4, gdn_head_dim=64 if impl == "fla" else 128)
    if impl == "qla":
        skip_unless_qla(mc)
    q, k, v, g, beta = tg._gdn_check_inputs(mc, 1, 128, torch.device("cuda"), 0)
    args = [t.requires_grad_(True) for t in (q, k, v, g, beta)] + [mc.gdn_head_dim ** -0.5, impl]
    with tg.fla_hopper_guard_lifted(True):
        torch.library.opcheck(tg._gdn_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))


@needs_fla
@pytest.mark.parametrize("T,heads,head_dim", [(2048, 4, 128), (333, 8, 64)])
def test_fla_conv_matches_float64_reference(T, heads, head_dim):
    mc = model_config(gdn_heads=heads, gdn_head_dim=head_dim)
    errs = tg.conv_kernel_errors(mc, T, torch.device("cuda"))
    print(f"conv T={T} C={heads * head_dim} " + " ".join(f"{k}:{v:.2e}" for k, v in errs.items()))
    assert all(v <= 2e-2 for v in errs.values()), errs
    x = torch.randn(2, 64, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 4, device="cuda")
    y = tg.conv_silu(x.double(), w.double(), "torch")
    assert tg.rel_err(tg.conv_silu(x, w, "fla"), y) < 2e-2
    assert tg.rel_err(tg.conv_silu(x, w.flip(1), "fla"), y) > 0.1  # the comparison sees the taps' order


@needs_fla
def test_conv_custom_op_registration_passes_opcheck():
    x = torch.randn(2, 96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(tg._conv_silu_fwd_op, (x, w), test_utils=("test_schema", "test_faketensor",
                                                                     "test_autograd_registration"))


@cuda
@pytest.mark.parametrize("cached", [0, 511])
@pytest.mark.parametrize("backend", ["varlen", "fa3"])
def test_attention_backend_matches_reference(backend, cached):
    if backend == "varlen" and not tg._varlen_has_window():
        pytest.skip("this torch has no windowed varlen_attn")
    if backend == "fa3":
        pytest.importorskip("flash_attn_interface")
    mc = model_config()
    errs = tg.attention_kernel_errors(mc, backend, 2048, torch.device("cuda"), cached=cached)
    print(backend, cached, errs)
    assert all(v <= 2e-2 for v in errs.values()), errs


@cuda
def test_compiled_fake_quantization_on_the_gpu_is_the_exports_rounding():
    """QAT's weight in the compiled training graph (Triton): the export's grid, fp16 scales included; a row whose
    scale sits on an fp16 midpoint may round to the neighbouring fp16 value (the compiled std's last bit)."""
    torch.manual_seed(0)
    x = torch.rand(100_000, device="cuda") * 10 ** torch.empty(100_000, device="cuda").uniform_(-9, 4)
    assert torch.equal(torch.compile(tg.round_to_fp16)(x), x.half().float())
    w = torch.randn(1536, 512, device="cuda") * torch.rand(1536, 1, device="cuda")
    exported = tg.dequantize_rows(*tg.quantize_rows(w, 6, 10.6))
    compiled = torch.compile(tg.fake_quantize)(w, torch.ones((), device="cuda"), 6, 10.6)
    rows_off = int(((compiled - exported).abs().amax(dim=1) > 1e-6).sum())
    print(f"rows off the export's grid: {rows_off} of {w.shape[0]}")
    assert rows_off <= w.shape[0] // 100
    scale = tg.row_scales(w, 6, 10.6).float()[:, None]
    assert ((compiled - exported).abs() <= 31 * scale * 2.0**-10 + 1e-7).all()


@needs_fla
@pytest.mark.parametrize("impl,gates", [("fla", False), ("qla", False), ("fla", True)])
def test_model_fast_path_matches_torch_path_and_compiles_without_breaks(impl, gates):
    """gates: the attention mixers' query gains and head gates (QK_GAIN_INIT, ATTN_HEAD_GATE), the layers' residual
    mixes and branch scales (RESID_MIX, BRANCH_SCALES) and a P layer (attention and GDN side by side) in the one
    graph too."""
    torch.manual_seed(0)
    extra = dict(qk_gain_init=2.0, attn_head_gate=True, resid_mix=True, branch_scales=True,
                 layout="GGSGsAP") if gates else {}
    mc = model_config(**{**dict(layout="GGSGs", model_dim=256, gdn_heads=2 if impl == "qla" else 4,
                                gdn_head_dim=128 if impl == "qla" else 64, num_heads=4, num_kv_heads=2,
                                swa_window=64), **extra})
    if impl == "qla":
        skip_unless_qla(mc)
    attn = "varlen" if tg._varlen_has_window() else "sdpa"
    fast = tg.GPT(mc, tg.Backends(impl, attn, "fla")).cuda()
    ref = tg.GPT(mc, tg.Backends("torch", "sdpa", "torch")).cuda()
    for p in fast.parameters():  # non-zero output projections so every layer contributes
        torch.nn.init.normal_(p, std=0.05)
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, mc.vocab_size, (2, 256), device="cuda")
    y = torch.randint(0, mc.vocab_size, (2, 256), device="cuda")
    with tg.fla_hopper_guard_lifted(True), torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fast = fast(x, y)
        loss_ref = ref(x, y)
        loss_fast.backward()
        loss_ref.backward()
        explanation = torch._dynamo.explain(fast)(x, y)
    assert abs(loss_fast.item() - loss_ref.item()) < 2e-2 * loss_ref.item()
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert tg.rel_err(a.grad, b.grad) < 5e-2, n
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_fla
@pytest.mark.parametrize("T", [300, tg.Config().stream_segment])  # the check's own length in a run: 32,768
@pytest.mark.parametrize("impl,head_dim", [("fla", 64), ("fla", 128), ("qla", 128)])
def test_fast_streaming_path_matches_reference(impl, head_dim, T):
    mc = model_config(gdn_heads=512 // head_dim, gdn_head_dim=head_dim)
    if impl == "qla":
        skip_unless_qla(mc)
    errs = tg.gdn_stream_kernel_errors(mc, T, torch.device("cuda"), impl=impl)
    print(head_dim, T, errs)
    assert all(v <= 2e-2 for v in errs.values()), errs


@needs_fla
@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_model_streaming_on_gpu_matches_one_long_forward(attn):
    torch.manual_seed(0)
    mc = model_config(layout="GGSGs", model_dim=256, gdn_heads=4, gdn_head_dim=64, num_heads=4, num_kv_heads=2,
                      swa_window=64)
    if attn == "varlen" and not tg._varlen_has_window():
        pytest.skip("no windowed varlen_attn")
    model = tg.GPT(mc, tg.Backends("fla", attn)).cuda()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tokens = torch.randint(0, mc.vocab_size, (1000,))
    cfg = tg.Config(eval_mode="stream", stream_segment=128, stream_lanes=1, swa_window=64)
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"), 1)
    bos = torch.zeros(mc.vocab_size, dtype=torch.bool)
    tables = tg.ByteTables(torch.ones(mc.vocab_size, dtype=torch.long), bos, bos, 1).to(rt.device)
    tally = tg.Tally(rt.device, track=len(tokens))
    tg.evaluate_stream(model, tokens, tables, cfg, rt, tally)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(tokens[None, :-1].cuda(), tokens[None, 1:].cuda(), reduction="none")[0].double().cpu()
    assert (tally.hits[1:] == 1).all()
    assert (tally.nll_at[1:] - full).abs().mean() < 2e-2  # bf16 compute, different segmentation


@needs_fla
@pytest.mark.parametrize("mode", ["1", "graphs"])
def test_compiled_sliding_ttt_matches_eager_ttt(mode):
    """TTT_COMPILE=1 runs TTT's window scoring and adaptation steps compiled, TTT_COMPILE=graphs compiled and
    replayed as CUDA graphs while the optimizer updates the weights in place between replays; both must score and
    adapt as the eager model does (bf16 compute: a small tolerance, over several adaptation steps)."""
    torch.manual_seed(0)
    mc = model_config(layout="GGSGs", model_dim=256, gdn_heads=4, gdn_head_dim=64, num_heads=4, num_kv_heads=2,
                      swa_window=64)
    attn = "varlen" if tg._varlen_has_window() else "sdpa"
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"), 1)
    cfg = tg.Config(eval_mode="window", eval_seq_len=256, eval_stride=64, eval_batch_tokens=4096, swa_window=64,
                    ttt_chunk_tokens=1024, ttt_batch_seqs=2, ttt_epochs=2, ttt_lr=0.01, compile="1", ttt_compile=mode)
    tokens = torch.randint(0, mc.vocab_size, (6000,))
    bos = torch.zeros(mc.vocab_size, dtype=torch.bool)
    tables = tg.ByteTables(torch.ones(mc.vocab_size, dtype=torch.long), bos, bos, 1).to(rt.device)
    init = tg.GPT(mc, tg.Backends("fla", attn)).state_dict()
    results, weights = [], []
    for fast in (False, True):  # the compiled model runs fla's short-convolution kernel too
        model = tg.GPT(mc, tg.Backends("fla", attn, "fla" if fast else "torch")).cuda()
        model.load_state_dict(init)
        module = tg.ttt_module(model, tg.maybe_compile(model, cfg, rt), cfg, rt)[0] if fast else None
        assert not fast or module is not None
        with tg.fla_hopper_guard_lifted(True):
            results.append(tg.evaluate_ttt(model, tokens, tables, cfg, rt, tg.Logger(None), compiled=module))
        weights.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
    eager, fast = results
    untouched = tg.GPT(mc, tg.Backends("fla", attn)).cuda()
    untouched.load_state_dict(init)
    with tg.fla_hopper_guard_lifted(True):
        base = tg.evaluate(untouched, tokens, tables, cfg, rt)
    assert eager.tokens == fast.tokens == len(tokens) - 1
    assert abs(fast.loss - eager.loss) < 2e-3 * eager.loss
    assert abs(eager.loss - base.loss) > 10 * abs(fast.loss - eager.loss)  # TTT moved the score; both moved alike
    moved = (weights[0] - torch.cat([p.detach().float().flatten() for p in untouched.parameters()])).norm()
    assert (weights[1] - weights[0]).norm() < 0.05 * moved  # the same adaptation steps, to bf16 rounding


@cuda
def test_a_run_resumed_on_the_gpu_goes_on_as_the_run_that_wrote_its_state(tmp_path, tiny_data):
    """STATE_PATH / RESUME_FROM on CUDA (fused Adam, bf16 autocast, pinned batches): the tiny preset trains 12 steps
    writing its state at step 7, with QAT on from step 6; a model of other initial weights resumed from it ends where
    the run that went on ended, far closer than the five steps after the write moved it."""
    env = {"PRESET": "tiny", "DATA_PATH": tiny_data["data_path"], "VOCAB_SIZE": str(tiny_data["vocab_size"]),
           "QAT_FRAC": "0.5"}
    path = tmp_path / "state.pt"
    writes = tg.Config.from_env({**env, "STATE_PATH": str(path), "STATE_EVERY": "7"})
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"), cfg.grad_accum_steps)

    def build(seed):
        torch.manual_seed(seed)
        model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa")).cuda()
        tg.enable_qat(model, cfg)
        return model, tg.build_optimizers(model, cfg, rt), [tg.EMA(model, cfg.ema_decay)]

    def flat(tensors):
        return torch.cat([t.detach().float().flatten() for t in tensors])

    model, opts, emas = build(0)
    tg.train(model, model, opts, emas, writes, rt, tg.Logger(None), None, None)
    at_write = flat(torch.load(path, map_location="cuda", weights_only=True)["weights"].values())
    resumed, r_opts, r_emas = build(1)
    start, data_tokens = tg.resume_training(path, resumed, r_opts, r_emas, cfg, rt, tg.Logger(None))
    stats = tg.train(resumed, resumed, r_opts, r_emas, cfg, rt, tg.Logger(None), None, None, start, data_tokens)
    assert (start.steps, stats.steps, stats.qat_from_step) == (7, cfg.iterations, 6)
    went_on = flat(model.state_dict().values())
    moved = (went_on - at_write).abs().max()
    assert moved > 0 and (flat(resumed.state_dict().values()) - went_on).abs().max() < 1e-3 * moved
    assert (flat(r_emas[0].shadow) - flat(emas[0].shadow)).abs().max() < 1e-3 * moved


@cuda
def test_the_packed_copy_runs_on_the_gpu_as_the_script(tmp_path, tiny_data):
    """tools/pack_script.py's copy runs its source through `exec`, which is what could break where the script's own
    file is read: torch.compile of the training model, the GPU's attention and GDN backends (fla's kernels where
    installed, checked first) and TTT as CUDA graphs. The copy picks the same backends, trains to the same losses
    and scores as the readable script within what CUDA's nondeterministic sums allow, and counts its own bytes."""
    root = Path(__file__).resolve().parents[1]
    packed = tmp_path / "build" / "train_gpt.py"
    subprocess.run([sys.executable, str(root / "tools" / "pack_script.py"), "--out", str(packed)], check=True)
    env = {**os.environ, "PRESET": "tiny", "COMPILE": "1", "TTT_COMPILE": "graphs", "GDN_HEAD_DIM": "64",
           "DATA_PATH": tiny_data["data_path"], "TOKENIZER_PATH": tiny_data["tokenizer_path"],
           "VOCAB_SIZE": str(tiny_data["vocab_size"])}
    runs = {}
    for name, script in (("plain", root / "train_gpt.py"), ("packed", packed)):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env={**env, "RUN_ID": name},
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = proc.stdout
    plain, copy = runs["plain"], runs["packed"]

    def backends(text):
        return [line.split(" (", 1)[0] for line in text.splitlines() if line.startswith("backends:")]

    def losses(text):
        return [float(x) for x in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", text, re.M)]

    def summary(text):
        return json.loads(next(line for line in text.splitlines() if line.startswith("summary "))[8:])
    assert backends(copy) == backends(plain) and backends(plain)
    assert len(losses(copy)) == len(losses(plain)) > 1
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(losses(copy), losses(plain)))
    s, p = summary(copy), summary(plain)
    assert abs(s["final"]["bpb"] - p["final"]["bpb"]) < 1e-2 and s["final"]["tokens"] == p["final"]["tokens"]
    assert s["code_bytes"] == packed.stat().st_size < p["code_bytes"] // 2
