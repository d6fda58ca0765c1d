"""Evaluation: windows score every target exactly once, and the scorer matches a direct per-target computation."""

import math

import pytest
import torch

import train_gpt as tg

from test_model import tiny_model


@pytest.mark.parametrize("n,L,s", [(1000, 128, 32), (1000, 128, 128), (129, 128, 64), (50, 128, 16), (2, 8, 8),
                                   (777, 100, 7), (1001, 100, 100)])
def test_windows_score_every_target_once_with_enough_context(n, L, s):
    windows = tg.make_windows(n, L, s)
    scored = []
    for i, w in enumerate(windows):
        assert 0 < w.length <= L and 0 <= w.score_from < w.length and w.start + w.length <= n - 1
        targets = list(range(w.start + w.score_from + 1, w.start + w.length + 1))
        if i > 0:  # every later window gives each scored target at least L - s tokens of context
            assert all(t - 1 - w.start + 1 >= min(L - s, t) for t in targets)
        scored += targets
    assert scored == list(range(1, n))
    assert all(w.start == i * s for i, w in enumerate(windows))


def test_stride_equal_to_length_is_plain_chunking():
    windows = tg.make_windows(1001, 100, 100)
    assert [(w.start, w.length, w.score_from) for w in windows] == [(i * 100, 100, 0) for i in range(10)]
    windows = tg.make_windows(1050, 100, 100)
    assert windows[-1] == tg.Window(1000, 49, 0)


def direct_score(model, tokens, tables, L, s):
    """Each target scored on its own, with the context its window gives it."""
    nll, nbytes = 0.0, 0
    for w in tg.make_windows(len(tokens), L, s):
        x = tokens[w.start: w.start + w.length]
        logits = model(x[None])[0].double()
        for i in range(w.score_from, w.length):
            y = tokens[w.start + i + 1]
            nll += -torch.log_softmax(logits[i], -1)[y].item()
            nbytes += int(tables.count(x[i: i + 1], y[None]))
    return nll, nbytes


@pytest.mark.parametrize("L,s", [(32, 32), (32, 8)])
def test_scorer_matches_direct_computation(tiny_tokenizer, L, s):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tables = tg.build_byte_tables(sp)
    model = tiny_model(layout="GSG")
    torch.manual_seed(4)
    tokens = torch.randint(4, 97, (203,))
    cfg = tg.Config(eval_seq_len=L, eval_stride=s, eval_batch_tokens=3 * L)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    result = tg.evaluate(model, tokens, tables, cfg, rt)
    with torch.no_grad():
        nll, nbytes = direct_score(model, tokens, tables, L, s)
    assert result.tokens == 202
    assert result.bytes == nbytes == int(tables.count(tokens[:-1], tokens[1:]).sum())
    assert result.loss == pytest.approx(nll / 202, rel=1e-6)
    assert result.bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)


def test_sliding_differs_from_plain_but_counts_the_same(tiny_tokenizer):
    import sentencepiece as spm

    tables = tg.build_byte_tables(spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)))
    model = tiny_model(layout="GSG")
    tokens = torch.randint(4, 97, (300,), generator=torch.Generator().manual_seed(5))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    plain = tg.evaluate(model, tokens, tables, tg.Config(eval_seq_len=32, eval_batch_tokens=64), rt)
    slide = tg.evaluate(model, tokens, tables, tg.Config(eval_seq_len=32, eval_stride=4, eval_batch_tokens=64), rt)
    assert (plain.tokens, plain.bytes) == (slide.tokens, slide.bytes)
    assert plain.loss != slide.loss


def test_a_rank_with_no_windows_scores_nothing_and_pads_to_the_shape_asked(tiny_tokenizer):
    """With more ranks than windows a rank's share is empty; TTT pads every chunk's windows to one batch shape."""
    import sentencepiece as spm

    tables = tg.build_byte_tables(spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)))
    model = tiny_model(layout="GSG")
    tokens = torch.randint(4, 97, (300,), generator=torch.Generator().manual_seed(5))
    cfg = tg.Config(eval_seq_len=32, eval_stride=8, eval_batch_tokens=256)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    empty = tg.Tally(rt.device)
    tg.score_windows(model, tokens, [], tables, cfg, rt, empty)
    assert int(empty.count) == 0
    shapes, forward = [], model.forward
    model.forward = lambda x, *a, **k: shapes.append(tuple(x.shape)) or forward(x, *a, **k)
    windows = tg.make_windows(len(tokens), 32, 8)[:3]
    tg.score_windows(model, tokens, windows, tables, cfg, rt, tg.Tally(rt.device), pad_to=5)
    assert shapes == [(5, 32)]


def test_a_result_whose_targets_or_bytes_miss_the_stream_is_refused(tiny_tokenizer):
    """Tally.result checks the scored targets against the stream's count and their bytes against its table bytes,
    so a scorer that skipped a target, or counted one target's bytes with the wrong previous token, cannot report."""
    import sentencepiece as spm

    tables = tg.build_byte_tables(spm.SentencePieceProcessor(model_file=str(tiny_tokenizer)))
    a, b = torch.nonzero(tables.has_leading_space).flatten()[:2].tolist()   # pieces that start a word
    tokens = torch.tensor([1, a, b, a, 1, b, a, b])
    x, y = tokens[None, :-1], tokens[None, 1:]
    pos, nll = torch.arange(1, 8)[None], torch.ones(1, 7)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    good = tg.Tally(rt.device)
    good.add(nll, x, y, torch.ones(1, 7, dtype=torch.bool), tables, pos)
    assert good.result(rt, tokens, tables, 0.0).bytes == int(tables.count(tokens[:-1], tokens[1:]).sum())
    skipped = tg.Tally(rt.device)
    skipped.add(nll, x, y, torch.arange(7)[None] != 3, tables, pos)
    with pytest.raises(RuntimeError, match="scored 6 targets, expected 7"):
        skipped.result(rt, tokens, tables, 0.0)
    shifted = tg.Tally(rt.device)  # every target's previous token taken as BOS: no leading spaces counted
    shifted.add(nll, torch.ones_like(x), y, torch.ones(1, 7, dtype=torch.bool), tables, pos)
    expected = int(tables.count(tokens[:-1], tokens[1:]).sum())
    assert int(shifted.bytes) < expected
    with pytest.raises(RuntimeError, match=f"counted {int(shifted.bytes)} bytes, the stream's targets hold {expected}"):
        shifted.result(rt, tokens, tables, 0.0)
