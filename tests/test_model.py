"""Model and optimizers: whole-model causality, parameter routing, Muon's orthogonalization, schedule, EMA."""

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import spawn_ranks

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), grad_accum_steps=1)


# BigramHash, SmearGate, U-Net skips, GDN negative eigenvalues, LeakyReLU^2, XSA, query gains, head gates, residual
# mixes with the embedding and branch scales all on (small), for the tests that must hold with and without them
FEATURES = {"BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "8", "SMEAR_GATE": "1", "UNET_SKIPS": "1", "GDN_NEG_EIGVAL": "1",
            "MLP_NEG_SLOPE": "0.5", "XSA_LAST": "2", "QK_GAIN_INIT": "2.5", "ATTN_HEAD_GATE": "1", "RESID_MIX": "1",
            "BRANCH_SCALES": "1"}


def tiny_model(layout="GSGsA", seed=0, **env) -> tg.GPT:
    torch.manual_seed(seed)
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout, "VOCAB_SIZE": "97", **env})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    for name, p in model.named_parameters():  # give the zero-initialized projections weight, so every path matters
        if p.ndim == 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
        if name in ("resid_mix", "branch_scale"):  # off their identity start, so that they act
            with torch.no_grad():
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layout", ["GSGsA", "NGnA", "GPAp"])
def test_model_is_causal(layout):
    model = tiny_model(layout)
    x = torch.randint(0, 97, (2, 48))
    t = 23
    x2 = x.clone()
    x2[:, t:] = torch.randint(0, 97, (2, 48 - t))
    with torch.no_grad():
        d = (model(x) - model(x2)).abs().amax(dim=(0, 2))
    assert d[:t].max() == 0
    assert d[t:].min() > 0


@pytest.mark.parametrize("layout", ["N", "A"])
def test_a_model_built_with_n_has_no_position_encoding(layout):
    """One layer: with N the logits at t see the tokens before t as a set (shuffling them changes nothing); with A
    (rotary) they see the order."""
    model = tiny_model(layout)
    x = torch.randint(0, 97, (2, 24))
    t = 20
    shuffled = x.clone()
    shuffled[:, :t] = x[:, torch.randperm(t)]
    with torch.no_grad():
        same = torch.allclose(model(x)[:, t], model(shuffled)[:, t], atol=1e-5)
    assert same == (layout == "N")


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
    calls = {i: 0 for i in range(len(model.mixers))}
    for i, mixer in enumerate(model.mixers):
        mixer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randint(0, 97, (1, 16))
    model(x, x).backward()
    assert calls == {0: 1, 1: 2, 2: 1}  # layers 1 and 3 both ran the one stored S mixer
    assert model.mixers[1].q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("unet", ["0", "1"])
def test_repeated_group_runs_the_same_layers_again(unet):
    """'G(SA)2' stores the weights of 'GSA' once and runs layers 0 1 2 1 2: written out with the plain model's
    modules, the outputs agree; both passes' uses reach the shared weights' gradients. With U-Net skips (on by
    default), the stream after layer i of the first half (i < L // 2) is added, times its own per-channel weight
    vector, before layer L - 1 - i: here the outputs of layers 1 and 0 before layers 3 and 4."""
    looped, plain = tiny_model("G(SA)2", UNET_SKIPS=unet), tiny_model("GSA", seed=1, UNET_SKIPS=unet)
    shared = [n for n, _ in plain.named_parameters() if n != "skip_weights"]
    assert [n for n, _ in looped.named_parameters() if n != "skip_weights"] == shared
    missing = looped.load_state_dict({k: plain.state_dict()[k] for k in shared}, strict=False).missing_keys
    assert missing == (["skip_weights"] if unet == "1" else [])
    assert looped.layer_mixer == [0, 1, 2, 1, 2] and looped.layer_mlp == [0, 1, 2, 1, 2]
    n_skips = 2 if unet == "1" else 0
    if n_skips:
        assert looped.skip_weights.shape == (n_skips, 64)
        torch.nn.init.normal_(looped.skip_weights, mean=1.0, std=0.5)  # not all ones: each weight must be the right one
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        x, out = tg.rms_norm(plain.embed(ids)), []
        for layer, i in enumerate((0, 1, 2, 1, 2)):
            if layer >= 5 - n_skips:
                x = x + looped.skip_weights[layer - (5 - n_skips)] * out[5 - 1 - layer]
            x = x + plain.mixers[i](tg.rms_norm(x))
            x = x + plain.mlps[i](tg.rms_norm(x))
            out.append(x)
        logits = F.linear(tg.rms_norm(x), plain.tok_emb.weight)
        logits = plain.mc.logit_softcap * torch.tanh(logits / plain.mc.logit_softcap)
        assert torch.allclose(looped(ids), logits, atol=1e-5)
        assert not torch.allclose(plain(ids), logits, atol=1e-3)  # the second pass matters
    looped(ids, ids).backward()
    one_pass = tiny_model("GSA", seed=1, UNET_SKIPS=unet)
    one_pass(ids, ids).backward()
    assert not torch.allclose(looped.mlps[2].fc.weight.grad, one_pass.mlps[2].fc.weight.grad, atol=1e-6)
    if n_skips:
        assert looped.skip_weights.grad.abs().min() > 0  # every skip weight is used


def test_every_parameter_in_exactly_one_optimizer_group():
    model = tiny_model()
    opts = tg.build_optimizers(model, tg.Config.from_env({"PRESET": "tiny"}), CPU)
    owned = [p for o in opts.all() for g in o.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    muon = {id(p) for p in opts.muon.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expect_muon = (p.ndim == 2 and name not in ("tok_emb.weight", "skip_weights")  # skip_weights: a stack of
                       and "a_proj" not in name and "b_proj" not in name and "_conv" not in name)  # vectors, Adam
        assert (id(p) in muon) == expect_muon, name
    conv = model.mixers[0].q_conv.weight  # conv kernels must be trained (an earlier submission never did)
    assert any(conv is p for g in opts.adam.param_groups for p in g["params"])


def test_unaligned_shapes_names_the_matrices_whose_bf16_matmuls_can_be_slow():
    assert tg.unaligned_shapes(tiny_model("AGA", VOCAB_SIZE="128")) == {}  # 64 wide, MLP 128: all multiples of 8
    # MLP 132 wide (a multiple of 4, like 3.3125 x 576 = 1,908) in all three layers, and a vocabulary of 97
    slow = tg.unaligned_shapes(tiny_model("AGA", MLP_MULT="2.0625"))
    assert slow == {(64, 132): 3, (97, 64): 1, (132, 64): 3}
    assert tg.unaligned_shapes(tiny_model("AGA", VOCAB_SIZE="128", MLP_MULT="2.0625"), align=4) == {}


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


def test_normuon_matches_a_per_matrix_reference():
    """MUON_VARIANT=normuon with weight decay (the default pair) over three steps: the orthogonalized momentum, each
    row over the root of its running mean square, rescaled to the orthogonalized update's norm, after the weights
    shrink by 1 - lr x decay. Written out per matrix, with the same momentum."""
    torch.manual_seed(5)
    shapes = [(16, 32), (32, 16), (16, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    second = [torch.zeros(s[0]) for s in shapes]
    opt = tg.Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.02, rt=CPU, row_beta2=0.8)
    plain = [p.detach().clone() for p in params]
    for _ in range(3):
        grads = [torch.randn(s) * torch.linspace(0.1, 3.0, s[0])[:, None] for s in shapes]  # uneven rows
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.9 * bufs[i] + g
            o = tg.newton_schulz(g + 0.9 * bufs[i], 5)
            second[i] = 0.8 * second[i] + 0.2 * o.square().mean(dim=1)
            n = o / second[i].sqrt()[:, None]
            upd = n * o.norm() / n.norm() * max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
            ref[i] = ref[i] * (1 - 0.05 * 0.02) - 0.05 * upd
            plain[i] = plain[i] * (1 - 0.05 * 0.02) - 0.05 * o * max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
    for p, r, q in zip(params, ref, plain):
        assert torch.allclose(p.detach(), r, atol=1e-5)
        assert not torch.allclose(p.detach(), q, atol=1e-3)  # not plain Muon (whose momentum it shares)


def test_normuon_evens_out_the_rows_of_one_update():
    """With row_beta2 near 0 the second moment is this step's: every row of the step has the same norm, and the
    step's norm is plain Muon's."""
    torch.manual_seed(6)
    g = torch.randn(16, 32) * torch.linspace(0.01, 5.0, 16)[:, None]
    p, q = torch.nn.Parameter(torch.zeros(16, 32)), torch.nn.Parameter(torch.zeros(16, 32))
    p.grad, q.grad = g.clone(), g.clone()
    tg.Muon([p], lr=1.0, momentum=0.0, ns_steps=5, weight_decay=0.0, rt=CPU, row_beta2=1e-9).step()
    tg.Muon([q], lr=1.0, momentum=0.0, ns_steps=5, weight_decay=0.0, rt=CPU).step()
    rows, plain_rows = p.detach().norm(dim=1), q.detach().norm(dim=1)
    assert rows.max() / rows.min() < 1 + 1e-4 and plain_rows.max() / plain_rows.min() > 1.05
    assert torch.allclose(p.detach().norm(), q.detach().norm(), rtol=1e-5)


def test_normuon_gdn_steps_gdn_matrices_as_normuon_and_the_rest_as_muon():
    """MUON_VARIANT=normuon_gdn: after two steps on the same gradients, every GDN mixer matrix equals the normuon
    model's and differs from plain Muon's; every other Muon matrix (attention, MLPs) equals plain Muon's."""
    models, variants = {}, ("normuon_gdn", "normuon", "muon")
    for variant in variants:
        model = tiny_model()
        opts = tg.build_optimizers(model, tg.Config.from_env({"PRESET": "tiny", "MUON_VARIANT": variant}), CPU)
        gen = torch.Generator().manual_seed(9)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opts.muon.step()
        models[variant] = dict(model.named_parameters())
    muon_names = {n for n, p in models["normuon_gdn"].items() if tg.PARAM_ROUTES[tg.route_index(n, p)][0] == "muon"}
    gdn_names = {n for n in muon_names if n.startswith(("mixers.0.", "mixers.2."))}  # "GSGsA": mixers G, S, G, A
    assert isinstance(model.mixers[2], tg.GatedDeltaNet) and len(gdn_names) == 10  # any copy: same layout
    for name in muon_names:
        mixed, norm, plain = (models[v][name].detach() for v in variants)
        if name in gdn_names:
            assert torch.allclose(mixed, norm, atol=1e-6) and not torch.allclose(mixed, plain, atol=1e-4), name
        else:
            assert torch.allclose(mixed, plain, atol=1e-6) and not torch.allclose(mixed, norm, atol=1e-4), name


MUON_SHAPES = [(16, 32), (32, 16), (16, 32), (8, 8), (16, 32), (32, 16), (16, 32)]


def _muon_worker(rank, world, out_path, row_beta2):
    """Three Muon steps on the same gradients on every rank; rank 0 saves the weights and the largest gap between
    the ranks' weights."""
    import torch.distributed as dist

    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s)) for s in MUON_SHAPES]
    init = torch.cat([p.detach().flatten() for p in params])
    opt = tg.Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.01,
                  rt=tg.Runtime(rank, world, rank, torch.device("cpu"), 1), row_beta2=row_beta2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in params])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save((init, flat, max((g - flat).abs().max().item() for g in gathered)), out_path)


@pytest.mark.parametrize("row_beta2", [0.0, 0.9], ids=["muon", "normuon"])
def test_muon_on_two_ranks_matches_one_rank(tmp_path, row_beta2):
    """Each rank orthogonalizes its run of each shape's matrices (3 of 5 and 1 of 2 here, uneven) and one
    all-reduce shares them: the weights equal one rank's, on both ranks."""
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        spawn_ranks(_muon_worker, world, str(out), row_beta2)
        results[world] = torch.load(out)
    (init, w1, _), (_, w2, spread) = results[1], results[2]
    assert spread == 0.0, "ranks ended with different weights"
    assert (w1 - init).abs().min() > 0  # every weight moved
    assert torch.allclose(w1, w2, atol=1e-6)


def _muon_state_worker(rank, world, out_path, row_beta2):
    """Three Muon steps on the same gradients; every rank saves the state full_state_dict gathers, how many
    matrices' state it held itself, and how many a fresh Muon on these ranks keeps after loading the gathered one."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s)) for s in MUON_SHAPES]
    rt = tg.Runtime(rank, world, rank, torch.device("cpu"), 1)
    opt = tg.Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.01, rt=rt, row_beta2=row_beta2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    held = len(opt.state)
    full = opt.full_state_dict()
    fresh = tg.Muon([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.05, momentum=0.9, ns_steps=5,
                    weight_decay=0.01, rt=rt, row_beta2=row_beta2)
    fresh.load_full_state_dict(full)
    torch.save((full["state"], held, len(fresh.state)), f"{out_path}.{rank}")


@pytest.mark.parametrize("row_beta2", [0.0, 0.9], ids=["muon", "normuon"])
def test_muons_state_gathered_from_two_ranks_is_one_ranks_state(tmp_path, row_beta2):
    """STATE_PATH's Muon state: on two ranks each holds the momentum (and NorMuon's row moments) of its own run of
    each shape; full_state_dict gives every rank the state one rank would hold after the same steps, and a Muon
    loading it keeps its own runs' state only, so a resumed run can gather it again."""
    states = {}
    for world in (1, 2):
        spawn_ranks(_muon_state_worker, world, str(tmp_path / f"world{world}.pt"), row_beta2)
        states[world] = [torch.load(tmp_path / f"world{world}.pt.{r}") for r in range(world)]
    one, held, kept = states[1][0]
    assert held == kept == len(one) == len(MUON_SHAPES)
    keys = {"momentum_buffer", "row_second_moment"} if row_beta2 else {"momentum_buffer"}
    for full, held, kept in states[2]:
        assert 0 < held == kept < len(MUON_SHAPES)  # each rank held and keeps part of the state
        assert sorted(full) == sorted(one)
        for i in one:
            assert set(full[i]) == set(one[i]) == keys
            for key in keys:
                assert torch.allclose(full[i][key], one[i][key], atol=1e-6), (i, key)
    assert sum(held for _, held, _ in states[2]) == len(MUON_SHAPES)


def _ddp_graphs_worker(rank, world, overlap, out_path):
    """Counts the graphs dynamo compiles for a model of two 8 MiB layers (each used twice), compiled, then wrapped
    in DDP by wrap_ddp."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False), torch.nn.Linear(2048, 1024, bias=False)] * 2)
    cfg = tg.Config.from_env({"PRESET": "tiny", "DDP_OVERLAP": overlap})
    ddp = tg.wrap_ddp(torch.compile(model, backend=backend), cfg, tg.Runtime(rank, world, rank, torch.device("cpu"), 1))
    ddp(torch.randn(4, 1024)).sum().backward()
    if rank == 0:
        torch.save(len(graphs), out_path)


def test_ddp_overlap_decides_whether_dynamo_splits_the_compiled_graph(tmp_path):
    """DDP_OVERLAP=1: dynamo's DDPOptimizer cuts the graph where DDP's buckets close (the first at 1 MiB, the others
    at 25 MB; here one cut, 2 graphs); DDP_OVERLAP=0 (default): one graph."""
    counts = {}
    for overlap in ("0", "1"):
        out = tmp_path / f"overlap{overlap}.pt"
        spawn_ranks(_ddp_graphs_worker, 2, overlap, str(out))
        counts[overlap] = torch.load(out)
    assert counts == {"0": 1, "1": 2}


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


@pytest.mark.parametrize("shape,at_half", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - 0.5 ** 0.5)])
def test_warmdown_shapes_fall_from_one_to_zero(shape, at_half):
    cfg = tg.Config(iterations=1000, max_wallclock_seconds=0, lr_warmup_steps=0, warmdown_frac=0.4,
                    warmdown_shape=shape)
    values = [tg.lr_multiplier(s, 0, cfg) for s in range(0, 1001, 10)]
    assert values[:61] == [1.0] * 61 and values[-1] == 0.0  # flat until step 600, then the warmdown
    assert all(a >= b for a, b in zip(values, values[1:])) and len(set(values[60:])) == len(values[60:])
    assert tg.lr_multiplier(800, 0, cfg) == pytest.approx(at_half)  # half way through the warmdown
    assert tg.lr_multiplier(700, 0, cfg) == pytest.approx(tg.WARMDOWN_SHAPES[shape](0.25))


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


def test_ema_decays_agree_until_the_warmup_bound_reaches_them():
    """Below update (10d - 1) / (1 - d) the warmup bound, not EMA_DECAY, sets the decay: two decays above the bound
    average identically (what a 300 s run of about 1,240 steps sees for 0.995 and 0.999), and part once the bound
    passes the smaller one; `describe` says which case a run was in."""
    model = torch.nn.Linear(4, 1, bias=False)
    a, b = tg.EMA(model, decay=0.95), tg.EMA(model, decay=0.99)
    assert (a.binds_from(), b.binds_from()) == (170, 890)
    for t in range(1, 200):
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, 4))
        a.update(), b.update()
        same = torch.equal(a.shadow[0], b.shadow[0])
        assert same == (tg.EMA.warmup_bound(t) <= 0.95), t  # equal decays until the bound passes 0.95
    assert a.describe() == "ema: 199 updates, EMA_DECAY=0.95 in force from update 170"
    assert b.describe().startswith("ema: 199 updates, all under the warmup bound") and "from update 890" in b.describe()
    assert tg.EMA.warmup_bound(a.binds_from() - 1) < 0.95 <= tg.EMA.warmup_bound(a.binds_from())


def test_bigram_and_smear_see_only_the_previous_token_and_never_across_a_bos():
    model = tiny_model(layout="GS", **FEATURES)
    BOS = model.mc.bos_id
    ids = torch.tensor([[5, 9, 9, BOS, 7, 8, 9, 10]])
    base = model.tok_emb(ids)
    x = model.embed(ids)
    none = torch.tensor([[-1]])
    # a BOS, like the first token, is embedded as having no predecessor: nothing from the previous document
    assert torch.allclose(x[0, 3], base[0, 3] + model.bigram(none, ids[:, 3:4])[0, 0], atol=1e-7)
    assert torch.allclose(x[0, 0], base[0, 0] + model.bigram(none, ids[:, :1])[0, 0], atol=1e-7)
    for t in range(1, ids.shape[1]):  # position t depends on ids[t-1] and ids[t] only
        other = torch.full_like(ids, 50)
        other[0, t - 1: t + 1] = ids[0, t - 1: t + 1]
        assert torch.allclose(model.embed(other)[0, t], x[0, t], atol=1e-7), t
    changed = ids.clone()
    changed[0, 2] = 40  # the token before the BOS
    assert torch.allclose(model.embed(changed)[0, 3:], x[0, 3:], atol=1e-7)
    assert not torch.allclose(model.embed(changed)[0, 2], x[0, 2], atol=1e-3)


def test_unet_skips_pair_mirrored_layers_and_zero_weights_remove_them():
    torch.manual_seed(0)
    with_skips = tiny_model(layout="GSGsG", UNET_SKIPS="1")
    plain = tiny_model(layout="GSGsG", UNET_SKIPS="0")
    assert with_skips.n_skips == 2 and with_skips.skip_weights.shape == (2, with_skips.mc.model_dim)
    state = {k: v for k, v in with_skips.state_dict().items() if k != "skip_weights"}
    plain.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 24))
    assert not torch.allclose(with_skips(ids), plain(ids))
    with torch.no_grad():
        with_skips.skip_weights.zero_()
    assert torch.allclose(with_skips(ids), plain(ids), atol=1e-6)
    with torch.no_grad():  # written out: layer 3 adds layer 1's output, layer 4 adds layer 0's
        with_skips.skip_weights.copy_(torch.randn(2, with_skips.mc.model_dim))
        m, w, outs = with_skips, with_skips.skip_weights, []
        x = tg.rms_norm(m.embed(ids))
        for i, j in enumerate(m.layer_mixer):
            if i >= 3:
                x = x + w[i - 3] * outs[4 - i]
            x = x + m.mixers[j](tg.rms_norm(x))
            x = x + m.mlps[i](tg.rms_norm(x))
            outs.append(x)
        logits = F.linear(tg.rms_norm(x), m.tok_emb.weight)
        logits = m.mc.logit_softcap * torch.tanh(logits / m.mc.logit_softcap)
        assert torch.allclose(m(ids), logits, atol=1e-5)
    with_skips.zero_grad()
    with_skips(ids).float().square().mean().backward()
    assert with_skips.skip_weights.grad.abs().sum(dim=1).gt(0).all()


def test_artifacts_from_before_the_new_model_fields_still_load_with_the_features_off():
    cfg = tg.Config.from_env({"PRESET": "tiny"})
    old_fields = {k: v for k, v in tg.ModelConfig.from_config(cfg).__dict__.items()
                  if k not in ("bigram_buckets", "bigram_dim", "smear_gate", "unet_skips", "bos_id", "residual_bf16",
                               "gdn_neg_eigval", "mlp_neg_slope", "xsa_last", "qk_gain_init",
                               "attn_head_gate", "resid_mix", "branch_scales")}
    mc = tg.ModelConfig(**old_fields)
    assert (mc.bigram_buckets, mc.smear_gate, mc.unet_skips, mc.residual_bf16, mc.gdn_neg_eigval, mc.mlp_neg_slope,
            mc.xsa_last, mc.qk_gain_init, mc.attn_head_gate, mc.resid_mix, mc.branch_scales) == (
        0, False, False, False, False, 0.0, 0, 0.0, False, False, False)
    assert tg.Config().residual_bf16  # new runs keep the stream in bf16; old artifacts are rescored as trained


def test_residual_bf16_keeps_the_stream_in_bf16_under_autocast_and_changes_nothing_without_it():
    ids, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    models = {flag: tiny_model(layout="GSA", RESIDUAL_BF16=flag, UNET_SKIPS="1") for flag in ("0", "1")}
    seen = {}
    for flag, model in models.items():  # the dtype of the stream each MLP is fed (its pre-norm keeps the dtype)
        for i, mlp in enumerate(model.mlps):
            mlp.register_forward_pre_hook(lambda _m, args, flag=flag, i=i: seen.__setitem__((flag, i), args[0].dtype))
    with torch.no_grad():
        assert torch.equal(models["0"](ids, targets), models["1"](ids, targets))  # no autocast: fp32 throughout
        assert set(seen.values()) == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = {flag: model(ids, targets).float() for flag, model in models.items()}
            compiled = torch.compile(models["1"], fullgraph=True)(ids, targets).float()
    assert {seen[("1", i)] for i in range(3)} == {torch.bfloat16}
    assert {seen[("0", i)] for i in range(3)} == {torch.float32}
    assert losses["0"] != losses["1"]  # the stream really is rounded differently
    assert abs(losses["0"] - losses["1"]) < 0.02 * losses["0"]
    assert abs(compiled - losses["1"]) < 0.02 * losses["1"]


def test_a_run_stopped_by_the_cap_logs_its_last_partial_window(monkeypatch):
    """The training-loss line is every TRAIN_LOG_EVERY steps; when the wallclock cap ends training between two, the
    steps since the last line get one more, so the log's last training loss is the end of training."""
    import types

    cfg = tg.Config.from_env({"PRESET": "tiny", "TRAIN_LOG_EVERY": "5", "MAX_WALLCLOCK_SECONDS": "1000",
                              "ITERATIONS": "100"})
    losses = iter(range(1, 100))  # step i's loss is i
    monkeypatch.setattr(tg, "train_step", lambda *args: torch.tensor(float(next(losses))))
    monkeypatch.setattr(tg, "TrainLoader", lambda cfg, rt, skip=0: types.SimpleNamespace(close=lambda: None))
    asked = []
    # the clock every rank reads: 0 ms until the cap is hit before step 7
    monkeypatch.setattr(tg, "_rank_max", lambda ms, rt: asked.append(ms) or (1e12 if len(asked) > 7 else 0.0))
    lines = []
    stats = tg.train(None, None, None, [], cfg, CPU, lines.append, None, None)
    assert stats.steps == 7 and stats.stopped_by_cap
    logged = [line.split()[:2] for line in lines if line.startswith("step:")]
    assert logged == [["step:5/100", "train_loss:3.0000"], ["step:7/100", "train_loss:6.5000"]]  # 1..5, then 6, 7
    asked.clear(), lines.clear()
    losses = iter(range(1, 100))
    monkeypatch.setattr(tg, "_rank_max", lambda ms, rt: asked.append(ms) or (1e12 if len(asked) > 10 else 0.0))
    tg.train(None, None, None, [], cfg, CPU, lines.append, None, None)
    assert [line.split()[0] for line in lines if line.startswith("step:")] == ["step:5/100", "step:10/100"]  # no repeat


@pytest.mark.parametrize("layout,xsa_last,expected", [
    ("AGSA", 2, [False, False, True, True]),  # the last two attention mixers, GDN not counted
    ("AGSA", 0, [False, False, False, False]),
    ("AGSA", 9, [True, False, True, True]),  # more than there are: all of them
    ("AGaSs", 2, [True, False, True]),  # a shared mixer is one mixer: XSA in every layer that uses it
])
def test_xsa_last_picks_the_last_attention_mixers(layout, xsa_last, expected):
    model = tiny_model(layout=layout, XSA_LAST=str(xsa_last))
    assert [getattr(m, "xsa", False) for m in model.mixers] == expected


def test_mlp_activation_is_relu_squared_or_leaky_relu_squared():
    torch.manual_seed(0)
    for slope in (0.0, 0.5):
        mlp = tg.MLP(16, 2.0, slope).double()
        torch.nn.init.normal_(mlp.proj.weight)
        x = torch.randn(3, 16, dtype=torch.float64)
        h = x @ mlp.fc.weight.T
        act = torch.where(h > 0, h, slope * h).square()  # written out: negative inputs scaled by the slope
        assert torch.allclose(mlp(x), act @ mlp.proj.weight.T, atol=1e-12)
        assert (h < 0).any() and ((act > 0) & (h < 0)).any() == (slope > 0)


def test_query_gains_one_per_head_of_each_attention_mixer_trained_by_adam():
    """QK_GAIN_INIT: a gain vector in every attention mixer (a shared one counted once), none in GDN mixers, routed
    to Adam's scalar group (and TTT_PARAMS=scalar), every gain reached by the gradient; 0 adds no parameter."""
    model = tiny_model(layout="AGSNa", QK_GAIN_INIT="3")
    gains = {n: p for n, p in model.named_parameters() if n.endswith("q_gain")}
    assert sorted(gains) == ["mixers.0.q_gain", "mixers.2.q_gain", "mixers.3.q_gain"]  # A, S, N; G has none
    assert all(p.tolist() == [3.0] * 4 for p in gains.values())  # the tiny preset's 4 heads
    opts = tg.build_optimizers(model, tg.Config.from_env({"PRESET": "tiny", "QK_GAIN_INIT": "3"}), CPU)
    adam = {id(p) for g in opts.adam.param_groups for p in g["params"]}
    assert all(id(p) in adam for p in gains.values())
    assert all(tg.PARAM_ROUTES[tg.route_index(n, p)][1].startswith("attention query gains") for n, p in gains.items())
    assert {id(p) for p in gains.values()} <= {id(p) for p in tg.ttt_parameters(model, "scalar")}
    ids = torch.randint(0, 97, (2, 24))
    model(ids, ids).backward()
    assert all(p.grad.abs().min() > 0 for p in gains.values())
    plain = tiny_model(layout="AGSNa")
    assert tg.count_parameters(plain) == tg.count_parameters(model) - 3 * 4
    assert not any(n.endswith("q_gain") for n, _ in plain.named_parameters())


def test_head_gates_one_row_per_head_of_each_attention_mixer_trained_by_adam_and_exported_fp16():
    """ATTN_HEAD_GATE: an (H, D) gate projection in every attention mixer (a shared one counted once), none in GDN
    mixers; routed to Adam's scalar group like the GDN's a_proj / b_proj (so fp16 in the artifact, no QAT), every
    row reached by the gradient once the output projection is nonzero."""
    model = tiny_model(layout="AGSNa", ATTN_HEAD_GATE="1")
    gates = {n: p for n, p in model.named_parameters() if n.endswith("head_gate.weight")}
    assert sorted(gates) == ["mixers.0.head_gate.weight", "mixers.2.head_gate.weight", "mixers.3.head_gate.weight"]
    assert all(p.shape == (4, 64) for p in gates.values())  # the tiny preset's 4 heads, 64 wide
    cfg = tg.Config.from_env({"PRESET": "tiny", "ATTN_HEAD_GATE": "1"})
    opts = tg.build_optimizers(model, cfg, CPU)
    adam = {id(p) for g in opts.adam.param_groups for p in g["params"]}
    assert all(id(p) in adam for p in gates.values())
    assert all(tg.quant_plan(n, p, cfg)[0] == "fp16" for n, p in gates.items())
    ids = torch.randint(0, 97, (2, 24))
    model(ids, ids).backward()
    assert all(p.grad.abs().sum(dim=1).min() > 0 for p in gates.values())
    assert tg.count_parameters(tiny_model(layout="AGSNa")) == tg.count_parameters(model) - 3 * 4 * 64
    built = tg.GPT(model.mc, tg.Backends("torch", "sdpa"))  # as built, before tiny_model's random init
    assert all(m.head_gate.weight.abs().sum() == 0 for m in built.mixers
               if isinstance(m, tg.Attention))  # zero at the start: every head at sigmoid(0) = 0.5


BLOCK_SCALARS = {"RESID_MIX": "1", "BRANCH_SCALES": "1"}


def test_residual_mixes_and_branch_scales_start_as_the_model_without_them_and_are_trained_by_adam():
    """RESID_MIX, BRANCH_SCALES: (L, 2, D) vectors per layer as run (a repeated group's passes each have their own),
    at their start the same logits as the model without them, routed to Adam's scalar group (fp16 in the artifact,
    TTT_PARAMS=scalar), every vector reached by the gradient."""
    layout = "G(SA)2"  # 5 layers as run from 3 mixers
    torch.manual_seed(0)
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout, "VOCAB_SIZE": "97", **BLOCK_SCALARS})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    torch.manual_seed(0)
    plain = tg.GPT(tg.ModelConfig.from_config(tg.Config.from_env({"PRESET": "tiny", "LAYOUT": layout,
                                                                    "VOCAB_SIZE": "97"})), tg.Backends("torch", "sdpa"))
    assert model.resid_mix.shape == model.branch_scale.shape == (5, 2, 64)
    assert plain.resid_mix is None and plain.branch_scale is None
    assert tg.count_parameters(model) == tg.count_parameters(plain) + 2 * 5 * 2 * 64
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        for p in model.parameters():  # the same nonzero weights in both (zero projections would hide the layers)
            if p.ndim == 2 and not p.abs().sum():
                torch.nn.init.normal_(p, std=0.05)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in ("resid_mix", "branch_scale")})
        assert torch.equal(model(ids), plain(ids))
    params = {"resid_mix": model.resid_mix, "branch_scale": model.branch_scale}
    opts = tg.build_optimizers(model, cfg, CPU)
    adam = {id(p) for g in opts.adam.param_groups for p in g["params"]}
    assert all(id(p) in adam and tg.quant_plan(n, p, cfg)[0] == "fp16" for n, p in params.items())
    assert {id(p) for p in params.values()} <= {id(p) for p in tg.ttt_parameters(model, "scalar")}
    model(ids, ids).backward()
    assert all(p.grad.abs().sum(dim=-1).min() > 0 for p in params.values())  # every layer's every vector


def test_a_layer_reading_the_embedding_alone_makes_the_layers_before_it_irrelevant():
    """RESID_MIX's meaning: with layer j's weights (a, b) = (0, 1) it reads the normed embedding x0 alone, so no
    weight of the layers before it can change the logits; with both of layer i's BRANCH_SCALES at 0 its mixer and
    MLP add nothing, so their weights cannot either."""
    ids = torch.randint(0, 97, (2, 24))
    model = tiny_model("GSAGA", UNET_SKIPS="0", **BLOCK_SCALARS)
    with torch.no_grad():
        model.resid_mix[2, 0].zero_()
        model.resid_mix[2, 1].fill_(1.0)
        model.branch_scale[3].zero_()
        before = model(ids)
        for m in (model.mixers[0], model.mlps[0], model.mixers[1], model.mlps[1], model.mixers[3], model.mlps[3]):
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(model(ids), before)
        for p in model.mlps[2].parameters():  # a layer after the cut still matters: the test can fail
            p.add_(torch.randn_like(p))
        assert not torch.allclose(model(ids), before)


def test_a_parallel_layer_sums_a_full_attention_and_a_gdn_reading_the_same_input():
    """P: an attention mixer like A's and a GDN mixer like G's side by side, outputs summed; their parameters are the
    two mixers' (routed as in A and G layers: the GDN half's gate projections and convs to Adam, matrices to Muon,
    and under NorMuon on the GDN matrices the GDN half's with them), TTT_PARAMS=gdn adapts the GDN halves too, and
    XSA, query gains and head gates reach the attention half."""
    model = tiny_model("GPAp")
    par = model.mixers[1]
    assert isinstance(par, tg.ParallelMixer) and model.layer_mixer == [0, 1, 2, 1]
    assert isinstance(par.attn, tg.Attention) and par.attn.window == 0 and par.attn.rotary is not None
    assert isinstance(par.gdn, tg.GatedDeltaNet)
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        assert torch.equal(par(x), par.attn(x) + par.gdn(x))
        assert par.attn(x).abs().sum() > 0 and par.gdn(x).abs().sum() > 0  # both halves act (tiny_model's init)
    count = tg.count_parameters
    assert count(par) == count(model.mixers[2]) + count(model.mixers[0])  # an A's and a G's
    routes = {n: tg.PARAM_ROUTES[tg.route_index(n, p)][0] for n, p in model.named_parameters() if n.startswith("mixers.1.")}
    assert routes["mixers.1.gdn.a_proj.weight"] == routes["mixers.1.gdn.q_conv.weight"] == "scalar"
    assert routes["mixers.1.gdn.q_proj.weight"] == routes["mixers.1.attn.q_proj.weight"] == "muon"
    gdn_params = {id(p) for p in [*model.mixers[0].parameters(), *par.gdn.parameters()]}
    assert {id(p) for p in tg.ttt_parameters(model, "gdn")} == gdn_params
    cfg = tg.Config.from_env({"PRESET": "tiny", "LAYOUT": "GPAp", "MUON_VARIANT": "normuon_gdn"})
    normuon = tg.build_optimizers(model, cfg, CPU).muon.param_groups[0]
    assert normuon["row_beta2"] > 0 and id(par.gdn.q_proj.weight) in {id(p) for p in normuon["params"]}
    assert id(par.attn.q_proj.weight) not in {id(p) for p in normuon["params"]}
    gated = tiny_model("GPA", XSA_LAST="2", QK_GAIN_INIT="2", ATTN_HEAD_GATE="1")
    assert gated.mixers[1].attn.xsa and gated.mixers[1].attn.q_gain is not None
    assert gated.mixers[1].attn.head_gate is not None and not hasattr(gated.mixers[1].gdn, "q_gain")
    with pytest.raises(ValueError, match="LAYOUT=GPA has full attention"):
        tg.Config.from_env({"LAYOUT": "GPA", "EVAL_MODE": "stream"})
    assert tg.Config.from_env({"LAYOUT": "AP", "GDN_NEG_EIGVAL": "1", "TTT_PARAMS": "gdn"}).gdn_neg_eigval
