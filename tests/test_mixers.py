"""Sequence mixers: the chunked GDN against the step-by-step recurrence, causality, and the attention window."""

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg


def gdn_inputs(B, T, H, K, V, seed=0, dtype=torch.float64, strong_decay=False, beta_max=1.0):
    """beta_max 2: GDN_NEG_EIGVAL's range, where a step can flip the state along its key."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    beta = beta_max * torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype))
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=dtype)) * (8.0 if strong_decay else 0.3)
    return q, k, v, g, beta


BETA_MAX = pytest.mark.parametrize("beta_max", [1.0, 2.0])


@BETA_MAX
@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 16), (100, 64), (5, 64)])
def test_chunked_matches_recurrence(T, chunk, beta_max):
    q, k, v, g, beta = gdn_inputs(2, T, 3, 8, 6, beta_max=beta_max)
    o_ref, s_ref = tg.gdn_recurrent_reference(q, k, v, g, beta, 8 ** -0.5)
    o, s = tg.gdn_chunked_reference(q, k, v, g, beta, 8 ** -0.5, chunk=chunk)
    assert o.shape == o_ref.shape == (2, T, 3, 6)
    assert torch.allclose(o, o_ref, atol=1e-10, rtol=1e-9)
    assert torch.allclose(s, s_ref, atol=1e-10, rtol=1e-9)


@BETA_MAX
def test_chunked_matches_recurrence_with_strong_decay_and_initial_state(beta_max):
    q, k, v, g, beta = gdn_inputs(1, 50, 2, 8, 8, seed=3, strong_decay=True, beta_max=beta_max)
    s0 = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    o_ref, s_ref = tg.gdn_recurrent_reference(q, k, v, g, beta, 0.5, initial_state=s0)
    o, s = tg.gdn_chunked_reference(q, k, v, g, beta, 0.5, initial_state=s0, chunk=16)
    assert torch.allclose(o, o_ref, atol=1e-10, rtol=1e-9)
    assert torch.allclose(s, s_ref, atol=1e-10, rtol=1e-9)


@BETA_MAX
def test_chunked_gradients_match_recurrence(beta_max):
    inputs = gdn_inputs(1, 40, 2, 8, 4, seed=5, beta_max=beta_max)
    grads = []
    for fn in (tg.gdn_recurrent_reference, lambda *a: tg.gdn_chunked_reference(*a, chunk=16)):
        xs = [t.clone().requires_grad_(True) for t in inputs]
        o, _ = fn(*xs, 0.35)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-8)


@BETA_MAX
def test_splitting_the_sequence_and_carrying_state_is_exact(beta_max):
    q, k, v, g, beta = gdn_inputs(1, 70, 2, 8, 8, seed=7, beta_max=beta_max)
    o_full, s_full = tg.gdn_chunked_reference(q, k, v, g, beta, 0.3, chunk=16)
    o1, s1 = tg.gdn_chunked_reference(q[:, :29], k[:, :29], v[:, :29], g[:, :29], beta[:, :29], 0.3, chunk=16)
    o2, s2 = tg.gdn_chunked_reference(q[:, 29:], k[:, 29:], v[:, 29:], g[:, 29:], beta[:, 29:], 0.3,
                                      initial_state=s1, chunk=16)
    assert torch.allclose(torch.cat([o1, o2], 1), o_full, atol=1e-10)
    assert torch.allclose(s2, s_full, atol=1e-10)


def _first_changed_position(fn, x, t):
    """Runs fn on x and on x with position t (and everything after it) perturbed; returns the outputs' diff per position."""
    y1 = fn(x)
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:])
    y2 = fn(x2)
    return (y1 - y2).abs().flatten(2).amax(-1).amax(0)  # (T,)


@pytest.mark.parametrize("kind", ["gdn", "swa", "attn", "nope"])
def test_mixers_are_causal(kind):
    torch.manual_seed(0)
    D, T, t = 32, 40, 17
    if kind == "gdn":
        mixer = tg.GatedDeltaNet(D, 2, 8, 1.0, 4, "torch")
    else:
        mixer = tg.Attention(D, 4, 2, 8 if kind == "swa" else 0, 0, 10000.0, "sdpa", rope=kind != "nope")
    for p in mixer.parameters():  # the zero-initialized output projection would hide everything
        torch.nn.init.normal_(p, std=0.3)
    diff = _first_changed_position(mixer, torch.randn(2, T, D), t)
    assert diff[:t].max() == 0, "an output before t depends on inputs at or after t"
    assert diff[t:].min() > 0, "outputs from t on should change"


@pytest.mark.parametrize("rope", [True, False])
def test_nope_attention_sees_the_earlier_tokens_as_a_set(rope):
    """Without rotary (layout letter N) the query at t gets the same output when the tokens before it are shuffled;
    with rotary it does not. Without rotary the layer is attention over the normalized projections, nothing else."""
    torch.manual_seed(5)
    D, T, t = 32, 24, 20
    mixer = tg.Attention(D, 4, 2, 0, 0, 10000.0, "sdpa", rope=rope)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, T, D)
    shuffled = x.clone()
    shuffled[:, :t] = x[:, torch.randperm(t)]
    with torch.no_grad():
        same = torch.allclose(mixer(x)[:, t], mixer(shuffled)[:, t], atol=1e-5)
        assert same != rope
        if not rope:
            q, k = (tg.rms_norm(p(x).view(2, T, -1, 8)) for p in (mixer.q_proj, mixer.k_proj))
            v = mixer.v_proj(x).view(2, T, 2, 8)
            expect = mixer.o_proj(tg.attention_reference(q, k, v, 0).reshape(2, T, D))
            assert torch.allclose(mixer(x), expect, atol=1e-5)


def test_swa_window_limits_what_a_query_sees():
    torch.manual_seed(1)
    B, T, H, D, W = 1, 50, 2, 8, 7
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    y = tg.attention_reference(q, k, v, W)
    t = 30
    k2, v2 = k.clone(), v.clone()
    k2[:, : t - W + 1] = torch.randn_like(k2[:, : t - W + 1])  # everything the query at t must not see
    v2[:, : t - W + 1] = torch.randn_like(v2[:, : t - W + 1])
    assert torch.equal(tg.attention_reference(q, k2, v2, W)[:, t], y[:, t])
    k3 = k.clone()
    k3[:, t - W + 1] += 1.0  # the oldest token inside the window does matter
    assert not torch.allclose(tg.attention_reference(q, k3, v, W)[:, t], y[:, t])


def test_swa_reference_equals_explicit_softmax():
    torch.manual_seed(2)
    B, T, H, KV, D, W = 2, 20, 4, 2, 8, 5
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, KV, D), torch.randn(B, T, KV, D)
    y = tg.attention_reference(q, k, v, W)
    kr, vr = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
    for t in range(T):
        lo = max(0, t - W + 1)
        s = torch.einsum("bhd,bshd->bhs", q[:, t], kr[:, lo: t + 1]) / D ** 0.5
        expect = torch.einsum("bhs,bshd->bhd", s.softmax(-1), vr[:, lo: t + 1])
        assert torch.allclose(y[:, t], expect, atol=1e-5)


def test_window_at_least_sequence_is_plain_causal():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    assert torch.allclose(tg.attention(q, k, v, 12, "sdpa"), tg.attention_reference(q, k, v, 0), atol=1e-6)
    assert torch.allclose(tg.attention(q, k, v, 5, "sdpa"), tg.attention_reference(q, k, v, 5), atol=1e-6)


@pytest.mark.parametrize("window", [5, 0])
def test_queries_after_cached_keys_see_the_band_aligned_at_the_end(window):
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 30, 4, 8), torch.randn(2, 30, 2, 8), torch.randn(2, 30, 2, 8)
    full = tg.attention_reference(q, k, v, window)
    for backend in ("sdpa",):
        assert torch.allclose(tg.attention(q[:, -11:], k, v, window, backend), full[:, -11:], atol=1e-6)


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_gdn_mixer_equals_the_layer_written_out_plainly(neg_eigval):
    """The mixer (streaming-capable convolutions, float32 gates) against the same layer written plainly from SPEC 5,
    each projection and each convolution on its own, in float64; with GDN_NEG_EIGVAL beta is twice the sigmoid."""
    torch.manual_seed(6)
    D, H, K = 32, 2, 8
    m = tg.GatedDeltaNet(D, H, K, 1.5, 4, "torch", neg_eigval=neg_eigval).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    B, T = x.shape[:2]

    def branch(proj, conv, dim):
        pre = F.linear(x, proj.weight)
        xp = F.pad(pre, (0, 0, 3, 0))
        out = sum(xp[:, 3 - j: 3 - j + T] * conv.weight[:, 3 - j] for j in range(4))
        return F.silu(out).view(B, T, H, dim)

    q = F.normalize(branch(m.q_proj, m.q_conv, m.k_dim), dim=-1)
    k = F.normalize(branch(m.k_proj, m.k_conv, m.k_dim), dim=-1)
    v = branch(m.v_proj, m.v_conv, m.v_dim)
    beta = (2 if neg_eigval else 1) * torch.sigmoid(F.linear(x, m.b_proj.weight))
    g = -m.A_log.exp() * F.softplus(F.linear(x, m.a_proj.weight) + m.dt_bias)
    o, _ = tg.gdn_recurrent_reference(q, k, v, g, beta, K ** -0.5)
    o = tg.rms_norm(o, m.o_norm_weight) * F.silu(F.linear(x, m.g_proj.weight)).view(B, T, H, m.v_dim)
    expected = F.linear(o.reshape(B, T, -1), m.o_proj.weight)
    # the layer computes q, k, beta, g and the gate in float32 whatever its input dtype
    assert tg.rel_err(m(x), expected) < 1e-6


def test_the_kernel_check_draws_beta_over_the_layers_range():
    """The GPU kernel check compares the kernel with the float64 reference on inputs from _gdn_check_inputs: with
    GDN_NEG_EIGVAL they must reach beta near 2 (a transition near a reflection), without it stay below 1."""
    for flag, lo, hi in ((False, 0.0, 1.0), (True, 1.9, 2.0)):
        mc = tg.ModelConfig.from_config(tg.Config(gdn_neg_eigval=flag))
        beta = tg._gdn_check_inputs(mc, 2, 256, torch.device("cpu"), 0)[4].float()
        assert beta.min() > 0 and lo < beta.max() <= hi, (flag, beta.min(), beta.max())  # bf16 may round to 2


@pytest.mark.parametrize("fault", ["none", "state dropped", "restarts ignored", "state transposed"])
def test_the_streaming_kernel_check_catches_a_kernel_that_mishandles_state_at_the_default_segment(monkeypatch, fault):
    """EVAL_MODE=stream's check runs at STREAM_SEGMENT (32,768): over a whole segment a kernel that dropped the
    carried state, ignored the restarts or read the state transposed (no shape error at K = V) stayed within the
    tolerance (0.8-1.1e-2 here); the first outputs of every piece do not. A faithful float32 "kernel" passes."""
    real = tg.gdn_stream

    def stream(backend, q, k, v, g, beta, scale, S, restarts):
        if backend != "faulty":
            return real(backend, q, k, v, g, beta, scale, S, restarts)
        S = {"state dropped": 0 * S, "state transposed": S.transpose(-1, -2)}.get(fault, S)
        restarts = None if fault == "restarts ignored" else restarts
        return real("torch", *(t.float() for t in (q, k, v, g, beta)), scale, S, restarts)

    monkeypatch.setattr(tg, "gdn_stream", stream)
    mc = tg.ModelConfig.from_config(tg.Config.from_env({"PRESET": "tiny", "GDN_HEADS": "4", "GDN_HEAD_DIM": "32"}))
    errs = tg.gdn_stream_kernel_errors(mc, tg.Config().stream_segment, torch.device("cpu"), impl="faulty")
    tol = tg.Config().kernel_check_tol
    if fault == "none":
        assert max(errs.values()) < 1e-5, errs
    else:
        assert errs["o"] < tol < 0.1 < errs["o_piece_starts"], errs  # the whole segment alone would have passed it


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("H,KV", [(4, 2), (9, 3)])  # two query heads per KV head, and the default's three
def test_xsa_removes_each_heads_component_along_its_own_value(window, H, KV):
    """XSA written out head by head in float64, with the KV heads repeated for the query heads (the grouped view in
    `exclude_self_value` must pair query head h with KV head h // (H/KV) here), against the mixer; without XSA the
    same weights give a different output."""
    torch.manual_seed(3)
    D, T = 8 * H, 14
    hd = D // H
    mixer = tg.Attention(D, H, KV, window, 0, 10000.0, "sdpa", xsa=True).double()
    plain = tg.Attention(D, H, KV, window, 0, 10000.0, "sdpa").double()
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    plain.load_state_dict(mixer.state_dict())
    x = torch.randn(2, T, D, dtype=torch.float64)
    q = tg.rms_norm(mixer.q_proj(x).view(2, T, H, hd))
    k = tg.rms_norm(mixer.k_proj(x).view(2, T, KV, hd))
    v = mixer.v_proj(x).view(2, T, KV, hd)
    q, k = mixer.rotary(q, 0), mixer.rotary(k, 0)
    y = tg.attention_reference(q, k, v, window)  # (2, T, H, hd)
    v_h = v.repeat_interleave(H // KV, dim=2)
    y = y - (y * v_h).sum(-1, keepdim=True) / (v_h * v_h).sum(-1, keepdim=True) * v_h
    assert (y * v_h).sum(-1).abs().max() < 1e-10  # orthogonal to the own value, head by head
    with torch.no_grad():
        out = mixer(x)
        assert torch.allclose(out, mixer.o_proj(y.reshape(2, T, D)), atol=1e-10)
        assert not torch.allclose(out, plain(x), atol=1e-3)


@pytest.mark.parametrize("window", [0, 6])
def test_query_gains_scale_each_heads_logits(window):
    """QK_GAIN_INIT: head h's logits are gain_h * q_h . k / sqrt(head_dim) on the RMS-normed, rotated q and k, written
    out here as a softmax over the allowed keys in float64; gains of 1 give the mixer without gains exactly."""
    torch.manual_seed(5)
    D, H, KV, T = 32, 4, 2, 13
    hd = D // H
    mixer = tg.Attention(D, H, KV, window, 0, 10000.0, "sdpa", qk_gain=1.5).double()
    assert mixer.q_gain.tolist() == [1.5] * H  # started at QK_GAIN_INIT
    plain = tg.Attention(D, H, KV, window, 0, 10000.0, "sdpa").double()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    assert plain.q_gain is None and "q_gain" not in plain.state_dict()
    mixer.load_state_dict({**plain.state_dict(), "q_gain": torch.tensor([0.5, 1.0, 3.0, 6.0], dtype=torch.float64)})
    x = torch.randn(2, T, D, dtype=torch.float64)
    q = mixer.rotary(tg.rms_norm(mixer.q_proj(x).view(2, T, H, hd)), 0)
    k = mixer.rotary(tg.rms_norm(mixer.k_proj(x).view(2, T, KV, hd)), 0).repeat_interleave(H // KV, dim=2)
    v = mixer.v_proj(x).view(2, T, KV, hd).repeat_interleave(H // KV, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * mixer.q_gain[None, :, None, None] / hd ** 0.5
    i = torch.arange(T)
    allowed = (i[None] <= i[:, None]) & ((i[:, None] - i[None] < window) if window else True)
    y = torch.einsum("bhts,bshd->bthd", logits.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    with torch.no_grad():
        out = mixer(x)
        assert torch.allclose(out, mixer.o_proj(y.reshape(2, T, D)), atol=1e-10)
        assert not torch.allclose(out, plain(x), atol=1e-3)
        mixer.q_gain.fill_(1.0)
        assert torch.equal(mixer(x), plain(x))


@pytest.mark.parametrize("xsa", [False, True])
def test_head_gates_scale_each_heads_output_by_a_sigmoid_of_the_input(xsa):
    """ATTN_HEAD_GATE: head h's output (after XSA, if on) times sigmoid(w_h . x) before the output projection, in
    float64 against the same mixer without gates; at w = 0 (the start) exactly half of it."""
    torch.manual_seed(6)
    D, H, KV, T = 32, 4, 2, 11
    hd = D // H
    gated = tg.Attention(D, H, KV, 0, 0, 10000.0, "sdpa", xsa=xsa, head_gate=True).double()
    plain = tg.Attention(D, H, KV, 0, 0, 10000.0, "sdpa", xsa=xsa).double()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    assert plain.head_gate is None and gated.head_gate.weight.abs().sum() == 0
    gated.load_state_dict({**plain.state_dict(), "head_gate.weight": torch.zeros(H, D, dtype=torch.float64)})
    x = torch.randn(2, T, D, dtype=torch.float64)
    captured = {}
    plain.o_proj.register_forward_pre_hook(lambda _m, args: captured.__setitem__("y", args[0]))
    with torch.no_grad():
        out = plain(x)
        assert torch.allclose(gated(x), 0.5 * out, atol=1e-12)  # the output projection is linear
        gated.head_gate.weight.normal_(std=0.5)
        s = torch.sigmoid(x @ gated.head_gate.weight.T)  # (2, T, H)
        y = captured["y"].view(2, T, H, hd) * s[..., None]
        assert torch.allclose(gated(x), plain.o_proj(y.reshape(2, T, D)), atol=1e-12)
        assert not torch.allclose(gated(x), 0.5 * out, atol=1e-3)
