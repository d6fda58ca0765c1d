"""Quantization-aware training (QAT_FRAC): the fake quantization is the export's rounding with a straight-through
gradient, covers exactly the matrices the export stores as ints, switches a compiled model without a recompile, and
is on for the run's last QAT_FRAC only, never while scoring."""

import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import spawn_ranks

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), grad_accum_steps=1)
FEATURES = {"BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "8", "UNET_SKIPS": "1", "XSA_LAST": "1"}


def qat_model(layout: str = "GSGsA", seed: int = 0, **env) -> tuple[tg.GPT, tg.Config]:
    torch.manual_seed(seed)
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout, "VOCAB_SIZE": "97", "QAT_FRAC": "0.5", **env})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    for p in model.parameters():  # the zero-initialized projections get weight, so every matrix matters
        if p.ndim == 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return model, cfg


def test_fake_quantize_is_the_exports_rounding_with_a_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.5, 0.0])[:, None]  # a zero row too
    w[2, 3] = 40.0  # an outlier beyond the clip: clamped
    on, off = torch.ones(()), torch.zeros(())
    for bits, clip in ((6, 10.6), (6, 3.0), (4, 2.5)):
        exported = tg.dequantize_rows(*tg.quantize_rows(w, bits, clip))
        assert torch.equal(tg.fake_quantize(w, on, bits, clip), exported)
        assert torch.equal(tg.fake_quantize(w, off, bits, clip), w)
        assert not torch.equal(exported, w)
        for switch in (on, off):
            leaf = w.clone().requires_grad_()
            upstream = torch.randn_like(w)
            (tg.fake_quantize(leaf, switch, bits, clip) * upstream).sum().backward()
            assert torch.equal(leaf.grad, upstream)


def test_qat_covers_the_int_matrices_and_computes_the_round_to_nearest_exports_forward():
    """With the switch on, the model computes what it would with every int-exported matrix replaced by its
    round-to-nearest export at QAT_CLIP_SIGMAS (the embeddings, int8 in the export, are not fake-quantized)."""
    model, cfg = qat_model(**FEATURES)
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        plain = model(ids)
    names = tg.enable_qat(model, cfg)
    at_qat_clip = tg.Config(**{**cfg.__dict__, "matrix_clip_sigmas": cfg.qat_clip_sigmas})
    frames, records = tg.serialize_state(model.state_dict(), model.mc, at_qat_clip)
    _, exported = tg.deserialize_state(frames, "test")
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    int_matrices = {r["name"] for r in records if r["kind"] == "int"} - embeddings
    assert sorted(names) == sorted(int_matrices) and len(names) > 10
    assert all(r["method"] == "rtn" and r["bits"] == cfg.matrix_bits for r in records if r["name"] in int_matrices)

    reference, _ = qat_model(**FEATURES)
    reference.load_state_dict({**model.state_dict(), **{n: exported[n] for n in int_matrices}})
    with torch.no_grad():
        assert torch.equal(model(ids), plain)  # the switch starts off
        tg.set_qat(model, True)
        quantized = model(ids)
        tg.set_qat(model, False)
        assert torch.equal(model(ids), plain)
        expected = reference(ids)
    assert torch.allclose(quantized, expected, atol=1e-5, rtol=1e-5)
    assert (quantized - plain).abs().max() > 100 * (quantized - expected).abs().max()
    assert not any("qat" in k for k in model.state_dict())  # nothing of QAT reaches checkpoints or artifacts


def test_round_to_fp16_is_the_cast_eager_and_compiled():
    torch.manual_seed(0)
    x = torch.rand(50_000) * 10 ** torch.empty(50_000).uniform_(-9, 4)  # fp16 subnormals (below 2^-14) included
    edges = torch.tensor([tg.MIN_SCALE, 2.0**-24, 2.0**-14, 2.0**-14 * (1 - 2.0**-12), 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                          2047 / 2048, 0.5, 60000.0])  # ties at the 11th bit round to even
    x = torch.cat([x, edges])
    cast = x.half().float()
    assert torch.equal(tg.round_to_fp16(x), cast)
    assert torch.equal(torch.compile(tg.round_to_fp16)(x), cast)
    assert not torch.equal(cast, x)


def test_a_compiled_fake_quantization_is_the_exports_rounding():
    """Inductor drops a cast to fp16 and back, so fake_quantize must not rely on one for the fp16 scales. Compiled,
    a row's std can differ from the eager one in its last bit, which moves a scale that sits on an fp16 midpoint
    to the next fp16 value: a row or two of a matrix may differ by that, every other row must be the export's."""
    model, _ = qat_model()
    w = model.mlps[0].fc.weight.detach()
    exported = tg.dequantize_rows(*tg.quantize_rows(w, 6, 10.6))
    compiled = torch.compile(tg.fake_quantize)(w, torch.ones(()), 6, 10.6)
    unrounded = w.float().std(dim=1, unbiased=False)[:, None] * 10.6 / 31  # scales not rounded to fp16
    rows_off = lambda q: int(((q - exported).abs().amax(dim=1) > 1e-6).sum())  # noqa: E731
    assert rows_off(torch.round(w / unrounded) * unrounded) > w.shape[0] // 2  # the fp16 rounding shows in most rows
    assert rows_off(compiled) <= 2
    scale = tg.row_scales(w, 6, 10.6).float()[:, None]
    assert ((compiled - exported).abs() <= 31 * scale * 2.0**-10 + 1e-7).all()  # within one fp16 step of the scale


@pytest.mark.parametrize("backend", ["count", "inductor"])
def test_the_switch_changes_a_compiled_model_without_a_recompile(backend):
    """The switch is read by the compiled graph: turning it on changes the loss and the gradients to the eager
    model's with QAT on, and dynamo compiles the model once (a Python flag could be specialized into the graph)."""
    model, cfg = qat_model(layout="GSA")
    tg.enable_qat(model, cfg)
    ids, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    graphs = []

    def counting(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting if backend == "count" else "inductor")

    def loss_and_grad(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, targets)
        loss.backward()
        return loss.detach(), model.mlps[0].fc.weight.grad.clone()

    results = []
    for on in (False, True, False, True):
        tg.set_qat(model, on)
        results.append((on, loss_and_grad(compiled), loss_and_grad(model)))
    for on, (c_loss, c_grad), (e_loss, e_grad) in results:
        assert torch.allclose(c_loss, e_loss, rtol=1e-4), on
        assert torch.allclose(c_grad, e_grad, rtol=1e-3, atol=1e-6), on
    assert results[0][2][0] != results[1][2][0]  # the switch changes the loss
    if backend == "count":
        assert len(graphs) == 1


def test_train_switches_qat_on_for_the_last_fraction_and_off_for_validation_and_after(monkeypatch):
    model, cfg = qat_model(QAT_FRAC="0.25", VAL_LOSS_EVERY="10")
    tg.enable_qat(model, cfg)
    seen_by_steps, seen_by_val = [], []
    monkeypatch.setattr(tg, "train_step",
                        lambda *args: seen_by_steps.append(tg.qat_is_on(model)) or torch.tensor(1.0))
    monkeypatch.setattr(tg, "TrainLoader", lambda cfg, rt, skip=0: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(tg, "evaluate", lambda *args: seen_by_val.append(tg.qat_is_on(model))
                        or types.SimpleNamespace(line=lambda tag: f"{tag} val"))
    lines = []
    stats = tg.train(model, None, None, [], cfg, CPU, lines.append, None, None)
    expected = [step / cfg.iterations >= 1 - cfg.qat_frac for step in range(cfg.iterations)]  # no wallclock cap
    assert seen_by_steps == expected and any(expected) and not all(expected)
    assert stats.qat_from_step == expected.index(True)
    assert seen_by_val == [False]  # at step 10, with QAT on before and after it
    assert not tg.qat_is_on(model)
    assert f"qat: fake quantization on from step {expected.index(True)}" in "\n".join(lines)


def _skewed_clock_worker(rank, world, out_dir):
    """train() under a wallclock cap on each rank, with a fake clock that every reading moves on by 1 ms on rank 0
    and 2 ms on rank 1 (rank 1's runs twice as fast); saves the learning-rate multiplier and the QAT switch each
    step trained with, and the step training stopped at."""
    model, cfg = qat_model(QAT_FRAC="0.3", MAX_WALLCLOCK_SECONDS="1", GPTQ_RESERVE_SECONDS="0.5",
                           ITERATIONS="100000", WARMDOWN_FRAC="0.5", LR_WARMUP_STEPS="0")
    tg.enable_qat(model, cfg)
    readings = iter(range(10 ** 9))
    tg.time = types.SimpleNamespace(perf_counter=lambda: next(readings) * 0.001 * (1 + rank))
    seen, lines = [], []
    tg.train_step = lambda *args: seen.append((args[-1], tg.qat_is_on(model))) or torch.tensor(1.0 + 2 * rank)
    tg.TrainLoader = lambda cfg, rt, skip=0: types.SimpleNamespace(close=lambda: None)
    stats = tg.train(model, None, None, [], cfg, tg.Runtime(rank, world, rank, torch.device("cpu"), 1),
                     lines.append, None, None)
    torch.save((seen, stats.steps, stats.stopped_by_cap, stats.train_ms, lines), f"{out_dir}/rank{rank}.pt")


def test_every_rank_reads_the_slowest_clock_for_its_learning_rate_qat_and_stop(tmp_path):
    """Under a cap the schedule reads the clock; ranks whose clocks disagree (each starts its own) must still take
    the same learning rate at every step, switch QAT on at the same step and stop at the same step, or their weights
    drift apart: before the fix each rank's learning rate followed its own clock."""
    spawn_ranks(_skewed_clock_worker, 2, str(tmp_path))
    (seen0, steps0, capped0, ms0, lines0), (seen1, steps1, capped1, ms1, _) = (
        torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert seen0 == seen1 and steps0 == steps1 == len(seen0) and capped0 and capped1
    assert ms0 == ms1 > 0, "train_time is the slowest rank's clock, on every rank (rank 1's runs twice as fast)"
    losses = {line.split("train_loss:")[1].split()[0] for line in lines0 if "train_loss:" in line}
    assert losses == {"2.0000"}  # the mean of rank 0's 1.0 and rank 1's 3.0: every rank's batches
    lrs, qat = [lr for lr, _ in seen0], [on for _, on in seen0]
    assert lrs[0] == 1.0 and 0 < lrs[-1] < 0.2 and lrs == sorted(lrs, reverse=True)  # flat, then the warmdown
    assert any(qat) and not all(qat) and qat == sorted(qat)  # switched on once, late, and kept on


def _slowest_clock_worker(rank, world, out_dir):
    torch.save(tg._rank_max([1234.5, 987.25][rank], tg.Runtime(rank, world, rank, torch.device("cpu"), 1)),
               f"{out_dir}/rank{rank}.pt")


def test_the_slowest_clock_is_the_largest_elapsed_time_on_every_rank(tmp_path):
    spawn_ranks(_slowest_clock_worker, 2, str(tmp_path))
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [1234.5, 1234.5]


def test_qat_with_a_wallclock_cap_starts_by_time():
    cfg = tg.Config.from_env({"PRESET": "tiny", "QAT_FRAC": "0.3", "MAX_WALLCLOCK_SECONDS": "110",
                              "GPTQ_RESERVE_SECONDS": "10", "ITERATIONS": "1000"})
    assert tg.run_progress(5, 69.0, cfg) < 1 - cfg.qat_frac <= tg.run_progress(5, 71.0, cfg)  # 70 s of 100 s
    assert tg.run_progress(700, 1.0, cfg) == 0.7  # or by steps, whichever is further


@pytest.mark.parametrize("env,message", [
    ({"QAT_FRAC": "1.5"}, "QAT_FRAC=1.5 must be in"),
    ({"QAT_FRAC": "-0.1"}, "QAT_FRAC=-0.1 must be in"),
    ({"QAT_FRAC": "0.2", "QAT_CLIP_SIGMAS": "0"}, "QAT_CLIP_SIGMAS=0.0 must be positive"),
    ({"QAT_FRAC": "0.2", "EVAL_ONLY": "1", "ARTIFACT_PATH": "a.pgz"}, "QAT_FRAC acts while training"),
    ({"QAT_FRAC": "0.2", "EXPORT_FROM": "c.pt"}, "QAT_FRAC acts while training"),
])
def test_bad_qat_settings_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        tg.Config.from_env({"PRESET": "tiny", **env})


def test_a_model_without_qat_runs_its_plain_layers():
    model, _ = qat_model()
    x = torch.randn(3, model.mc.model_dim)
    fc = model.mlps[0].fc
    assert fc.qat_bits == 0 and not hasattr(model, "qat_switch") and not tg.qat_is_on(model)
    assert torch.equal(fc(x), F.linear(x, fc.weight))
    with tg.qat_paused(model):  # nothing to pause
        assert not tg.qat_is_on(model)
