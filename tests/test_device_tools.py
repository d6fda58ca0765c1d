"""tools/device/: a lease's staging (pack.sh), its start on the GPU machine (start.sh), the waits that bring
results back (wait.sh) and the stop of a job (stop.sh), run here against a fake checkout, fake shared data and a
fake setup.sh."""

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "device"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("setsid") is None,
                                reason="needs bash and setsid")


def run(args, cwd, env=None, timeout=120):
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def write_shard(path: Path, tokens, magic=tg.SHARD_MAGIC):
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = [magic, tg.SHARD_VERSION, len(tokens)]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


JOB = """#!/usr/bin/env bash
# what a lease's job does, in small: a run that logs, writes its artifact, and a sweep line saying it ended
mkdir -p artifacts logs
echo "DATA_PATH=$DATA_PATH TOKENIZER_PATH=$TOKENIZER_PATH HELDOUT_PATH=${HELDOUT_PATH-unset}" > logs/r1.txt
echo "final_x val_bpb:1.2345" >> logs/r1.txt
echo artifact > artifacts/r1.pgz
echo "sweep: r1 started on GPU 0"
echo "sweep: r1 ended (exit 0) after 1 s"
"""


@pytest.fixture
def lease(tmp_path):
    """A checkout with .devcarry (whose setup.sh points DATA_ROOT at prepared shards), a job, an old log, and the
    first call's training file in EXTRA."""
    checkout, data, extra = tmp_path / "checkout", tmp_path / "pgdata", tmp_path / "extra"
    (checkout / ".devcarry" / "data" / "corpus").mkdir(parents=True)
    (checkout / ".gpujobs").mkdir()
    (checkout / "logs").mkdir()
    shutil.copy(ROOT / "train_gpt.py", checkout / "train_gpt.py")
    (checkout / "data").mkdir()
    shutil.copy(ROOT / "data" / "make_shards.py", checkout / "data" / "make_shards.py")
    (checkout / "logs" / "old.txt").write_text("an earlier lease's log\n")
    os.utime(checkout / "logs" / "old.txt", (time.time() - 3600,) * 2)
    (checkout / ".gpujobs" / "job.sh").write_text(JOB)
    (checkout / ".devcarry" / "setup.sh").write_text(f'export DATA_ROOT="{data}"\necho "setup: fake"\n')
    shards = data / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    (data / "tokenizers").mkdir()
    (data / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    write_shard(shards / "fineweb_train_000000.bin", [1, 2, 3, 4, 5])
    write_shard(shards / "fineweb_val_000000.bin", [6, 7, 8])
    extra.mkdir()
    (extra / "train_docs_000.jsonl.zst").write_bytes(b"first training file")
    env = {"WORK": str(tmp_path / "w"), "EXTRA": str(extra), "OUT": str(tmp_path / "out"),
           "CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    (tmp_path / "out").mkdir()
    return checkout, env, tmp_path


def wait_for(path: Path, text: str, seconds: float = 30.0):
    end = time.time() + seconds
    while time.time() < end:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never held {text!r}")


def carry_heldout(checkout: Path, data: bytes) -> None:
    """The held-out text as pack.sh carries it, in .devcarry/heldout."""
    (checkout / ".devcarry" / "heldout").mkdir()
    (checkout / ".devcarry" / "heldout" / "train_docs_002.jsonl.zst").write_bytes(data)


def refused_start(checkout: Path, env: dict, message: str) -> int:
    """start.sh's exit status, after checking that it said `message` and started no job."""
    started = run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env)
    assert message in started.stderr
    assert not (Path(env["WORK"]) / "logs" / "job.out").exists()
    return started.returncode


def test_start_then_wait_brings_back_the_new_logs_and_the_artifact(lease):
    checkout, env, tmp = lease
    started = run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env)
    assert started.returncode == 0, started.stderr
    assert "fineweb_train_000000.bin 5 tokens" in started.stdout
    assert "fineweb_val_000000.bin 3 tokens" in started.stdout
    work = Path(env["WORK"])
    assert (work / ".devcarry" / "data" / "corpus" / "train_docs_000.jsonl.zst").read_bytes() == b"first training file"
    wait_for(work / "logs" / "job.out", "sweep: r1 ended")
    waited = run([TOOLS / "wait.sh", "job", "r1", "20"], checkout, env)
    assert waited.returncode == 0, waited.stderr
    assert "r1 ended" in waited.stdout and "final_x val_bpb:1.2345" in waited.stdout
    out = Path(env["OUT"])
    assert (out / "r1.pgz").read_text() == "artifact\n"
    with tarfile.open(out / "logs.tgz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("logs/r1.txt").read().decode()
    assert names == {"logs/r1.txt", "logs/job.out"}            # not logs/old.txt, written before the start
    data = tmp / "pgdata"
    assert f"DATA_PATH={data}/datasets/fineweb10B_sp1024 " in log
    assert f"TOKENIZER_PATH={data}/tokenizers/fineweb_1024_bpe.model HELDOUT_PATH=unset" in log
    assert "no held-out text carried" in started.stdout


def test_start_writes_the_held_out_text_as_a_validation_folder_for_the_job(lease, tiny_tokenizer):
    """Held-out text carried in .devcarry/heldout: its first HELDOUT_DOCS documents become a validation-only
    folder (each document BOS + its pieces), checked and counted like the others, whose path the job gets."""
    import sentencepiece as spm
    import zstandard

    checkout, env, tmp = lease
    data = tmp / "pgdata"
    shutil.copy(tiny_tokenizer, data / "tokenizers" / "fineweb_1024_bpe.model")
    docs = [f"held-out document {i}: the river crossed {i * 7} fields before the sea." for i in range(5)]
    carry_heldout(checkout, zstandard.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    started = run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, {**env, "HELDOUT_DOCS": "3"})
    assert started.returncode == 0, started.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    tokens = sum(1 + len(sp.encode(d)) for d in docs[:3])
    held = data / "datasets" / "heldout_sp1024"
    assert f"start.sh: {held}/fineweb_val_000000.bin {tokens:,} tokens" in started.stdout
    assert [p.name for p in held.glob("fineweb_*.bin")] == ["fineweb_val_000000.bin"]
    wait_for(Path(env["WORK"]) / "logs" / "r1.txt", f"HELDOUT_PATH={held}\n")


def test_start_stops_when_the_held_out_text_cannot_be_written(lease):
    checkout, env, _ = lease
    carry_heldout(checkout, b"not zstd")
    assert refused_start(checkout, env, "held-out text's shard could not be written") == 1


def test_wait_that_runs_out_still_sends_what_is_there(lease):
    checkout, env, _ = lease
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    wait_for(Path(env["WORK"]) / "logs" / "job.out", "sweep: r1 ended")
    waited = run([TOOLS / "wait.sh", "job", "r2", "0"], checkout, env)
    assert waited.returncode == 3
    assert "r2 has not ended" in waited.stdout
    with tarfile.open(Path(env["OUT"]) / "logs.tgz") as tar:
        assert "logs/job.out" in tar.getnames()
    assert not (Path(env["OUT"]) / "r2.pgz").exists()


def test_wait_for_the_whole_job_reports_its_exit_status(lease):
    """--end waits for the job itself, past its sweeps (the GPU checks a lease runs last), and says how it exited."""
    checkout, env, _ = lease
    job = checkout / ".gpujobs" / "job.sh"
    job.write_text(JOB + 'sleep 1\necho "checks: 3 passed" | tee logs/checks.txt\nexit 7\n')
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    early = run([TOOLS / "wait.sh", "job", "--end", "0"], checkout, env)
    assert early.returncode == 3 and "the job has not ended" in early.stdout
    waited = run([TOOLS / "wait.sh", "job", "--end", "30"], checkout, env)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "the job ended (exit 7)" in waited.stdout and "checks: 3 passed" in waited.stdout
    with tarfile.open(Path(env["OUT"]) / "logs.tgz") as tar:
        assert {"logs/r1.txt", "logs/job.out", "logs/checks.txt"} <= set(tar.getnames())


STOPPABLE_JOB = """#!/usr/bin/env bash
mkdir -p logs
echo "sweep: r1 started on GPU 0"
python3 -c "
import pathlib, signal, sys, time
def stop(*_):  # as tools/sweep.py does: its runs stopped first, then its own exit
    time.sleep(1)
    pathlib.Path('logs/stopped.txt').write_text('runs stopped')
    sys.exit(128 + signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
print('ready', flush=True)
time.sleep(300)
"
echo "the job went on" > logs/after.txt
"""


def group_alive(work: Path) -> bool:
    try:
        os.killpg(int((work / ".job_pid").read_text()), 0)
        return True
    except ProcessLookupError:
        return False


def test_stop_ends_the_job_after_its_sweep_has_stopped_and_records_the_end(lease):
    """stop.sh: SIGTERM to the job's process group, returning once every process of it has ended (the sweep-like
    child's own stopping, a second long, included); the job does not go on past the stopped sweep, its end (143) is
    recorded for wait.sh --end, and a second stop finds it ended. Without a start it names what is missing."""
    checkout, env, _ = lease
    work = Path(env["WORK"])
    missing = run([TOOLS / "stop.sh"], checkout, env)
    assert missing.returncode == 1 and f"no {work}/.job_pid" in missing.stderr
    (checkout / ".gpujobs" / "job.sh").write_text(STOPPABLE_JOB)
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    wait_for(work / "logs" / "job.out", "ready")
    assert group_alive(work)
    stopped = run([TOOLS / "stop.sh", "30"], checkout, env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "the job ended (exit 143)" in stopped.stdout
    assert (work / "logs" / "stopped.txt").read_text() == "runs stopped" and not group_alive(work)
    assert not (work / "logs" / "after.txt").exists()
    waited = run([TOOLS / "wait.sh", "job", "--end", "0"], checkout, env)
    assert waited.returncode == 0 and "the job ended (exit 143)" in waited.stdout
    again = run([TOOLS / "stop.sh"], checkout, env)
    assert again.returncode == 0 and "had already ended (exit 143)" in again.stdout


def test_stop_kills_a_job_that_ignores_sigterm_after_the_limit(lease):
    checkout, env, _ = lease
    work = Path(env["WORK"])
    (checkout / ".gpujobs" / "job.sh").write_text("trap '' TERM\necho ready\nsleep 300\n")
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    wait_for(work / "logs" / "job.out", "ready")
    stopped = run([TOOLS / "stop.sh", "2"], checkout, env)
    assert stopped.returncode == 3 and "did not end within 2 s of SIGTERM" in stopped.stderr
    end = time.time() + 10
    while group_alive(work) and time.time() < end:  # until the killed processes are reaped
        time.sleep(0.1)
    assert not group_alive(work)


def test_a_second_start_forgets_the_last_jobs_end(lease):
    checkout, env, _ = lease
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    assert run([TOOLS / "wait.sh", "job", "--end", "30"], checkout, env).returncode == 0
    (checkout / ".gpujobs" / "job.sh").write_text("sleep 3\n")
    assert run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env).returncode == 0
    assert run([TOOLS / "wait.sh", "job", "--end", "0"], checkout, env).returncode == 3


def test_start_puts_carried_artifacts_where_the_job_reads_them(lease):
    """Artifacts the first call left in EXTRA (pack.sh's ARTIFACTS) land in the job's artifacts/, each sha256 said."""
    import hashlib

    checkout, env, _ = lease
    blob = os.urandom(3000)
    (Path(env["EXTRA"]) / "kept_s1337.pgz").write_bytes(blob)
    started = run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env)
    assert started.returncode == 0, started.stderr
    assert f"start.sh: carried {hashlib.sha256(blob).hexdigest()}  artifacts/kept_s1337.pgz" in started.stdout
    assert (Path(env["WORK"]) / "artifacts" / "kept_s1337.pgz").read_bytes() == blob


def test_start_refuses_without_the_first_calls_file(lease):
    checkout, env, tmp = lease
    for f in Path(env["EXTRA"]).iterdir():
        f.unlink()
    assert refused_start(checkout, env, "no training file in") == 1


def test_start_refuses_a_bad_shard_before_the_job_starts(lease):
    checkout, env, tmp = lease
    write_shard(tmp / "pgdata" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", [1, 2], magic=7)
    assert refused_start(checkout, env, "not a challenge shard") != 0


def test_wait_refuses_without_a_start(lease):
    checkout, env, _ = lease
    waited = run([TOOLS / "wait.sh", "job", "r1", "0"], checkout, env)
    assert waited.returncode == 1 and "start.sh did not run" in waited.stderr


def fake_shared(tmp: Path, first_bytes: int) -> Path:
    """../shared in small: stage.sh writes .devcarry as the real one does (two tokenizers, validation text)."""
    shared = tmp / "shared"
    (shared / "gpu").mkdir(parents=True)
    (shared / "data" / "corpus").mkdir(parents=True)
    (shared / "data" / "tokenizers").mkdir(parents=True)
    for v in (1024, 2048, 8192):
        (shared / "data" / "tokenizers" / f"fineweb_{v}_bpe.model").write_bytes(f"tok{v}".encode())
    with open(shared / "data" / "corpus" / "train_docs_000.jsonl.zst", "wb") as f:
        f.truncate(first_bytes)
    (shared / "data" / "corpus" / "train_docs_001.jsonl.zst").write_bytes(b"second")
    (shared / "data" / "corpus" / "train_docs_002.jsonl.zst").write_bytes(b"held out")
    (shared / "gpu" / "stage.sh").write_text(
        'S="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"\n'
        "rm -rf .devcarry && mkdir -p .devcarry/data/corpus .devcarry/data/tokenizers .devcarry/wheels\n"
        'cp "$S"/data/tokenizers/fineweb_{1024,8192}_bpe.model .devcarry/data/tokenizers/\n'
        "echo val > .devcarry/data/corpus/val_docs.jsonl.zst\n"
        'echo "TRAIN_FILES=$TRAIN_FILES" > .devcarry/train_files\n')
    return shared


def git_checkout(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "tracked.txt").write_text("x" * 1000)
    subprocess.run(["git", "add", "tracked.txt"], cwd=repo, check=True)
    return repo


def test_pack_splits_the_corpus_and_keeps_only_the_tokenizers_asked_for(tmp_path):
    shared, repo = fake_shared(tmp_path, 1000), git_checkout(tmp_path)
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "VOCABS": "1024 2048"})
    assert packed.returncode == 0, packed.stderr
    assert sorted(p.name for p in (repo / ".devextra1").iterdir()) == ["train_docs_000.jsonl.zst"]
    assert sorted(p.name for p in (repo / ".devcarry" / "data" / "corpus").iterdir()) == [
        "train_docs_001.jsonl.zst", "val_docs.jsonl.zst"]
    assert sorted(p.name for p in (repo / ".devcarry" / "data" / "tokenizers").iterdir()) == [
        "fineweb_1024_bpe.model", "fineweb_2048_bpe.model"]
    assert (repo / ".devcarry" / "heldout" / "train_docs_002.jsonl.zst").read_bytes() == b"held out"
    assert (repo / ".devcarry" / "train_files").read_text() == "TRAIN_FILES=0\n"
    excluded = (repo / ".git" / "info" / "exclude").read_text().split()
    assert {"/.devcarry/", "/.devextra*/", "/.gpujobs/"} <= set(excluded)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout.split() == ["A", "tracked.txt"]


def test_pack_carries_the_artifacts_asked_for_beside_the_first_file(tmp_path):
    shared, repo = fake_shared(tmp_path, 1000), git_checkout(tmp_path)
    (repo / "ckpt").mkdir()
    (repo / "ckpt" / "a_s1337.pgz").write_bytes(b"artifact a")
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "ARTIFACTS": "ckpt/a_s1337.pgz"})
    assert packed.returncode == 0, packed.stderr
    assert sorted(p.name for p in (repo / ".devextra1").iterdir()) == ["a_s1337.pgz", "train_docs_000.jsonl.zst"]
    assert (repo / ".devextra1" / "a_s1337.pgz").read_bytes() == b"artifact a"


@pytest.mark.parametrize("names, message", [
    (["missing.pgz"], "artifact ckpt/missing.pgz (ARTIFACTS) does not exist"),
    (["a.pt"], "artifact ckpt/a.pt (ARTIFACTS) is not a .pgz file"),
    (["a.pgz", "other/a.pgz"], "two artifacts are named a.pgz"),
])
def test_pack_refuses_artifacts_it_cannot_carry(tmp_path, names, message):
    shared, repo = fake_shared(tmp_path, 1000), git_checkout(tmp_path)
    for d in ("ckpt", "ckpt/other"):
        (repo / d).mkdir()
    for name in ("ckpt/a.pgz", "ckpt/other/a.pgz", "ckpt/a.pt"):
        (repo / name).write_bytes(b"x")
    (repo / ".devextra1").mkdir()
    (repo / ".devextra1" / "earlier.pgz").write_bytes(b"an earlier pack")
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "ARTIFACTS": " ".join(f"ckpt/{n}" for n in names)})
    assert packed.returncode == 1 and message in packed.stderr
    assert [p.name for p in (repo / ".devextra1").iterdir()] == ["earlier.pgz"]   # refused before anything is written
    assert not (repo / ".devcarry").exists()


def test_pack_refuses_a_part_that_does_not_fit_one_call(tmp_path):
    shared, repo = fake_shared(tmp_path, 64 * 1024 * 1024), git_checkout(tmp_path)
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared)})
    assert packed.returncode == 1
    assert ".devextra1 does not fit" in packed.stderr


def test_pack_names_missing_shared_data(tmp_path):
    repo = git_checkout(tmp_path)
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(tmp_path / "nowhere")})
    assert packed.returncode == 1 and "is missing" in packed.stderr


# The compile cache: filled by a lease's runs, sent back by cache.sh, staged by pack.sh, unpacked by the next start.sh

CACHE_JOB = """#!/usr/bin/env bash
# a lease's runs in small: they compile into the caches start.sh names
mkdir -p logs "$TRITON_CACHE_DIR/k1" "$TORCHINDUCTOR_CACHE_DIR/fxgraph"
echo "$TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR" > logs/cache_env.txt
head -c 5000 /dev/urandom > "$TRITON_CACHE_DIR/k1/kernel.cubin"
echo graph > "$TORCHINDUCTOR_CACHE_DIR/fxgraph/g1"
"""


def save_cache(cache: Path, out: Path, part_bytes: int = 1000, max_parts: int = 20, what: str = ""):
    out.mkdir(exist_ok=True)
    env = {"CACHE_DIR": str(cache), "OUT": str(out), "CACHE_PART_BYTES": str(part_bytes),
           "CACHE_MAX_PARTS": str(max_parts)}
    return run([TOOLS / "cache.sh"], ROOT, {**env, "CACHE_WHAT": what} if what else env)


def cache_files(cache: Path) -> dict:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_compile_cache_goes_from_one_lease_to_the_next(lease):
    """Lease A's runs compile into start.sh's CACHE_DIR; cache.sh sends it back in parts; pack.sh joins them into
    .devextra1; lease B's start.sh unpacks the same files where its runs compile."""
    checkout, env, tmp = lease
    (checkout / ".gpujobs" / "cachejob.sh").write_text(CACHE_JOB)
    started = run([TOOLS / "start.sh", ".gpujobs/cachejob.sh"], checkout, env)
    assert started.returncode == 0, started.stderr
    assert "no compile cache carried" in started.stdout
    work, cache = Path(env["WORK"]), Path(env["CACHE_DIR"])
    wait_for(work / ".job_rc", "0")
    assert (work / "logs" / "cache_env.txt").read_text() == f"{cache}/triton {cache}/inductor\n"
    compiled = cache_files(cache)
    assert set(compiled) == {"triton/k1/kernel.cubin", "inductor/fxgraph/g1"}

    out = tmp / "out"
    saved = save_cache(cache, out)
    assert saved.returncode == 0, saved.stderr
    parts = sorted(out.glob("compile_cache.tgz.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 1000 for p in parts)
    assert [p.name for p in parts][:2] == ["compile_cache.tgz.part00", "compile_cache.tgz.part01"]
    origin = (cache / "ORIGIN").read_text()
    assert origin.startswith("saved ") and origin.endswith("; triton inductor: 2 files\n")
    assert f"cache.sh: {parts[-1].name} {parts[-1].stat().st_size} bytes" in saved.stdout

    shared, repo = fake_shared(tmp, 1000), git_checkout(tmp)
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "COMPILE_CACHE": str(out)})
    assert packed.returncode == 0, packed.stderr
    assert f"compile cache of {len(parts)} parts" in packed.stdout and origin.strip() in packed.stdout
    assert "the compile cache travels in .devextra1" in packed.stdout
    assert not (repo / ".devextra2").exists()
    carried = repo / ".devextra1" / "compile_cache.tgz"
    assert carried.read_bytes() == b"".join(p.read_bytes() for p in parts)

    extra_b = tmp / "extra_b"                  # lease B's first call: cp .devextra1/* /tmp/extra/
    shutil.copytree(repo / ".devextra1", extra_b)
    env_b = {**env, "WORK": str(tmp / "w_b"), "EXTRA": str(extra_b), "CACHE_DIR": str(tmp / "cache_b")}
    started_b = run([TOOLS / "start.sh", ".gpujobs/job.sh"], checkout, env_b)
    assert started_b.returncode == 0, started_b.stderr
    assert f"compile cache unpacked into {tmp / 'cache_b'} (3 files): {origin.strip()};" in started_b.stdout
    assert cache_files(tmp / "cache_b") == {**compiled, "ORIGIN": origin.encode()}


def test_start_refuses_a_carried_compile_cache_it_cannot_read(lease):
    checkout, env, _ = lease
    (Path(env["EXTRA"]) / "compile_cache.tgz").write_bytes(b"not a tarball")
    assert refused_start(checkout, env, "is not one cache.sh wrote") == 1


@pytest.mark.parametrize("setup, max_parts, message", [
    ("missing", 20, "no compile cache at"),
    ("empty", 20, "holds nothing of CACHE_WHAT=triton inductor"),
    ("large", 2, "more than CACHE_MAX_PARTS=2"),
])
def test_cache_refuses_what_it_cannot_send(tmp_path, setup, max_parts, message):
    cache, out = tmp_path / "cache", tmp_path / "out"
    if setup != "missing":
        (cache / "triton").mkdir(parents=True)
    if setup == "large":
        (cache / "triton" / "k.cubin").write_bytes(os.urandom(5000))
    saved = save_cache(cache, out, max_parts=max_parts)
    assert saved.returncode == 1 and message in saved.stderr
    assert list(out.iterdir()) == []                # no parts left behind to be mistaken for a cache


def test_cache_sends_only_the_caches_asked_for(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    for d in ("triton", "inductor", "elsewhere"):
        (cache / d).mkdir(parents=True)
        (cache / d / "f").write_text(d)
    saved = save_cache(cache, out, part_bytes=10**6, what="triton")
    assert saved.returncode == 0, saved.stderr
    with tarfile.open(out / "compile_cache.tgz.part00") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == ["./ORIGIN", "./triton/f"]
    assert (cache / "ORIGIN").read_text().endswith("; triton: 1 files\n")
    refused = save_cache(cache, out, what="triton fxgraph")
    assert refused.returncode == 1 and "fxgraph is neither triton nor inductor" in refused.stderr


def test_pack_refuses_compile_cache_parts_that_do_not_join(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    (cache / "triton").mkdir(parents=True)
    (cache / "triton" / "k.cubin").write_bytes(os.urandom(5000))
    assert save_cache(cache, out).returncode == 0
    (out / "compile_cache.tgz.part01").unlink()
    shared, repo = fake_shared(tmp_path, 1000), git_checkout(tmp_path)
    (repo / ".devextra1").mkdir()
    (repo / ".devextra1" / "earlier.pgz").write_bytes(b"an earlier pack")
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "COMPILE_CACHE": str(out)})
    assert packed.returncode == 1 and "do not join into a compile cache" in packed.stderr
    assert [p.name for p in (repo / ".devextra1").iterdir()] == ["earlier.pgz"]   # refused before anything is written
    empty = tmp_path / "empty"
    empty.mkdir()
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "COMPILE_CACHE": str(empty)})
    assert packed.returncode == 1 and f"no compile_cache.tgz.part* in {empty}" in packed.stderr


def test_pack_sends_a_compile_cache_that_does_not_fit_the_first_call_in_a_call_of_its_own(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    (cache / "triton").mkdir(parents=True)
    (cache / "triton" / "k.cubin").write_bytes(os.urandom(12000))        # about 12 KB compressed
    assert save_cache(cache, out, part_bytes=4000).returncode == 0
    # the first file, its folder (4 KiB on ext4, less elsewhere) and the 1,000 bytes of the working tree leave
    # 4-8 KiB of the call
    shared, repo = fake_shared(tmp_path, 64 * 1024 * 1024 - 4096 - 4096 - 1000), git_checkout(tmp_path)
    packed = run([TOOLS / "pack.sh"], repo, {"SHARED": str(shared), "COMPILE_CACHE": str(out)})
    assert packed.returncode == 0, packed.stderr
    assert "the compile cache travels in .devextra2" in packed.stdout
    assert sorted(p.name for p in (repo / ".devextra1").iterdir()) == ["train_docs_000.jsonl.zst"]
    joined = b"".join(p.read_bytes() for p in sorted(out.glob("compile_cache.tgz.part*")))
    assert (repo / ".devextra2" / "compile_cache.tgz").read_bytes() == joined
    assert "pack.sh: .devextra2 " in packed.stdout            # checked to fit its call like the others
