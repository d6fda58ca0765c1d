#!/usr/bin/env python3
"""Two training runs' losses on the same batches: the mean of A's logged training loss minus B's, over step ranges.

    python3 tools/loss_diff.py logs/hyb.txt logs/attn.txt                          # ranges of 400 steps
    python3 tools/loss_diff.py logs/hyb.txt logs/attn.txt --ranges 800-1199,1200-1599,2000-2500

train_gpt.py logs `step:N/M train_loss:L ...` every TRAIN_LOG_EVERY steps (and for the last steps under the cap),
where L is the mean loss of the steps since the line before. Each such line is a window of steps; a window counts in
a range when the step that ends it is in the range (both ends included), and only windows that both logs cover with
the same steps are compared. A range's figure is the mean over its steps (each window weighted by its steps) of A's
loss minus B's: negative when A's training loss is lower.

Two runs see the same batches when their data order and batch shapes match: the same SEED (it orders the shards),
the same training text (the `train_data:` line: shards and tokens), TRAIN_BATCH_TOKENS and TRAIN_SEQ_LEN, and the
same number of spans per step, world size times gradient accumulation (the `runtime:` line; each micro-step the
ranks take consecutive spans of the stream, each reading one token past its own, so one process accumulating two
micro-batches reads what two processes read in one). A pair that differs in any of these is refused, with what
differs. A log of several ranks written before session 60 holds rank 0's loss alone, its share of each batch. The
last run of each log is read (train_gpt.py appends a rerun of a RUN_ID to its log); it need not have finished.

Each row also gives both runs' mean learning-rate multiplier over its steps (train_gpt.py's lr_multiplier: the
warmup, then 1, then the warmdown over the last WARMDOWN_FRAC of the run in steps or wallclock, whichever is
further), from each log's schedule settings and its step lines' training times (the time before a step between two
lines interpolated). Two runs at different speeds under the same wallclock cap start their warmdowns at different
steps, and from there the same step is taken at different rates: only rows whose multipliers agree compare the
runs at the same rate (lease 54's comparison of a slowed run, RESULTS.md). A log without those settings shows —.
A resumed run's windows and clock begin at the step it resumed after (its `resume:` line), so its first window,
shorter than the run that went on had there, matches none of that run's.

Why: on a text read several times in a run, the training loss and the validation score can disagree (RESULTS.md,
issue 6 at 600 s: the hybrid's training loss ends 0.013 below all-attention's while its validation score is worse);
this prints that comparison from the logs instead of by hand.
"""

import argparse
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_submission import last_run, logged_config, trained  # noqa: E402
import train_gpt as tg  # noqa: E402

DEFAULT_RANGE_STEPS = 400
SAME_BATCH_SETTINGS = ("SEED", "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN")
STEP_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.eE+-]+|nan|inf) (?:train_time:(\d+)ms)?", flags=re.M)
# the Config fields lr_multiplier reads (each logged as `config FIELD_IN_CAPITALS=value`)
SCHEDULE_FIELDS = {f.name: f.type for f in fields(tg.Config)
                   if f.name in ("iterations", "lr_warmup_steps", "warmdown_frac", "warmdown_shape",
                                 "max_wallclock_seconds", "gptq_reserve_seconds", "quant_method")}


@dataclass
class TrainLog:
    path: Path
    settings: dict[str, str]  # what decides the batches, as logged
    windows: dict[tuple[int, int], float]  # (first step, last step) -> the mean training loss over those steps
    rates: dict[int, float] | None  # step -> its learning-rate multiplier (None: the log does not say)


def learning_rates(config: dict[str, str], times_ms: dict[int, int], first: int = 0,
                   first_ms: int = 0) -> dict[int, float] | None:
    """Each step's learning-rate multiplier (the steps after `first`, where a resumed run began, to the last
    logged), as train_gpt.lr_multiplier gave it: step s is the loop's step s - 1, read with the training time
    before it, which between two logged step lines is interpolated linearly (from `first_ms` at step `first`).
    None when the log lacks a schedule setting or the step times."""
    if not times_ms or any(name.upper() not in config for name in SCHEDULE_FIELDS):
        return None
    try:  # read as train_gpt.py reads its environment
        cfg = tg.Config(**{name: tg._parse_env_value(name.upper(), config[name.upper()], typ)
                           for name, typ in SCHEDULE_FIELDS.items()})
    except ValueError:
        return None
    known = sorted({first: first_ms, **times_ms}.items())
    rates, i = {}, 0
    for step in range(first + 1, known[-1][0] + 1):
        done = step - 1  # steps finished before this one
        while known[i + 1][0] < done:
            i += 1
        (s0, t0), (s1, t1) = known[i], known[i + 1]
        elapsed_ms = t0 + (t1 - t0) * (done - s0) / (s1 - s0)
        rates[step] = tg.lr_multiplier(done, elapsed_ms / 1000, cfg)
    return rates


def read_train_log(path: Path) -> TrainLog:
    """The training-loss windows and batch-deciding settings of the last run in one train_gpt.py log."""
    text, _ = last_run(path.read_text(encoding="utf-8", errors="replace"))
    config = logged_config(text)
    if not trained(config):
        raise ValueError(f"{path}: the run did not train (EVAL_ONLY or EXPORT_FROM); it has no training losses")
    settings = {key: config.get(key, "(not logged)") for key in SAME_BATCH_SETTINGS}
    runtime = re.search(r"^runtime: world_size:(\d+) grad_accum_steps:(\d+)", text, flags=re.M)
    data = re.search(r"^train_data: (\d+) shards?, ([\d,]+) tokens", text, flags=re.M)  # older logs: "1 shards"
    # every micro-step the ranks take consecutive spans of the stream, so the batches depend on the product alone:
    # 1 process accumulating 2 micro-batches reads the spans 2 processes read in one
    settings["spans per step (world size x gradient accumulation)"] = (
        str(int(runtime[1]) * int(runtime[2])) if runtime else "(not logged)")
    settings["training text"] = f"{data[1]} shard(s), {data[2]} tokens" if data else "(not logged)"
    # a resumed run's first step line averages the steps since the one it resumed after, its clock goes on from there
    resumed = re.search(r"^resume: .* after step (\d+) \((\d+)ms trained", text, flags=re.M)
    first, first_ms = (int(resumed[1]), int(resumed[2])) if resumed else (0, 0)
    windows, times_ms, previous = {}, {}, first
    for match in STEP_LINE.finditer(text):
        step = int(match[1])
        if step > previous:  # a step line repeated (a warm-up's) or out of order would make a window of no steps
            windows[(previous + 1, step)] = float(match[2])
            if match[3] is not None:
                times_ms[step] = int(match[3])
            previous = step
    if not windows:
        raise ValueError(f"{path}: no `step:N/M train_loss:...` lines in its last run; did it train?")
    timed = len(times_ms) == len(windows)
    return TrainLog(path, settings, windows, learning_rates(config, times_ms, first, first_ms) if timed else None)


def check_same_batches(a: TrainLog, b: TrainLog) -> None:
    differ = [f"{key}: {a.settings[key]} against {b.settings[key]}" for key in a.settings
              if a.settings[key] != b.settings[key] or a.settings[key] == "(not logged)"]
    if differ:
        raise ValueError(f"{a.path} and {b.path} did not train on the same batches (or a log does not say): "
                         + "; ".join(differ))


def parse_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if not m or int(m[1]) > int(m[2]):
            raise ValueError(f"--ranges: {part!r} is not FIRST-LAST with FIRST <= LAST (steps, e.g. 800-1199)")
        ranges.append((int(m[1]), int(m[2])))
    if not ranges:
        raise ValueError("--ranges names no range")
    return ranges


def default_ranges(last_step: int, size: int = DEFAULT_RANGE_STEPS) -> list[tuple[int, int]]:
    """0-399, 400-799, ... up to the last step both logs cover (window ends fall on multiples of the log interval,
    so a range that starts on a multiple of 400 takes the window that ends on its first step)."""
    return [(lo, min(lo + size - 1, last_step)) for lo in range(0, last_step + 1, size)]


def compare(a: TrainLog, b: TrainLog, ranges: list[tuple[int, int]] | None = None) -> list[dict]:
    """One row per range: its windows, steps, each run's mean loss over those steps and the difference A - B, and
    each run's mean learning-rate multiplier over those steps (None where its log does not say)."""
    common = sorted(set(a.windows) & set(b.windows), key=lambda w: w[1])
    if not common:
        raise ValueError(f"{a.path} and {b.path} log no window of the same steps (TRAIN_LOG_EVERY differs?)")
    rows = []
    for lo, hi in ranges or default_ranges(common[-1][1]):
        inside = [w for w in common if lo <= w[1] <= hi]
        steps = sum(w[1] - w[0] + 1 for w in inside)
        row = dict(first=lo, last=hi, windows=len(inside), steps=steps, a=None, b=None, diff=None, a_lr=None,
                   b_lr=None)
        if inside:
            row["a"], row["b"] = (sum(log.windows[w] * (w[1] - w[0] + 1) for w in inside) / steps for log in (a, b))
            row["diff"] = row["a"] - row["b"]
            for key, log in (("a_lr", a), ("b_lr", b)):
                if log.rates is not None:
                    row[key] = sum(log.rates[s] for w in inside for s in range(w[0], w[1] + 1)) / steps
        rows.append(row)
    return rows


def markdown(rows: list[dict], a: TrainLog, b: TrainLog) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    lines = [f"| window ends at steps | windows | steps | A {a.path.stem} | B {b.path.stem} | A - B | "
             "LR multiplier A / B |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['first']:,}–{r['last']:,} | {r['windows']} | {r['steps']:,} | {cell(r['a'], '.4f')} | "
                     f"{cell(r['b'], '.4f')} | {cell(r['diff'], '+.4f')} | {cell(r['a_lr'], '.3f')} / "
                     f"{cell(r['b_lr'], '.3f')} |")
    for log, name in ((a, "A"), (b, "B")):
        if log.rates is None:
            lines.append(f"{name}: its log does not give the schedule settings or step times; its rate is not known")
        else:
            warmdown = [s for s, m in log.rates.items() if m < 1.0 and log.rates.get(s - 1) == 1.0]
            lines.append(f"{name}: at its full learning rate through step {warmdown[0] - 1:,}" if warmdown else
                         f"{name}: no warmdown in its {max(log.rates):,} logged steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="a train_gpt.py log (A)")
    p.add_argument("b", type=Path, help="another, trained on the same batches (B)")
    p.add_argument("--ranges", default="", help="FIRST-LAST step ranges, comma-separated (default: 400 steps each)")
    args = p.parse_args(argv)
    try:
        a, b = read_train_log(args.a), read_train_log(args.b)
        check_same_batches(a, b)
        rows = compare(a, b, parse_ranges(args.ranges) if args.ranges else None)
    except (OSError, ValueError) as e:
        print(f"loss_diff: {e}", file=sys.stderr)
        return 2
    print(markdown(rows, a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
