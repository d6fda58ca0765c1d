#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb shards from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

The download is driven by the manifest of the challenge's dataset repository
(`willdepueoai/parameter-golf`, a dataset repo; override with MATCHED_FINEWEB_REPO_ID).
Everything lives under one folder of that repository, `datasets/` by default
(override with MATCHED_FINEWEB_REMOTE_ROOT_PREFIX):

    <root>/manifest.json                          lists datasets and tokenizers
    <root>/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin
    <root>/tokenizers/fineweb_1024_bpe.{model,vocab}   (as named by the manifest)

Local layout (relative to this script's folder, or --data-dir):

    manifest.json
    datasets/fineweb10B_sp{V}/fineweb_{val,train}_NNNNNN.bin
    tokenizers/fineweb_{V}_bpe.{model,vocab}

All validation shards are downloaded; of the training shards (100M tokens each),
the first --train-shards. Files already present locally are skipped. Without
--skip-manifest the manifest itself is fetched again on every run. Files are
materialised as real files (hard link to, or copy of, the hub cache entry),
written under a temporary name and then renamed, so an interrupted run never
leaves a partial file under a final name.

Needs `huggingface_hub` (pip install huggingface_hub) only when something has to
be downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_ROOT_PREFIX = "datasets"
REPO_ID_ENV = "MATCHED_FINEWEB_REPO_ID"
ROOT_PREFIX_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
KNOWN_VARIANTS = ("sp1024", "sp2048", "sp4096", "sp8192")
DEFAULT_TRAIN_SHARDS = 80
TOKENIZER_PATH_KEYS = ("model_path", "vocab_path", "path")

Plan = list[tuple[str, Path]]  # (path inside the hub repository, local destination)


class PlanError(ValueError):
    """The request cannot be served from the manifest (bad variant, too many shards...)."""


class DownloadError(RuntimeError):
    """Fetching from the hub is impossible or failed."""


# --------------------------------------------------------------------------- planning


def dataset_name(variant: str) -> str:
    """Map a variant such as "sp1024" to its dataset folder, "fineweb10B_sp1024"."""
    if not re.fullmatch(r"sp[0-9]+", variant):
        raise PlanError(f"unknown variant {variant!r}; expected sp<VOCAB>, e.g. "
                        + ", ".join(KNOWN_VARIANTS))
    return f"fineweb10B_{variant}"


def remote_path(root_prefix: str, relative: str) -> str:
    """Join the repository root folder and a path relative to it, POSIX style."""
    parts = [p for p in (root_prefix.strip("/"), relative.strip("/")) if p]
    return "/".join(parts)


def _checked_relative(value: Any, what: str) -> PurePosixPath:
    """A manifest path as a relative POSIX path that cannot escape the data folder."""
    path = PurePosixPath(str(value))
    if not str(value) or path.is_absolute() or ".." in path.parts:
        raise PlanError(f"{what}: unsafe or empty path {value!r} in manifest")
    return path


def _find_by_name(manifest: dict, section: str, name: str) -> dict:
    """Return the entry of manifest[section] whose "name" is `name`."""
    entries = manifest.get(section)
    if not isinstance(entries, list):
        raise PlanError(f"manifest has no {section!r} list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    listed = sorted(str(e.get("name")) for e in entries if isinstance(e, dict))
    raise PlanError(f"{name!r} is not in the manifest's {section}; it lists: {', '.join(listed)}")


def _shard_counts(entry: dict) -> tuple[int, int]:
    """(validation files, training files) from a dataset entry's "stats"."""
    stats = entry.get("stats") or {}
    try:
        return int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"dataset {entry.get('name')!r}: manifest stats need integer "
                        f"files_val and files_train, got {stats!r}") from None


def tokenizer_files(entry: dict) -> list[str]:
    """Paths (relative to the root) of a tokenizer entry's files, without duplicates."""
    paths = [str(entry[key]) for key in TOKENIZER_PATH_KEYS if entry.get(key)]
    if not paths:
        raise PlanError(f"tokenizer {entry.get('name')!r} names no file "
                        f"(keys {', '.join(TOKENIZER_PATH_KEYS)})")
    return list(dict.fromkeys(paths))


def plan_downloads(manifest: dict, variant: str, train_shards: int, root_prefix: str,
                   data_dir: Path) -> Plan:
    """List every file to fetch: all val shards, the first `train_shards`, the tokenizer.

    Pure: reads only `manifest`, touches neither the network nor the disk.
    """
    name = dataset_name(variant)
    entry = _find_by_name(manifest, "datasets", name)
    files_val, files_train = _shard_counts(entry)
    if train_shards < 0:
        raise PlanError(f"--train-shards must be >= 0, got {train_shards}")
    if train_shards > files_train:
        raise PlanError(f"requested {train_shards} train shards but the manifest lists only "
                        f"{files_train} for {name}")
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(files_val)]
    shards += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    plan = [(remote_path(root_prefix, f"datasets/{name}/{shard}"),
             data_dir / "datasets" / name / shard) for shard in shards]
    tokenizer = _find_by_name(manifest, "tokenizers", str(entry.get("tokenizer_name")))
    for rel in tokenizer_files(tokenizer):
        checked = _checked_relative(rel, f"tokenizer {tokenizer.get('name')!r}")
        local = data_dir.joinpath(*checked.parts)
        plan.append((remote_path(root_prefix, checked.as_posix()), local))
    return plan


def load_manifest(path: Path) -> dict:
    """Read a local manifest.json and check its top-level shape."""
    if not path.is_file():
        raise PlanError(f"manifest not found at {path} (run once without --skip-manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise PlanError(f"{path}: expected a JSON object with a \"datasets\" list")
    return manifest


# --------------------------------------------------------------------------- downloading


def fetch_from_hub(repo_id: str, remote: str) -> Path:
    """Download one file of the dataset repository into the hub cache; return its path."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed; "
                            "run: pip install huggingface_hub") from None
    try:
        cached = hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset")
    except Exception as exc:  # the hub raises many types; report the file and the cause
        raise DownloadError(f"could not download {remote} from {repo_id}: {exc}") from exc
    return Path(cached)


def materialise(source: Path, destination: Path) -> None:
    """Place a real copy of `source` at `destination` (hard link if possible) atomically."""
    source = source.resolve(strict=True)  # the hub cache holds symlinks to blobs
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # other filesystem, or links not allowed
            shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download(plan: Plan, repo_id: str) -> tuple[int, int]:
    """Fetch every planned file that is not already present; return (fetched, skipped)."""
    fetched = skipped = 0
    for index, (remote, local) in enumerate(plan, start=1):
        if local.is_file():
            skipped += 1
            continue
        materialise(fetch_from_hub(repo_id, remote), local)
        fetched += 1
        print(f"[{index}/{len(plan)}] {remote} -> {local}", flush=True)
    return fetched, skipped


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp1024",
                        help=f"tokenizer variant: {', '.join(KNOWN_VARIANTS)} "
                        "(default %(default)s)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help="number of training shards, 100M tokens each (default %(default)s)")
    parser.add_argument("--skip-manifest", action="store_true",
                        help="use the manifest.json already in the data folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="destination root (default: this script's folder)")
    return parser


def run(args: argparse.Namespace, repo_id: str, root_prefix: str) -> None:
    """Fetch the manifest (unless skipped), plan, download and report."""
    data_dir: Path = args.data_dir
    manifest_file = data_dir / MANIFEST_NAME
    if not args.skip_manifest:
        source = fetch_from_hub(repo_id, remote_path(root_prefix, MANIFEST_NAME))
        materialise(source, manifest_file)
    manifest = load_manifest(manifest_file)
    plan = plan_downloads(manifest, args.variant, args.train_shards, root_prefix, data_dir)
    print(f"{repo_id}/{root_prefix}: variant {args.variant}, {len(plan)} files planned "
          f"({args.train_shards} train shards)", flush=True)
    fetched, skipped = download(plan, repo_id)
    print(f"done: {fetched} downloaded, {skipped} already present; "
          f"shards in {data_dir / 'datasets' / dataset_name(args.variant)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    repo_id = os.environ.get(REPO_ID_ENV, DEFAULT_REPO_ID)
    root_prefix = os.environ.get(ROOT_PREFIX_ENV, DEFAULT_ROOT_PREFIX)
    try:
        run(args, repo_id, root_prefix)
    except (PlanError, DownloadError) as exc:
        print(f"cached_challenge_fineweb.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
