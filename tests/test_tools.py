"""The benchmark tool runs end to end (tiny configuration on the CPU) and reports both stacks and the breakdown."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import bench_train  # noqa: E402
import train_gpt as tg  # noqa: E402


def run_bench_process(tmp_path, **settings) -> subprocess.CompletedProcess:
    """tools/bench_train.py on the tiny preset, in its own process."""
    env = {**os.environ, "PRESET": "tiny", "BENCH_WARMUP": "1", "OMP_NUM_THREADS": "1", **settings}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_bench(tmp_path, **settings) -> dict:
    """The figures of tools/bench_train.py's `bench {json}` line (tiny preset)."""
    proc = run_bench_process(tmp_path, **settings)
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("bench "))[6:])


@pytest.mark.parametrize("layout, named, not_named", [
    ("GSGs", "gdn:torch conv:torch swa:", "full attention"),
    ("GAGA", "gdn:torch conv:torch full attention:sdpa", "swa:"),
])
def test_bench_header_names_each_layer_kinds_backend(tmp_path, layout, named, not_named):
    """The header says what each kind of layer in LAYOUT runs on: full attention always runs SDPA, and ATTN_BACKEND
    (which may be varlen or fa3 on a GPU) only the sliding window, so a layout without S layers must not name it."""
    proc = run_bench_process(tmp_path, LAYOUT=layout, BENCH_STEPS="1", BENCH_COMPARE="0", BENCH_BREAKDOWN="0")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("device: "))
    assert named in header and not_named not in header, header


def test_bench_train_reports_both_stacks_and_a_breakdown(tmp_path):
    bench = run_bench(tmp_path, BENCH_STEPS="2")
    hybrid, attn = bench["runs"]
    assert hybrid["layout"] == "GSGs" and set(attn["layout"]) == {"A"}
    assert abs(attn["params"] - hybrid["params"]) < 0.2 * hybrid["params"]
    assert bench["ratio"] == round(hybrid["tokens_per_s"] / attn["tokens_per_s"], 4)
    assert {"gdn mixer x2", "swa mixer x2", "mlp x4", "optimizer (Muon + Adam)", "data loader"} <= set(bench["breakdown_ms"])
    assert all(v > 0 for v in bench["breakdown_ms"].values())


def test_bench_breakdown_counts_an_mlp_per_layer_as_run(tmp_path):
    """(GS)2 stores two MLPs and runs four: the MLP row is four calls' time (it counted the stored ones)."""
    bench = run_bench(tmp_path, BENCH_STEPS="1", BENCH_COMPARE="0", LAYOUT="(GS)2")
    assert {"gdn mixer x2", "swa mixer x2", "mlp x4"} <= set(bench["breakdown_ms"]), bench["breakdown_ms"]


def test_bench_ttt_takes_a_compiled_module(monkeypatch):
    """With compilation on (every GPU run), ttt_module returns a compiled module, which has no truth value: the
    benchmark crashed on `fwd or model` before timing anything. Compiling is stubbed: only the choice is under test."""
    cfg = tg.Config.from_env({"PRESET": "tiny", "COMPILE": "1"})
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)

    class NoTruth(torch.nn.Module):  # like torch.compile's OptimizedModule around a GPT: len() raises
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __len__(self):
            raise TypeError("GPT does not support len()")

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    monkeypatch.setattr(tg, "maybe_compile", lambda model, cfg, rt: NoTruth(model))
    rows = bench_train.bench_ttt(cfg, rt, tg.Backends("torch", "sdpa"), "1", 1)
    assert {r["mode"] for r in rows} == {"eager", "compiled"} and all(r["ms"] > 0 for r in rows), rows


def test_bench_variant_with_qat_frac_times_steps_with_qat_on(tmp_path):
    bench = run_bench(tmp_path, BENCH_STEPS="1", BENCH_COMPARE="0", BENCH_BREAKDOWN="0",
                      BENCH_VARIANTS="qat:QAT_FRAC=0.15")
    plain, qat = bench["runs"]
    assert qat["layout"] == "qat" and qat["tokens_per_s"] > 0
    assert plain["qat_matrices"] == 0 and qat["qat_matrices"] > 0


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_bench_fusion_alternative_is_the_same_mixer_fused(neg_eigval):
    """BENCH_FUSION times the production mixer against its projections fused into one matmul; both must compute
    the same, with either beta range."""
    torch.manual_seed(0)
    plain = tg.GatedDeltaNet(32, 2, 8, 1.0, 4, "torch", neg_eigval=neg_eigval)
    fused = bench_train.FusedGDN(32, 2, 8, 1.0, 4, "torch", neg_eigval=neg_eigval)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.o_proj.weight.normal_()  # zero-initialized: the outputs would be zero either way
        fused.o_proj.weight.copy_(plain.o_proj.weight)
    x = torch.randn(2, 24, 32)
    assert torch.allclose(plain(x), fused(x), atol=1e-5)


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_bench_bf16_mixer_is_the_production_mixer_up_to_rounding(neg_eigval):
    """The bf16 candidate differs from the production mixer only in where it rounds: in float32 on the CPU the two
    compute the same function; the no-convolution ablation does not (or it would time nothing)."""
    torch.manual_seed(0)
    plain = tg.GatedDeltaNet(32, 2, 8, 1.0, 4, "torch", neg_eigval=neg_eigval)
    with torch.no_grad():
        plain.o_proj.weight.normal_()
    others = {}
    for cls in (bench_train.BF16GDN, bench_train.NoConvGDN):
        others[cls] = cls(32, 2, 8, 1.0, 4, "torch", neg_eigval=neg_eigval)
        others[cls].load_state_dict(plain.state_dict())
    x = torch.randn(2, 24, 32)
    assert torch.allclose(plain(x), others[bench_train.BF16GDN](x), atol=1e-5)
    assert not torch.allclose(plain(x), others[bench_train.NoConvGDN](x), atol=1e-3)


def test_bench_fusion_runs_on_the_cpu(tmp_path):
    bench = run_bench(tmp_path, BENCH_STEPS="1", BENCH_FUSION="1", BENCH_COMPARE="0", BENCH_BREAKDOWN="0")
    assert [r["mixer"] for r in bench["fusion"]] == ["train_gpt.py (conv torch)"] + [
        name for name, _, _ in bench_train.MIXER_VARIANTS[1:]]
    assert all(r["ms"] > 0 for r in bench["fusion"])


def test_bench_ttt_times_one_adaptation_step_per_call(tmp_path):
    """BENCH_TTT's premise: ttt_adapt over b sequences with TTT_BATCH_SEQS=b and one epoch takes exactly one step."""
    cfg = tg.Config.from_env({"PRESET": "tiny"})
    mc = tg.ModelConfig.from_config(cfg)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    model = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    params = list(model.parameters())
    steps = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    opt = Spy(params, lr=1e-3)
    for b in (1, 3):
        steps.clear()
        span = torch.randint(0, mc.vocab_size, (b * cfg.eval_len + 1,))
        tg.ttt_adapt(model, opt, params, span, tg.Config(**{**cfg.__dict__, "ttt_batch_seqs": b, "ttt_epochs": 1}),
                     rt, model)
        assert len(steps) == 1
    bench = run_bench(tmp_path, BENCH_STEPS="1", BENCH_TTT="1,2", BENCH_COMPARE="0", BENCH_BREAKDOWN="0")
    assert [(r["seqs"], r["mode"]) for r in bench["ttt"]] == [(1, "eager"), (2, "eager")]
    assert all(r["ms"] > 0 and r["seq_len"] == cfg.eval_len for r in bench["ttt"])


def test_bench_ddp_times_the_step_and_its_parts_on_two_ranks(tmp_path):
    """tools/bench_ddp.py under torchrun (two CPU ranks, gloo): the whole step and every part, slowest rank."""
    env = {**os.environ, "PRESET": "tiny", "BENCH_STEPS": "2", "BENCH_WARMUP": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tools" / "bench_ddp.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("bench ")]
    assert len(lines) == 1  # rank 0 reports, once
    bench = json.loads(lines[0][6:])
    assert bench["world_size"] == 2 and bench["grad_accum_steps"] == tg.PRESETS["tiny"]["grad_accum_steps"]
    assert set(bench["parts_ms"]) == {"forward + backward (no gradient sync)", "gradient all-reduce",
                                      "Muon's update all-reduce", "optimizer step (Muon + Adam)", "EMA update",
                                      "data loader"}
    assert all(v > 0 for v in bench["parts_ms"].values())
    assert bench["tokens_per_s"] == round(tg.PRESETS["tiny"]["train_batch_tokens"] / (bench["ms_per_step"] / 1000))
    forward_backward = bench["parts_ms"]["forward + backward (no gradient sync)"]
    assert bench["unshared_ms"] == round(bench["ms_per_step"] - forward_backward, 2)
    # the phases of a real step, the last micro-batch's backward carrying DDP's all-reduce
    assert set(bench["phases_ms"]) == {"data", "forward", "backward", "backward (gradient all-reduce included)",
                                       "Muon", "Adam", "EMA"}
    assert all(v > 0 for v in bench["phases_ms"].values()) and bench["loop_ms_per_step"] > 0


@pytest.mark.parametrize("window", [0, 5])
def test_attention_sharpness_per_query_against_a_written_out_softmax(window):
    """tools/attn_sharpness.py's query_stats against one query at a time in float64: the largest logit, the top
    probability and the entropy over the keys the layer lets it see (causal, and within the window)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import attn_sharpness

    gen = torch.Generator().manual_seed(3)
    B, T, H, KV, hd, skip = 2, 12, 4, 2, 8, 3
    q, k = torch.randn(B, T, H, hd, generator=gen), torch.randn(B, T, KV, hd, generator=gen)
    top_logit, top_p, entropy = attn_sharpness.query_stats(q, k, window, skip)
    assert top_logit.shape == top_p.shape == entropy.shape == (B, H, T - skip)
    for b in range(B):
        for h in range(H):
            for t in range(skip, T):
                keys = [s for s in range(t + 1) if window == 0 or t - s < window]
                logits = [float(q[b, t, h].double() @ k[b, s, h // (H // KV)].double()) / math.sqrt(hd) for s in keys]
                z = sum(math.exp(v) for v in logits)
                probs = [math.exp(v) / z for v in logits]
                assert math.isclose(top_logit[b, h, t - skip], max(logits), rel_tol=1e-9)
                assert math.isclose(top_p[b, h, t - skip], max(probs), rel_tol=1e-9)
                assert math.isclose(entropy[b, h, t - skip], -sum(p * math.log(p) for p in probs), rel_tol=1e-9)


def ablation_model(layout: str) -> tg.GPT:
    """A tiny model of `layout` with every output projection given weight (they start at zero)."""
    torch.manual_seed(5)
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout, "VOCAB_SIZE": "97"})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    for p in model.parameters():
        if p.ndim == 2 and not p.abs().sum():  # large enough that every module moves the loss
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def output_projections(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(owner, attribute) of the projections whose outputs sum to the module's output."""
    if isinstance(module, tg.ParallelMixer):
        return output_projections(module.attn) + output_projections(module.gdn)
    return [(module, "proj" if isinstance(module, tg.MLP) else "o_proj")]


def test_layer_ablation_position_ranges_are_checked():
    """--positions must start at 0, increase and stay below the sequence length; the last range ends there."""
    sys.path.insert(0, str(ROOT / "tools"))
    import layer_ablation

    assert layer_ablation.position_ranges([0, 64, 256], 300) == [(0, 64), (64, 256), (256, 300)]
    assert layer_ablation.position_ranges([0], 8) == [(0, 8)]
    for starts in ([], [1, 64], [0, 64, 64], [0, 300]):
        with pytest.raises(ValueError, match="need increasing starts from 0"):
            layer_ablation.position_ranges(starts, 300)


def test_layer_ablation_names_every_mixer_half_and_mlp_with_the_layers_that_run_it():
    """GPAp: the P mixer is run by layers 1 and 3 (p shares it) and listed whole and as its two halves; every
    layer has its own MLP."""
    sys.path.insert(0, str(ROOT / "tools"))
    import layer_ablation

    targets = layer_ablation.ablation_targets(ablation_model("GPAp"))
    assert [(name, kind, layers) for name, kind, layers, _ in targets] == [
        ("mixers.0", "gdn", [0]), ("mixers.1", "par", [1, 3]), ("mixers.1.attn", "attn", [1, 3]),
        ("mixers.1.gdn", "gdn", [1, 3]), ("mixers.2", "attn", [2]),
        ("mlps.0", "mlp", [0]), ("mlps.1", "mlp", [1]), ("mlps.2", "mlp", [2]), ("mlps.3", "mlp", [3])]


def test_layer_ablation_zero_mode_is_the_model_with_that_modules_output_projections_zeroed():
    """Each row of --mode zero against a copy of the model whose module's output projection(s) are zero (both
    halves' for a whole P mixer; at both of its layers for the shared one), scored by the model itself: the mean
    increase and the increase over targets 0-9, 10-24 and 25-39."""
    sys.path.insert(0, str(ROOT / "tools"))
    import copy

    import layer_ablation

    model = ablation_model("GPAp")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 40), generator=gen), torch.randint(0, 97, (2, 40), generator=gen)
    unablated, rows = layer_ablation.ablation_rows(model, x, y, "zero", [0, 10, 25])
    with torch.no_grad():
        base = model(x, y, reduction="none")
        assert unablated["loss"] == pytest.approx(float(base.mean()), abs=1e-6)
        assert [(r["start"], r["end"]) for r in unablated["by_position"]] == [(0, 10), (10, 25), (25, 40)]
        for r in unablated["by_position"]:
            assert r["loss"] == pytest.approx(float(base[:, r["start"]:r["end"]].mean()), abs=1e-6)
        for row in rows:
            ablated = copy.deepcopy(model)
            for owner, attr in output_projections(ablated.get_submodule(row["module"])):
                getattr(owner, attr).weight.zero_()
            loss = ablated(x, y, reduction="none")
            assert row["loss"] == pytest.approx(float(loss.mean()), abs=2e-6), row
            assert row["delta"] == pytest.approx(float((loss - base).mean()), abs=2e-6), row
            assert abs(row["delta"]) > 1e-4, row
            assert row["by_position"] == pytest.approx([float((loss - base)[:, a:b].mean())
                                                        for a, b in ((0, 10), (10, 25), (25, 40))], abs=2e-6), row


def test_layer_ablation_mean_mode_is_each_calls_unablated_mean_as_a_constant_output():
    """Each row of --mode mean against the same model without sharing (GPAP, the 4th layer's mixer a copy of the
    2nd's), whose module's output projections are replaced, at each layer that ran it, by a constant: the mean over
    batch and position of what they put out at that layer in the unablated pass (read at the projections, a
    projection's output summed over a P mixer's halves for the whole mixer)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import copy

    import layer_ablation

    shared = ablation_model("GPAp")
    unshared = tg.GPT(tg.ModelConfig(**{**shared.mc.__dict__, "layout": "GPAP"}), tg.Backends("torch", "sdpa")).eval()
    state = shared.state_dict()
    state.update({k.replace("mixers.1.", "mixers.3.", 1): v for k, v in state.items() if k.startswith("mixers.1.")})
    unshared.load_state_dict(state)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 97, (2, 40), generator=gen), torch.randint(0, 97, (2, 40), generator=gen)
    unablated, rows = layer_ablation.ablation_rows(shared, x, y, "mean")
    with torch.no_grad():
        assert unablated["loss"] == pytest.approx(float(unshared(x, y)), abs=1e-6)
        for row in rows:
            names = [row["module"]] + ([row["module"].replace("mixers.1", "mixers.3", 1)]
                                       if row["module"].startswith("mixers.1") else [])
            projections = {name: output_projections(unshared.get_submodule(name)) for name in names}
            outputs = {name: [] for name in names}

            def keep(name):
                return lambda _mod, _args, out: outputs[name].append(out)

            hooks = [getattr(owner, attr).register_forward_hook(keep(name))
                     for name in names for owner, attr in projections[name]]
            unshared(x, y)
            for h in hooks:
                h.remove()
            ablated = copy.deepcopy(unshared)
            for name in names:
                mean = sum(outputs[name]).mean(dim=(0, 1))  # the halves' outputs summed, then averaged
                for n, (owner, attr) in enumerate(output_projections(ablated.get_submodule(name))):
                    old = getattr(owner, attr)
                    constant = torch.nn.Linear(old.in_features, old.out_features)
                    constant.weight.data.zero_()
                    constant.bias.data.copy_(mean if n == 0 else torch.zeros_like(mean))
                    setattr(owner, attr, constant)
            expected = float(ablated(x, y))
            assert row["loss"] == pytest.approx(expected, abs=2e-6), row
            assert abs(row["delta"]) > 1e-4, row


def test_bench_state_writes_reads_back_and_removes_the_state(tmp_path):
    """tools/bench_state.py on the tiny preset with a second average: each pass writes the state (the same size
    each time), reads it into a fresh model with the weights back, and the file is gone at the end."""
    env = {**os.environ, "PRESET": "tiny", "EMA_COMPARE": "0.5", "BENCH_REPEATS": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_state.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    passes = re.findall(r"^pass \d: ([\d,]+) bytes, written in [\d.]+ s, read back in [\d.]+ s, weights back: True$",
                        proc.stdout, flags=re.M)
    assert len(passes) == 2 and len(set(passes)) == 1, proc.stdout
    assert "2 averages" in proc.stdout and f"state: {passes[0]} bytes (" in proc.stdout
    assert not (tmp_path / "bench_state.pt").exists()


def test_bench_muon_times_every_variant_in_alternating_passes(tmp_path):
    """tools/bench_muon.py on the tiny preset's matrices: the groups of each variant (normuon_gdn: the GDN mixers'
    matrices with normuon, the rest plain), every pass timing muon, normuon, normuon_gdn, then the summary."""
    env = {**os.environ, "PRESET": "tiny", "BENCH_PASSES": "2", "BENCH_STEPS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_muon.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    cfg = tg.Config.from_env({"PRESET": "tiny"})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    opts = tg.build_optimizers(model, cfg, tg.Runtime(0, 1, 0, torch.device("cpu"), 1))
    mats = [p for g in opts.muon.param_groups for p in g["params"]]
    in_muon = {id(p) for p in mats}
    n_gdn = sum(id(p) in in_muon for m in model.modules() if isinstance(m, tg.GatedDeltaNet) for p in m.parameters())
    assert 0 < n_gdn < len(mats)  # the tiny preset has GDN and attention layers, so normuon_gdn has two groups
    assert f"{len(mats)} Muon matrices" in lines[0]
    assert lines[1] == (f"groups: muon {len(mats)} plain; normuon {len(mats)} normuon; "
                        f"normuon_gdn {n_gdn} normuon + {len(mats) - n_gdn} plain")
    names = ["muon", "normuon", "normuon_gdn"]
    assert [line.split()[2] for line in lines[2:8]] == names * 2
    assert all(float(line.split()[3]) > 0 for line in lines[2:8])
    assert [line.split(":")[0] for line in lines[8:]] == names


def test_submission_summary_names_the_gdn_beta_range():
    import make_submission as ms

    c = {"LAYOUT": "AAGA", "MODEL_DIM": "512", "MLP_MULT": "3.0", "VOCAB_SIZE": "1024", "UNET_SKIPS": "True",
         "GDN_NEG_EIGVAL": "True"}
    assert ms.model_summary(c) == ("4 layers (1 Gated DeltaNet + 3 full attention), layout AAGA, d512, MLP 3.0x ReLU^2, "
                                   "vocab 1024, U-Net skips, GDN beta in (0, 2) (negative eigenvalues)")
    assert ms.model_summary({**c, "MLP_NEG_SLOPE": "0.5", "XSA_LAST": "2"}).endswith(
        "MLP 3.0x LeakyReLU(0.5)^2, vocab 1024, U-Net skips, GDN beta in (0, 2) (negative eigenvalues), "
        "XSA in the last 2 attention mixers")
    assert ms.model_summary({**c, "XSA_LAST": "9"}).endswith("XSA in all attention mixers")
    assert "negative" not in ms.model_summary({**c, "LAYOUT": "AAAA"})  # no GDN layer: nothing to name
    assert ms.model_summary({**c, "LAYOUT": "AGNn"}).startswith(
        "4 layers (1 Gated DeltaNet + 1 full attention + 2 full attention without position encoding), layout AGNn")
    assert "negative" not in ms.model_summary({**c, "GDN_NEG_EIGVAL": "False"})
    assert ms.model_summary({**c, "QK_GAIN_INIT": "4.0"}).endswith(
        "(negative eigenvalues), learnable query gains (from 4.0)")
    assert "query gains" not in ms.model_summary({**c, "QK_GAIN_INIT": "0.0"})
    assert ms.model_summary({**c, "ATTN_HEAD_GATE": "True"}).endswith("(negative eigenvalues), sigmoid-gated attention heads")
    assert "gated" not in ms.model_summary({**c, "ATTN_HEAD_GATE": "True", "LAYOUT": "GGGG"})
    assert ms.model_summary({**c, "RESID_MIX": "True", "BRANCH_SCALES": "True"}).endswith(
        "(negative eigenvalues), per-layer mixes of the stream with the embedding, per-channel branch scales")
    assert "embedding" not in ms.model_summary({**c, "RESID_MIX": "False"})
    assert "branch" not in ms.model_summary({**c, "BRANCH_SCALES": "False"})
    assert ms.model_summary({**c, "LAYOUT": "AAPA"}).startswith(
        "4 layers (3 full attention + 1 full attention + Gated DeltaNet side by side), layout AAPA")
    assert "negative eigenvalues" in ms.model_summary({**c, "LAYOUT": "AAPA"})  # P's GDN half has them


LOGGED_SCRIPT = '"""A stand-in for train_gpt.py, as a run logs it first."""\nprint("trained")\n'


def _run_log(run_id: str, run: dict, script: str = LOGGED_SCRIPT) -> str:
    """A train_gpt.py log in small: the code it ran, the rule, the run's lines and its summary."""
    return f"{script}\n{'=' * 100}\nrun_id:{run_id}\nconfig LAYOUT=AAGA\nsummary {json.dumps(run)}\n"


def _summary_run(seed, **over):
    run = dict(seed=seed, world_size=8, train_time_ms=590_000, budget_used_ms=599_000, total_bytes=15_900_000,
               final=dict(bpb=1.1, loss=1.9, seconds=400.0, tokens=1_194_961, bytes=3_062_010), steps=7000,
               step_avg_ms=84.0, log=f"s{seed}.txt", code_bytes=150_000, code_sha256="a",
               device="NVIDIA H100 80GB HBM3", torch="2.11", config={"LAYOUT": "AAGA"})
    return {**run, **over}


@pytest.mark.parametrize("over,record", [
    ({}, True),
    ({"world_size": 1}, False),
    ({"device": "NVIDIA H200"}, False),  # 8 GPUs, but the record track is 8xH100 SXM
    ({"device": "NVIDIA H100 PCIe"}, False),
    ({"budget_used_ms": 600_001}, False),
    ({"total_bytes": 16_000_001}, False),  # over the limit: never labelled a record, whatever the GPUs
    ({"final": dict(bpb=1.1, loss=1.9, seconds=601.0, tokens=1_194_961, bytes=3_062_010)}, False),  # eval > 600 s
    ({"resumed_from_step": 3000}, False),  # RESUME_FROM: the log holds only the training after step 3000
])
def test_submission_is_a_record_only_when_every_check_holds(over, record):
    import argparse

    import make_submission as ms

    args = argparse.Namespace(author="a", github_id="g", name="n", blurb="b", date="2026-11-30", technique="t")
    hardware = set(over) <= {"world_size", "device"}
    sub = ms.build([_summary_run(1, **(over if hardware else {})), _summary_run(2, **over)], args)
    assert (sub["track"] == "10min_16mb") == record
    assert all(sub["compliance"].values()) == (record or hardware)
    if "resumed_from_step" in over:  # said per seed, and only where it happened
        assert sub["seed_results"]["2"]["resumed_from_step"] == 3000 and "resumed_from_step" not in sub["seed_results"]["1"]


@pytest.mark.parametrize("over,differs", [
    ({"config": {"LAYOUT": "AAAA"}}, "LAYOUT AAGA vs AAAA"),
    ({"config": {"LAYOUT": "AAGA", "MLP_MULT": "3.0"}}, "MLP_MULT None vs 3.0"),
    ({"code_bytes": 150_001}, "code_bytes 150000 vs 150001"),
    ({"device": "NVIDIA H200"}, "device NVIDIA H100 80GB HBM3 vs NVIDIA H200"),
    ({"world_size": 4}, "world_size 8 vs 4"),
    ({"code_sha256": "b"}, "code_sha256 a vs b"),  # the same length, other code
    ({"torch": "2.12"}, "torch 2.11 vs 2.12"),
    ({"final": dict(bpb=1.0, loss=1.8, seconds=400.0, tokens=1_226_898, bytes=2_900_000)},  # the held-out text
     "validation text (targets, bytes) (1194961, 3062010) vs (1226898, 2900000)"),
])
def test_a_submission_is_seeds_of_one_configuration(over, differs):
    """Logs of different models, code or machines are not seeds of one submission: refused, naming what differs;
    the seed, run id and paths may differ."""
    import argparse

    import make_submission as ms

    args = argparse.Namespace(author="a", github_id="g", name="n", blurb="b", date="2026-11-30", technique="t")
    with pytest.raises(ValueError, match=re.escape(f"s1.txt and s2.txt are not seeds of one configuration: {differs}")):
        ms.build([_summary_run(1), _summary_run(2, **over)], args)
    per_seed = {"LAYOUT": "AAGA", "SEED": "2", "RUN_ID": "b", "ARTIFACT_PATH": "x.pgz", "DATA_PATH": "/d",
                "STATE_PATH": "s.pt", "STATE_EVERY": "500", "RESUME_FROM": "s.pt"}
    assert ms.build([_summary_run(1), _summary_run(2, config=per_seed)], args)["seeds"] == [1, 2]


def test_an_artifact_over_the_limit_is_no_submission_and_an_earlier_file_is_kept(tmp_path):
    """Both tracks share the 16,000,000-byte limit: a log whose artifact + code is over it is refused by name, and
    the submission.json already there is left as it was."""
    import make_submission as ms

    run = _summary_run(1, total_bytes=ms.LIMIT_BYTES + 1)
    log = tmp_path / "over.txt"
    log.write_text(_run_log("over", run))
    out = tmp_path / "submission.json"
    out.write_text("an earlier submission\n")
    cmd = [sys.executable, str(ROOT / "tools" / "make_submission.py"), str(log), "--author", "a", "--github-id", "g",
           "--name", "n", "--technique", "t", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"over.txt: artifact + code is {ms.LIMIT_BYTES + 1:,} bytes, over the {ms.LIMIT_BYTES:,}-byte" in proc.stderr
    assert out.read_text() == "an earlier submission\n"
    log.write_text(log.read_text().replace(str(ms.LIMIT_BYTES + 1), str(ms.LIMIT_BYTES)))  # at the limit: accepted
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["bytes_total"] == ms.LIMIT_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["over.txt", "submission.json"]  # no temporary file left


def test_a_failed_write_leaves_the_earlier_submission_whole(tmp_path, monkeypatch):
    """make_submission writes a temporary file and renames it: a write that fails half-way leaves the earlier
    submission.json as it was, and no temporary file behind."""
    import make_submission as ms

    log = tmp_path / "s1.txt"
    log.write_text(_run_log("s1", _summary_run(1)))
    out = tmp_path / "submission.json"
    out.write_text("an earlier submission\n")

    def half_then_fail(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ms.main([str(log), "--author", "a", "--github-id", "g", "--name", "n", "--technique", "t", "--out", str(out)])
    monkeypatch.undo()
    assert out.read_text() == "an earlier submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.txt", "submission.json"]


@pytest.mark.parametrize("extra,message", [
    ({"eval_only": True}, "an EVAL_ONLY rescoring log, not a training run"),
    ({"export_from": "ckpt/a.pt"}, "an EXPORT_FROM log (weights from ckpt/a.pt), not a training run"),
])
def test_a_log_that_did_not_train_is_no_submission(tmp_path, extra, message):
    import make_submission as ms

    log = tmp_path / "x.txt"
    log.write_text(f"run_id:x\nconfig LAYOUT=AAGA\nsummary {json.dumps(_summary_run(1, **extra))}\n")
    with pytest.raises(ValueError, match=re.escape(f"{log}: {message}")):
        ms.read_run(log)
    log.write_text(_run_log("x", _summary_run(1)))
    assert ms.read_run(log)["total_bytes"] == _summary_run(1)["total_bytes"]


def _train_log(run_id: str, step_losses: list[float], log_every: int, seed: int = 1337, world: str = "1",
               accum: str = "2", data: str = "1 shard, 93,535,700 tokens", eval_only: bool = False,
               ms_per_step: int = 1, schedule: dict[str, str] | None = None) -> str:
    """A train_gpt.py log as the script writes one: header lines, config lines (`schedule`: more of them), and a
    `step:` line every `log_every` steps (and at the last) with the mean loss of the steps since the line before and
    the training time so far."""
    lines = [f"run_id:{run_id}", f"runtime: world_size:{world} grad_accum_steps:{accum} device:cpu",
             f"config EVAL_ONLY={eval_only}", f"config SEED={seed}", "config TRAIN_BATCH_TOKENS=262144",
             "config TRAIN_SEQ_LEN=2048", *(f"config {k}={v}" for k, v in (schedule or {}).items()),
             f"train_data: {data}", "step:0/100 val_loss:7.0000 val_bpb:4.0000 train_time:0ms"]
    first = 0
    for step in range(1, len(step_losses) + 1):
        if step % log_every == 0 or step == len(step_losses):
            mean = sum(step_losses[first:step]) / (step - first)
            lines.append(f"step:{step}/100 train_loss:{mean:.6f} train_time:{step * ms_per_step}ms "
                         f"step_avg:{ms_per_step}.00ms tok/s:1")
            first = step
    return "\n".join(lines) + "\n"


def test_loss_diff_is_the_mean_over_the_ranges_steps_of_a_minus_b(tmp_path):
    """Windows of unequal length (the last one under a cap) and windows only one log has: the figure equals the
    difference of the per-step losses averaged over exactly the steps of the windows both logs share."""
    import loss_diff

    gen = torch.Generator().manual_seed(0)
    a_steps = (2 + torch.rand(97, generator=gen)).tolist()
    b_steps = (2 + torch.rand(103, generator=gen)).tolist()
    (tmp_path / "a.txt").write_text(_train_log("a", a_steps, 10))
    (tmp_path / "b.txt").write_text(_train_log("b", b_steps, 10, data="1 shards, 93,535,700 tokens"))  # older logs
    a, b = loss_diff.read_train_log(tmp_path / "a.txt"), loss_diff.read_train_log(tmp_path / "b.txt")
    assert sorted(a.windows)[-1] == (91, 97) and sorted(b.windows)[-1] == (101, 103)
    loss_diff.check_same_batches(a, b)
    rows = loss_diff.compare(a, b, [(0, 39), (40, 97), (95, 103)])
    # 0-39: the windows ending at 10, 20, 30 (steps 1-30); 40-97: those ending at 40 ... 90 (steps 31-90), not A's
    # last window 91-97, which B does not have (B's is 91-100); 95-103: no window both logs share
    covered = [range(1, 31), range(31, 91)]
    for row, steps in zip(rows, covered):
        want = sum(a_steps[s - 1] - b_steps[s - 1] for s in steps) / len(steps)
        assert row["steps"] == len(steps) and row["windows"] == len(steps) // 10
        assert row["diff"] == pytest.approx(want, abs=1e-5)  # the log rounds each window's mean to 6 decimals
    assert rows[2] == dict(first=95, last=103, windows=0, steps=0, a=None, b=None, diff=None, a_lr=None, b_lr=None)
    # a run with A's 97 steps shares A's short last window, which counts by its 7 steps, not as one of two windows
    c_steps = b_steps[:97]
    (tmp_path / "c.txt").write_text(_train_log("c", c_steps, 10))
    [row] = loss_diff.compare(a, loss_diff.read_train_log(tmp_path / "c.txt"), [(81, 97)])
    assert row["windows"] == 2 and row["steps"] == 17
    assert row["diff"] == pytest.approx(sum(a_steps[s] - c_steps[s] for s in range(80, 97)) / 17, abs=1e-5)
    assert loss_diff.default_ranges(90) == [(0, 90)]
    assert loss_diff.default_ranges(900) == [(0, 399), (400, 799), (800, 900)]


@pytest.mark.parametrize("b_kwargs,differs", [
    (dict(seed=1338), "SEED: 1337 against 1338"),
    (dict(world="1", accum="4"), "spans per step (world size x gradient accumulation): 2 against 4"),
    (dict(data="2 shards, 187,071,400 tokens"), "training text: 1 shard(s), 93,535,700 tokens against 2 shard(s)"),
])
def test_loss_diff_refuses_runs_that_did_not_see_the_same_batches(tmp_path, b_kwargs, differs):
    import loss_diff

    (tmp_path / "a.txt").write_text(_train_log("a", [3.0] * 20, 5))
    (tmp_path / "b.txt").write_text(_train_log("b", [2.0] * 20, 5, **b_kwargs))
    assert loss_diff.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 2
    with pytest.raises(ValueError, match=re.escape(differs)):
        loss_diff.check_same_batches(*(loss_diff.read_train_log(tmp_path / f"{r}.txt") for r in "ab"))


def test_loss_diff_takes_one_process_accumulating_as_the_ranks_reading_the_same_spans(tmp_path):
    """1 process x 2 micro-batches and 2 processes x 1 read the same spans of the stream at every step (the loader's
    batches, drawn both ways here, are equal): loss_diff compares them."""
    import loss_diff

    from conftest import load_data_tool

    shards = tmp_path / "data"
    shards.mkdir()
    load_data_tool("make_shards").write_shard(shards / "fineweb_train_000000.bin", np.arange(5000) % 1000)
    cfg = tg.Config(data_path=str(shards), train_batch_tokens=256, train_seq_len=16, vocab_size=1000)
    drawn = {}
    for world, accum in ((1, 2), (2, 1)):
        loaders = [tg.TrainLoader(cfg, tg.Runtime(r, world, r, torch.device("cpu"), accum)) for r in range(world)]
        drawn[world] = [torch.cat([ld.next_batch()[0] for ld in loaders]) for _ in range(3 * accum)]
        for ld in loaders:
            ld.close()
    one = [torch.cat(drawn[1][i: i + 2]) for i in range(0, 6, 2)]  # a step's two micro-batches
    assert all(torch.equal(a, b) for a, b in zip(one, drawn[2]))
    (tmp_path / "a.txt").write_text(_train_log("a", [3.0] * 20, 5, world="1", accum="2"))
    (tmp_path / "b.txt").write_text(_train_log("b", [2.0] * 20, 5, world="2", accum="1"))
    loss_diff.check_same_batches(*(loss_diff.read_train_log(tmp_path / f"{r}.txt") for r in "ab"))


def test_loss_diff_reads_the_last_run_of_a_log_and_refuses_what_has_no_training_losses(tmp_path, capsys):
    import loss_diff

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(_train_log("a", [9.0] * 20, 5, seed=1) + _train_log("a", [3.0] * 20, 5))  # a rerun of RUN_ID a
    b.write_text(_train_log("b", [2.5] * 20, 5))
    assert loss_diff.main([str(a), str(b), "--ranges", "0-20"]) == 0
    out = capsys.readouterr().out
    assert "| 0–20 | 4 | 20 | 3.0000 | 2.5000 | +0.5000 | — / — |" in out
    assert "A: its log does not give the schedule settings or step times; its rate is not known" in out
    for bad in ("20-10", "x", ","):
        assert loss_diff.main([str(a), str(b), "--ranges", bad]) == 2
        assert "--ranges" in capsys.readouterr().err
    b.write_text(_train_log("b", [2.5] * 20, 5, eval_only=True))
    with pytest.raises(ValueError, match="did not train"):
        loss_diff.read_train_log(b)
    b.write_text(_train_log("b", [], 5))
    with pytest.raises(ValueError, match=re.escape(f"{b}: no `step:N/M train_loss:...` lines")):
        loss_diff.read_train_log(b)
    b.write_text(_train_log("b", [2.5] * 20, 5).replace("config SEED=1337\n", ""))
    with pytest.raises(ValueError, match=re.escape("SEED: 1337 against (not logged)")):
        loss_diff.check_same_batches(loss_diff.read_train_log(a), loss_diff.read_train_log(b))
    b.write_text(_train_log("b", [2.5] * 20, 4))
    with pytest.raises(ValueError, match="no window of the same steps"):
        loss_diff.compare(loss_diff.read_train_log(a), loss_diff.read_train_log(b))


def test_loss_diff_gives_each_rows_learning_rates_as_train_gpt_set_them(tmp_path, capsys):
    """Two runs under one wallclock cap at 10 and 20 ms a step: each row's mean learning-rate multiplier is the mean
    of train_gpt.lr_multiplier over its steps, each read with the training time before the step (exact here: the
    step time is constant, so interpolating between the logged lines loses nothing), and each run's last step at
    the full rate is the last where lr_multiplier gives 1. A log without a schedule setting gives none."""
    import loss_diff

    schedule = {"ITERATIONS": "100", "LR_WARMUP_STEPS": "5", "WARMDOWN_FRAC": "0.5", "WARMDOWN_SHAPE": "cosine",
                "MAX_WALLCLOCK_SECONDS": "1.2", "GPTQ_RESERVE_SECONDS": "0.2", "QUANT_METHOD": "gptq"}
    cfg = tg.Config.from_env(schedule)
    losses = [3.0 - 0.01 * s for s in range(60)]
    for name, ms in (("a", 10), ("b", 20)):
        (tmp_path / f"{name}.txt").write_text(_train_log(name, losses, 10, ms_per_step=ms, schedule=schedule))
    assert loss_diff.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--ranges", "1-10,11-30,31-60"]) == 0
    out = capsys.readouterr().out
    a, b = (loss_diff.read_train_log(tmp_path / f"{r}.txt") for r in "ab")
    for log, ms in ((a, 10), (b, 20)):
        want = {s: tg.lr_multiplier(s - 1, (s - 1) * ms / 1000, cfg) for s in range(1, 61)}
        assert log.rates == pytest.approx(want, abs=1e-12)
        assert {s for s in want if want[s] < 1} & set(range(6, 61))  # the warmdown begins within the 60 steps
    rows = loss_diff.compare(a, b, [(1, 10), (11, 30), (31, 60)])
    for row, steps in zip(rows, (range(1, 11), range(11, 31), range(31, 61))):
        assert row["a_lr"] == pytest.approx(sum(a.rates[s] for s in steps) / len(steps), abs=1e-12)
        assert row["b_lr"] == pytest.approx(sum(b.rates[s] for s in steps) / len(steps), abs=1e-12)
        assert f"| {row['a_lr']:.3f} / {row['b_lr']:.3f} |" in out
    for name, log in (("A", a), ("B", b)):
        full = max(s for s in range(5, 61) if all(log.rates[t] == 1.0 for t in range(5, s + 1)))
        assert f"{name}: at its full learning rate through step {full}" in out
    assert rows[2]["a_lr"] != pytest.approx(rows[2]["b_lr"])  # the slower run's warmdown is further on
    del schedule["WARMDOWN_FRAC"]
    (tmp_path / "b.txt").write_text(_train_log("b", losses, 10, ms_per_step=20, schedule=schedule))
    assert loss_diff.read_train_log(tmp_path / "b.txt").rates is None
    [row] = loss_diff.compare(a, loss_diff.read_train_log(tmp_path / "b.txt"), [(1, 60)])
    assert row["a_lr"] is not None and row["b_lr"] is None


def test_loss_diff_starts_a_resumed_runs_windows_and_clock_where_it_resumed(tmp_path):
    """A run resumed after step 35 logs its first window at step 40 over steps 36-40 only (README, resuming): that
    window is its own, not steps 1-40, so it matches no window of the run that went on; its learning rates start
    from the logged training time at the resume and equal the unbroken run's step for step."""
    import loss_diff

    schedule = {"ITERATIONS": "60", "LR_WARMUP_STEPS": "5", "WARMDOWN_FRAC": "0.5", "WARMDOWN_SHAPE": "linear",
                "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "10", "QUANT_METHOD": "gptq"}
    losses = [3.0 - 0.01 * s for s in range(60)]
    whole = _train_log("a", losses, 10, ms_per_step=7, schedule=schedule)
    head, _, steps = whole.partition("step:0/100 val_loss:7.0000 val_bpb:4.0000 train_time:0ms\n")
    resumed_lines = ["resume: state.pt after step 35 (245ms trained, 0 stream tokens read); the settings are the "
                     "same as then", f"step:40/100 train_loss:{sum(losses[35:40]) / 5:.6f} train_time:280ms "
                     "step_avg:7.00ms tok/s:1"]
    resumed_lines += [line for line in steps.splitlines() if int(line.split("/")[0][5:]) > 40]
    (tmp_path / "a.txt").write_text(whole)
    (tmp_path / "b.txt").write_text(head.replace("run_id:a", "run_id:b") + "\n".join(resumed_lines) + "\n")
    a, b = (loss_diff.read_train_log(tmp_path / f"{r}.txt") for r in "ab")
    assert sorted(b.windows) == [(36, 40), (41, 50), (51, 60)]
    assert b.windows[(36, 40)] == pytest.approx(sum(losses[35:40]) / 5, abs=1e-6)
    assert sorted(b.rates) == list(range(36, 61)) and b.rates == {s: a.rates[s] for s in range(36, 61)}
    [row] = loss_diff.compare(a, b, [(1, 60)])
    assert row["windows"] == 2 and row["steps"] == 20 and row["diff"] == pytest.approx(0.0, abs=1e-6)


def _random_stream(seed: int, n: int, vocab: int, bos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    tokens[torch.rand(n, generator=g) < 0.08] = bos  # documents of about a dozen tokens, some empty
    return tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_artifacts_groupings_match_loops_over_the_stream(seed):
    """tools/compare_artifacts.py: each target's position in its document, its token's frequency rank and the
    per-document figures, against plain loops over a random stream (BOS = 1, with runs of BOS)."""
    import compare_artifacts as ca
    n, vocab, bos = 400, 24, 1
    tokens = _random_stream(seed, n, vocab, bos)
    tokens[0] = 7 if seed == 0 else bos  # a stream that starts inside a document, or at a BOS
    pos = ca.positions_in_document(tokens, bos)
    for t in range(1, n):
        first = max([i for i in range(t) if tokens[i] == bos], default=0)
        assert pos[t] == t - first  # tokens first .. t-1 precede t in its document
    counts = {v: sum(1 for t in range(1, n) if tokens[t] == v) for v in range(vocab)}
    order = sorted(range(vocab), key=lambda v: (-counts[v], v))
    ranks = ca.frequency_ranks(tokens, vocab)
    assert all(ranks[t] == order.index(int(tokens[t])) + 1 for t in range(1, n))
    g = torch.Generator().manual_seed(100 + seed)
    nll_a, nll_b = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    nbytes = torch.randint(1, 5, (n,), generator=g)
    nll_a[0] = nll_b[0] = nbytes[0] = 0
    docs: dict[int, list[int]] = {}
    for t in range(1, n):  # target t belongs to the document token t - 1 is in; a BOS at i opens a document
        doc = sum(1 for i in range(t) if tokens[i] == bos)
        docs.setdefault(doc, []).append(t)
    nats = {d: sum(float(nll_a[t] - nll_b[t]) for t in ts) for d, ts in docs.items()}
    doc_bytes = {d: sum(int(nbytes[t]) for t in ts) for d, ts in docs.items()}
    per_byte = {d: (nats[d] / doc_bytes[d], nats[d]) for d in docs}
    figures = ca.document_figures(tokens, bos, nll_a, nll_b, nbytes)
    assert figures["documents"] == len(docs)
    assert figures["a_better"] == sum(1 for pb, _ in per_byte.values() if pb < 0)
    assert figures["b_better"] == sum(1 for pb, _ in per_byte.values() if pb > 0)
    assert figures["bytes_a_better"] == sum(doc_bytes[d] for d, (pb, _) in per_byte.items() if pb < 0)
    ranked = sorted(docs, key=lambda d: -per_byte[d][0])
    tenth = max(1, len(docs) // 10)
    for key, part in (("worst_tenth", ranked[:tenth]), ("best_tenth", ranked[-tenth:])):
        b = sum(doc_bytes[d] for d in part)
        assert figures[key]["documents"] == tenth and figures[key]["bytes"] == b
        assert figures[key]["bpb_difference"] == pytest.approx(sum(nats[d] for d in part) / (math.log(2) * b))
    assert figures["worst_tenth"]["bpb_difference"] > figures["best_tenth"]["bpb_difference"]
    assert figures["median_bpb_difference"] == pytest.approx(
        sorted(per_byte[d][0] for d in docs)[(len(docs) - 1) // 2] / math.log(2))  # torch's median: the lower one
    rows = ca.split_rows(pos, ca.POSITION_EDGES, nll_a, nll_b, nbytes)
    assert sum(r["targets"] for r in rows) == n - 1 and sum(r["bytes"] for r in rows) == int(nbytes.sum())
    assert sum(r["nll_a"] for r in rows) == pytest.approx(float(nll_a.sum()))
    assert rows[0]["row"] == "1" and rows[0]["targets"] == sum(1 for t in range(1, n) if pos[t] == 1)


def test_compare_artifacts_side_settings_are_evaluation_settings_only():
    """`--a`/`--b` change how one side is scored (EVAL_*, TTT_*, STREAM_*), never what is scored: the data, the
    tokenizer, the number of validation tokens, or a model setting, which would make the targets differ."""
    import compare_artifacts as ca
    assert ca.side_settings("TTT_ENABLED=1 TTT_LR=0.003 EVAL_STRIDE=256", "--a") == {
        "TTT_ENABLED": "1", "TTT_LR": "0.003", "EVAL_STRIDE": "256"}
    assert ca.side_settings("", "--b") == {}
    for text, needle in (("VAL_MAX_TOKENS=4096", "--a: VAL_MAX_TOKENS is not an evaluation setting"),
                         ("DATA_PATH=/x", "--a: DATA_PATH is not an evaluation setting"),
                         ("LAYOUT=AA", "--a: LAYOUT is not an evaluation setting"),
                         ("EVAL_ONLY=1", "--a: EVAL_ONLY is not an evaluation setting"),
                         ("TTT_LR", "--a: 'TTT_LR' is not KEY=VALUE")):
        with pytest.raises(SystemExit, match=needle):
            ca.side_settings(text, "--a")
    with pytest.raises(SystemExit, match="--b: .*TTT_PARAMS"):  # Config's own refusal, named by its side
        ca.side_config({"TTT_PARAMS": "attention"}, "--b", Path("b.pgz"))
    cfg = ca.side_config({"TTT_ENABLED": "1", "TTT_LR": "0.003"}, "--a", Path("a.pgz"))
    assert cfg.ttt_enabled and cfg.ttt_lr == 0.003 and cfg.eval_mode == "window"
    assert ca.describe(cfg).endswith(", TTT sgd lr 0.003, 3 epochs, chunks of 32768, all parameters")
    assert ca.describe(ca.side_config({}, "--b", Path("b.pgz"))) == "windows of 2048, stride 512, no TTT"
    assert ca.describe(ca.side_config({"EVAL_MODE": "stream"}, "--b", Path("b.pgz"))) == "streaming, no TTT"
    assert ca.describe(ca.side_config({"EVAL_STRIDE": "0"}, "--b", Path("b.pgz"))) == "windows of 2048, no TTT"


def _bucket_share_by_loops(tokens: list[int], buckets: int, bos: int) -> float:
    """The mean over occurrences of a pair's share of its bucket, counted pair by pair with the model's hash."""
    hasher = tg.BigramHash(buckets, 1, 1)
    pairs = [(a, b) for a, b in zip(tokens[:-1], tokens[1:]) if b != bos]
    bucket_of = {p: int(hasher.bucket(torch.tensor([p[0]]), torch.tensor([p[1]]))) for p in set(pairs)}
    in_bucket: dict[int, int] = {}
    for p in pairs:
        in_bucket[bucket_of[p]] = in_bucket.get(bucket_of[p], 0) + 1
    return sum(pairs.count(p) / in_bucket[bucket_of[p]] for p in pairs) / len(pairs)


@pytest.mark.parametrize("seed, buckets", [(0, 2), (1, 5), (2, 64), (3, 4096)])
def test_bigram_buckets_share_matches_a_loop_over_the_pairs(seed, buckets):
    """tools/bigram_buckets.py: the pairs as the model forms them (none whose current token is the BOS) and each
    occurrence's share of its bucket, against plain loops; one bucket holds every pair, many hold about one each."""
    import bigram_buckets as bb
    bos = 1
    tokens = _random_stream(seed, 300, 12, bos).tolist()
    prev, cur, counts, at_bos = bb.pair_counts(np.array(tokens, dtype=np.uint16), bos)
    assert at_bos == sum(1 for t in tokens[1:] if t == bos)
    assert sorted(zip(prev.tolist(), cur.tolist())) == sorted({(a, b) for a, b in zip(tokens[:-1], tokens[1:])
                                                               if b != bos})
    assert counts.sum() == len(tokens) - 1 - at_bos
    share = bb.own_share(prev, cur, counts, buckets)
    assert share == pytest.approx(_bucket_share_by_loops(tokens, buckets, bos), rel=1e-12)
    if buckets == 2:  # one bucket for every pair: the share is the sum of squared frequencies
        assert share == pytest.approx(float((counts / counts.sum()) @ (counts / counts.sum())), rel=1e-12)


def test_bigram_buckets_reads_shards_as_one_stream_and_refuses_bad_counts(tmp_path, capsys):
    import bigram_buckets as bb
    from test_data import write_shard
    write_shard(tmp_path / "a.bin", [5, 6, 5, 6])
    write_shard(tmp_path / "b.bin", [5, 1, 5])  # a pair across the two shards: (6, 5)
    assert bb.main([str(tmp_path / "a.bin"), str(tmp_path / "b.bin"), "--buckets", "2,4096"]) == 0
    out = capsys.readouterr().out
    # the stream 5 6 5 6 5 1 5: pairs (5, 6) twice, (6, 5) twice, (1, 5); (5, 1) ends at the BOS
    assert "7 tokens, 5 pairs (1 positions at a BOS left out), 3 distinct" in out
    assert f"| 2 | 3.0 | {(2 / 5) ** 2 + (2 / 5) ** 2 + (1 / 5) ** 2:.3f} |" in out  # one bucket holds all three
    for bad in ("1,4096", "x"):
        with pytest.raises(SystemExit):
            bb.main([str(tmp_path / "a.bin"), "--buckets", bad])
    write_shard(tmp_path / "c.bin", [5, 6], magic=7)
    with pytest.raises(ValueError, match="not a challenge shard"):
        bb.main([str(tmp_path / "c.bin")])


def test_a_submission_names_the_code_its_logs_ran(tmp_path):
    """Each log's last run carries the code that ran at its head: two logs of other code (here the same length) are
    no seeds of one submission, a log without its code or with only log_code.py's line for it is refused, and with
    --script the file shipped must be that code."""
    import argparse

    import make_submission as ms

    logs = {}
    for seed, script in ((1, LOGGED_SCRIPT), (2, LOGGED_SCRIPT), (3, LOGGED_SCRIPT.replace("trained", "trainee"))):
        logs[seed] = tmp_path / f"s{seed}.txt"
        logs[seed].write_text(_run_log(f"s{seed}", _summary_run(seed, log=str(logs[seed]))))
        if seed == 3:
            logs[seed].write_text(_run_log("s3", _summary_run(3, log=str(logs[seed])), script))
    runs = {seed: ms.read_run(path) for seed, path in logs.items()}
    assert runs[1]["code_sha256"] == hashlib.sha256(LOGGED_SCRIPT.encode()).hexdigest() == runs[2]["code_sha256"]
    assert len(LOGGED_SCRIPT) == len(LOGGED_SCRIPT.replace("trained", "trainee")) != 0
    shipped = tmp_path / "train_gpt.py"
    shipped.write_text(LOGGED_SCRIPT)
    args = argparse.Namespace(author="a", github_id="g", name="n", blurb="b", date="2026-11-30", technique="t",
                              script=shipped)
    assert ms.build([runs[1], runs[2]], args)["seeds"] == [1, 2]
    with pytest.raises(ValueError, match="are not seeds of one configuration: code_sha256"):
        ms.build([runs[1], runs[3]], args)
    shipped.write_text(LOGGED_SCRIPT + "# one more line\n")
    with pytest.raises(ValueError, match="is not the code the logs ran"):
        ms.build([runs[1], runs[2]], args)
    two_runs = tmp_path / "two.txt"  # a log of two runs: the last run's code counts
    two_runs.write_text(_run_log("t", _summary_run(1), LOGGED_SCRIPT.replace("trained", "trainee"))
                        + _run_log("t", _summary_run(1)))
    assert ms.read_run(two_runs)["code_sha256"] == runs[1]["code_sha256"]
    bare = tmp_path / "bare.txt"
    bare.write_text(f"run_id:x\nconfig LAYOUT=AAGA\nsummary {json.dumps(_summary_run(1))}\n")
    with pytest.raises(ValueError, match="no copy of the code"):
        ms.read_run(bare)
    stripped = tmp_path / "stripped.txt"
    line = (f"train_gpt.py elided: git blob {'1' * 40}, 99 bytes, sha256 {'2' * 64}, first in commit {'3' * 40}; "
            "tools/log_code.py restore\n")  # as strip writes it, in the script's place
    stripped.write_text(_run_log("x", _summary_run(1), line))
    with pytest.raises(ValueError, match="was elided .*log_code.py restore"):
        ms.read_run(stripped)


def test_a_log_scored_on_part_of_the_validation_split_is_no_submission(tmp_path):
    import make_submission as ms

    log = tmp_path / "p.txt"
    log.write_text(_run_log("p", _summary_run(1, partial_validation=True)))
    with pytest.raises(ValueError, match="scored on part of the validation split"):
        ms.read_run(log)


def test_make_submission_names_a_missing_output_folder(tmp_path):
    log = tmp_path / "s1.txt"
    log.write_text(_run_log("s1", _summary_run(1)))
    cmd = [sys.executable, str(ROOT / "tools" / "make_submission.py"), str(log), "--author", "a", "--github-id", "g",
           "--name", "n", "--technique", "t", "--out", str(tmp_path / "nowhere" / "submission.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1 and "the folder" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("reset", [False, True])
def test_lane_context_is_what_the_stream_scorer_had_read_for_each_target(reset):
    """Against a loop over targets: the lane holding the target's input, the inputs before it in the lane and its
    warmup, and with STREAM_RESET no further back than the latest BOS."""
    import eval_by_context as ebc

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 50, (403,), generator=gen)
    tokens[[0, 17, 18, 150, 301]] = 1  # BOS, two in a row among them
    cfg = tg.Config(eval_mode="stream", stream_lanes=3, stream_warmup=40, stream_reset=reset)
    ctx = ebc.lane_context(tokens, cfg, bos_id=1)
    lanes = tg.stream_lanes(len(tokens), 3)
    for t in range(1, len(tokens)):
        i = t - 1  # the target's input
        s = next(a for a, e in lanes if a <= i < e)
        want = i - s + min(s, 40)
        if reset:
            want = min(want, i - max(j for j in range(i + 1) if tokens[j] == 1))
        assert ctx[t] == want, (t, int(ctx[t]), want)
