"""Streaming evaluation and score-first TTT: exactness against one long forward, legality, and scoring rules."""

import time

import pytest
import torch

import train_gpt as tg

from conftest import spawn_ranks
from test_model import FEATURES, tiny_model

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
BOS = 1


def tables(vocab=97) -> tg.ByteTables:
    """Synthetic byte tables: token i is (i % 5) bytes, odd tokens carry a leading space; BOS is a boundary."""
    base = torch.arange(vocab) % 5
    base[BOS] = 0
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[BOS] = True
    return tg.ByteTables(base, torch.arange(vocab) % 2 == 1, boundary, BOS)


def stream_of_documents(n_docs, seed, min_len=20, max_len=90):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(4, 97, (int(torch.randint(min_len, max_len, (1,), generator=gen)),), generator=gen)
            for _ in range(n_docs)]
    return torch.cat([torch.cat([torch.tensor([BOS]), d]) for d in docs])


def full_nll(model, tokens):
    with torch.no_grad():
        return model(tokens[None, :-1], tokens[None, 1:], reduction="none")[0].double()


def stream_cfg(**kw):
    base = dict(eval_mode="stream", stream_segment=16, stream_lanes=1, stream_warmup=20, swa_window=16, eval_seq_len=32,
                eval_batch_tokens=256, ttt_enabled=False, ttt_chunk_tokens=64, ttt_seq_len=32, ttt_batch_seqs=2,
                ttt_epochs=1, ttt_lr=0.05)
    return tg.Config(**{**base, **kw})


def tracked(cfg, stream, fn, **kw):
    tokens = stream
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    result = fn(cfg=cfg, tally=tally, tokens=tokens, **kw)
    assert result.tokens == len(tokens) - 1
    assert tally.hits[0] == 0 and (tally.hits[1:] == 1).all(), "every target exactly once"
    return result, tally


@pytest.mark.parametrize("layout", ["GSGs", "G(Sg)2"])
@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("segment", [399, 16, 7])
def test_streaming_equals_one_long_forward(segment, features, layout):
    """One lane, no resets: the carried state (conv tails, GDN state, SWA keys, the previous token for BigramHash
    and SmearGate) makes short segments exact. A repeated group's passes share weights, not state."""
    model = tiny_model(layout=layout, **(FEATURES if features else {}))  # SWA window 16 in the tiny preset
    tokens = stream_of_documents(6, seed=0)[:400]
    expect = full_nll(model, tokens)
    cfg = stream_cfg(stream_segment=segment)
    _, tally = tracked(cfg, tokens, tg.evaluate_stream, model=model, tables=tables(), rt=CPU)
    assert torch.allclose(tally.nll_at[1:], expect, atol=2e-5, rtol=1e-5)


def test_long_stream_does_not_drift():
    model = tiny_model(layout="GSG")
    tokens = stream_of_documents(40, seed=1, min_len=40, max_len=80)[:2500]
    expect = full_nll(model, tokens)
    _, tally = tracked(stream_cfg(stream_segment=64), tokens, tg.evaluate_stream, model=model, tables=tables(),
                       rt=CPU)
    err = (tally.nll_at[1:] - expect).abs()
    assert err.max() < 5e-5 and err[-500:].max() < 5e-5  # no growth towards the end


@pytest.mark.parametrize("features", [False, True])
def test_reset_at_bos_equals_scoring_each_document_alone(features):
    model = tiny_model(layout="GSGs", **(FEATURES if features else {}))
    tokens = stream_of_documents(5, seed=2)
    starts = (tokens == BOS).nonzero().flatten().tolist() + [len(tokens)]
    _, tally = tracked(stream_cfg(stream_reset=True, stream_segment=13), tokens, tg.evaluate_stream, model=model,
                       tables=tables(), rt=CPU)
    for a, b in zip(starts, starts[1:]):
        doc = tokens[a: min(b + 1, len(tokens))]  # the document, and the next BOS as its last target
        alone = full_nll(model, doc)[: b - a if b < len(tokens) else b - a - 1]
        assert torch.allclose(tally.nll_at[a + 1: a + 1 + len(alone)], alone, atol=2e-5)


@pytest.mark.parametrize("warmup", [0, 9, 1000])
@pytest.mark.parametrize("features", [False, True])
def test_lanes_cover_the_stream_and_each_is_one_long_forward(features, warmup):
    """Each lane scores its own span, as one long forward that starts STREAM_WARMUP tokens before the span (never
    before the stream's start): the warmup tokens are context only."""
    tokens = stream_of_documents(30, seed=3)
    lanes = tg.stream_lanes(len(tokens), 7)
    assert len(lanes) == 7 and lanes[0][0] == 0 and lanes[-1][1] == len(tokens) - 1
    assert all(a[1] == b[0] for a, b in zip(lanes, lanes[1:]))
    assert max(e - s for s, e in lanes) - min(e - s for s, e in lanes) <= 1
    model = tiny_model(layout="GSG", **(FEATURES if features else {}))
    cfg = stream_cfg(stream_lanes=7, stream_warmup=warmup)
    _, tally = tracked(cfg, tokens, tg.evaluate_stream, model=model, tables=tables(), rt=CPU)
    for s, e in lanes:
        a = max(0, s - warmup)
        assert torch.allclose(tally.nll_at[s + 1: e + 1], full_nll(model, tokens[a: e + 1])[s - a:], atol=2e-5)
    if warmup:  # and the warmup changes what a later lane's first targets see
        s, e = lanes[3]
        assert not torch.allclose(tally.nll_at[s + 1: s + 4], full_nll(model, tokens[s: e + 1])[:3], atol=1e-3)


@pytest.mark.parametrize("layout", ["GSA", "GSN", "GSP"])
def test_streaming_rejects_full_attention_layers(layout):
    model = tiny_model(layout=layout)
    with pytest.raises(ValueError, match=f"LAYOUT={layout} has full attention"):
        tg.evaluate_stream(model, stream_of_documents(3, 0), tables(), stream_cfg(), CPU)


def test_a_parallel_layer_refuses_a_carried_state_itself():
    """Below the model's refusal above: a P layer's two halves would keep their carried keys and conv tails under
    the same names, each overwriting the other's."""
    model = tiny_model(layout="GPAp")
    mixer = next(m for m in model.mixers if isinstance(m, tg.ParallelMixer))
    x = torch.randn(1, 8, model.mc.model_dim)
    assert mixer(x).shape == x.shape
    with pytest.raises(ValueError, match="a P layer .* cannot stream"):
        mixer(x, {}, tg.StreamContext(layers=[{}]))


MODES = {
    "sliding": dict(eval_mode="window", eval_stride=8),
    "plain": dict(eval_mode="window"),
    "stream": dict(eval_mode="stream", stream_lanes=3),
    "stream_reset": dict(eval_mode="stream", stream_reset=True, stream_lanes=3),
    "sliding_ttt": dict(eval_mode="window", eval_stride=8, ttt_enabled=True),
    "stream_ttt_carry": dict(eval_mode="stream", ttt_enabled=True, ttt_state="carry"),
    "stream_ttt_rebuild": dict(eval_mode="stream", ttt_enabled=True, ttt_state="rebuild"),
}


def run_mode(mode, tokens, seed=0, features=False):
    model = tiny_model(layout="GSGs", seed=seed, **(FEATURES if features else {}))
    cfg = stream_cfg(**MODES[mode])
    fn = tg.evaluate_ttt if cfg.ttt_enabled else tg.evaluate_base
    kw = dict(log=tg.Logger(None)) if cfg.ttt_enabled else {}
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    result = fn(model, tokens, tables(), cfg, CPU, tally=tally, **kw)
    return result, tally


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_future_tokens_never_change_a_probability(mode, features):
    """Two streams equal up to t and different after it: every loss at targets <= t is identical, in every mode."""
    tokens = stream_of_documents(8, seed=4)[:300]
    t = 211  # inside a later TTT chunk, after several adaptations
    other = tokens.clone()
    other[t + 1:] = torch.randint(4, 97, (len(tokens) - t - 1,), generator=torch.Generator().manual_seed(9))
    _, a = run_mode(mode, tokens, features=features)
    _, b = run_mode(mode, other, features=features)
    assert (a.hits[1:] == 1).all() and (b.hits[1:] == 1).all()
    assert torch.equal(a.nll_at[: t + 1], b.nll_at[: t + 1])
    assert not torch.equal(a.nll_at[t + 1:], b.nll_at[t + 1:])


@pytest.mark.parametrize("mode", ["sliding_ttt", "stream_ttt_carry", "stream_ttt_rebuild"])
def test_ttt_trains_only_on_tokens_already_scored(mode, monkeypatch):
    tokens = stream_of_documents(8, seed=5)[:300]
    model = tiny_model(layout="GSGs")
    cfg = stream_cfg(**MODES[mode])
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    trained = []
    real = tg.ttt_adapt

    def spy(model_, opt, params, span, cfg_, rt_, fwd):
        lo = next(i for i in range(len(tokens)) if torch.equal(tokens[i: i + len(span)], span))
        targets = range(lo + 1, lo + len(span))
        assert all(tally.hits[j] == 1 for j in targets), "trained on a token not yet scored"
        trained.append((lo, lo + len(span) - 1, int(tally.hits.sum())))
        return real(model_, opt, params, span, cfg_, rt_, fwd)

    monkeypatch.setattr(tg, "ttt_adapt", spy)
    before = [p.detach().clone() for p in model.parameters()]
    tg.evaluate_ttt(model, tokens, tables(), cfg, CPU, tg.Logger(None), tally=tally)
    assert len(trained) == len(tg.ttt_chunks(len(tokens), cfg)) - 1 >= 3  # every chunk but the last
    assert trained[-1][1] < len(tokens) - 1  # nothing trained on the last chunk
    assert all(a[1] <= b[0] for a, b in zip(trained, trained[1:]))  # in stream order, never overlapping
    assert (tally.hits[1:] == 1).all()  # and no token scored twice
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("state", ["carry", "rebuild"])
def test_stream_ttt_scores_each_chunk_with_the_state_its_setting_names(state):
    """Carry: chunk c is scored on top of the state the lane had reached, built by the weights of earlier chunks.
    Rebuild: after an update, chunk c is exactly a fresh forward of the current weights over the STREAM_WARMUP
    tokens before it and the chunk."""
    tokens = stream_of_documents(8, seed=8)[:300]
    model = tiny_model(layout="GSGs")
    cfg = stream_cfg(**{**MODES["stream_ttt_rebuild"], "ttt_state": state}, stream_warmup=20)
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    errors = []

    def observer(event, lo, hi):
        if event == "score" and lo > 0:  # the weights that just scored the chunk, before they train on it
            a = max(0, lo - cfg.stream_warmup)
            fresh = full_nll(model, tokens[a: hi + 1])[lo - a:]
            errors.append((tally.nll_at[lo + 1: hi + 1] - fresh).abs().max().item())

    tg.evaluate_ttt(model, tokens, tables(), cfg, CPU, tg.Logger(None), observer=observer, tally=tally)
    assert len(errors) >= 3
    if state == "rebuild":
        assert max(errors) < 2e-5
    else:
        assert min(errors) > 1e-4  # the carried state is not the one a rebuild would give


@pytest.mark.parametrize("segment", [16, 21, 48, 100])
def test_stream_ttt_without_updates_equals_one_lane_streaming_for_any_segment(segment):
    """Carried state and no adaptation (TTT_EPOCHS=0): the chunks (64 tokens) walked one after another must score
    as one lane streamed whole, also when STREAM_SEGMENT does not divide the chunk (64 = 3 x 21 + 1: a last piece
    of one token). Padding the last piece to a whole segment once put unscored zeros into the carried state."""
    tokens = stream_of_documents(8, seed=4)[:300]
    model = tiny_model(layout="GSGs")
    ttt = tg.Tally(torch.device("cpu"), track=len(tokens))
    cfg = stream_cfg(ttt_enabled=True, ttt_state="carry", ttt_epochs=0, stream_segment=segment)
    tg.evaluate_ttt(model, tokens, tables(), cfg, CPU, tg.Logger(None), tally=ttt)
    whole = tg.Tally(torch.device("cpu"), track=len(tokens))
    tg.evaluate_stream(model, tokens, tables(), stream_cfg(stream_segment=segment), CPU, tally=whole)
    assert (ttt.hits[1:] == 1).all() and (whole.hits[1:] == 1).all()
    assert (ttt.nll_at - whole.nll_at).abs().max() < 1e-5
    assert (ttt.nll_at[1:] - full_nll(model, tokens)).abs().max() < 2e-5  # and as one long forward


@pytest.mark.parametrize("segment", [16, 21])
def test_stream_ttt_continues_exactly_after_adaptation_stops(segment, monkeypatch):
    """TTT_STATE=rebuild, adaptation stopped (as EVAL_MAX_SECONDS does) once chunk 1 is scored, after one update
    (on chunk 0): chunk 1's state was rebuilt from 20 warmup tokens + 64 (not a multiple of 16), and the later
    chunks continue it with the same, final weights, so they must score as one long forward of those weights from
    the rebuild's first token."""
    tokens = stream_of_documents(8, seed=4)[:300]
    model = tiny_model(layout="GSGs")
    cfg = stream_cfg(ttt_enabled=True, ttt_state="rebuild", stream_segment=segment, eval_max_seconds=1e9)
    asked = []
    monkeypatch.setattr(tg, "_any_rank", lambda over, rt: asked.append(over) or len(asked) >= 2)
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    tg.evaluate_ttt(model, tokens, tables(), cfg, CPU, tg.Logger(None), tally=tally)
    start = 64 - cfg.stream_warmup  # chunk 1 (targets 65..128) was rebuilt from here with the final weights
    ref = full_nll(model, tokens[start:])
    assert (tally.nll_at[65:] - ref[64 - start:]).abs().max() < 2e-5


def test_a_stream_scorer_refuses_to_continue_lanes_that_read_padding():
    model = tiny_model(layout="GSGs")
    tokens = stream_of_documents(8, seed=4)[:300]
    scorer = tg.StreamScorer(model, 2, stream_cfg(), CPU, BOS)
    scorer.run(tokens, [(0, 40), (100, 150)], tables(), None)  # the first lane is shorter: padded
    with pytest.raises(RuntimeError, match="read padding"):
        scorer.run(tokens, [(40, 80), (150, 190)], tables(), None)


def test_ttt_changes_the_score_and_eval_budget_stops_only_adaptation():
    tokens = stream_of_documents(8, seed=6)[:300]
    base, _ = run_mode("sliding", tokens)
    ttt, _ = run_mode("sliding_ttt", tokens)
    assert ttt.tokens == base.tokens and ttt.bytes == base.bytes and ttt.loss != base.loss
    model = tiny_model(layout="GSGs")
    cfg = stream_cfg(**MODES["sliding_ttt"], eval_max_seconds=1e-9)
    lines = []
    log = tg.Logger(None)
    log.__class__ = type("L", (tg.Logger,), {"__call__": lambda self, m, console=True: lines.append(m)})
    stopped = tg.evaluate_ttt(model, tokens, tables(), cfg, CPU, log)
    assert stopped.loss == pytest.approx(base.loss, rel=1e-9)  # no adaptation happened, every token still scored
    assert any("adaptation stops after 0/" in m for m in lines)
    summary = next(m for m in lines if m.startswith("ttt: window mode"))  # no adaptation time to take a median of
    assert "adapted on 0 " in summary and summary.endswith("adaptation none (medians)")


def test_eval_budget_is_not_fooled_by_the_first_chunks_compilation(monkeypatch):
    """The first chunk's scoring includes compiling its shapes; projecting it onto every later chunk stopped
    adaptation before the first chunk in an H100 run that had time for all of them. A fake clock makes the test
    independent of the machine's load: the first scoring takes 1 s, later ones 0.01 s, each adaptation 0.05 s."""
    tokens = stream_of_documents(8, seed=6)[:300]
    clock, calls = [0.0], []
    score, adapt = tg.score_windows, tg.ttt_adapt

    def timed_score(*args, **kw):
        calls.append(1)
        clock[0] += 1.0 if len(calls) == 1 else 0.01  # the first stands in for compilation
        return score(*args, **kw)

    def timed_adapt(*args, **kw):
        clock[0] += 0.05
        return adapt(*args, **kw)

    monkeypatch.setattr(tg, "score_windows", timed_score)
    monkeypatch.setattr(tg, "ttt_adapt", timed_adapt)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    cfg = stream_cfg(**MODES["sliding_ttt"], eval_max_seconds=3.0)
    events = []
    tg.evaluate_ttt(tiny_model(layout="GSGs"), tokens, tables(), cfg, CPU, tg.Logger(None),
                    observer=lambda event, lo, hi: events.append(event))
    chunks = events.count("score")
    assert 4 <= chunks < 30  # a projection from the first chunk alone (>= 4 s) would have stopped adaptation at once
    assert events.count("train") == chunks - 1


def test_compiled_ttt_scores_as_the_eager_model():
    """TTT_COMPILE=1: window scoring and adaptation steps through torch.compile (the module that compile returns
    has no truth value, and switches between eval and train graphs); the same score as eager, in float32."""
    tokens = stream_of_documents(8, seed=6)[:300]
    cfg = stream_cfg(**MODES["sliding_ttt"], compile="1")
    eager_model, compiled_model = tiny_model(layout="GSGs"), tiny_model(layout="GSGs")
    eager = tg.evaluate_ttt(eager_model, tokens, tables(), cfg, CPU, tg.Logger(None))
    fast = tg.evaluate_ttt(compiled_model, tokens, tables(), cfg, CPU, tg.Logger(None),
                           compiled=tg.maybe_compile(compiled_model, cfg, CPU))
    assert fast.tokens == eager.tokens == len(tokens) - 1
    assert fast.loss == pytest.approx(eager.loss, rel=1e-6)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)  # the same adaptation steps


def test_ttt_chunks_cover_windows_in_order():
    cfg = tg.Config(eval_seq_len=32, eval_stride=8, ttt_chunk_tokens=50)
    chunks = tg.ttt_chunks(500, cfg)
    assert chunks[0].lo == 0 and chunks[-1].hi == 499
    assert all(a.hi == b.lo for a, b in zip(chunks, chunks[1:]))
    assert all(c.hi - c.lo >= 50 for c in chunks[:-1])


def _ttt_worker(rank, world, mode, out_path):
    import torch.distributed as dist

    rt = tg.Runtime(rank, world, rank, torch.device("cpu"), 1)
    model = tiny_model(layout="GSGs")
    tokens = stream_of_documents(8, seed=7)[:300]
    # 4 sequences per chunk and 3 per step: two steps per chunk, the second uneven, split 2 + 1 over two ranks
    cfg = stream_cfg(**MODES[mode], ttt_chunk_tokens=128, ttt_batch_seqs=3)
    result = tg.evaluate_ttt(model, tokens, tables(), cfg, rt, tg.Logger(None))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save((result.loss, result.tokens, max((g - flat).abs().max().item() for g in gathered), flat), out_path)


def _eval_worker(rank, world, mode, out_path):
    import torch.distributed as dist

    rt = tg.Runtime(rank, world, rank, torch.device("cpu"), 1)
    tokens = stream_of_documents(8, seed=7)[:300]
    tally = tg.Tally(torch.device("cpu"), track=len(tokens))
    result = tg.evaluate_base(tiny_model(layout="GSGs"), tokens, tables(), stream_cfg(**MODES[mode]), rt, tally)
    for t in (tally.hits, tally.nll_at):  # every rank's targets, position by position
        dist.all_reduce(t)
    if rank == 0:
        torch.save((result.loss, result.tokens, result.bytes, tally.hits, tally.nll_at), out_path)


@pytest.mark.parametrize("mode", ["sliding", "plain", "stream", "stream_reset"])
def test_evaluation_split_over_ranks_scores_every_target_as_one_rank_does(mode, tmp_path):
    """Windows and lanes shared out over 2 and 3 ranks: each target scored once, with the same loss as on one rank
    (so an EVAL_ONLY rescoring on one GPU reproduces an 8-GPU score). Stream mode cuts STREAM_LANES (3) lanes in
    all: before session 60 it cut 3 per rank, and a target's context depended on the number of ranks."""
    results = {}
    for world in (1, 2, 3):
        out = tmp_path / f"world{world}.pt"
        spawn_ranks(_eval_worker, world, mode, str(out))
        results[world] = torch.load(out)
    loss1, n1, bytes1, hits1, nll1 = results[1]
    assert n1 == 299 and hits1[0] == 0 and (hits1[1:] == 1).all()
    for world in (2, 3):
        loss, n, nbytes, hits, nll = results[world]
        assert (n, nbytes) == (n1, bytes1) and torch.equal(hits, hits1)
        assert torch.allclose(nll, nll1, rtol=0, atol=1e-5), f"{world} ranks: {(nll - nll1).abs().max():.2e}"
        assert loss == pytest.approx(loss1, rel=1e-6)


@pytest.mark.parametrize("mode", ["sliding_ttt", "stream_ttt_carry", "stream_ttt_rebuild"])
def test_ttt_on_two_ranks_keeps_weights_identical_and_matches_one_rank(mode, tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        spawn_ranks(_ttt_worker, world, mode, str(out))
        results[world] = torch.load(out)
    (loss1, n1, _, w1), (loss2, n2, spread, w2) = results[1], results[2]
    assert spread == 0.0, "ranks ended with different weights"
    assert n1 == n2 == 299
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert torch.allclose(w1, w2, atol=1e-5)


@pytest.mark.parametrize("which", ["mlp", "scalar", "gdn"])
def test_ttt_adapts_only_the_parameters_ttt_params_selects(which):
    """Score-first TTT with TTT_PARAMS: the selected parameters move, every other one is bit for bit as before."""
    model = tiny_model(layout="GSGs")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = {id(p) for p in tg.ttt_parameters(model, which)}
    cfg = stream_cfg(**MODES["sliding_ttt"], ttt_params=which)
    tg.evaluate_ttt(model, stream_of_documents(8, seed=5)[:300], tables(), cfg, CPU, tg.Logger(None))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    named = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert moved and moved <= named, sorted(moved - named)
