#!/usr/bin/env python3
"""Run several train_gpt.py configurations side by side, one per GPU, and print their results as one table.

    MAX_WALLCLOCK_SECONDS=300 python3 tools/sweep.py --gpus 0,1 \\
        'RUN_ID=hyb' \\
        'RUN_ID=attn LAYOUT=AAAAAAAAAAA MUON_VARIANT=muon MLP_MULT=3.25 UNET_SKIPS=0'
    python3 tools/sweep.py --table logs/hyb.txt logs/attn.txt        # the same table later, from the logs
    python3 tools/sweep.py --table --means logs/hyb*.txt             # ... and the mean over the seeds of each setting
    python3 tools/sweep.py --table --lead logs/hyb*.txt logs/attn*.txt  # ... and the first setting's lead over each

Each configuration is one argument of KEY=VALUE words: train_gpt.py's settings, on top of this environment (so a
setting in front of the command applies to every run). RUN_ID is required and must be new: a run's log
(logs/{RUN_ID}.txt, written by train_gpt.py in the current directory) is where its results are read back from, and
train_gpt.py appends to an existing one. Every configuration is checked (train_gpt.Config) before any run starts,
and no two runs may write the same file: artifact (ARTIFACT_PATH, by default artifacts/{RUN_ID}.pgz; EVAL_ONLY
runs read it and may share one) or checkpoint (CHECKPOINT_PATH).

Each run is `python3 train_gpt.py` alone on one GPU (CUDA_VISIBLE_DEVICES), its console in logs/{RUN_ID}.console;
with more configurations than GPUs the rest wait for a free one. `--cpu N` runs N at a time on the CPU instead
(the tiny preset; tests). The runs start in their own process sessions: Ctrl-C or SIGTERM stops them with the
sweep, but if the sweep itself is killed outright they run on, and `--table` reads their results when they finish.

`--more FILE` lets a sweep take configurations decided while it runs (the second seed of whatever did best). FILE
must be new or empty when the sweep starts. Each complete line appended to it is one more configuration (blank
lines and # comments skipped), checked like the others and queued behind them; a line END stops the reading (a line
after it is reported, not run). The sweep still ends when its last run has ended and FILE has nothing new, so a line
written after that is not run. A line that is refused (not UTF-8, a setting train_gpt.py rejects, a RUN_ID already
in the sweep or logged, a file that a run in the sweep writes) is reported at once and in the table, and the runs
go on; so do they when FILE cannot be read or shrinks (only append to it).
Adding runs by starting processes beside a sweep is what this replaces: a GPU with little memory in use is not
free when the sweep has just started a run on it.

Why: the 300 s comparisons of issue 6 (RESULTS.md) are one GPU each, so a host with N GPUs runs N of them
in the wall time of one, on the same machine, which is what a comparison needs. The table's columns are the
issue's: settings beyond the current defaults, seed, parameters, steps, tok/s, pre-quantization, round-trip and
final (TTT) val_bpb, artifact + code bytes; and how many times the run read its training shards (train passes:
on a small corpus, a comparison is one of repeated text). Exit status: 0 when every run finished with a summary,
1 when one did not (its row says why) or a --more line was refused, 2 for a configuration refused before starting.
"""

import argparse
import difflib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt as tg  # noqa: E402
from make_submission import NoSummaryError, last_run, read_log, trained, validation_text  # noqa: E402

# Settings that name a run or its files rather than what was trained; the table never lists them as changes.
NOT_SETTINGS = {"RUN_ID", "SEED", "DATA_PATH", "TOKENIZER_PATH", "CHECKPOINT_PATH", "STATE_PATH", "STATE_EVERY",
                "RESUME_FROM"}  # (and ARTIFACT_PATH for a training run, which writes it: changed_settings)
EVAL_SETTINGS = ("EVAL_", "TTT_", "STREAM_", "ARTIFACT_PATH", "VAL_MAX_TOKENS")  # what a rescoring's row lists
EXPORT_SETTINGS = EVAL_SETTINGS + ("EXPORT_FROM", "QUANT_", "GPTQ_", "MATRIX_BITS", "MATRIX_CLIP_", "EMBED_BITS",
                                   "EMBED_CLIP_SIGMAS", "COMPRESSOR", "PACKING")  # ... and an EXPORT_FROM run's
COLUMNS = ["run", "settings beyond the defaults", "seed", "device", "params", "steps", "tok/s", "train passes",
           "pre-quant", "round trip", "+ TTT", "artifact + code", "wall s"]
MEAN_COLUMNS = ["settings beyond the defaults", "device", "runs", "seeds", "steps", "pre-quant", "round trip", "+ TTT",
                "spread"]
LEAD_COLUMNS = ["settings beyond the defaults", "device", "seeds in common", "lead pre-quant", "lead round trip",
                "lead + TTT", "lead per seed (last stage)"]


@dataclass
class Run:
    settings: dict[str, str]
    returncode: int | None = None

    @property
    def run_id(self) -> str:
        return self.settings["RUN_ID"]


# Environment variables a configuration may set besides train_gpt.py's settings (Config's fields and PRESET): those
# of the libraries under it. Any other key is refused, since train_gpt.py would ignore it: a misspelt setting
# (MLP_MUTL=4) would train the default on the GPU's time.
ENV_PREFIXES = ("CUDA_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "NCCL_", "TRITON_", "PYTHON")


def parse_config(text: str, allow: tuple[str, ...] = ()) -> dict[str, str]:
    """'KEY=VALUE KEY=VALUE' (shell quoting allowed) -> {KEY: VALUE}; errors name the word that is wrong. `allow`:
    more prefixes of variables that are not train_gpt.py settings (another --script's)."""
    settings = {}
    known = {f.name.upper() for f in fields(tg.Config)} | {"PRESET"}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep or not key.isupper() or not key.replace("_", "").isalnum():
            raise ValueError(f"{word!r} in configuration {text!r} is not a KEY=VALUE setting")
        if key not in known and not key.startswith(ENV_PREFIXES + allow):
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"{key} in configuration {text!r} is no train_gpt.py setting"
                             + (f" (did you mean {close[0]}?)" if close else "")
                             + f"; it would be ignored (library variables may start with {', '.join(ENV_PREFIXES)})")
        settings[key] = value
    if not settings.get("RUN_ID"):
        raise ValueError(f"configuration {text!r} has no RUN_ID (its log, logs/RUN_ID.txt, is where results are read)")
    return settings


def written_files(cfg: tg.Config, workdir: Path) -> dict[Path, str]:
    """The files a run writes besides its log and console, each with the setting that names it: its artifact (and
    with QUANT_COMPARE the round-to-nearest one beside it) unless it is EVAL_ONLY, which reads ARTIFACT_PATH; a
    training run's CHECKPOINT_PATH and STATE_PATH."""
    files = {}
    if not cfg.eval_only:
        artifact = tg.artifact_path(cfg, cfg.run_id)
        files[artifact] = "ARTIFACT_PATH"
        if cfg.quant_compare and cfg.quant_method == "gptq":  # as train_gpt.export_and_score writes it
            files[tg.rtn_artifact_path(artifact)] = "QUANT_COMPARE's rtn artifact"
    if cfg.checkpoint_path and not cfg.model_from_file:
        files[Path(cfg.checkpoint_path)] = "CHECKPOINT_PATH"
    if cfg.state_path:
        files[Path(cfg.state_path)] = "STATE_PATH"
    return {(workdir / path).resolve(): what for path, what in files.items()}


def check_configs(configs: list[dict[str, str]], workdir: Path,
                  writers: dict[Path, str] | None = None) -> dict[Path, str]:
    """Refuses, before anything starts, a RUN_ID used twice or already logged, a setting train_gpt.py rejects, or a
    file that two runs would write (one would replace the other's; at once, one could score the other's artifact).
    `writers` holds the files of the runs already in the sweep (--more), each with the run and setting that write
    it; returned with these configurations' files added."""
    ids = [c["RUN_ID"] for c in configs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"RUN_ID used by more than one configuration: {', '.join(twice)}")
    writers = dict(writers or {})
    for settings in configs:
        log = workdir / "logs" / f"{settings['RUN_ID']}.txt"
        if log.exists():
            raise ValueError(f"{log} exists (train_gpt.py would append to it): choose another RUN_ID or move it")
        try:
            cfg = tg.Config.from_env({**os.environ, **settings})
        except ValueError as e:
            raise ValueError(f"RUN_ID={settings['RUN_ID']}: {e}") from None
        for path, what in written_files(cfg, workdir).items():
            writer = f"RUN_ID={settings['RUN_ID']} ({what})"
            if path in writers:
                raise ValueError(f"{path} would be written by {writers[path]} and by {writer}: one would replace "
                                 "the other's; give one of them another path")
            writers[path] = writer
    return writers


def gpu_slots(gpus: str, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value each slot's runs get. --gpus lists GPUs as this process sees them (0, 1, ... of
    an inherited CUDA_VISIBLE_DEVICES, as torch numbers them), mapped through that variable so that a run lands on
    the GPU meant and not on the machine's GPU of that number; without --gpus, every GPU this process sees."""
    seen = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    if gpus.strip():
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {gpus}: a GPU is named twice (two runs at a time on it)")
        if seen is None:
            return ids
        bad = [g for g in ids if not g.isdigit() or int(g) >= len(seen)]
        if bad:
            raise ValueError(f"--gpus {gpus}: {', '.join(bad)} not among the {len(seen)} GPUs of "
                             f"CUDA_VISIBLE_DEVICES={visible} (numbered from 0)")
        return [seen[int(g)] for g in ids]
    if seen is not None:
        return seen
    import torch  # noqa: PLC0415

    slots = [str(i) for i in range(torch.cuda.device_count())]
    if not slots:
        raise ValueError("no GPU is visible: name them with --gpus, or run on the CPU with --cpu N")
    return slots


def start(run: Run, slot: str, script: Path, workdir: Path) -> subprocess.Popen:
    console = workdir / "logs" / f"{run.run_id}.console"
    console.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.settings, "CUDA_VISIBLE_DEVICES": slot}
    with open(console, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop_all(running: dict[int, tuple[Run, subprocess.Popen, float]]) -> None:
    """SIGTERM to each run's process group, then SIGKILL to whatever is left after a grace period."""
    for _, proc, _ in running.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for _, proc, _ in running.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class MoreConfigs:
    """--more FILE: the configurations appended to FILE while the sweep runs. Each call of `take` reads the complete
    lines (ending in a newline) not read before, so a line being written is taken once it is whole. Nothing about
    the file stops the sweep: a line that cannot be used is refused, a file that cannot be read is reported."""

    def __init__(self, path: Path, workdir: Path, run_ids: list[str], writers: dict[Path, str],
                 allow: tuple[str, ...] = ()):
        self.path, self.workdir, self.allow = path, workdir, allow
        self.run_ids = set(run_ids)  # in the sweep so far: a later line may not reuse one
        self.writers = writers  # the files they write (check_configs): nor one of those
        self.lines_read = 0
        self.ended = False  # a line END was read
        self.refused: list[tuple[str, str]] = []  # (RUN_ID or the line, why)
        self._said: set[str] = set()

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            print(f"sweep: {message}", file=sys.stderr, flush=True)

    def take(self) -> list[Run]:
        try:
            lines = self.path.read_bytes().split(b"\n")[:-1]
        except FileNotFoundError:  # not written yet
            return []
        except OSError as e:
            self._say_once(f"cannot read {self.path} ({e.strerror}); its lines wait until it can be read")
            return []
        if len(lines) < self.lines_read:
            self._say_once(f"{self.path} now has fewer lines than the {self.lines_read} already read: only append to "
                           f"it; lines after line {self.lines_read} will be read")
            return []
        new, first = lines[self.lines_read:], self.lines_read + 1
        self.lines_read = len(lines)
        runs = []
        for number, raw in enumerate(new, start=first):
            where = f"{self.path} line {number}"
            if self.ended:
                print(f"sweep: {where} is after END: not read", file=sys.stderr, flush=True)
                continue
            settings = None
            try:
                text = raw.decode("utf-8").strip()  # a UnicodeDecodeError is a ValueError: refused like the others
                if not text or text.startswith("#"):
                    continue
                if text == "END":
                    self.ended = True
                    continue
                settings = parse_config(text, self.allow)
                if settings["RUN_ID"] in self.run_ids:
                    raise ValueError(f"RUN_ID={settings['RUN_ID']} is already in this sweep")
                self.writers = check_configs([settings], self.workdir, self.writers)
            except ValueError as e:
                name = settings["RUN_ID"] if settings else raw.decode("utf-8", "replace").strip()[:60]
                self.refused.append((name, f"refused ({self.path.name} line {number}): {e}"))
                print(f"sweep: {where} refused: {e}", file=sys.stderr, flush=True)
                continue
            self.run_ids.add(settings["RUN_ID"])
            runs.append(Run(settings))
            print(f"sweep: {settings['RUN_ID']} queued from {where}", flush=True)
        return runs

    @staticmethod
    def check_path(path: Path) -> None:
        """Before the sweep starts: FILE must be new or empty (an earlier sweep's lines would run again, and its END
        would end this one's reading) and its folder must exist (a mistyped one would be waited on in silence)."""
        if path.is_dir():
            raise ValueError(f"--more {path} is a directory, not a file")
        if not path.parent.is_dir():
            raise ValueError(f"--more {path}: there is no folder {path.parent}")
        if path.exists() and path.stat().st_size:
            raise ValueError(f"--more {path} already has lines (an earlier sweep's?): give a new or empty file")


def run_all(runs: list[Run], slots: list[str], script: Path, workdir: Path, poll_s: float = 1.0,
            more: MoreConfigs | None = None) -> None:
    """Starts each run on the first free slot, in order, and returns when all have ended (filling in their exit
    codes). With `more`, the configurations it yields join the queue (and `runs`) as they come, until the last
    run has ended and nothing new is there. Interrupted (Ctrl-C, SIGTERM), it stops the runs still going before it
    raises."""
    pending = list(runs)
    running: dict[int, tuple[Run, subprocess.Popen, float]] = {}  # by slot index (the CPU's slots are all "")
    try:
        while True:
            if more is not None:
                added = more.take()
                runs.extend(added)
                pending.extend(added)
            if not (pending or running):
                break
            for i, (run, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    run.returncode = proc.returncode
                    del running[i]
                    print(f"sweep: {run.run_id} ended (exit {run.returncode}) after {time.monotonic() - t0:.0f} s",
                          flush=True)
            for i, slot in enumerate(slots):
                if i not in running and pending:
                    run = pending.pop(0)
                    running[i] = (run, start(run, slot, script, workdir), time.monotonic())
                    where = f"GPU {slot}" if slot else "the CPU"
                    print(f"sweep: {run.run_id} started on {where}", flush=True)
            if pending or running:
                time.sleep(poll_s)
    finally:
        stop_all(running)


# Settings whose current default is not what ran before they existed (most came in off and were made the default
# later). train_gpt.py logs every setting, so a log that records the older setting named beside it (logged since the
# first code, or since the feature this one belongs to) but not this one is from before this one existed, and ran as
# the value given. A setting whose default is what ran before it needs no entry, nor one that only acts through a
# feature that did not exist yet (TTT_LR, STREAM_SEGMENT, EVAL_MAX_SECONDS came in with TTT and streaming:
# TTT_ENABLED=False says it); nor DDP_OVERLAP, though runs on several ranks split the graph (=1) before it, since one
# rank does neither. The commits are train_gpt.py's (git log -S<name> -- train_gpt.py).
BEFORE_THE_SETTING = {
    "UNET_SKIPS": ("MODEL_DIM", "False"),  # 0f57646, off; on by default since 5ed56b8
    "RESIDUAL_BF16": ("MODEL_DIM", "False"),  # 9a6dfed, off; on by default since d557d74
    "GDN_CONV": ("GDN_CONV_SIZE", "torch"),  # e4bcee2: the convolution's reference before it
    "MUON_VARIANT": ("MUON_MOMENTUM", "muon"),  # db68719, muon; normuon by default since feba901
    "STREAM_WARMUP": ("STREAM_LANES", "0"),  # 00f2fac: each lane started from an empty state before it
    "TTT_ENABLED": ("EVAL_STRIDE", "False"),  # 45f2d50, off; on by default since e9be1c6
    "TTT_STATE": ("TTT_CHUNK_TOKENS", "carry"),  # 00f2fac, carry; rebuild by default since a7637e0
    "TTT_COMPILE": ("TTT_CHUNK_TOKENS", "0"),  # 10a927a: eager before it; graphs by default since 1d890ab
    "QUANT_METHOD": ("MATRIX_BITS", "rtn"),  # 45f2d50: round to nearest before GPTQ
    "PACKING": ("MATRIX_BITS", "dense"),  # the code before the first commit (logs/h100_smoke_40s_firstcode.txt)
    "MATRIX_CLIP_FIT": ("MATRIX_CLIP_SIGMAS", "False"),  # 2897673, off; on by default since 6f7f65f (lease 12)
}


def as_run(config: dict[str, str]) -> dict[str, str]:
    """A log's settings with those it predates filled in as they ran (BEFORE_THE_SETTING)."""
    return {**{key: value for key, (older, value) in BEFORE_THE_SETTING.items() if older in config}, **config}


def changed_settings(config: dict[str, str]) -> str:
    """The settings a log's run ran with (as_run) that differ from the current Config defaults, as KEY=VALUE words:
    for a run that did not train, only those that act on what it did (evaluation; for EXPORT_FROM, export too)."""
    defaults = tg.Config()
    listed = None if trained(config) else EVAL_SETTINGS if config.get("EVAL_ONLY") == "True" else EXPORT_SETTINGS
    config = as_run(config)
    skip = NOT_SETTINGS | ({"ARTIFACT_PATH"} if listed is None else set())  # a rescoring's artifact is what it did
    words = [f"{key}={config[key]}" for key in (f.name.upper() for f in fields(tg.Config))
             if key in config and key not in skip and config[key] != str(getattr(defaults, key.lower()))
             and (listed is None or key.startswith(listed))]
    return " ".join(words) or "none"


def bpb(score: dict | None) -> str:
    return f"{score['bpb']:.4f}" if score else "—"


def round_trip(summary: dict) -> dict | None:
    """The score after the artifact's round trip without TTT: `final_no_ttt`, or in a log from before that was
    written, `final` when the run's TTT was off (as_run: a log from before TTT existed ran without it)."""
    if "final_no_ttt" in summary:
        return summary["final_no_ttt"]
    return summary.get("final") if as_run(summary["config"]).get("TTT_ENABLED") == "False" else None


def count(summary: dict, key: str) -> str:
    return f"{summary[key]:,}" if key in summary else "—"


def passes(summary: dict) -> str:
    """How many times the timed steps read the training shards (logs from before the figure was logged: —)."""
    return f"{summary['train_passes']:.2f}" if "train_passes" in summary else "—"


def table_row(summary: dict) -> list[str]:
    """The seed cell of a run that did not train (EVAL_ONLY, EXPORT_FROM) is blank: its SEED is the process's, not
    the one its model trained with (which the artifact does not record)."""
    ttt = summary["config"].get("TTT_ENABLED") == "True"
    seed = str(summary["seed"]) if trained(summary["config"]) else "—"
    return [summary["run_id"], changed_settings(summary["config"]), seed, summary["device"],
            count(summary, "params"), count(summary, "steps"), count(summary, "tokens_per_s"), passes(summary),
            bpb(summary.get("pre_quant")), bpb(round_trip(summary)), bpb(summary.get("final")) if ttt else "—",
            count(summary, "total_bytes"), f"{summary['wall_seconds']:.0f}"]


def failed_row(run_id: str, why: str) -> list[str]:
    return [run_id, why] + ["—"] * (len(COLUMNS) - 2)


def unfinished(path: Path) -> str:
    """What the last run of a log without a summary got to: its last score line (a run stopped during TTT has its
    round trip)."""
    try:
        lines = last_run(path.read_text(encoding="utf-8", errors="replace"))[0].splitlines()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    scores = [line for line in lines if re.match(r"(pre_quant|final_)\S*(?<!_exact) val_loss:", line)]
    if not scores:
        return "no summary, no score"
    tag, rest = scores[-1].split(" ", 1)
    bpb_field = re.search(r"val_bpb:\S+", rest)
    return f"no summary; last score {tag} {bpb_field.group(0) if bpb_field else rest}"


def markdown(rows: list[list[str]], columns: list[str] = COLUMNS) -> str:
    """A markdown table; a '|' in a cell (LAYOUT's separator, a refused line's text) is escaped, not a new column."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows])


def setting_groups(summaries: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The training runs grouped by what they trained (the same settings beyond the defaults, seed aside) on the same
    device and scored on the same validation text, in order of first appearance; a group scored on other text than
    most runs says so after its settings. Runs that did not train (rescorings, EXPORT_FROM) are left out: their seed
    is not the model's."""
    trained_runs = [s for s in summaries if trained(s["config"])]
    common = Counter(map(validation_text, trained_runs)).most_common(1)
    groups: dict[tuple[str, str], list[dict]] = {}
    for summary in trained_runs:
        settings, val = changed_settings(summary["config"]), validation_text(summary)
        if common and val != common[0][0] and val is not None:
            settings += f" (scored on other text: {val[0]:,} targets, {val[1]:,} bytes)"
        groups.setdefault((settings, summary["device"]), []).append(summary)
    return groups


def seed_means(runs: list[dict], values: list[float]) -> dict[int, float]:
    """values (one per run, in the runs' order) averaged over each seed's runs, by seed in order of first appearance;
    empty when a run lacks the value."""
    if len(values) != len(runs):
        return {}
    per_seed: dict[int, list[float]] = {}
    for value, run in zip(values, runs):
        per_seed.setdefault(run["seed"], []).append(value)
    return {seed: sum(v) / len(v) for seed, v in per_seed.items()}


def stage_scores(runs: list[dict]) -> list[list[float]]:
    """Each run's pre-quant, round-trip and + TTT bpb, as three lists (one value per run); a list is empty when a run
    lacks that score (+ TTT: unless every run had TTT on)."""
    def scores(score: Callable[[dict], dict | None]) -> list[float]:
        got = [s["bpb"] for s in map(score, runs) if s]
        return got if len(got) == len(runs) else []

    ttt = scores(lambda r: r.get("final")) if all(r["config"].get("TTT_ENABLED") == "True" for r in runs) else []
    return [scores(lambda r: r.get("pre_quant")), scores(round_trip), ttt]


def mean_rows(summaries: list[dict]) -> list[list[str]]:
    """One row per group of setting_groups: the mean steps and scores of each group over its seeds, and the spread
    (largest minus smallest) of its last score over its runs (+ TTT when every run has it, else the round trip). A
    seed run more than once counts once, with the mean of its runs, so a rerun does not weigh its seed double; the
    seeds column says how many runs such a seed had."""
    rows = []
    for (settings, device), runs in setting_groups(summaries).items():
        counts = Counter(r["seed"] for r in runs)  # runs per seed, seeds in order of first appearance

        def over_seeds(values: list[float], fmt: str = ".4f") -> str:  # one value per run, in the runs' order
            means = seed_means(runs, values)
            return format(sum(means.values()) / len(means), fmt) if means else "—"

        pre, trip, ttt = stage_scores(runs)
        last = ttt or trip
        rows.append([settings, device, str(len(runs)),
                     ", ".join(f"{seed} ×{n}" if n > 1 else str(seed) for seed, n in counts.items()),
                     over_seeds([r["steps"] for r in runs if "steps" in r], ",.0f"),
                     over_seeds(pre), over_seeds(trip), over_seeds(ttt),
                     f"{max(last) - min(last):.4f}" if len(last) > 1 else "—"])
    return rows


def lead_rows(summaries: list[dict]) -> list[list[str]]:
    """How far the first group of setting_groups is ahead of each other group, on the seeds both ran: for each stage
    the mean over those seeds of (other − first), each seed's runs averaged first, so a positive lead means the first
    setting scores lower. The last column gives each seed's lead at the last stage both groups have. A group with no
    seed in common gets —, and so does a stage that a run of either group lacks (stage_scores)."""
    groups = list(setting_groups(summaries).items())
    if len(groups) < 2:
        raise ValueError(f"--lead compares the first setting with the others; the logs hold {len(groups)} setting(s) "
                         "of training runs (rescorings and exports are left out: their seed is not the model's)")
    (_, first), others = groups[0], groups[1:]
    first_stages = [seed_means(first, values) for values in stage_scores(first)]
    rows = []
    for (settings, device), runs in others:
        theirs_seeds = {r["seed"] for r in runs}
        common = [seed for seed in dict.fromkeys(r["seed"] for r in first) if seed in theirs_seeds]
        leads = []  # seed_means gives every seed of its group or none, so a stage both have covers common
        for mine, theirs in zip(first_stages, (seed_means(runs, values) for values in stage_scores(runs))):
            leads.append({seed: theirs[seed] - mine[seed] for seed in common} if mine and theirs else {})
        shown = [lead for lead in leads if lead]
        rows.append([settings, device, ", ".join(map(str, common)) or "none",
                     *(f"{sum(lead.values()) / len(lead):+.4f}" if lead else "—" for lead in leads),
                     "; ".join(f"{seed}: {value:+.4f}" for seed, value in shown[-1].items()) if shown else "—"])
    return rows


def row_for(run: Run, workdir: Path) -> tuple[list[str], bool]:
    """The run's table row from its log, or, if it exited with an error or wrote no summary, a row that says so
    with the last line of its console."""
    if run.returncode == 0:
        try:
            return table_row(read_log(workdir / "logs" / f"{run.run_id}.txt")), True
        except (OSError, ValueError):
            pass
    console = (workdir / "logs" / f"{run.run_id}.console").read_text(encoding="utf-8", errors="replace")
    last = next((line for line in reversed(console.splitlines()) if line.strip()), "no output")
    return failed_row(run.run_id, f"failed (exit {run.returncode}): {last.strip()[:200]}"), False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="one 'KEY=VALUE ...' string per run (with --table: log files)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", default="", help="comma-separated GPU ids, one run on each (default: every GPU)")
    where.add_argument("--cpu", type=int, default=0, help="run this many at a time on the CPU instead")
    p.add_argument("--table", action="store_true",
                   help="print the table of runs' logs (a log without a summary: its last score; exit 2); start nothing")
    p.add_argument("--means", action="store_true",
                   help="with --table: also the mean of the runs that differ only in their seed (and their spread)")
    p.add_argument("--lead", action="store_true",
                   help="with --table: the means, and how far the first log's setting is ahead of each other setting "
                        "on the seeds both ran (other minus first)")
    p.add_argument("--more", type=Path, default=None, metavar="FILE",
                   help="also run the configurations appended to FILE while the sweep runs, one per line (END stops)")
    p.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help=argparse.SUPPRESS)
    p.add_argument("--allow-env", action="append", default=[], help=argparse.SUPPRESS)  # another script's variables
    args = p.parse_args(argv)
    if args.table and args.more:
        print("sweep: --more adds runs to a sweep; --table starts none", file=sys.stderr)
        return 2
    if (args.means or args.lead) and not args.table:
        print(f"sweep: {'--lead' if args.lead else '--means'} summarizes logs; use it with --table", file=sys.stderr)
        return 2
    if args.table:
        rows, bad, summaries = [], [], []
        for path in map(Path, args.configs):
            try:
                summaries.append(read_log(path))
                rows.append(table_row(summaries[-1]))
            except (OSError, ValueError) as e:  # the row says what is wrong; a missing summary: how far it got
                rows.append(failed_row(path.stem, unfinished(path) if isinstance(e, NoSummaryError) else str(e)[:200]))
                bad.append(str(e) if str(path) in str(e) else f"{path}: {e}")
        print(markdown(rows))
        if args.means or args.lead:
            print()
            print(markdown(mean_rows(summaries), MEAN_COLUMNS))
        if args.lead:
            try:
                leads = lead_rows(summaries)
            except ValueError as e:
                bad.append(str(e))
            else:
                print()
                print(markdown(leads, LEAD_COLUMNS))
        for why in bad:
            print(f"sweep: {why}", file=sys.stderr)
        return 2 if bad else 0
    workdir = Path.cwd()
    try:
        if args.cpu < 0:
            raise ValueError(f"--cpu {args.cpu}: the number of runs at a time must be positive")
        runs = [Run(parse_config(text, tuple(args.allow_env))) for text in args.configs]
        writers = check_configs([run.settings for run in runs], workdir)
        if args.more is not None:
            MoreConfigs.check_path(args.more)
        slots = [""] * args.cpu if args.cpu else gpu_slots(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    more = (MoreConfigs(args.more, workdir, [run.run_id for run in runs], writers, tuple(args.allow_env))
            if args.more else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run_all(runs, slots, args.script, workdir, more=more)
    rows, ok = zip(*(row_for(run, workdir) for run in runs))
    refused = [failed_row(name, why[:200]) for name, why in more.refused] if more else []
    print(markdown(list(rows) + refused))
    return 0 if all(ok) and not refused else 1


if __name__ == "__main__":
    sys.exit(main())
