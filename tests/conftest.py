"""Shared fixtures: the script imported as a module, a tokenizer trained here, and shards made from synthetic text,
so every test runs without ../shared/data; tests that use the shared tokenizers skip where it is absent."""

import importlib.util
import json
import random
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def _rank_main(rank: int, world: int, port: int, worker, args: tuple) -> None:
    """One spawned rank: joins a gloo group on the local port, runs worker(rank, world, *args) on one thread, then
    waits for every rank before the group is torn down (a rank leaving early was seen to abort the other), and
    leaves without finalizing the interpreter: about once in 50 runs a rank that had finished, torn its group down
    and run its atexit handlers still died of SIGABRT ("terminate called without an active exception") while
    Python finalized, a known torch/gloo teardown race (pytorch/pytorch#179291)."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    worker(rank, world, *args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, world: int, *args) -> None:
    """Runs worker(rank, world, *args) in `world` fresh processes, each in one gloo group on a free local port, and
    waits for all of them; a failing rank fails the test."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, worker, args), nprocs=world, join=True, start_method="spawn")


WORDS = ("the of and to in a is was for on that with as by at from his he it an were are which this be "
         "city river 1984 2,500 3.14 café naïve Zürich 東京 — data model golf byte token shard").split()


def synthetic_text(seed: int, n_docs: int, words_per_doc: int = 120) -> list[str]:
    """Documents of English-like text with digits, punctuation and non-ASCII characters."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(words_per_doc // 2, words_per_doc))]
        sentences = [" ".join(words[i: i + 9]).capitalize() + rng.choice([".", "!", "?", ","])
                     for i in range(0, len(words), 9)]
        docs.append(" ".join(sentences))
    return docs


def load_data_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tokenizers").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def train_tokenizer(texts, prefix: Path, vocab_size: int = 320) -> Path:
    """A SentencePiece BPE model of `vocab_size` pieces trained on `texts`, with the challenge's special ids and byte
    fallback; returns its .model file."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size, pad_id=0,
        bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return prefix.with_name(prefix.name + ".model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 320-piece SentencePiece BPE model with the challenge's special ids and byte fallback."""
    return train_tokenizer(synthetic_text(0, 300), tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer) -> dict:
    """Challenge-format shards (one val, two train) from synthetic text, written by data/make_shards.py."""
    folder = tmp_path_factory.mktemp("data")
    val, train = folder / "val.jsonl", folder / "train.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_text(1, 60)))
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_text(2, 900)))
    out = folder / "shards"
    make_shards = load_data_tool("make_shards")
    assert make_shards.main(["--tokenizer", str(tiny_tokenizer), "--out-dir", str(out), "--val", str(val),
                             "--train", str(train), "--shard-tokens", "40000"]) == 0
    return dict(data_path=str(out), tokenizer_path=str(tiny_tokenizer), vocab_size=320)
