"""Tests for data/make_shards.py and data/cached_challenge_fineweb.py (CPU, offline).

`data/` is a plain folder, not a package, so both tools are loaded by file path.
Expected token streams are computed here straight from sentencepiece, one document
at a time, and shards are parsed here with numpy, independently of the tools' code.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from conftest import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SP1024 = REPO_ROOT.parent / "shared" / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SPEC_MAGIC, SPEC_VERSION, SPEC_HEADER_BYTES = 20240520, 1, 256 * 4  # from SPEC.md section 2


def load_tool(name: str) -> ModuleType:
    """Import data/<name>.py by path."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ms = load_tool("make_shards")
cc = load_tool("cached_challenge_fineweb")


# --------------------------------------------------------------------------- helpers


def synthetic_docs(seed: int, count: int) -> list[str]:
    """Varied documents: long and short, odd whitespace, non-ASCII, one empty."""
    rng = random.Random(seed)
    words = ["the", "model", "shard", "token", "golf", "parameter", "Zürich", "naïve",
             "東京", "🙂", "data", "fine", "web", "byte", "pair", "encoding", "x7", "—"]
    docs = []
    for i in range(count):
        n_words = rng.choice([3, 20, 150, 600])
        text = " ".join(rng.choice(words) for _ in range(n_words))
        if i % 5 == 1:
            text = "  " + text.replace(" data ", "\ndata\t", 3) + "\n\n"
        docs.append(text)
    docs[count // 2] = ""
    return docs


def write_jsonl(path: Path, docs: list[str], compressed: bool) -> Path:
    """Write docs as {"text", "source"} JSON lines, zstd-compressed if asked."""
    payload = "".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(payload) if compressed else payload)
    return path


def expected_stream(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """[bos] + encode(doc) for each doc, concatenated."""
    ids: list[int] = []
    for doc in docs:
        ids += [sp.bos_id()] + sp.encode(doc)
    return np.array(ids, dtype=np.int64)


def parse_shard(path: Path) -> np.ndarray:
    """Parse one shard with numpy and check its header and size against the spec."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:SPEC_HEADER_BYTES], dtype="<i4")
    assert header[0] == SPEC_MAGIC and header[1] == SPEC_VERSION
    assert not header[3:].any()
    assert len(raw) == SPEC_HEADER_BYTES + 2 * int(header[2])
    return np.frombuffer(raw[SPEC_HEADER_BYTES:], dtype="<u2").astype(np.int64)


def split_shards(out_dir: Path, split: str) -> list[Path]:
    """The split's shard files, checking they are numbered 0, 1, 2, ..."""
    files = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    assert [f.name for f in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
    return files


def read_split(out_dir: Path, split: str) -> np.ndarray:
    """Concatenate every shard of a split."""
    return np.concatenate([parse_shard(f) for f in split_shards(out_dir, split)])


def run_tool(tok: Path, out_dir: Path, val: Path, train: Path, *extra: str) -> dict:
    """Run make_shards.main, assert success, return its manifest."""
    argv = ["--tokenizer", str(tok), "--out-dir", str(out_dir), "--val", str(val),
            "--train", str(train), "--threads", "2", "--batch-docs", "7", *extra]
    assert ms.main(argv) == 0
    return json.loads((out_dir / ms.MANIFEST_NAME).read_text())


# --------------------------------------------------------------------------- fixtures


def train_tiny_tokenizer(folder: Path) -> Path:
    """A small BPE model with the challenge's special ids and byte fallback."""
    lines = [line for doc in synthetic_docs(99, 200) for line in doc.splitlines() if line.strip()]
    return train_tokenizer(lines, folder / "tiny")


@pytest.fixture(scope="session", params=["challenge_sp1024", "tiny_trained"])
def tokenizer(request, tmp_path_factory) -> Path:
    """The real sp1024 model (skipped when ../shared/data is absent) and a tiny trained one."""
    if request.param == "challenge_sp1024":
        if not SHARED_SP1024.is_file():
            pytest.skip(f"{SHARED_SP1024} not present")
        return SHARED_SP1024
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def sp(tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer))


@pytest.fixture()
def corpus(tmp_path) -> dict:
    """Val and train JSONL files (plain) plus the documents they hold."""
    val_docs, train_docs = synthetic_docs(1, 12), synthetic_docs(2, 30)
    return {"val_docs": val_docs, "train_docs": train_docs,
            "val": write_jsonl(tmp_path / "val.jsonl", val_docs, False),
            "train": write_jsonl(tmp_path / "train.jsonl", train_docs, False)}


# --------------------------------------------------------------------------- make_shards


def test_write_shard_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=1001)
    path = tmp_path / "fineweb_val_000000.bin"
    ms.write_shard(path, tokens)
    assert np.array_equal(parse_shard(path), tokens)
    assert path.read_bytes()[SPEC_HEADER_BYTES:] == tokens.astype("<u2").tobytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    assert np.array_equal(ms.read_shard(path), tokens)
    with pytest.raises(ValueError, match="65536"):
        ms.write_shard(tmp_path / "bad.bin", [2**16])


def test_tokenizer_is_challenge_compatible(sp, tokenizer):
    ms.check_tokenizer(sp, tokenizer)  # the tool's own check accepts the tokenizers the tests export with


def test_encode_documents_matches_single_encodes(sp, corpus):
    docs = corpus["train_docs"]
    encoded = ms.encode_documents(sp, docs, num_threads=2)
    assert len(encoded) == len(docs)
    for doc, ids in zip(docs, encoded):
        assert ids.dtype == np.uint16
        assert ids.tolist() == [sp.bos_id()] + sp.encode(doc)


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.zst"])
def test_roundtrip_streams(tokenizer, sp, corpus, tmp_path, compressed):
    suffix = ".jsonl.zst" if compressed else ".jsonl"
    val = write_jsonl(tmp_path / f"v{suffix}", corpus["val_docs"], compressed)
    train = write_jsonl(tmp_path / f"t{suffix}", corpus["train_docs"], compressed)
    manifest = run_tool(tokenizer, tmp_path / "out", val, train)
    for split in ("val", "train"):
        docs = corpus[f"{split}_docs"]
        want = expected_stream(sp, docs)
        got = read_split(tmp_path / "out", split)
        assert np.array_equal(got, want)
        assert int((got == sp.bos_id()).sum()) == len(docs)  # one BOS per document
        assert manifest["splits"][split]["docs"] == len(docs)
        assert manifest["splits"][split]["tokens"] == len(want)
    assert manifest["tokenizer"]["vocab_size"] == sp.vocab_size()


@pytest.mark.parametrize("rule", ["quarter", "first_doc", "first_doc_plus_one"])
def test_documents_straddle_small_shards(tokenizer, sp, corpus, tmp_path, rule):
    want = expected_stream(sp, corpus["train_docs"])
    first_doc = 1 + len(sp.encode(corpus["train_docs"][0]))
    # a shard end a quarter of the way in, exactly at the end of the first document,
    # and one token after it (where an off-by-one in the writer would show)
    shard = {"quarter": max(2, len(want) // 4 - 1), "first_doc": first_doc,
             "first_doc_plus_one": first_doc + 1}[rule]
    run_tool(tokenizer, tmp_path / "out", corpus["val"], corpus["train"],
             "--shard-tokens", str(shard))
    files = split_shards(tmp_path / "out", "train")
    sizes = [len(parse_shard(f)) for f in files]
    assert len(files) == math.ceil(len(want) / shard)
    assert sizes[:-1] == [shard] * (len(files) - 1) and 0 < sizes[-1] <= shard
    assert np.array_equal(read_split(tmp_path / "out", "train"), want)
    # the test is only meaningful if some shard starts in the middle of a document
    assert any(parse_shard(f)[0] != sp.bos_id() for f in files[1:])


def test_max_train_tokens_keeps_prefix(tokenizer, sp, corpus, tmp_path, capsys):
    want = expected_stream(sp, corpus["train_docs"])
    limit = len(want) // 3 + 1
    manifest = run_tool(tokenizer, tmp_path / "out", corpus["val"], corpus["train"],
                        "--max-train-tokens", str(limit))
    assert np.array_equal(read_split(tmp_path / "out", "train"), want[:limit])
    assert manifest["splits"]["train"]["tokens"] == limit
    assert manifest["splits"]["train"]["docs"] == int((want[:limit] == sp.bos_id()).sum())
    assert np.array_equal(read_split(tmp_path / "out", "val"),
                          expected_stream(sp, corpus["val_docs"]))
    assert "stopped at --max-train-tokens" in capsys.readouterr().out


def test_max_docs(tokenizer, sp, corpus, tmp_path):
    n_val, n_train = len(corpus["val_docs"]) // 2, len(corpus["train_docs"]) // 3
    run_tool(tokenizer, tmp_path / "out", corpus["val"], corpus["train"],
             "--max-val-docs", str(n_val), "--max-train-docs", str(n_train))
    assert np.array_equal(read_split(tmp_path / "out", "val"),
                          expected_stream(sp, corpus["val_docs"][:n_val]))
    assert np.array_equal(read_split(tmp_path / "out", "train"),
                          expected_stream(sp, corpus["train_docs"][:n_train]))


def test_an_earlier_exports_shards_are_replaced(tokenizer, sp, corpus, tmp_path, capsys):
    """The shards of an earlier export into the folder (its manifest says so) go, those beyond the new count too;
    other files stay."""
    out = tmp_path / "out"
    run_tool(tokenizer, out, corpus["val"], corpus["train"], "--shard-tokens", "64")  # many small shards
    earlier = split_shards(out, "train") + split_shards(out, "val")
    keep = out / "notes.txt"
    keep.write_text("not a shard")
    capsys.readouterr()
    run_tool(tokenizer, out, corpus["val"], corpus["train"])
    assert len(split_shards(out, "train")) == 1 and len(split_shards(out, "val")) == 1
    assert keep.read_text() == "not a shard"
    printed = capsys.readouterr().out
    assert f"replaced {len(earlier) + 1} earlier file(s)" in printed  # the shards and the manifest
    assert np.array_equal(read_split(out, "train"), expected_stream(sp, corpus["train_docs"]))
    assert not list(tmp_path.glob(".out.make_shards*"))  # the working folder is gone


def test_shards_no_manifest_covers_are_not_deleted_without_force(tokenizer, sp, corpus, tmp_path, capsys):
    """Shards without a make_shards manifest (e.g. the challenge's download, in the folder of the docstring's
    example) are refused, untouched; --force replaces them."""
    out = tmp_path / "out"
    out.mkdir()
    foreign = [out / "fineweb_train_000042.bin", out / "fineweb_val_000007.bin"]
    for path in foreign:
        ms.write_shard(path, [1, 2, 3])
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(out), "--val", str(corpus["val"]),
            "--train", str(corpus["train"]), "--threads", "2"]
    assert ms.main(argv) == 1
    assert "holds 2 shard(s) that make_shards.py did not write" in capsys.readouterr().err
    assert all(np.array_equal(ms.read_shard(p), [1, 2, 3]) for p in foreign)
    assert ms.main([*argv, "--force"]) == 0
    assert not any(p.exists() for p in foreign)
    assert np.array_equal(read_split(out, "train"), expected_stream(sp, corpus["train_docs"]))


def test_a_failed_export_leaves_the_folder_as_it_was(tokenizer, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run_tool(tokenizer, out, corpus["val"], corpus["train"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut off\n')
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(out), "--val", str(corpus["val"]), "--train", str(bad)]
    assert ms.main(argv) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.make_shards*"))


def test_a_validation_document_in_the_training_input_is_refused(tokenizer, corpus, tmp_path, capsys):
    """The same file given as --val and --train (or any validation document among the training ones) would have
    the model trained on text it is scored on."""
    out = tmp_path / "out"
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(out), "--val", str(corpus["val"]),
            "--train", str(corpus["train"]), str(corpus["val"])]
    assert ms.main(argv) == 1
    assert "is also a validation document" in capsys.readouterr().err
    assert not split_shards(out, "train") and not (out / ms.MANIFEST_NAME).exists()


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.zst"])
def test_bad_json_names_file_and_line(tokenizer, corpus, tmp_path, capsys, compressed):
    lines = [json.dumps({"text": "fine"}), "", '{"text": "cut off', json.dumps({"text": "x"})]
    payload = ("\n".join(lines) + "\n").encode()
    bad = tmp_path / ("bad.jsonl.zst" if compressed else "bad.jsonl")
    bad.write_bytes(zstandard.ZstdCompressor().compress(payload) if compressed else payload)
    bad_line = lines.index('{"text": "cut off') + 1
    with pytest.raises(ms.CorpusError, match=rf"bad\.jsonl.*line {bad_line}\b"):
        list(ms.iter_documents(bad))
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(tmp_path / "out"),
            "--val", str(bad), "--train", str(corpus["train"])]
    assert ms.main(argv) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and f"line {bad_line}" in err


def test_missing_text_key_names_line(tmp_path):
    path = tmp_path / "no_text.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "oops"}) + "\n")
    with pytest.raises(ms.CorpusError, match=r"no_text\.jsonl: line 2: .*\"text\""):
        list(ms.iter_documents(path))


def test_txt_documents_split_on_blank_lines(tmp_path):
    docs = ["first doc\n  indented second line", "second doc", "  third\twith tab ", "last"]
    separators = ["\n\n", "\n   \n\n", "\n\n"]
    text = docs[0] + "".join(sep + doc for sep, doc in zip(separators, docs[1:])) + "\n"
    path = tmp_path / "docs.txt"
    path.write_text("\n\n" + text, encoding="utf-8")
    assert list(ms.iter_documents(path)) == docs
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\r\n\r\nc\r\n")
    assert list(ms.iter_documents(crlf)) == ["a\r\nb", "c"]


def test_corpus_dir_orders_train_files(tokenizer, sp, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    val_docs, train_a, train_b = synthetic_docs(5, 4), synthetic_docs(6, 5), synthetic_docs(7, 6)
    write_jsonl(corpus_dir / "train_docs_001.jsonl.zst", train_b, True)  # written first on purpose
    write_jsonl(corpus_dir / "train_docs_000.jsonl.zst", train_a, True)
    write_jsonl(corpus_dir / "val_docs.jsonl.zst", val_docs, True)
    out = tmp_path / "out"
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(out), "--corpus-dir", str(corpus_dir)]
    assert ms.main(argv) == 0
    assert np.array_equal(read_split(out, "val"), expected_stream(sp, val_docs))
    assert np.array_equal(read_split(out, "train"), expected_stream(sp, train_a + train_b))


def test_val_only_writes_the_validation_split_alone(tokenizer, sp, corpus, tmp_path, capsys):
    """--val-only: other text to rescore an artifact on. Its validation shards are the bytes a full export writes for
    the same documents, and no training shard is left in the folder, an old one included."""
    full = tmp_path / "full"
    n_val = len(corpus["val_docs"]) // 2
    run_tool(tokenizer, full, corpus["val"], corpus["train"], "--max-val-docs", str(n_val))
    out = tmp_path / "out"
    run_tool(tokenizer, out, corpus["val"], corpus["train"])  # an earlier full export: its training shards must go
    assert split_shards(out, "train")
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(out), "--val", str(corpus["val"]), "--val-only",
            "--max-val-docs", str(n_val), "--threads", "2", "--batch-docs", "7"]
    assert ms.main(argv) == 0
    assert "(no train split: --val-only)" in capsys.readouterr().out
    assert not split_shards(out, "train")
    assert [p.read_bytes() for p in split_shards(out, "val")] == [p.read_bytes() for p in split_shards(full, "val")]
    assert np.array_equal(read_split(out, "val"), expected_stream(sp, corpus["val_docs"][:n_val]))
    manifest = json.loads((out / ms.MANIFEST_NAME).read_text())
    assert list(manifest["splits"]) == list(manifest["inputs"]) == ["val"]
    assert manifest["settings"]["val_only"] is True


@pytest.mark.parametrize("extra, message", [
    (["--train", "TRAIN"], "writes no training split"),
    (["--max-train-docs", "3"], "writes no training split"),
    (["--max-train-tokens", "100"], "writes no training split"),
    (["--corpus-dir", "CORPUS"], "writes no training split"),
    (["NO_VAL"], "needs --val"),
], ids=["train", "max-train-docs", "max-train-tokens", "corpus-dir", "no-val"])
def test_val_only_refuses_what_would_write_or_limit_a_training_split(tokenizer, corpus, tmp_path, capsys, extra,
                                                                       message):
    stand_in = {"TRAIN": str(corpus["train"]), "CORPUS": str(corpus["train"].parent)}
    val = [] if extra == ["NO_VAL"] or "CORPUS" in extra else ["--val", str(corpus["val"])]
    extra = [stand_in.get(a, a) for a in extra if a != "NO_VAL"]
    argv = ["--tokenizer", str(tokenizer), "--out-dir", str(tmp_path / "out"), "--val-only", *val, *extra]
    with pytest.raises(SystemExit) as exc:
        ms.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vocab_too_large_is_rejected():
    class FakeModel:
        def __init__(self, vocab: int, bos: int = 1):
            self.vocab, self.bos = vocab, bos

        def vocab_size(self) -> int:
            return self.vocab

        def bos_id(self) -> int:
            return self.bos

    ms.check_tokenizer(FakeModel(2**16), "ok.model")
    with pytest.raises(ms.CorpusError, match=str(2**16 + 1)):
        ms.check_tokenizer(FakeModel(2**16 + 1), "big.model")
    with pytest.raises(ms.CorpusError, match="nobos.model: the model defines no BOS piece"):
        ms.check_tokenizer(FakeModel(1024, bos=-1), "nobos.model")  # sentencepiece's bos_id() when there is none


# ------------------------------------------------------------------ cached_challenge_fineweb

FAKE_MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
         "stats": {"files_train": 5, "files_val": 2, "tokens_train": 500_000_000}},
        {"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
         "stats": {"files_train": 3, "files_val": 1}},
    ],
    "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        {"name": "sp_bpe_8192", "path": "tokenizers/fineweb_8192_bpe.model"},
    ],
}


def manifest_entry(section: str, name: str) -> dict:
    return next(e for e in FAKE_MANIFEST[section] if e["name"] == name)


def expected_plan(variant: str, train_shards: int, prefix: str, data_dir: Path) -> list:
    """Spell out the plan from the manifest: val shards, first train shards, tokenizer."""
    name = f"fineweb10B_{variant}"
    entry = manifest_entry("datasets", name)
    files = [f"fineweb_val_{i:06d}.bin" for i in range(entry["stats"]["files_val"])]
    files += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    lead = f"{prefix}/" if prefix else ""
    plan = [(f"{lead}datasets/{name}/{f}", data_dir / "datasets" / name / f) for f in files]
    tok = manifest_entry("tokenizers", entry["tokenizer_name"])
    rels = [tok[k] for k in ("model_path", "vocab_path", "path") if k in tok]
    return plan + [(f"{lead}{rel}", data_dir / rel) for rel in rels]


@pytest.mark.parametrize("variant", ["sp1024", "sp8192"])
@pytest.mark.parametrize("prefix", ["datasets", ""])
def test_plan_lists_val_train_prefix_and_tokenizer(tmp_path, variant, prefix):
    n_train = manifest_entry("datasets", f"fineweb10B_{variant}")["stats"]["files_train"] - 1
    plan = cc.plan_downloads(FAKE_MANIFEST, variant, n_train, prefix, tmp_path)
    assert plan == expected_plan(variant, n_train, prefix, tmp_path)


def test_plan_default_layout(tmp_path):
    plan = cc.plan_downloads(FAKE_MANIFEST, "sp1024", 1, "datasets", tmp_path)
    assert plan[0] == ("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                       tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin")
    assert plan[-1] == ("datasets/tokenizers/fineweb_1024_bpe.vocab",
                        tmp_path / "tokenizers" / "fineweb_1024_bpe.vocab")


def test_too_many_train_shards(tmp_path):
    available = manifest_entry("datasets", "fineweb10B_sp1024")["stats"]["files_train"]
    with pytest.raises(cc.PlanError, match=rf"\b{available + 1}\b.*\b{available}\b"):
        cc.plan_downloads(FAKE_MANIFEST, "sp1024", available + 1, "datasets", tmp_path)


def test_unknown_variants(tmp_path):
    with pytest.raises(cc.PlanError, match="fineweb10B_sp2048"):
        cc.plan_downloads(FAKE_MANIFEST, "sp2048", 1, "datasets", tmp_path)
    with pytest.raises(cc.PlanError, match="gpt2"):
        cc.plan_downloads(FAKE_MANIFEST, "gpt2", 1, "datasets", tmp_path)


def test_unsafe_manifest_path_rejected(tmp_path):
    manifest = json.loads(json.dumps(FAKE_MANIFEST))
    manifest["tokenizers"][0]["vocab_path"] = "../../etc/evil"
    with pytest.raises(cc.PlanError, match="evil"):
        cc.plan_downloads(manifest, "sp1024", 1, "datasets", tmp_path)


class FakeHub:
    """Stands in for fetch_from_hub: serves files from a local 'cache' via symlinks."""

    def __init__(self, cache: Path, contents: dict[str, bytes] | None = None):
        self.cache, self.contents, self.calls = cache, contents or {}, []

    def __call__(self, repo_id: str, remote: str) -> Path:
        self.calls.append((repo_id, remote))
        blob = self.cache / "blobs" / remote.replace("/", "__")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(self.contents.get(remote, remote.encode()))
        link = self.cache / "snapshot" / remote
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
        return link


def test_download_skips_existing_files(tmp_path, monkeypatch):
    plan = cc.plan_downloads(FAKE_MANIFEST, "sp1024", 3, "datasets", tmp_path / "data")
    present = plan[::2]
    for _, local in present:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(b"already here")
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(cc, "fetch_from_hub", hub)
    fetched, skipped = cc.download(plan, "owner/repo")
    missing = [item for item in plan if item not in present]
    assert hub.calls == [("owner/repo", remote) for remote, _ in missing]
    assert (fetched, skipped) == (len(missing), len(present))
    for _, local in present:
        assert local.read_bytes() == b"already here"
    for remote, local in missing:
        assert local.is_file() and not local.is_symlink()
        assert local.read_bytes() == remote.encode()
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_main_uses_env_and_local_manifest(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(FAKE_MANIFEST))
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export_v2")
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(cc, "fetch_from_hub", hub)
    argv = ["--variant", "sp1024", "--train-shards", "2", "--skip-manifest",
            "--data-dir", str(data)]
    assert cc.main(argv) == 0
    want = expected_plan("sp1024", 2, "export_v2", data)
    assert hub.calls == [("someone/mirror", remote) for remote, _ in want]
    assert all(local.is_file() for _, local in want)
    available = manifest_entry("datasets", "fineweb10B_sp1024")["stats"]["files_train"]
    too_many = ["--train-shards", str(available + 4), "--skip-manifest", "--data-dir", str(data)]
    assert cc.main(too_many) == 1
    assert re.search(rf"\b{available + 4}\b.*\b{available}\b", capsys.readouterr().err)


def test_main_fetches_manifest_first(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    hub = FakeHub(tmp_path / "hub", {"datasets/manifest.json": json.dumps(FAKE_MANIFEST).encode()})
    monkeypatch.setattr(cc, "fetch_from_hub", hub)
    data = tmp_path / "data"
    assert cc.main(["--variant", "sp8192", "--train-shards", "1", "--data-dir", str(data)]) == 0
    assert hub.calls[0] == ("willdepueoai/parameter-golf", "datasets/manifest.json")
    assert json.loads((data / "manifest.json").read_text()) == FAKE_MANIFEST
    planned = [remote for remote, _ in expected_plan("sp8192", 1, "datasets", data)]
    assert [remote for _, remote in hub.calls[1:]] == planned


def test_skip_manifest_without_local_copy(tmp_path, capsys):
    assert cc.main(["--skip-manifest", "--data-dir", str(tmp_path)]) == 1
    assert str(tmp_path / "manifest.json") in capsys.readouterr().err


def test_hub_library_only_needed_to_download(monkeypatch):
    assert "huggingface_hub" not in vars(cc)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed, whether it is here or not
    with pytest.raises(cc.DownloadError, match="pip install huggingface_hub"):
        cc.fetch_from_hub("owner/repo", "datasets/manifest.json")
