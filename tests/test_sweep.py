"""tools/sweep.py: configurations are checked before anything starts, runs wait for a free slot, a failed or
interrupted run is reported or stopped, and the table comes from the runs' own logs."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sweep  # noqa: E402
from make_submission import read_log  # noqa: E402

# Stands in for train_gpt.py where only the scheduling is under test: records its pid and when and on which slot it
# ran, sleeps FAKE_SLEEP seconds, then fails (FAKE_FAIL) or writes a log with config lines and a summary (and then
# exits with FAKE_EXIT, if set).
FAKE_SCRIPT = """
import json, os, sys, time
from pathlib import Path
run = os.environ["RUN_ID"]
for d in ("logs", "pids", "spans"):
    Path(d).mkdir(exist_ok=True)
Path("pids", run).write_text(str(os.getpid()))
t0 = time.time()
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.3")))
if os.environ.get("FAKE_FAIL"):
    print("training...")
    print("RuntimeError: fake failure of " + run)
    sys.exit(3)
summary = dict(run_id=run, seed=7, device="fake", params=1000, steps=10, tokens_per_s=5000, total_bytes=123,
               wall_seconds=0.3, eval_only=False, pre_quant=dict(bpb=1.5), final_no_ttt=dict(bpb=1.25),
               final=dict(bpb=1.125))
Path("logs", run + ".txt").write_text(f"config RUN_ID={run}\\nconfig TTT_ENABLED=True\\nsummary {json.dumps(summary)}\\n")
Path("spans", run).write_text(json.dumps([os.environ["CUDA_VISIBLE_DEVICES"], t0, time.time()]))
if os.environ.get("FAKE_EXIT"):
    print("crashed after its summary")
    sys.exit(int(os.environ["FAKE_EXIT"]))
"""


TOOL = [sys.executable, str(ROOT / "tools" / "sweep.py")]


def sweep_cmd(tmp_path: Path, *args: str) -> list[str]:
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_SCRIPT)
    return [*TOOL, "--script", str(fake), "--allow-env", "FAKE_", *args]


def run_sweep(tmp_path: Path, *args: str, fake: bool = True) -> subprocess.CompletedProcess:
    cmd = sweep_cmd(tmp_path, *args) if fake else [*TOOL, *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def start_sweep(tmp_path: Path, *args: str) -> subprocess.Popen:
    """A sweep in the background, for tests that act while it runs."""
    return subprocess.Popen(sweep_cmd(tmp_path, *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(path: Path, tool: subprocess.Popen, seconds: float = 60) -> None:
    """Until a fake run has written `path` (its pid file: it has started), while the sweep is still going."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline and tool.poll() is None, f"{path} was not written"
        time.sleep(0.05)


def stop(tool: subprocess.Popen) -> None:
    """A test's sweep that is still going when the test ends (it failed): SIGTERM stops it and the runs it started."""
    if tool.poll() is None:
        tool.terminate()
        tool.wait(timeout=30)


def test_runs_wait_for_a_free_slot_and_never_share_one(tmp_path):
    proc = run_sweep(tmp_path, "--gpus", "3,5", "RUN_ID=a FAKE_SLEEP=1", "RUN_ID=b FAKE_SLEEP=1", "RUN_ID=c")
    assert proc.returncode == 0, proc.stderr
    spans = {run: json.loads((tmp_path / "spans" / run).read_text()) for run in "abc"}
    assert {slot for slot, _, _ in spans.values()} <= {"3", "5"}
    for x in "abc":
        for y in "abc":
            if x < y and spans[x][0] == spans[y][0]:  # one slot: one run after the other
                assert spans[x][2] <= spans[y][1] or spans[y][2] <= spans[x][1], (x, y, spans)
    # the third run waited for one of the first two to end
    assert spans["c"][1] >= min(spans["a"][2], spans["b"][2])
    rows = [sweep.table_row(read_log(tmp_path / "logs" / f"{run}.txt")) for run in "abc"]
    assert sweep.markdown(rows) in proc.stdout  # in the order given, read back from the logs


@pytest.mark.parametrize("configs, message", [
    (["RUN_ID=a LAYOUT=AXQ"], "LAYOUT"),
    (["RUN_ID=a", "RUN_ID=a"], "more than one configuration: a"),
    (["LAYOUT=AAAA"], "no RUN_ID"),
    (["RUN_ID=a layout=GSGs"], "'layout=GSGs'"),
    (["RUN_ID=a MATRIX_LR=fast"], "MATRIX_LR"),
    (["RUN_ID=old"], "logs/old.txt exists"),
    (["--cpu", "-1"], "--cpu -1"),
    (["RUN_ID=b ARTIFACT_PATH=artifacts/fine.pgz"],  # the first run's artifact, by default
     "artifacts/fine.pgz would be written by RUN_ID=fine (ARTIFACT_PATH) and by RUN_ID=b (ARTIFACT_PATH)"),
    (["RUN_ID=a CHECKPOINT_PATH=ck/a.pt", "RUN_ID=b CHECKPOINT_PATH=ck/../ck/a.pt"],
     "ck/a.pt would be written by RUN_ID=a (CHECKPOINT_PATH) and by RUN_ID=b (CHECKPOINT_PATH)"),
    (["RUN_ID=a STATE_PATH=st/a.pt STATE_EVERY=100", "RUN_ID=b STATE_PATH=st/a.pt STATE_EVERY=50"],
     "st/a.pt would be written by RUN_ID=a (STATE_PATH) and by RUN_ID=b (STATE_PATH)"),
    (["RUN_ID=a QUANT_COMPARE=1", "RUN_ID=b ARTIFACT_PATH=artifacts/a_rtn.pgz"],
     "artifacts/a_rtn.pgz would be written by RUN_ID=a (QUANT_COMPARE's rtn artifact) and by RUN_ID=b"),
])
def test_bad_configurations_are_refused_before_anything_starts(tmp_path, configs, message):
    (tmp_path / "logs").mkdir()
    old = tmp_path / "logs" / "old.txt"
    old.write_text("an earlier run's log\n")
    proc = run_sweep(tmp_path, "--cpu", "2", "RUN_ID=fine", *configs)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "pids").exists()  # not even the valid configuration started
    assert old.read_text() == "an earlier run's log\n"


def test_eval_only_runs_may_share_the_artifact_they_read_and_more_lines_may_not_write_a_sweeps_file(tmp_path):
    """EVAL_ONLY runs read ARTIFACT_PATH and write no artifact: several rescorings of one artifact run side by side.
    A --more line that would write a file a run already in the sweep writes is refused like a reused RUN_ID."""
    same = "EVAL_ONLY=1 ARTIFACT_PATH=artifacts/x.pgz"
    proc = run_sweep(tmp_path, "--cpu", "2", f"RUN_ID=e1 {same}", f"RUN_ID=e2 {same}", "RUN_ID=t")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["e1", "e2", "t"]

    more = tmp_path / "more.txt"
    more.write_text(f"RUN_ID=n1 CHECKPOINT_PATH=ck/t.pt\nRUN_ID=n2 ARTIFACT_PATH=artifacts/s.pgz\nRUN_ID=e3 {same}\n"
                    "RUN_ID=n3 ARTIFACT_PATH=artifacts/n1.pgz\n")
    taker = sweep.MoreConfigs(more, tmp_path, ["s"], sweep.check_configs([{"RUN_ID": "s"}], tmp_path))
    assert [run.run_id for run in taker.take()] == ["n1", "e3"]
    assert [name for name, _ in taker.refused] == ["n2", "n3"]
    assert "would be written by RUN_ID=s (ARTIFACT_PATH) and by RUN_ID=n2 (ARTIFACT_PATH)" in taker.refused[0][1]
    assert "would be written by RUN_ID=n1 (ARTIFACT_PATH) and by RUN_ID=n3 (ARTIFACT_PATH)" in taker.refused[1][1]


def test_a_failed_run_is_a_row_that_says_why_and_fails_the_sweep(tmp_path):
    proc = run_sweep(tmp_path, "--cpu", "2", "RUN_ID=good", "RUN_ID=bad FAKE_FAIL=1", "RUN_ID=late FAKE_EXIT=4")
    assert proc.returncode == 1
    assert "| bad | failed (exit 3): RuntimeError: fake failure of bad |" in proc.stdout
    assert "| late | failed (exit 4): crashed after its summary |" in proc.stdout  # a summary is not enough
    assert "| good | " in proc.stdout and "| 1.2500 | 1.1250 |" in proc.stdout


def test_sigterm_stops_the_runs_it_started(tmp_path):
    tool = start_sweep(tmp_path, "--cpu", "2", "RUN_ID=a FAKE_SLEEP=120", "RUN_ID=b FAKE_SLEEP=120")
    pid_files = [tmp_path / "pids" / run for run in "ab"]
    for p in pid_files:
        wait_for(p, tool)
    tool.send_signal(signal.SIGTERM)
    assert tool.wait(timeout=30) == 128 + signal.SIGTERM
    for p in pid_files:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


def test_two_tiny_trainings_side_by_side_and_their_table(tmp_path, tiny_data):
    """The real script, two configurations at once on the CPU: every figure in the table is the log's."""
    common = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in
                      dict(PRESET="tiny", DATA_PATH=tiny_data["data_path"], TOKENIZER_PATH=tiny_data["tokenizer_path"],
                           VOCAB_SIZE=tiny_data["vocab_size"]).items())
    proc = run_sweep(tmp_path, "--cpu", "2", f"RUN_ID=hyb {common}", f"RUN_ID=attn {common} LAYOUT=AAAA TTT_ENABLED=0",
                     fake=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hyb, attn = (read_log(tmp_path / "logs" / f"{run}.txt") for run in ("hyb", "attn"))
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in proc.stdout.splitlines()
                                          if line.startswith("| hyb ") or line.startswith("| attn "))}
    assert rows["hyb"][sweep.COLUMNS.index("+ TTT")] == f"{hyb['final']['bpb']:.4f}"
    assert rows["hyb"][sweep.COLUMNS.index("round trip")] == f"{hyb['final_no_ttt']['bpb']:.4f}"
    assert rows["attn"][sweep.COLUMNS.index("+ TTT")] == "—"  # TTT off: no TTT score to show
    assert rows["attn"][sweep.COLUMNS.index("steps")] == f"{attn['steps']:,}"
    assert rows["attn"][sweep.COLUMNS.index("train passes")] == f"{attn['train_passes']:.2f}" != "0.00"
    assert "LAYOUT=AAAA " in rows["attn"][1] + " " and "LAYOUT=GSGs " in rows["hyb"][1] + " "  # the tiny preset's
    again = run_sweep(tmp_path, "--table", "logs/hyb.txt", "logs/attn.txt", fake=False)
    assert again.returncode == 0 and again.stdout.strip() in proc.stdout


def test_a_rescoring_row_lists_only_evaluation_settings_and_no_training_seed(tmp_path):
    # A rescoring's model comes from its artifact: a LAYOUT in its environment changed nothing, and its SEED is
    # the evaluating process's, not the artifact's.
    summary = dict(run_id="r", seed=1337, device="fake", wall_seconds=20.0, eval_only=True,
                   final_no_ttt=dict(bpb=1.4474), final=dict(bpb=1.4201))
    config = ["EVAL_ONLY=True", "ARTIFACT_PATH=artifacts/x.pgz", "TTT_LR=0.02", "LAYOUT=GGGG", "SEED=1337",
              "TTT_ENABLED=True"]
    log = tmp_path / "r.txt"
    log.write_text("".join(f"config {c}\n" for c in config) + f"summary {json.dumps(summary)}\n")
    row = dict(zip(sweep.COLUMNS, sweep.table_row(read_log(log))))
    assert row["settings beyond the defaults"] == "TTT_LR=0.02 EVAL_ONLY=True ARTIFACT_PATH=artifacts/x.pgz"
    assert row["seed"] == "—"
    assert (row["round trip"], row["+ TTT"], row["steps"], row["train passes"]) == ("1.4474", "1.4201", "—", "—")
    summary.update(eval_only=False)  # the same log as a training run's: its seed is the model's
    log.write_text("".join(f"config {c}\n" for c in config if not c.startswith("EVAL_ONLY"))
                   + f"summary {json.dumps(summary)}\n")
    row = dict(zip(sweep.COLUMNS, sweep.table_row(read_log(log))))
    assert row["seed"] == "1337" and "LAYOUT=GGGG" in row["settings beyond the defaults"]
    # writing or resuming from a training state changes nothing trained: never listed
    log.write_text("".join(f"config {c}\n" for c in config if not c.startswith("EVAL_ONLY"))
                   + "config STATE_PATH=s.pt\nconfig STATE_EVERY=500\nconfig RESUME_FROM=s.pt\n"
                   + f"summary {json.dumps(summary)}\n")
    listed = dict(zip(sweep.COLUMNS, sweep.table_row(read_log(log))))["settings beyond the defaults"]
    assert "LAYOUT=GGGG" in listed and "STATE" not in listed and "RESUME" not in listed


def test_an_export_from_row_lists_export_and_evaluation_settings_and_no_training_seed(tmp_path):
    """EXPORT_FROM's weights come from a checkpoint: its LAYOUT and MATRIX_LR changed nothing, its export settings
    did; its seed is not the model's, and the means leave it out."""
    summary = dict(run_id="x", seed=1337, device="fake", wall_seconds=20.0, eval_only=False, steps=100,
                   export_from="ckpt/a.pt", pre_quant=dict(bpb=1.40), final_no_ttt=dict(bpb=1.41), final=dict(bpb=1.39))
    config = ["EXPORT_FROM=ckpt/a.pt", "MATRIX_CLIP_SIGMAS=10.0", "MATRIX_CLIP_FIT=False", "MATRIX_LR=0.06",
              "LAYOUT=GGGG", "SEED=1337", "TTT_ENABLED=True", "CHECKPOINT_PATH="]
    (tmp_path / "x.txt").write_text("".join(f"config {c}\n" for c in config) + f"summary {json.dumps(summary)}\n")
    row = dict(zip(sweep.COLUMNS, sweep.table_row(read_log(tmp_path / "x.txt"))))
    assert row["settings beyond the defaults"] == "EXPORT_FROM=ckpt/a.pt MATRIX_CLIP_SIGMAS=10.0 MATRIX_CLIP_FIT=False"
    assert (row["seed"], row["steps"], row["round trip"]) == ("—", "100", "1.4100")
    proc = run_sweep(tmp_path, "--table", "--means", "x.txt", fake=False)
    assert proc.returncode == 0 and proc.stdout.split("\n\n", 1)[1].splitlines()[2:] == []


def test_a_log_from_before_the_clip_fit_counts_as_exported_without_it(tmp_path):
    """MATRIX_CLIP_FIT came in off and is now on: a log that records MATRIX_CLIP_SIGMAS but not MATRIX_CLIP_FIT ran
    without the fit, and groups with later runs that set MATRIX_CLIP_FIT=0; a run with the fit lists nothing."""
    summary = dict(run_id="x", seed=1337, device="fake", wall_seconds=20.0, eval_only=False, steps=100,
                   pre_quant=dict(bpb=1.40), final_no_ttt=dict(bpb=1.41), final=dict(bpb=1.39))
    for name, extra in [("old", []), ("off", ["MATRIX_CLIP_FIT=False"]), ("on", ["MATRIX_CLIP_FIT=True"])]:
        config = ["MATRIX_CLIP_SIGMAS=12.85", f"SEED={1337 + len(extra)}", *extra]
        (tmp_path / f"{name}.txt").write_text("".join(f"config {c}\n" for c in config)
                                              + f"summary {json.dumps({**summary, 'run_id': name})}\n")
    rows = {name: dict(zip(sweep.COLUMNS, sweep.table_row(read_log(tmp_path / f"{name}.txt"))))
            for name in ("old", "off", "on")}
    settings = {name: row["settings beyond the defaults"] for name, row in rows.items()}
    assert settings == {"old": "MATRIX_CLIP_FIT=False", "off": "MATRIX_CLIP_FIT=False", "on": "none"}


def test_a_log_from_before_a_setting_lists_what_ran_then(tmp_path):
    """A setting that came in with one behaviour and now defaults to another: a log from before it (it records the
    older setting named beside it, not this one) lists the value that ran then, spelled as train_gpt.py logs it, so
    it groups with later runs that set that value and not with runs of today's default."""
    defaults = sweep.tg.Config()
    for key, (older, value) in sweep.BEFORE_THE_SETTING.items():
        assert str(getattr(sweep.tg.Config.from_env({key: value}), key.lower())) == value, key  # a value it logs
        assert value != str(getattr(defaults, key.lower())), key  # else a log without it ran at the default
        old = {older: str(getattr(defaults, older.lower()))}
        assert f"{key}={value}" in sweep.changed_settings(old).split(), key
        assert key not in sweep.changed_settings({**old, key: str(getattr(defaults, key.lower()))}), key
    assert sweep.changed_settings({"SEED": "1"}) == "none"  # a log that records no older setting: nothing assumed

    # a plain-Muon pair, one from before MUON_VARIANT and one that set it, and a NorMuon run at the default
    momentum = f"MUON_MOMENTUM={defaults.muon_momentum}"
    logs = {"old": [momentum], "muon": [momentum, "MUON_VARIANT=muon"], "nor": [momentum, "MUON_VARIANT=normuon"]}
    summaries = []
    for seed, (name, config) in enumerate(logs.items(), start=1337):
        summary = dict(run_id=name, seed=seed, device="fake", wall_seconds=1.0, steps=10, final=dict(bpb=1.0))
        (tmp_path / f"{name}.txt").write_text("".join(f"config {c}\n" for c in [*config, f"SEED={seed}"])
                                              + f"summary {json.dumps(summary)}\n")
        summaries.append(read_log(tmp_path / f"{name}.txt"))
    groups = [(row[0], row[3]) for row in sweep.mean_rows(summaries)]
    assert groups == [("MUON_VARIANT=muon", "1337, 1338"), ("none", "1339")]


def test_a_log_from_before_final_no_ttt_has_its_round_trip_in_final_when_ttt_was_off(tmp_path):
    """Logs from before the summary's `final_no_ttt` keep the round trip in `final` when TTT was off (a log from
    before TTT existed ran without it); with TTT on, `final` is the TTT score and the round trip is unknown. The
    table and the means both read it so."""
    stride = f"EVAL_STRIDE={sweep.tg.Config().eval_stride}"  # logged since the first code, at today's default
    logs = {"off": (["TTT_ENABLED=False", stride], 1.25), "pre_ttt": ([stride], 1.5),
            "on": (["TTT_ENABLED=True", stride], 1.125)}
    summaries = {}
    for seed, (name, (config, final)) in enumerate(logs.items(), start=1337):
        summary = dict(run_id=name, seed=seed, device="fake", wall_seconds=1.0, steps=10, pre_quant=dict(bpb=1.0),
                       final=dict(bpb=final))
        (tmp_path / f"{name}.txt").write_text("".join(f"config {c}\n" for c in config)
                                              + f"summary {json.dumps(summary)}\n")
        summaries[name] = read_log(tmp_path / f"{name}.txt")
    rows = {name: dict(zip(sweep.COLUMNS, sweep.table_row(s))) for name, s in summaries.items()}
    assert [(rows[n]["round trip"], rows[n]["+ TTT"]) for n in logs] == [
        (f"{logs['off'][1]:.4f}", "—"), (f"{logs['pre_ttt'][1]:.4f}", "—"), ("—", f"{logs['on'][1]:.4f}")]
    means = {row[0]: dict(zip(sweep.MEAN_COLUMNS, row)) for row in sweep.mean_rows(list(summaries.values()))}
    assert means["TTT_ENABLED=False"]["runs"] == "2"  # off and pre_ttt: the same setting
    assert means["TTT_ENABLED=False"]["round trip"] == f"{(logs['off'][1] + logs['pre_ttt'][1]) / 2:.4f}"
    assert (means["none"]["round trip"], means["none"]["+ TTT"]) == ("—", f"{logs['on'][1]:.4f}")


def test_a_bar_in_a_setting_stays_in_its_cell(tmp_path):
    """LAYOUT may hold '|' (a separator train_gpt.py ignores): every cell escapes it, so no row of either table has
    more columns than its header, and the cell reads back as the setting."""
    layout = "AAAG|AAAAAA|GAAA"
    summary = dict(run_id="bar", seed=1337, device="fake", wall_seconds=1.0, steps=10, final_no_ttt=dict(bpb=1.5))
    (tmp_path / "bar.txt").write_text(f"config LAYOUT={layout}\nsummary {json.dumps(summary)}\n")
    proc = run_sweep(tmp_path, "--table", "--means", "bar.txt", fake=False)
    assert proc.returncode == 0, proc.stderr
    table, means = (part.splitlines() for part in proc.stdout.strip().split("\n\n"))
    for lines, columns in ((table, sweep.COLUMNS), (means, sweep.MEAN_COLUMNS)):
        cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
        assert [len(row) for row in cells] == [len(columns)] * 3, lines
        assert f"LAYOUT={layout}" in cells[2][columns.index("settings beyond the defaults")].split()


def test_the_table_of_logs_shows_an_unfinished_run_and_fails(tmp_path):
    """A log without a summary (a run stopped during TTT) keeps its row, with the last score it logged; the finished
    logs' rows are printed all the same, and the exit status says that one was unfinished."""
    summary = dict(run_id="done", seed=1337, device="fake", wall_seconds=20.0, final_no_ttt=dict(bpb=1.4474))
    (tmp_path / "done.txt").write_text(f"config SEED=1337\nsummary {json.dumps(summary)}\n")
    (tmp_path / "cut.txt").write_text(
        "config SEED=1337\npre_quant_ema_sliding512 val_loss:2.4666 val_bpb:1.3887 val_tokens:9\n"
        "final_int6_brotli_roundtrip_sliding512 val_loss:2.4958 val_bpb:1.4052 val_tokens:9\n"
        "final_int6_brotli_roundtrip_sliding512_exact val_loss:2.49576736 val_bpb:1.40515996\nttt: compiling\n")
    (tmp_path / "torn.txt").write_text('config SEED=1337\nsummary {"run_id": "torn", \n')  # a summary cut short
    proc = run_sweep(tmp_path, "--table", "cut.txt", "done.txt", "torn.txt", fake=False)
    assert proc.returncode == 2 and "cut.txt: no 'summary {...}' line" in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| cut ", "| done ", "| torn "))]
    assert rows[0].startswith("| cut | no summary; last score final_int6_brotli_roundtrip_sliding512 val_bpb:1.4052 |")
    assert rows[1] == "| " + " | ".join(sweep.table_row(read_log(tmp_path / "done.txt"))) + " |"
    assert rows[2].startswith("| torn | ") and "no summary" not in rows[2]  # the JSON error, not "unfinished"
    assert "torn.txt: " in proc.stderr


def test_means_group_the_runs_that_differ_only_in_their_seed(tmp_path):
    """--table --means: one row per setting and device, in order of first appearance, with the mean of each score
    over the seeds and the spread of the last one; a rescoring of one of the artifacts is no seed of its own."""
    runs = {"a1": ("1", 1337, 100, 1.50, 1.40, 1.30), "b1": ("2", 1337, 90, 1.60, 1.50, 1.45),
            "a2": ("1", 1338, 110, 1.52, 1.42, 1.34), "a3": ("1", 7, 120, 1.48, 1.38, 1.29)}
    for run_id, (skips, seed, steps, pre, rt, ttt) in runs.items():
        summary = dict(run_id=run_id, seed=seed, device="fake", wall_seconds=1.0, steps=steps,
                       pre_quant=dict(bpb=pre), final_no_ttt=dict(bpb=rt), final=dict(bpb=ttt))
        config = f"config SEED={seed}\nconfig UNET_SKIPS={skips == '1'}\nconfig TTT_ENABLED=True\n"
        (tmp_path / f"{run_id}.txt").write_text(f"run_id:{run_id}\n{config}summary {json.dumps(summary)}\n")
    rescore = dict(run_id="r", seed=1337, device="fake", wall_seconds=1.0, final_no_ttt=dict(bpb=9.0),
                   final=dict(bpb=9.0))
    (tmp_path / "r.txt").write_text(f"config EVAL_ONLY=True\nconfig TTT_ENABLED=True\nsummary {json.dumps(rescore)}\n")
    proc = run_sweep(tmp_path, "--table", "--means", "a1.txt", "b1.txt", "a2.txt", "r.txt", "a3.txt", fake=False)
    assert proc.returncode == 0, proc.stderr
    means = proc.stdout.split("\n\n", 1)[1].splitlines()
    assert means[0] == "| " + " | ".join(sweep.MEAN_COLUMNS) + " |" and len(means) == 4

    def row(settings: str, ids: list[str]) -> str:
        got = [runs[i] for i in ids]
        mean = [f"{sum(g[k] for g in got) / len(got):.4f}" for k in (3, 4, 5)]
        spread = f"{max(g[5] for g in got) - min(g[5] for g in got):.4f}" if len(got) > 1 else "—"
        steps = f"{sum(g[2] for g in got) / len(got):,.0f}"
        return "| " + " | ".join([settings, "fake", str(len(got)), ", ".join(str(g[1]) for g in got), steps, *mean,
                                  spread]) + " |"

    assert means[2] == row("none", ["a1", "a2", "a3"])
    assert means[3] == row("UNET_SKIPS=False", ["b1"])
    assert run_sweep(tmp_path, "--means", "RUN_ID=x", fake=False).returncode == 2  # it summarizes logs only


def test_means_count_a_seed_run_twice_once(tmp_path):
    """A rerun of a seed (another machine, the same settings) is averaged with its seed's first run before the mean
    over seeds, so the seed does not weigh double; the spread is still over every run, and the seeds column says
    which seed ran how often."""
    runs = {"s1": (1337, 100, 1.50, 1.40, 1.30), "s2": (1338, 140, 1.44, 1.36, 1.26),
            "s1again": (1337, 80, 1.56, 1.48, 1.40)}
    summaries = []
    for run_id, (seed, steps, pre, rt, ttt) in runs.items():
        summary = dict(run_id=run_id, seed=seed, device="fake", wall_seconds=1.0, steps=steps,
                       pre_quant=dict(bpb=pre), final_no_ttt=dict(bpb=rt), final=dict(bpb=ttt))
        (tmp_path / f"{run_id}.txt").write_text(f"config SEED={seed}\nconfig TTT_ENABLED=True\n"
                                                f"summary {json.dumps(summary)}\n")
        summaries.append(read_log(tmp_path / f"{run_id}.txt"))
    [row] = sweep.mean_rows(summaries)
    got = dict(zip(sweep.MEAN_COLUMNS, row))

    def over_seeds(k: int) -> float:
        first = (runs["s1"][k] + runs["s1again"][k]) / 2
        return (first + runs["s2"][k]) / 2

    assert (got["runs"], got["seeds"]) == ("3", "1337 ×2, 1338")
    assert got["steps"] == f"{over_seeds(1):,.0f}"
    assert [got["pre-quant"], got["round trip"], got["+ TTT"]] == [f"{over_seeds(k):.4f}" for k in (2, 3, 4)]
    plain = sum(r[4] for r in runs.values()) / len(runs)
    assert f"{plain:.4f}" != got["+ TTT"]  # the data tell the two means apart
    assert got["spread"] == f"{runs['s1again'][4] - runs['s2'][4]:.4f}"


def test_lead_is_the_other_settings_score_minus_the_firsts_on_the_seeds_both_ran(tmp_path):
    """--table --lead: for each setting after the first, the mean over the seeds both ran of (other - first) at each
    stage, each seed's runs averaged first; a seed only one of them ran is left out, a setting with no seed in common
    or a stage one of them lacks gets a dash, and the last column is each seed's lead at the last stage both have."""
    runs = {"a1": ("1", True, 1337, 1.50, 1.40, 1.30), "a1again": ("1", True, 1337, 1.54, 1.46, 1.38),
            "a2": ("1", True, 1338, 1.52, 1.42, 1.34), "a3": ("1", True, 7, 1.10, 1.10, 1.10),
            "b1": ("2", True, 1337, 1.61, 1.53, 1.47), "b2": ("2", True, 1338, 1.58, 1.49, 1.44),
            "b9": ("2", True, 99, 9.0, 9.0, 9.0), "c5": ("3", True, 5, 1.7, 1.6, 1.5),
            "d1": ("4", False, 1338, 1.55, 1.47, None)}
    for run_id, (kind, ttt_on, seed, pre, rt, ttt) in runs.items():
        summary = dict(run_id=run_id, seed=seed, device="fake", wall_seconds=1.0, steps=100,
                       pre_quant=dict(bpb=pre), final_no_ttt=dict(bpb=rt), final=dict(bpb=ttt if ttt_on else rt))
        config = f"config SEED={seed}\nconfig TTT_ENABLED={ttt_on}\n"
        config += {"1": "", "2": "config UNET_SKIPS=False\n", "3": "config MLP_MULT=2.0\n",
                   "4": "config MLP_MULT=5.0\n"}[kind]
        (tmp_path / f"{run_id}.txt").write_text(f"{config}summary {json.dumps(summary)}\n")
    files = [f"{run_id}.txt" for run_id in runs]
    proc = run_sweep(tmp_path, "--table", "--lead", *files, fake=False)
    assert proc.returncode == 0, proc.stderr
    table, means, leads = (part.splitlines() for part in proc.stdout.strip().split("\n\n"))
    assert means[0] == "| " + " | ".join(sweep.MEAN_COLUMNS) + " |" and len(means) == 2 + 4
    assert leads[0] == "| " + " | ".join(sweep.LEAD_COLUMNS) + " |" and len(leads) == 2 + 3
    got = {row.split(" | ")[0][2:]: dict(zip(sweep.LEAD_COLUMNS, row[2:-2].split(" | "))) for row in leads[2:]}

    def first(seed: int, k: int) -> float:  # the first setting's score of a seed, its runs averaged
        mine = [r[k] for r in runs.values() if r[0] == "1" and r[2] == seed]
        return sum(mine) / len(mine)

    b = {r[2]: r for r in runs.values() if r[0] == "2"}
    for k, column in ((3, "lead pre-quant"), (4, "lead round trip"), (5, "lead + TTT")):
        expected = sum(b[seed][k] - first(seed, k) for seed in (1337, 1338)) / 2
        assert got["UNET_SKIPS=False"][column] == f"{expected:+.4f}"
    assert got["UNET_SKIPS=False"]["seeds in common"] == "1337, 1338"
    assert got["UNET_SKIPS=False"]["lead per seed (last stage)"] == "; ".join(
        f"{seed}: {b[seed][5] - first(seed, 5):+.4f}" for seed in (1337, 1338))
    assert [got["MLP_MULT=2.0"][c] for c in sweep.LEAD_COLUMNS[2:]] == ["none"] + ["—"] * 4
    d = got["MLP_MULT=5.0 TTT_ENABLED=False"]  # no TTT: its lead stops at the round trip
    assert (d["seeds in common"], d["lead + TTT"]) == ("1338", "—")
    assert d["lead round trip"] == f"{1.47 - first(1338, 4):+.4f}"
    assert d["lead per seed (last stage)"] == f"1338: {1.47 - first(1338, 4):+.4f}"


def test_lead_needs_two_settings_and_the_table(tmp_path):
    summary = dict(run_id="a", seed=1, device="fake", wall_seconds=1.0, steps=1, pre_quant=dict(bpb=1.5),
                   final_no_ttt=dict(bpb=1.4), final=dict(bpb=1.3))
    (tmp_path / "a.txt").write_text(f"config SEED=1\nconfig TTT_ENABLED=True\nsummary {json.dumps(summary)}\n")
    proc = run_sweep(tmp_path, "--table", "--lead", "a.txt", fake=False)
    assert proc.returncode == 2 and "1 setting(s)" in proc.stderr
    assert proc.stdout.count("\n\n") == 1  # the runs and their means are still printed, no lead table
    for name in ("r1.txt", "r2.txt"):  # two rescorings (EVAL_ONLY) of different artifacts: no training run to compare
        (tmp_path / name).write_text(f"config SEED=1\nconfig EVAL_ONLY=True\nconfig ARTIFACT_PATH={name}.pgz\n"
                                     f"config TTT_ENABLED=True\nsummary {json.dumps(summary)}\n")
    proc = run_sweep(tmp_path, "--table", "--lead", "r1.txt", "r2.txt", fake=False)
    assert proc.returncode == 2 and "0 setting(s) of training runs (rescorings and exports are left out" in proc.stderr
    proc = run_sweep(tmp_path, "--lead", "RUN_ID=x", fake=False)
    assert proc.returncode == 2 and "--lead summarizes logs" in proc.stderr


def test_a_log_of_several_runs_is_read_for_its_last_run_only(tmp_path):
    """train_gpt.py appends a rerun under the same RUN_ID to the same log: the table and the submission tool read
    the last run alone (its summary and its settings), and a last run that failed or did not finish is reported as
    such, not replaced by the earlier run's score."""
    def run(layout: str, seed: int, end: str) -> str:
        return f"run_id:x\nconfig LAYOUT={layout}\nconfig SEED={seed}\n" + end

    def summary(seed: int, bpb: float) -> str:
        s = dict(run_id="x", seed=seed, device="fake", wall_seconds=20.0, final_no_ttt=dict(bpb=bpb + 0.01),
                 final=dict(bpb=bpb))
        return f"summary {json.dumps(s)}\n"

    first = run("GGGG", 1, summary(1, 1.5))
    (tmp_path / "twice.txt").write_text(first + run("AAAA", 2, summary(2, 1.25)))
    got = read_log(tmp_path / "twice.txt")
    assert (got["seed"], got["final"]["bpb"], got["config"]) == (2, 1.25, {"LAYOUT": "AAAA", "SEED": "2"})
    (tmp_path / "failed.txt").write_text(first + run("AAAA", 2, "run failed: RuntimeError: CUDA out of memory\n"))
    with pytest.raises(ValueError, match=r"the run \(the last of 2 runs in it\) failed: RuntimeError: CUDA out of"):
        read_log(tmp_path / "failed.txt")
    (tmp_path / "cut.txt").write_text(first + run("AAAA", 2, "final_int6_brotli_roundtrip_sliding512 val_loss:2.5 "
                                                              "val_bpb:1.4052 val_tokens:9\n"))
    proc = run_sweep(tmp_path, "--table", "twice.txt", "failed.txt", "cut.txt", fake=False)
    assert proc.returncode == 2
    rows = {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert rows["x"].startswith("| x | LAYOUT=AAAA | 2 | ") and "| 1.2600 |" in rows["x"]  # named by its RUN_ID
    assert rows["failed"].startswith("| failed | ") and "CUDA out of memory" in rows["failed"]
    assert rows["cut"].startswith("| cut | no summary; last score final_int6_brotli_roundtrip_sliding512 "
                                  "val_bpb:1.4052")  # the last run's score, not the first run's summary
    assert "cut.txt: no 'summary {...}' line (the last of 2 runs in it)" in proc.stderr


def test_more_takes_whole_lines_appended_while_it_runs_until_end(tmp_path):
    """--more: lines appended while the first run goes are queued behind it on the one slot; a half-written line
    waits until it is whole; a refused line (a bad setting, a RUN_ID already there, bytes that are not UTF-8) is
    reported and in the table without stopping the others; END stops the reading, and a line after it is reported."""
    more = tmp_path / "more.txt"
    tool = start_sweep(tmp_path, "--cpu", "1", "--more", str(more), "RUN_ID=a FAKE_SLEEP=6")
    try:
        wait_for(tmp_path / "pids" / "a", tool)
        more.write_text("RUN_ID=bb")  # no newline yet: not a configuration until it ends
        time.sleep(2.5)  # more than two of the sweep's polls
        with more.open("ab") as f:
            f.write(b"x FAKE_SLEEP=0.1\n\n# a comment\nRUN_ID=a\nRUN_ID=c LAYOUT=AXQ\nRUN_ID=f caf\xe9\n"
                    b"RUN_ID=d FAKE_SLEEP=0.1\nEND\nRUN_ID=e\n")
        out, err = tool.communicate(timeout=120)
    finally:
        stop(tool)
    assert tool.returncode == 1, out + err  # the refused lines fail the sweep; the runs did not
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["a", "bbx", "d"]  # not bb, not e (after END)
    spans = {run: json.loads((tmp_path / "spans" / run).read_text()) for run in ("a", "bbx", "d")}
    assert spans["a"][2] <= spans["bbx"][1] and spans["bbx"][2] <= spans["d"][1]  # one slot, in the file's order
    assert "more.txt line 4 refused: RUN_ID=a is already in this sweep" in err
    assert "more.txt line 5 refused: RUN_ID=c: " in err and "LAYOUT" in err
    assert "more.txt line 6 refused: 'utf-8' codec can't decode" in err
    assert "more.txt line 9 is after END: not read" in err
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert [row.split(" | ")[0] for row in rows] == ["| a", "| bbx", "| d", "| a", "| c", "| RUN_ID=f caf\ufffd"]
    assert rows[3].startswith("| a | refused (more.txt line 4): RUN_ID=a is already in this sweep |")
    assert rows[1] == "| " + " | ".join(sweep.table_row(read_log(tmp_path / "logs" / "bbx.txt"))) + " |"


def test_more_ends_with_the_last_run_and_refuses_files_it_cannot_use(tmp_path):
    """Without END the sweep still ends when its runs have ended and the file has nothing new (a file that is never
    written is no reason to wait). Before anything starts it refuses a FILE with lines already (an earlier sweep's
    would run again, or its END end the reading), a folder, a FILE in a missing folder, and --more with --table."""
    proc = run_sweep(tmp_path, "--cpu", "1", "--more", str(tmp_path / "never.txt"), "RUN_ID=a FAKE_SLEEP=0.1")
    assert proc.returncode == 0, proc.stderr
    assert "| a | " in proc.stdout
    (tmp_path / "old.txt").write_text("RUN_ID=x\nEND\n")
    for more, message in (("old.txt", "already has lines"), (".", "is a directory"), ("nowhere/m.txt", "no folder")):
        proc = run_sweep(tmp_path, "--cpu", "1", "--more", more, "RUN_ID=b")
        assert proc.returncode == 2 and message in proc.stderr, (more, proc.stderr)
    assert not (tmp_path / "pids" / "b").exists()
    proc = run_sweep(tmp_path, "--table", "--more", "x.txt", "logs/a.txt")
    assert proc.returncode == 2 and "--more adds runs to a sweep" in proc.stderr


def test_more_says_so_when_the_file_shrinks_and_goes_on(tmp_path):
    """A FILE rewritten shorter (an editor's save) is not read again from the top, which would refuse or re-run what
    it had queued: the sweep says to append, and reads on from where it was."""
    more = tmp_path / "more.txt"
    tool = start_sweep(tmp_path, "--cpu", "1", "--more", str(more), "RUN_ID=a FAKE_SLEEP=5")
    try:
        wait_for(tmp_path / "pids" / "a", tool)
        more.write_text("RUN_ID=b FAKE_SLEEP=0.1\n# two lines\n")
        time.sleep(1.5)
        more.write_text("RUN_ID=c\n")  # one line: shorter than what was read
        time.sleep(1.5)
        more.write_text("RUN_ID=b FAKE_SLEEP=0.1\n# two lines\nRUN_ID=d FAKE_SLEEP=0.1\n")  # appended after all
        out, err = tool.communicate(timeout=120)
    finally:
        stop(tool)
    assert tool.returncode == 0, out + err
    assert "more.txt now has fewer lines than the 2 already read: only append" in err
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["a", "b", "d"]


def test_a_setting_train_gpt_does_not_read_is_refused_with_the_likely_one():
    """train_gpt.py ignores environment variables it has no setting for: a misspelt setting would train the defaults
    on the GPU's time."""
    with pytest.raises(ValueError, match=r"MLP_MUTL in configuration .* is no train_gpt.py setting \(did you mean "
                                         r"MLP_MULT\?\)"):
        sweep.parse_config("RUN_ID=a MLP_MUTL=4")
    with pytest.raises(ValueError, match=r"LAYUOT .*\(did you mean LAYOUT\?\)"):
        sweep.parse_config("RUN_ID=a LAYUOT=AAAA")
    assert sweep.parse_config("RUN_ID=a PRESET=tiny TORCH_LOGS=+dynamo CUDA_LAUNCH_BLOCKING=1 QK_GAIN_INIT=4") == {
        "RUN_ID": "a", "PRESET": "tiny", "TORCH_LOGS": "+dynamo", "CUDA_LAUNCH_BLOCKING": "1", "QK_GAIN_INIT": "4"}


@pytest.mark.parametrize("gpus, visible, slots", [
    ("", "4,5", ["4", "5"]),          # every GPU this process sees, by the machine's numbers
    ("1", "4,5", ["5"]),              # --gpus numbers them as torch in this process does
    ("0,1", "GPU-aaaa,GPU-bbbb", ["GPU-aaaa", "GPU-bbbb"]),
    ("3,5", None, ["3", "5"]),        # nothing inherited: the machine's numbers
])
def test_gpu_slots_go_through_an_inherited_cuda_visible_devices(gpus, visible, slots):
    assert sweep.gpu_slots(gpus, visible) == slots


@pytest.mark.parametrize("gpus, visible, message", [
    ("0,0", None, "a GPU is named twice"),
    ("2", "4,5", "2 not among the 2 GPUs of CUDA_VISIBLE_DEVICES=4,5"),
])
def test_gpu_slots_refuse_what_would_put_two_runs_on_one_gpu_or_none(gpus, visible, message):
    with pytest.raises(ValueError, match=message):
        sweep.gpu_slots(gpus, visible)


def test_runs_scored_on_other_validation_text_are_not_averaged_with_the_others():
    """The leases score on the web text and on held-out text of the training kind: the same settings and seeds
    scored on both are two rows, the rarer text's named by its size."""
    def summary(seed, tokens, nbytes, bpb):
        return {"config": {"RUN_ID": f"r{seed}_{tokens}", "SEED": str(seed)}, "device": "H200", "seed": seed,
                "steps": 10, "final": {"bpb": bpb, "tokens": tokens, "bytes": nbytes}}

    runs = [summary(1, 1000, 3000, 1.30), summary(2, 1000, 3000, 1.32), summary(1, 1200, 2900, 1.10)]
    groups = sweep.setting_groups(runs)
    assert list(groups) == [("none", "H200"), ("none (scored on other text: 1,200 targets, 2,900 bytes)", "H200")]
    assert [len(g) for g in groups.values()] == [2, 1]


def test_where_a_training_run_writes_its_artifact_is_no_setting_of_what_it_trained():
    runs = [{"config": {"RUN_ID": f"r{seed}", "SEED": str(seed), "ARTIFACT_PATH": f"ckpt/r{seed}.pgz"},
             "device": "H200", "seed": seed, "final": {"bpb": 1.3}} for seed in (1, 2)]
    assert {key: len(group) for key, group in sweep.setting_groups(runs).items()} == {("none", "H200"): 2}
    rescoring = {"EVAL_ONLY": "True", "ARTIFACT_PATH": "ckpt/r1.pgz", "RUN_ID": "x"}
    assert sweep.changed_settings(rescoring) == "EVAL_ONLY=True ARTIFACT_PATH=ckpt/r1.pgz"  # what a rescoring did
