#!/usr/bin/env python3
"""Elide from train_gpt.py logs the copy of the script each run logs first, and put it back, byte for byte.

    python3 tools/log_code.py strip logs/quality/*.txt     # each committed script -> one line naming its git blob
    python3 tools/log_code.py restore logs/quality/x.txt   # the line -> the script again (from git)
    python3 tools/log_code.py check logs                   # every elided script is in git and matches its line

train_gpt.py writes its own source at the top of each run's log (then a line of 100 '=' and `run_id:`), as the
challenge's baseline does, so a log says exactly what code made it. Committed, those copies are most of the logs'
bytes (about 50 of 56 MB in logs/ after lease 49), and the tracked files travel with every GPU call, which carries at
most 64 MiB. When a logged script is byte for byte a version of train_gpt.py in this repository's git history,
`strip` replaces it with one line

    train_gpt.py elided: git blob <sha1>, <N> bytes, sha256 <hex>, first in commit <hash>; tools/log_code.py restore

and nothing else in the log changes: the tools that read logs (sweep.py, loss_diff.py, make_submission.py) read each
run from its `run_id:` line on. A script that is in no commit (a run of uncommitted code) is left in place. `restore`
reads the blob back with `git cat-file` and checks its size and sha256 before writing; both commands write through a
temporary file and a rename (train_gpt.write_atomically), and `strip` restores its result in memory and compares it
with the original before it writes anything. A directory argument means every *.txt under it.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402  (write_atomically)

SCRIPT = "train_gpt.py"
RUN_START = b"\n" + b"=" * 100 + b"\nrun_id:"  # the logger's newline after the script, its rule, the run's first line
STUB = re.compile(rb"train_gpt\.py elided: git blob ([0-9a-f]{40}), (\d+) bytes, sha256 ([0-9a-f]{64}), "
                  rb"first in commit ([0-9a-f]{40}); tools/log_code\.py restore\n\Z")
SCRIPT_START = re.compile(rb'^"""', flags=re.M)  # train_gpt.py has always opened with its module docstring


def git(*args: str, cwd: Path, binary: bool = False) -> str | bytes:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout if binary else done.stdout.decode()


def blob_id(content: bytes) -> str:
    """The id git gives a file of these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class History:
    """Every version of train_gpt.py in the repository's history: blob id -> the first commit that holds it."""
    repo: Path
    first_commit: dict[str, str]
    cache: dict[str, bytes] = field(default_factory=dict)  # blob id -> the script

    @classmethod
    def read(cls, repo: Path) -> "History":
        if git("rev-parse", "--is-shallow-repository", cwd=repo).strip() == "true":
            raise RuntimeError(f"{repo} is a shallow clone: its history may lack the scripts the logs name "
                               "(git fetch --unshallow)")
        raw = git("log", "--all", "--reverse", "--format=commit %H", "--raw", "--no-abbrev", "--", SCRIPT, cwd=repo)
        first, commit = {}, ""
        for line in raw.splitlines():
            if line.startswith("commit "):
                commit = line.split()[1]
            elif line.startswith(":"):  # :old_mode new_mode old_blob new_blob status\tpath
                new = line.split()[3]
                if set(new) != {"0"}:  # a deletion's new blob is all zeros
                    first.setdefault(new, commit)
        return cls(repo, first)

    def content(self, blob: str) -> bytes:
        if blob not in self.cache:
            self.cache[blob] = git("cat-file", "blob", blob, cwd=self.repo, binary=True)
        return self.cache[blob]


def stub(script: bytes, history: History) -> bytes:
    blob = blob_id(script)
    return (f"train_gpt.py elided: git blob {blob}, {len(script)} bytes, sha256 {hashlib.sha256(script).hexdigest()}, "
            f"first in commit {history.first_commit[blob]}; tools/log_code.py restore\n").encode()


def runs(data: bytes) -> list[int]:
    """Where each run's script region ends: the position of the newline the logger wrote after the script."""
    return [m.start() for m in re.finditer(re.escape(RUN_START), data)]


def stub_at(data: bytes, start: int, end: int) -> tuple[int, re.Match | None]:
    """The last line of data[start:end] (a run's script region) and its match as an elided script's line."""
    newline = data.rfind(b"\n", start, end - 1)
    line_start = newline + 1 if newline >= 0 else start
    return line_start, STUB.match(data, line_start, end)


def strip_bytes(data: bytes, history: History) -> tuple[bytes, int, int]:
    """The log with each committed script elided; how many scripts were elided and how many were left (in no
    commit). A run's script is the text from a line opening with '\"\"\"' after the previous run's `run_id:` line up
    to the run's rule, and is taken only if those bytes are a version in the history."""
    out, start, elided, kept = [], 0, 0, 0
    for end in runs(data):
        for opening in SCRIPT_START.finditer(data, start, end):
            script = data[opening.start():end]
            if blob_id(script) in history.first_commit:
                out += [data[start:opening.start()], stub(script, history)]
                elided += 1
                break
        else:
            out.append(data[start:end])
            kept += stub_at(data, start, end)[1] is None
        start = end
    out.append(data[start:])
    return b"".join(out), elided, kept


def restore_bytes(data: bytes, history: History, name: str) -> tuple[bytes, int]:
    """The log with each elided script written back, after checking it against its line; and how many."""
    out, start, restored = [], 0, 0
    for end in runs(data):
        line_start, match = stub_at(data, start, end)
        if match:
            blob, size, sha = match[1].decode(), int(match[2]), match[3].decode()
            if blob not in history.first_commit:
                raise ValueError(f"{name}: git blob {blob} is no version of {SCRIPT} in {history.repo}'s history")
            script = history.content(blob)
            if len(script) != size or hashlib.sha256(script).hexdigest() != sha:
                raise ValueError(f"{name}: git blob {blob} does not match its line ({len(script)} bytes against "
                                 f"{size}, or another sha256): the log or the repository is damaged")
            out += [data[start:line_start], script]
            restored += 1
        else:
            out.append(data[start:end])
        start = end
    out.append(data[start:])
    return b"".join(out), restored


def log_files(args: list[str]) -> list[Path]:
    files = []
    for arg in map(Path, args):
        if arg.is_dir():
            files += sorted(arg.rglob("*.txt"))
        elif arg.is_file():
            files.append(arg)
        else:
            raise FileNotFoundError(f"{arg}: no such log or directory")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("strip", "restore", "check"))
    parser.add_argument("logs", nargs="+", help="train_gpt.py logs, or directories of them (*.txt)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the git repository whose history holds the scripts (default: this one)")
    args = parser.parse_args(argv)
    history = History.read(args.repo)
    totals = dict(files=0, elided=0, kept=0, restored=0, before=0, after=0)
    for path in log_files(args.logs):
        data = path.read_bytes()
        restored, count = restore_bytes(data, history, str(path))  # check: every line names its script rightly
        if args.command == "strip":
            new, elided, kept = strip_bytes(data, history)
            if restore_bytes(new, history, str(path))[0] != restored:
                raise RuntimeError(f"{path}: stripping would not restore to the same bytes; left unchanged")
            totals["elided"] += elided
            totals["kept"] += kept
            if kept:
                print(f"{path}: {kept} script(s) in no commit, left in place")
        elif args.command == "restore":
            new = restored
            totals["restored"] += count
        else:
            new = data
            totals["restored"] += count
        if new != data:
            mode = path.stat().st_mode & 0o777
            tg.write_atomically(path, lambda f: f.write(new))
            os.chmod(path, mode)  # the log keeps its permissions
            totals["files"] += 1
        totals["before"] += len(data)
        totals["after"] += len(new)
    t = totals
    if args.command == "strip":
        print(f"strip: {t['elided']} script(s) elided in {t['files']} file(s), {t['kept']} in no commit left; "
              f"{t['before']:,} -> {t['after']:,} bytes")
    elif args.command == "restore":
        print(f"restore: {t['restored']} script(s) written back in {t['files']} file(s); "
              f"{t['before']:,} -> {t['after']:,} bytes")
    else:
        print(f"check: {t['restored']} elided script(s) found in git and matching their lines")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, RuntimeError, ValueError) as e:
        print(f"log_code: {e}", file=sys.stderr)
        sys.exit(1)
