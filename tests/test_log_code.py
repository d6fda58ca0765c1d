"""tools/log_code.py: a log's committed scripts elided and written back byte for byte, and refused when damaged."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import log_code  # noqa: E402
from make_submission import read_log  # noqa: E402

RULE = "=" * 100


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def commit_script(repo: Path, text: str, message: str) -> tuple[str, str]:
    """Commits train_gpt.py with this text; the commit and git's own blob id for the file."""
    (repo / "train_gpt.py").write_text(text)
    git(repo, "add", "train_gpt.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD:train_gpt.py")


def run_text(run_id: str, bpb: float) -> str:
    """One run's lines after the script, as train_gpt.py writes them (with a summary sweep.py can read)."""
    return (f"{RULE}\nrun_id:{run_id}\nconfig SEED=1337\nconfig RUN_ID={run_id}\nstep:1/10 train_loss:5.0 x\n"
            f'summary {{"final": {{"bpb": {bpb}}}, "steps": 10}}\n')


@pytest.fixture
def repo(tmp_path):
    """A repository with two versions of train_gpt.py (and one version never committed), and logs of each."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    v1 = '"""Version one."""\n\n\ndef f():\n    """Indented docstring."""\n    return 1\n'
    v2 = '"""Version two."""\n"""A second module-level string."""\nprint(2)\n'
    c1, b1 = commit_script(repo, v1, "one")
    c2, b2 = commit_script(repo, v2, "two")
    commit_script(repo, v1, "one again")  # version one's blob in a later commit too: its line names the first
    logs = repo / "logs"
    (logs / "sub").mkdir(parents=True)
    # a log of two runs (a rerun appended to its RUN_ID's log), of two committed versions
    (logs / "two_runs.txt").write_text(v1 + "\n" + run_text("a", 1.5) + v2 + "\n" + run_text("a", 1.4))
    (logs / "sub" / "uncommitted.txt").write_text('"""Never committed."""\n' + "\n" + run_text("b", 1.3))
    (logs / "sub" / "console.log").write_text(v2 + "\n" + run_text("c", 1.2))  # not *.txt: never read
    return dict(repo=repo, logs=logs, v1=v1, v2=v2, c1=c1, c2=c2, b1=b1, b2=b2)


def test_strip_elides_committed_scripts_leaves_the_rest_and_restore_gives_back_the_same_bytes(repo, capsys):
    logs, two_runs, uncommitted = repo["logs"], repo["logs"] / "two_runs.txt", repo["logs"] / "sub" / "uncommitted.txt"
    originals = {p: p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    summary_before = read_log(two_runs)

    assert log_code.main(["strip", str(logs), "--repo", str(repo["repo"])]) == 0
    assert "2 script(s) elided in 1 file(s), 1 in no commit left" in capsys.readouterr().out
    lines = two_runs.read_text().splitlines()
    stubs = [line for line in lines if line.startswith("train_gpt.py elided")]
    assert stubs == [line for line in lines if "git blob" in line] and len(stubs) == 2
    for line, blob, commit, script in ((stubs[0], repo["b1"], repo["c1"], repo["v1"]),
                                       (stubs[1], repo["b2"], repo["c2"], repo["v2"])):
        assert f"git blob {blob}, {len(script.encode())} bytes" in line and f"first in commit {commit}" in line
    # everything but the scripts is as it was; the run's summary and settings read the same
    expected = originals[two_runs].decode().replace(repo["v1"], stubs[0] + "\n", 1)
    expected = expected.replace(repo["v2"], stubs[1] + "\n", 1)
    assert two_runs.read_text() == expected
    assert read_log(two_runs) == {**summary_before, "log": str(two_runs)}
    assert uncommitted.read_bytes() == originals[uncommitted]
    assert (logs / "sub" / "console.log").read_bytes() == originals[logs / "sub" / "console.log"]

    stripped = two_runs.read_bytes()
    assert log_code.main(["strip", str(logs), "--repo", str(repo["repo"])]) == 0  # a second strip changes nothing
    assert two_runs.read_bytes() == stripped
    assert log_code.main(["check", str(two_runs), "--repo", str(repo["repo"])]) == 0
    assert "check: 2 elided script(s)" in capsys.readouterr().out

    assert log_code.main(["restore", str(logs), "--repo", str(repo["repo"])]) == 0
    for path, data in originals.items():
        assert path.read_bytes() == data, path


def test_a_damaged_line_or_an_unknown_blob_is_refused_naming_the_log_and_nothing_is_written(repo):
    two_runs = repo["logs"] / "two_runs.txt"
    log_code.main(["strip", str(two_runs), "--repo", str(repo["repo"])])
    stripped = two_runs.read_text()
    sha = stripped.split("sha256 ")[1].split(",")[0]
    damaged = stripped.replace(sha, "0" * 64, 1)
    two_runs.write_text(damaged)
    for command in ("restore", "check", "strip"):
        with pytest.raises(ValueError, match=f"{two_runs}: git blob {repo['b1']} does not match its line"):
            log_code.main([command, str(two_runs), "--repo", str(repo["repo"])])
        assert two_runs.read_text() == damaged
    unknown = stripped.replace(repo["b1"], "f" * 40, 1)
    two_runs.write_text(unknown)
    with pytest.raises(ValueError, match=f"{two_runs}: git blob f{{40}} is no version of train_gpt.py"):
        log_code.main(["restore", str(two_runs), "--repo", str(repo["repo"])])
    assert two_runs.read_text() == unknown


def test_a_shallow_clone_or_a_missing_log_is_refused(repo, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such log"):
        log_code.main(["check", str(tmp_path / "nope.txt"), "--repo", str(repo["repo"])])
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo['repo']}", str(shallow)], check=True)
    with pytest.raises(RuntimeError, match="shallow clone"):
        log_code.main(["check", str(repo["logs"]), "--repo", str(shallow)])


def test_every_elided_script_in_this_repository_is_in_its_history_and_matches_its_line():
    """The committed logs: each elided script comes back from git with the size and sha256 its line names."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the elided scripts live in the repository's history")
    if git(ROOT, "rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone lacks the history the logs' elided scripts are read from")
    history = log_code.History.read(ROOT)
    elided = lines = 0
    for path in log_code.log_files([str(ROOT / "logs")]):
        data = path.read_bytes()
        restored, count = log_code.restore_bytes(data, history, str(path))
        elided += count
        lines += sum(line.startswith(b"train_gpt.py elided") for line in data.splitlines())
        assert log_code.strip_bytes(restored, history)[0] == data, path
    assert elided == lines > 0
