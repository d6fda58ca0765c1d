"""Model and optimizers: whole-model causality, parameter routing, Muon's orthogonalization, schedule, EMA."""

import pytest
import torch

import train_gpt as tg

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), grad_accum_steps=1)


def tiny_model(layout="GSGsA", seed=0) -> tg.GPT:
    torch.manual_seed(seed)
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout, "VOCAB_SIZE": "97"})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    for name, p in model.named_parameters():  # give the zero-initialized projections weight, so every path matters
        if p.ndim == 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_model_is_causal():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 48))
    t = 23
    x2 = x.clone()
    x2[:, t:] = torch.randint(0, 97, (2, 48 - t))
    with torch.no_grad():
        d = (model(x) - model(x2)).abs().amax(dim=(0, 2))
    assert d[:t].max() == 0
    assert d[t:].min() > 0


def test_logits_are_softcapped_and_loss_matches_per_token():
    model = tiny_model()
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        logits = model(x)
        per_token = model(x, y, reduction="none")
        mean = model(x, y)
    assert logits.abs().max() <= model.mc.logit_softcap
    assert per_token.shape == (2, 32)
    assert torch.allclose(per_token.mean(), mean, atol=1e-6)
    expect = torch.nn.functional.cross_entropy(logits.view(-1, 97), y.view(-1))
    assert torch.allclose(mean, expect, atol=1e-6)


def test_shared_mixer_is_stored_once_and_used_twice():
    model = tiny_model("GSGs")
    assert len(model.mixers) == 3 and model.layer_mixer == [0, 1, 2, 1]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("mixers.3") for n in names)
    x = torch.randint(0, 97, (1, 16))
    model(x, x).backward()
    assert model.mixers[1].q_proj.weight.grad.abs().sum() > 0


def test_every_parameter_in_exactly_one_optimizer_group():
    model = tiny_model()
    opts = tg.build_optimizers(model, tg.Config.from_env({"PRESET": "tiny"}), CPU)
    owned = [p for o in opts.all() for g in o.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    muon = {id(p) for p in opts.muon.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expect_muon = (p.ndim == 2 and name != "tok_emb.weight" and "a_proj" not in name and "b_proj" not in name
                       and "_conv" not in name)
        assert (id(p) in muon) == expect_muon, name
    conv = model.mixers[0].q_conv.weight  # conv kernels must be trained (an earlier submission never did)
    assert any(conv is p for g in opts.adam.param_groups for p in g["params"])


def test_coverage_check_catches_a_missing_parameter():
    model = tiny_model()
    opts = tg.build_optimizers(model, tg.Config.from_env({"PRESET": "tiny"}), CPU)
    opts.adam.param_groups[1]["params"].pop()
    with pytest.raises(RuntimeError, match="missing"):
        tg.check_optimizer_coverage(model, opts)


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (128, 512)])
def test_newton_schulz_orthogonalizes(shape):
    """G = U diag(s) V^T with singular values spread over [0.02, 1]: the result must be close to U V^T."""
    gen = torch.Generator().manual_seed(1)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    s = torch.logspace(-1.7, 0, k)
    G = 3.0 * U @ torch.diag(s) @ V.T
    X = tg.newton_schulz(G, steps=5)
    sv = torch.linalg.svdvals(X)
    # the quintic iteration trades exactness for speed: singular values land in about [0.68, 1.2], not on 1
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    assert tg.rel_err(X, U @ V.T) < 0.25
    assert tg.rel_err(G / G.norm() * (U @ V.T).norm(), U @ V.T) > 0.5  # the input itself was far from it


def test_newton_schulz_on_a_stack_equals_each_matrix_alone():
    gen = torch.Generator().manual_seed(3)
    for shape in [(5, 24, 40), (3, 40, 24)]:
        G = torch.randn(shape, generator=gen) * torch.tensor([0.1, 1.0, 30.0, 2.0, 5.0][: shape[0]])[:, None, None]
        batched = tg.newton_schulz(G, steps=5)
        for i in range(shape[0]):
            assert torch.allclose(batched[i], tg.newton_schulz(G[i], steps=5), atol=1e-5)


def test_muon_with_mixed_shapes_and_momentum_matches_a_per_matrix_reference():
    """Shapes grouped and batched, Nesterov momentum over three steps: the same as the plain per-matrix update."""
    torch.manual_seed(4)
    shapes = [(16, 32), (32, 16), (16, 32), (8, 8), (16, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = tg.Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.01, rt=CPU)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.9 * bufs[i] + g
            upd = tg.newton_schulz(g + 0.9 * bufs[i], 5) * max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
            ref[i] = ref[i] * (1 - 0.05 * 0.01) - 0.05 * upd
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), r, atol=1e-5)


def test_muon_step_moves_along_the_orthogonalized_momentum():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(16, 32))
    before = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.0, ns_steps=5, weight_decay=0.0, rt=CPU)
    p.grad = torch.randn(16, 32)
    opt.step()
    assert torch.allclose(p.detach(), before - 0.1 * tg.newton_schulz(p.grad, 5), atol=1e-6)


def test_lr_schedule_warmup_flat_warmdown():
    cfg = tg.Config(iterations=1000, max_wallclock_seconds=0, lr_warmup_steps=10, warmdown_frac=0.2)
    assert tg.lr_multiplier(0, 0, cfg) == pytest.approx(0.1)
    assert tg.lr_multiplier(500, 0, cfg) == 1.0
    assert tg.lr_multiplier(900, 0, cfg) == pytest.approx(0.5)
    capped = tg.Config(iterations=10**6, max_wallclock_seconds=100, lr_warmup_steps=0, warmdown_frac=0.2,
                       quant_method="rtn")
    assert tg.lr_multiplier(50, 90.0, capped) == pytest.approx(0.5)  # the wallclock drives the warmdown
    assert tg.lr_multiplier(50, 100.0, capped) == 0.0
    gptq = tg.Config(iterations=10**6, max_wallclock_seconds=100, lr_warmup_steps=0, warmdown_frac=0.2,
                     quant_method="gptq", gptq_reserve_seconds=20)
    assert gptq.train_budget_seconds == 80  # calibration time is reserved inside the cap
    assert tg.lr_multiplier(50, 72.0, gptq) == pytest.approx(0.5)


def test_ema_warms_up_then_averages():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = tg.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # decay min(0.9, 2/11): mostly the new weights
    assert ema.shadow[0].item() == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update()
    ema.copy_to_model()
    assert model.weight.item() == pytest.approx(1.0, abs=1e-6)
