#!/usr/bin/env python3
"""Turn a text corpus into Parameter Golf challenge-format token shards.

Output (in --out-dir):
    fineweb_val_000000.bin, fineweb_val_000001.bin, ...      validation documents
    fineweb_train_000000.bin, fineweb_train_000001.bin, ...  training documents (none with --val-only,
                                                             which makes other text to rescore on)
    make_shards_manifest.json                                counts and settings
                                                             (written last: if it is missing,
                                                             the run did not finish)

Shard layout: a header of 256 little-endian int32 values ([0] = 20240520 magic,
[1] = 1 version, [2] = number of tokens, the rest 0), followed by that many
little-endian uint16 token ids. Every document becomes [BOS] + sp.encode(text):
the BOS id comes from the SentencePiece model (1 for the challenge models), no EOS
is appended, and the text is encoded exactly as read (no stripping). Documents are
written in input order and one document may straddle two shards of its split.

Input files (--val / --train), chosen by file name:
    *.jsonl, *.jsonl.zst  one JSON object per line; the document is obj["text"].
                          Blank lines are skipped; other keys are ignored.
    *.txt, *.txt.zst      documents are separated by one or more blank lines
                          (empty or whitespace-only). A document's text is its
                          lines exactly as in the file, without the line break
                          that ends its last line.
    .zst means a zstandard stream (multi-frame files are fine). Text is UTF-8 and
    lines end at "\\n"; a "\\r" before it is kept as part of the line.

--corpus-dir DIR is shorthand for --val DIR/val_docs*.jsonl.zst and
--train DIR/train_docs_*.jsonl.zst (each sorted by name).

Examples:
    python3 data/make_shards.py --corpus-dir ../shared/data/corpus \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --out-dir data/datasets/stand_in_sp1024
    # training without train_docs_002, whose first documents are then held-out text of the training kind:
    python3 data/make_shards.py --val ../shared/data/corpus/val_docs.jsonl.zst \\
        --train ../shared/data/corpus/train_docs_000.jsonl.zst ../shared/data/corpus/train_docs_001.jsonl.zst \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --out-dir data/datasets/stand_in_2x
    python3 data/make_shards.py --val-only --val ../shared/data/corpus/train_docs_002.jsonl.zst \\
        --max-val-docs 666 --tokenizer data/tokenizers/fineweb_1024_bpe.model --out-dir heldout
    EVAL_ONLY=1 ARTIFACT_PATH=artifacts/<run>.pgz DATA_PATH=heldout python3 train_gpt.py   # rescore on it

The shards and the manifest are written into a folder beside --out-dir and moved in when all are written, replacing
an earlier export's (a failed export leaves --out-dir as it was); shards that no manifest covers (the challenge's
download) are refused unless --force. A training document equal to a validation document is refused.
"""

import argparse
import hashlib
import io
import itertools
import json
import os
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence, TextIO

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB_SIZE = 2**16
MAX_SHARD_TOKENS = 2**31 - 1  # the token count is stored in an int32
DEFAULT_SHARD_TOKENS = 100_000_000
MANIFEST_NAME = "make_shards_manifest.json"
SPLITS = ("val", "train")
SHARD_PATTERNS = [f"fineweb_{s}_*.bin" for s in SPLITS]  # every shard this tool writes (or a download holds)


class CorpusError(ValueError):
    """Bad input: a malformed corpus line, a missing file, an unusable tokenizer."""


# --------------------------------------------------------------------------- shards


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. fineweb_val_000000.bin."""
    return f"fineweb_{split}_{index:06d}.bin"


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to a temporary file next to `path`, then rename it to `path`."""
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 lets the umask decide permissions, as for an ordinary file
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_shard(path: Path | str, tokens: Sequence[int] | np.ndarray) -> None:
    """Write one challenge-format shard (header + uint16 tokens) atomically."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{array.size} tokens do not fit in one shard (max {MAX_SHARD_TOKENS})")
    if array.size and (array.min() < 0 or array.max() >= MAX_VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {MAX_VOCAB_SIZE}), got "
                         f"[{array.min()}, {array.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, array.size
    _atomic_write(Path(path), [header.tobytes(), array.astype(TOKEN_DTYPE).tobytes()])


def read_shard(path: Path | str) -> np.ndarray:
    """Read a shard written by `write_shard`, checking its header and size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise CorpusError(f"{path}: not a version-{SHARD_VERSION} shard (bad header)")
    count = int(header[2])
    expected_size = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if path.stat().st_size != expected_size:
        raise CorpusError(f"{path}: size {path.stat().st_size} != {expected_size} "
                          f"for {count} tokens")
    return np.fromfile(path, dtype=TOKEN_DTYPE, count=count, offset=HEADER_BYTES)


class ShardWriter:
    """Collects one split's token stream and writes it out in fixed-size shards.

    `max_tokens` > 0 keeps only that many tokens (a prefix of the stream).
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, max_tokens: int = 0):
        """Shards go to out_dir/fineweb_{split}_NNNNNN.bin, `shard_tokens` tokens each."""
        if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
        self.out_dir, self.split, self.max_tokens = out_dir, split, max_tokens
        self.buffer = np.empty(min(shard_tokens, max_tokens or shard_tokens), dtype=TOKEN_DTYPE)
        self.shard_tokens = shard_tokens
        self.filled = 0
        self.total = 0
        self.files: list[str] = []

    @property
    def full(self) -> bool:
        """True once `max_tokens` tokens have been kept."""
        return bool(self.max_tokens) and self.total >= self.max_tokens

    def add(self, tokens: np.ndarray) -> int:
        """Append tokens, writing every shard that fills up; return how many were kept."""
        if self.max_tokens:
            tokens = tokens[: max(0, self.max_tokens - self.total)]
        start = 0
        while start < len(tokens):
            take = min(self.shard_tokens - self.filled, len(tokens) - start)
            self.buffer[self.filled:self.filled + take] = tokens[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_tokens:
                self.flush()
        self.total += len(tokens)
        return len(tokens)

    def flush(self) -> None:
        """Write the buffered tokens (if any) as the next shard."""
        if self.filled:
            name = shard_name(self.split, len(self.files))
            write_shard(self.out_dir / name, self.buffer[:self.filled])
            self.files.append(name)
            self.filled = 0


# --------------------------------------------------------------------------- input


def input_format(path: Path) -> tuple[str, bool]:
    """Return (kind, compressed) for an input file: kind is "jsonl" or "txt"."""
    name = path.name.lower()
    compressed = name.endswith(".zst")
    stem = name[: -len(".zst")] if compressed else name
    for kind in ("jsonl", "txt"):
        if stem.endswith("." + kind):
            return kind, compressed
    raise CorpusError(f"{path}: unknown input type; expected .jsonl, .jsonl.zst, .txt or .txt.zst")


@contextmanager
def open_text(path: Path, compressed: bool) -> Iterator[TextIO]:
    """Open `path` (optionally a zstandard stream) as UTF-8 text split only at '\\n'."""
    with open(path, "rb") as raw:
        stream: BinaryIO = raw
        if compressed:
            import zstandard  # only needed for .zst inputs

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with io.TextIOWrapper(stream, encoding="utf-8", newline="\n") as text:
            yield text


def _numbered_lines(path: Path, compressed: bool) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) pairs, naming the file on bad UTF-8."""
    lineno = 0
    with open_text(path, compressed) as text:
        try:
            for lineno, line in enumerate(text, start=1):
                yield lineno, line
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: invalid UTF-8 after line {lineno}: {exc.reason}") from exc


def _jsonl_texts(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[str]:
    """Yield obj["text"] for each non-blank JSONL line, with file:line in errors."""
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: line {lineno}: invalid JSON "
                              f"({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise CorpusError(f"{path}: line {lineno}: expected a JSON object with a \"text\" key")
        if not isinstance(record["text"], str):
            kind = type(record["text"]).__name__
            raise CorpusError(f"{path}: line {lineno}: \"text\" must be a string, got {kind}")
        yield record["text"]


def _strip_final_line_break(line: str) -> str:
    """Drop the '\\n' (or '\\r\\n') that ends a line, if present."""
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith("\n") else line


def _txt_texts(lines: Iterable[tuple[int, str]]) -> Iterator[str]:
    """Yield blank-line-separated documents; see the module docstring for the rule."""
    block: list[str] = []
    for _, line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield _strip_final_line_break("".join(block))
            block = []
    if block:
        yield _strip_final_line_break("".join(block))


def iter_documents(path: Path | str) -> Iterator[str]:
    """Stream the document texts of one input file, in file order."""
    path = Path(path)
    kind, compressed = input_format(path)
    lines = _numbered_lines(path, compressed)
    if kind == "jsonl":
        return _jsonl_texts(path, lines)
    return _txt_texts(lines)


def iter_split_documents(paths: Sequence[Path], max_docs: int = 0) -> Iterator[str]:
    """Chain the documents of several files; `max_docs` > 0 keeps only the first ones."""
    docs = itertools.chain.from_iterable(iter_documents(p) for p in paths)
    return itertools.islice(docs, max_docs) if max_docs else docs


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Group an iterable into lists of at most `size` items."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# --------------------------------------------------------------------------- encoding


def load_tokenizer(path: Path) -> Any:
    """Load a SentencePiece model and check it can produce challenge shards."""
    import sentencepiece as spm

    if not path.is_file():
        raise CorpusError(f"tokenizer not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    check_tokenizer(sp, path)
    return sp


def check_tokenizer(sp: Any, path: Path | str) -> None:
    """Raise if the vocabulary does not fit uint16 or the model has no BOS piece."""
    vocab_size = int(sp.vocab_size())
    if vocab_size > MAX_VOCAB_SIZE:
        raise CorpusError(f"{path}: vocab size {vocab_size} exceeds {MAX_VOCAB_SIZE}, "
                          "so token ids do not fit in uint16")
    if int(sp.bos_id()) < 0:
        raise CorpusError(f"{path}: the model defines no BOS piece (bos_id = {sp.bos_id()})")


def encode_documents(sp: Any, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
    """Encode texts in one batch; each becomes a uint16 array [bos_id] + sp.encode(text)."""
    bos, vocab_size = int(sp.bos_id()), int(sp.vocab_size())
    encoded = sp.encode(list(texts), out_type=int, num_threads=num_threads)
    documents = []
    for ids in encoded:
        doc = np.empty(len(ids) + 1, dtype=np.int64)
        doc[0] = bos
        doc[1:] = ids
        if doc.min() < 0 or doc.max() >= vocab_size:
            raise CorpusError(f"tokenizer produced id outside [0, {vocab_size}): "
                              f"[{doc.min()}, {doc.max()}]")
        documents.append(doc.astype(TOKEN_DTYPE))
    return documents


@dataclass
class SplitStats:
    """What was written for one split."""

    docs: int = 0
    tokens: int = 0
    files: list[str] = field(default_factory=list)
    hit_token_limit: bool = False  # True if the split stopped at its max_tokens


def doc_key(text: str) -> bytes:
    """A document's identity for the check that no validation document is also trained on."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def export_split(split: str, paths: Sequence[Path], sp: Any, out_dir: Path, *,
                 shard_tokens: int, max_tokens: int = 0, max_docs: int = 0,
                 batch_docs: int = 512, num_threads: int = 1,
                 keys: set[bytes] | None = None, held_out: set[bytes] | None = None) -> SplitStats:
    """Encode every document of `paths` and write the split's shards. Each document's key goes into `keys`, and a
    document whose key is in `held_out` (the validation split's) is refused: a trained-on text would be scored."""
    writer = ShardWriter(out_dir, split, shard_tokens, max_tokens)
    stats = SplitStats()
    for texts in batched(iter_split_documents(paths, max_docs), batch_docs):
        for text in texts:
            if not text.strip():  # (an empty document in both splits holds no text to leak)
                continue
            key = doc_key(text)
            if held_out is not None and key in held_out:
                raise CorpusError(f"{split}: a document of {[str(p) for p in paths]} is also a validation document "
                                  f"(it begins {text[:60]!r}): training on it would score text the model saw")
            if keys is not None:
                keys.add(key)
        for doc in encode_documents(sp, texts, num_threads):
            kept = writer.add(doc)
            if kept:
                stats.docs += 1
            if writer.full:
                break
        if writer.full:
            stats.hit_token_limit = True
            break
    writer.flush()
    stats.tokens, stats.files = writer.total, writer.files
    if stats.tokens == 0:
        raise CorpusError(f"{split}: no documents found in {[str(p) for p in paths]}")
    return stats


# --------------------------------------------------------------------------- CLI


def remove_stale_outputs(out_dir: Path) -> list[Path]:
    """Delete old shards, leftover temp files and the old manifest; return them."""
    patterns = SHARD_PATTERNS + [MANIFEST_NAME]
    patterns += [".fineweb_*.tmp", f".{MANIFEST_NAME}.*.tmp"]  # left by an interrupted run
    stale = sorted({p for pattern in patterns for p in out_dir.glob(pattern) if p.is_file()})
    for path in stale:
        path.unlink()
    return stale


def find_corpus_files(corpus_dir: Path) -> tuple[list[Path], list[Path]]:
    """Return (val files, train files) of a corpus folder like ../shared/data/corpus."""
    val = sorted(corpus_dir.glob("val_docs*.jsonl.zst"))
    train = sorted(corpus_dir.glob("train_docs_*.jsonl.zst"))
    for split, files, pattern in (("val", val, "val_docs*.jsonl.zst"),
                                  ("train", train, "train_docs_*.jsonl.zst")):
        if not files:
            raise CorpusError(f"--corpus-dir {corpus_dir}: no {split} files matching {pattern}")
    return val, train


def resolve_inputs(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Work out the input files of each split and check that they exist."""
    if args.corpus_dir is not None:
        val, train = find_corpus_files(Path(args.corpus_dir))
        inputs = {"val": val, "train": train}
    else:
        inputs = {"val": [Path(p) for p in args.val or []],
                  "train": [Path(p) for p in args.train or []]}
    if args.val_only:
        del inputs["train"]
    for split, files in inputs.items():
        if not files:
            raise CorpusError(f"no {split} input: give --{split} FILE... or --corpus-dir DIR")
        for path in files:
            if not path.is_file():
                raise CorpusError(f"--{split} input not found: {path}")
            input_format(path)
    return inputs


def _count(text: str) -> int:
    """argparse type: a non-negative integer (underscores allowed, e.g. 100_000_000)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece .model file")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the shards")
    parser.add_argument("--val", nargs="+", metavar="FILE", help="validation input files")
    parser.add_argument("--train", nargs="+", metavar="FILE", help="training input files")
    parser.add_argument("--corpus-dir", help="take val_docs*.jsonl.zst / train_docs_*.jsonl.zst "
                        "from this folder (not combinable with --val/--train)")
    parser.add_argument("--shard-tokens", type=_count, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default %(default)s)")
    parser.add_argument("--max-train-tokens", type=_count, default=0,
                        help="keep only the first N training tokens (0 = all)")
    parser.add_argument("--max-val-docs", type=_count, default=0, help="first N val docs (0 = all)")
    parser.add_argument("--max-train-docs", type=_count, default=0,
                        help="first N train docs (0 = all)")
    parser.add_argument("--batch-docs", type=_count, default=512,
                        help="documents per sp.encode call (default %(default)s)")
    parser.add_argument("--threads", type=_count, default=os.cpu_count() or 1,
                        help="SentencePiece encoding threads (default: all CPUs)")
    parser.add_argument("--force", action="store_true",
                        help="replace shards in --out-dir that no make_shards manifest covers (e.g. a download)")
    parser.add_argument("--val-only", action="store_true",
                        help="write the validation split alone: other text to rescore an artifact on "
                        "(EVAL_ONLY=1 reads no training shard); no --train, --corpus-dir or train limit")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.corpus_dir is not None and (args.val or args.train):
        parser.error("--corpus-dir cannot be combined with --val/--train")
    if args.val_only and (args.train or args.corpus_dir is not None or args.max_train_tokens or args.max_train_docs):
        parser.error("--val-only writes no training split: drop --train, --corpus-dir and the train limits")
    if args.val_only and not args.val:
        parser.error("--val-only needs --val FILE...")
    if not 0 < args.shard_tokens <= MAX_SHARD_TOKENS:
        parser.error(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}], got {args.shard_tokens}")
    if args.batch_docs < 1 or args.threads < 1:
        parser.error("--batch-docs and --threads must be at least 1")
    return args


def build_manifest(args: argparse.Namespace, sp: Any, inputs: dict[str, list[Path]],
                   stats: dict[str, SplitStats]) -> dict[str, Any]:
    """The contents of make_shards_manifest.json."""
    return {
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": HEADER_INTS,
                   "token_dtype": "uint16 little-endian", "document": "[bos_id] + encode(text)"},
        "tokenizer": {"path": str(args.tokenizer.resolve()), "vocab_size": int(sp.vocab_size()),
                      "bos_id": int(sp.bos_id())},
        "settings": {"shard_tokens": args.shard_tokens, "max_train_tokens": args.max_train_tokens,
                     "max_val_docs": args.max_val_docs, "max_train_docs": args.max_train_docs,
                     "val_only": args.val_only},
        "inputs": {split: [str(p.resolve()) for p in files] for split, files in inputs.items()},
        "splits": {split: vars(s) for split, s in stats.items()},
    }


def foreign_shards(out_dir: Path) -> list[Path]:
    """Shards in out_dir that no make_shards manifest covers (e.g. the challenge's download): not ours to delete."""
    if (out_dir / MANIFEST_NAME).is_file():
        return []
    return sorted(p for pattern in SHARD_PATTERNS for p in out_dir.glob(pattern) if p.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the export described by `args`; return the manifest it wrote. The shards and the manifest are written
    into a temporary folder beside out_dir and moved in only when all of them are (the manifest last): a failed
    export leaves out_dir as it was."""
    started = time.perf_counter()
    inputs = resolve_inputs(args)
    sp = load_tokenizer(args.tokenizer)
    if sp.bos_id() != 1:
        print(f"warning: {args.tokenizer} has bos_id {sp.bos_id()}; the challenge models use 1")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    foreign = foreign_shards(args.out_dir)
    if foreign and not args.force:
        raise CorpusError(f"{args.out_dir} holds {len(foreign)} shard(s) that make_shards.py did not write (no "
                          f"{MANIFEST_NAME}), e.g. {foreign[0].name}: choose another --out-dir, or --force to "
                          "replace them")
    work = args.out_dir.parent / f".{args.out_dir.name}.make_shards{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        stats: dict[str, SplitStats] = {}
        val_keys: set[bytes] = set()
        for split in inputs:  # val first: its documents' keys are refused in train
            stats[split] = export_split(
                split, inputs[split], sp, work, shard_tokens=args.shard_tokens,
                max_tokens=args.max_train_tokens if split == "train" else 0,
                max_docs=args.max_train_docs if split == "train" else args.max_val_docs,
                batch_docs=args.batch_docs, num_threads=args.threads,
                keys=val_keys if split == "val" else None, held_out=val_keys if split == "train" else None)
            s = stats[split]
            print(f"{split}: {s.docs:,} docs, {s.tokens:,} tokens, {len(s.files)} shard(s)"
                  + (" (stopped at --max-train-tokens)" if s.hit_token_limit else ""), flush=True)
        manifest = build_manifest(args, sp, inputs, stats)
        _atomic_write(work / MANIFEST_NAME, [json.dumps(manifest, indent=2).encode() + b"\n"])
        stale = remove_stale_outputs(args.out_dir)
        if stale:
            print(f"replaced {len(stale)} earlier file(s) in {args.out_dir}: "
                  + ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else ""))
        for path in sorted(work.iterdir(), key=lambda p: p.name == MANIFEST_NAME):  # the manifest last
            os.replace(path, args.out_dir / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = ", ".join(f"{split} {s.tokens:,} tokens / {len(s.files)} shard(s)" for split, s in stats.items())
    print(f"make_shards: {written}{' (no train split: --val-only)' if args.val_only else ''}, "
          f"vocab {sp.vocab_size()}, in {time.perf_counter() - started:.1f}s -> {args.out_dir}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    try:
        run(args)
    except CorpusError as exc:
        print(f"make_shards.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
