"""Data: shard reader errors, the train loader's split over ranks, and canonical byte counting."""

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg

from conftest import synthetic_text, train_tokenizer


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_reads_a_good_shard(tmp_path):
    tokens = np.arange(1000) % 300
    assert np.array_equal(tg.read_shard(write_shard(tmp_path / "s.bin", tokens)), tokens)


@pytest.mark.parametrize("kind,needle", [
    ("missing", "does not exist"), ("magic", "magic 1234"), ("version", "version 7"),
    ("truncated", "truncated or corrupt"), ("short", "shorter than its 1024-byte header"),
])
def test_bad_shards_raise_clear_errors(tmp_path, kind, needle):
    path = tmp_path / "s.bin"
    if kind == "magic":
        write_shard(path, [1, 2, 3], magic=1234)
    elif kind == "version":
        write_shard(path, [1, 2, 3], version=7)
    elif kind == "truncated":
        write_shard(path, [1, 2, 3], count=10)
    elif kind == "short":
        path.write_bytes(b"\0" * 100)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        tg.read_shard(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_data_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        tg.shard_files(str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="no fineweb_val_"):
        tg.shard_files(str(tmp_path), "val")


def test_train_shards_without_tokens_are_refused(tmp_path):
    # valid headers, zero tokens: the stream would wait forever for its first batch
    files = [write_shard(tmp_path / f"fineweb_train_00000{i}.bin", []) for i in range(2)]
    assert tg.count_tokens(files) == 0
    with pytest.raises(ValueError, match="hold no tokens") as err:
        tg.TokenStream(files, seed=0)
    assert str(files[0]) in str(err.value)
    write_shard(files[1], [1, 2, 3])  # one shard with tokens is enough
    assert tg.count_tokens(files) == 3 and list(tg.TokenStream(files, seed=0).take(5)) == [1, 2, 3, 1, 2]


def test_tokenizer_must_match_vocab_size(tiny_data):
    cfg = tg.Config(tokenizer_path=tiny_data["tokenizer_path"], vocab_size=1024)
    with pytest.raises(ValueError, match="has 320 pieces but VOCAB_SIZE=1024"):
        tg.load_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(tg.Config(tokenizer_path="/nonexistent.model"))


def test_val_shards_are_read_in_order_as_one_stream(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", [1, 7, 8])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 4, 5, 6])
    write_shard(tmp_path / "fineweb_train_000000.bin", [9, 9, 9])  # no training token among them
    tokens = tg.load_val_tokens(tg.Config(data_path=str(tmp_path), vocab_size=320))
    assert tokens.tolist() == [1, 4, 5, 6, 1, 7, 8]
    assert tg.load_val_tokens(tg.Config(data_path=str(tmp_path), vocab_size=320, val_max_tokens=5)).tolist() == [
        1, 4, 5, 6, 1]


def test_val_tokens_beyond_vocab_are_rejected(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 900])
    with pytest.raises(ValueError, match="token id 900 >= VOCAB_SIZE=320"):
        tg.load_val_tokens(tg.Config(data_path=str(tmp_path), vocab_size=320))


@pytest.mark.parametrize("tokens, max_tokens, needle", [
    ([], 0, "hold 0 token(s): at least 2"), ([1], 0, "hold 1 token(s): at least 2"),
    ([1, 5, 6], 1, "hold 1 token(s) (VAL_MAX_TOKENS=1): at least 2"),
])
def test_val_shards_without_a_target_are_refused_when_read(tmp_path, tokens, max_tokens, needle):
    """Refused before training: every evaluation would fail after it (0 targets scored; a division by 0 bytes)."""
    path = write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    with pytest.raises(ValueError) as err:
        tg.load_val_tokens(tg.Config(data_path=str(tmp_path), vocab_size=320, val_max_tokens=max_tokens))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_val_shards_of_another_tokenizer_are_refused_though_their_ids_fit(tiny_data, tmp_path):
    """The tiny shards' ids are all below 400, so a 400-piece tokenizer passes the id and size checks; its byte
    tables would count other pieces' bytes. Re-encoding the decoded documents tells them apart."""
    cfg = tg.Config(data_path=tiny_data["data_path"], tokenizer_path=tiny_data["tokenizer_path"], vocab_size=320)
    tables, tokens, line = tg.load_scoring_text(cfg, torch.device("cpu"))
    docs = int((tokens == 1).sum()) - 1                      # whole documents: each followed by a BOS
    assert line == f"tokenizer check: {docs} of {docs} whole validation documents re-encode to their own ids"
    assert 4 <= docs <= 64
    model = train_tokenizer(synthetic_text(7, 300), tmp_path / "other", vocab_size=400)
    other = tg.Config(data_path=tiny_data["data_path"], tokenizer_path=str(model), vocab_size=400)
    assert int(tg.load_val_tokens(other).max()) < 320             # the checks before this one all pass
    with pytest.raises(ValueError, match=r"not written with TOKENIZER_PATH=.*other.model: only \d+ of \d+ doc"):
        tg.load_scoring_text(other, torch.device("cpu"))


def test_the_tokenizer_check_says_when_it_has_too_few_documents(tiny_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    docs = [sp.encode(t) for t in synthetic_text(3, 4, words_per_doc=10)]
    tokens = torch.tensor([i for d in docs for i in [1] + d])   # 4 documents, the last one not known to be whole
    assert tg.check_tokenizer_wrote(sp, tokens, "tiny") == (
        "tokenizer check: not made (only 3 whole validation document(s) without unknown pieces; it needs 4)")
    assert tg.check_tokenizer_wrote(sp, torch.cat([tokens, torch.tensor([1])]), "tiny").startswith(
        "tokenizer check: 4 of 4 ")


def test_loader_gives_each_rank_its_own_contiguous_span(tmp_path):
    stream = np.arange(5000) % 1000
    write_shard(tmp_path / "fineweb_train_000000.bin", stream)
    cfg = tg.Config(data_path=str(tmp_path), train_batch_tokens=256, train_seq_len=16, vocab_size=1000)
    batches = {}
    for rank in range(2):
        rt = tg.Runtime(rank, 2, rank, torch.device("cpu"), grad_accum_steps=4)
        loader = tg.TrainLoader(cfg, rt)
        batches[rank] = [loader.next_batch() for _ in range(3)]
        loader.close()
    span = 256 // 8 + 1  # micro-batch tokens per rank + 1 for the shifted targets
    for step in range(3):
        for rank in range(2):
            x, y = batches[rank][step]
            start = step * 2 * span + rank * span
            assert torch.equal(x.flatten(), torch.from_numpy(stream[start: start + span - 1].astype(np.int64)))
            assert torch.equal(y.flatten(), torch.from_numpy(stream[start + 1: start + span].astype(np.int64)))


def test_a_stream_started_at_an_offset_reads_on_as_one_that_took_those_tokens(tmp_path):
    """RESUME_FROM's stream position: TokenStream(skip=n) goes on where take(n) would have left it, across shard
    ends, an empty shard and whole passes over the text, in the seeded shard order."""
    sizes = (37, 0, 50, 13)
    files = [write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(n) + 100 * i) for i, n in enumerate(sizes)]
    order = [f.name for f in tg.TokenStream(files, seed=3).files]
    assert order != sorted(order)  # the seed reorders them, so the offsets below are counted in its order
    for skip in (0, 1, 36, 37, 50, 87, 99, 100, 101, 250, 1000):
        whole = tg.TokenStream(files, seed=3).take(skip + 120)
        assert np.array_equal(tg.TokenStream(files, seed=3, skip=skip).take(120), whole[skip:]), skip


def test_the_loader_counts_the_stream_tokens_behind_its_batches_and_restarts_there(tmp_path):
    """`consumed` (what STATE_PATH records) counts every rank's spans of the batches handed out, not the prefetched
    one; a loader started at it hands out the batches the first would have handed out next."""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000) % 1000)
    cfg = tg.Config(data_path=str(tmp_path), train_batch_tokens=256, train_seq_len=16, vocab_size=1000)
    rt = tg.Runtime(1, 2, 1, torch.device("cpu"), grad_accum_steps=4)
    loader = tg.TrainLoader(cfg, rt)
    first = [loader.next_batch() for _ in range(7)]
    assert loader.consumed == 7 * 2 * (256 // 8 + 1)
    resumed = tg.TrainLoader(cfg, rt, skip=3 * 2 * (256 // 8 + 1))
    assert resumed.consumed == 3 * 2 * (256 // 8 + 1)
    for a, b in zip(first[3:], [resumed.next_batch() for _ in range(4)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    loader.close()
    resumed.close()


def byte_total(sp, tables, text: str) -> int:
    ids = torch.tensor([sp.bos_id()] + sp.encode(text))
    return int(tables.count(ids[:-1], ids[1:]).sum())


TEXTS = ["Hello world, this is 2024 and pi is 3.14159.",
         "Zürich café — naïve résumé; 東京タワー and emoji 🙂🚀!",
         "tabs\tand  double  spaces and\nnew lines\n\nparagraphs",
         "x" * 50 + " 1234567890 " + "Ωμέγα",
         "The 3rd edition (1998) sold 12,500 copies; see pp. 41-44 & footnote 7.",
         " leading space, trailing space "]
ASCII_TEXTS = 4


def check_tokenizer_bytes(model_path) -> int:
    """Summed table bytes == UTF-8 length of the decoded text, for every text the tokenizer encodes without <unk>
    (sp1024 has no byte fallback: an unknown character is 0 bytes by the canonical rule). Returns texts checked."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tables = tg.build_byte_tables(sp)
    checked = 0
    for text in TEXTS + synthetic_text(5, 20):
        ids = sp.encode(text)
        if sp.unk_id() in ids:
            continue
        decoded = sp.decode(ids)  # SentencePiece normalizes whitespace; the bytes scored are those of this text
        assert byte_total(sp, tables, decoded) == len(decoded.encode("utf-8")), decoded
        checked += 1
    return checked


def test_byte_tables_sum_to_utf8_length_tiny_tokenizer(tiny_tokenizer):
    assert check_tokenizer_bytes(tiny_tokenizer) == len(TEXTS) + 20  # byte fallback: nothing is unknown


def test_byte_tables_sum_to_utf8_length_challenge_tokenizers(shared_data):
    assert check_tokenizer_bytes(shared_data / "tokenizers" / "fineweb_8192_bpe.model") == len(TEXTS) + 20
    assert check_tokenizer_bytes(shared_data / "tokenizers" / "fineweb_1024_bpe.model") == ASCII_TEXTS


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_byte_tables_on_the_shared_validation_documents(shared_data, vocab):
    """The first 300 stand-in validation documents: for each one that encodes without <unk>, the summed table bytes
    over [BOS] + ids equal the UTF-8 bytes of the decoded document."""
    import json

    import zstandard

    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / f"fineweb_{vocab}_bpe.model"))
    tables = tg.build_byte_tables(sp)
    with open(shared_data / "corpus" / "val_docs.jsonl.zst", "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    docs = [json.loads(line)["text"] for line in raw.decode().splitlines()[:300]]
    encoded = [sp.encode(d) for d in docs]
    clean = [(d, ids) for d, ids in zip(docs, encoded) if sp.unk_id() not in ids]
    assert len(clean) >= (150 if vocab == 1024 else 300)
    ids = torch.tensor([t for _, e in clean for t in [sp.bos_id()] + e])
    expect = sum(len(sp.decode(e).encode("utf-8")) for _, e in clean)
    assert int(tables.count(ids[:-1], ids[1:]).sum()) == expect


def test_control_and_byte_pieces_follow_the_rules(tiny_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    t = tg.build_byte_tables(sp)
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert t.base_bytes[i] == 0 and t.is_boundary[i]
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert byte_ids and all(t.base_bytes[i] == 1 and not t.has_leading_space[i] for i in byte_ids)
    spaced = [i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1]
    i = spaced[0]  # the leading space is counted in the loop, never in base_bytes
    assert t.base_bytes[i] == len(sp.id_to_piece(i)[1:].encode()) and t.has_leading_space[i]
    bos, word = torch.tensor([1]), torch.tensor([i])
    assert int(t.count(bos, word)) == int(t.base_bytes[i])  # after BOS the space is not a byte of the text
    assert int(t.count(word, word)) == int(t.base_bytes[i]) + 1
