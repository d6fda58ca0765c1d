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
same world size and gradient accumulation (the `runtime:` line; each micro-batch reads one token past its span). A
pair that differs in any of these is refused, with what differs. The last run of each log is read (train_gpt.py
appends a rerun of a RUN_ID to its log); it need not have finished.

Why: on a text read several times in a run, the training loss and the validation score can disagree (RESULTS.md,
issue 6 at 600 s: the hybrid's training loss ends 0.013 below all-attention's while its validation score is worse);
this prints that comparison from the logs instead of by hand.
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_submission import last_run, logged_config, trained  # noqa: E402

DEFAULT_RANGE_STEPS = 400
SAME_BATCH_SETTINGS = ("SEED", "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN")
STEP_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.eE+-]+|nan|inf) ", flags=re.M)


@dataclass
class TrainLog:
    path: Path
    settings: dict[str, str]  # what decides the batches, as logged
    windows: dict[tuple[int, int], float]  # (first step, last step) -> the mean training loss over those steps


def read_train_log(path: Path) -> TrainLog:
    """The training-loss windows and batch-deciding settings of the last run in one train_gpt.py log."""
    text, _ = last_run(path.read_text(encoding="utf-8", errors="replace"))
    config = logged_config(text)
    if not trained(config):
        raise ValueError(f"{path}: the run did not train (EVAL_ONLY or EXPORT_FROM); it has no training losses")
    settings = {key: config.get(key, "(not logged)") for key in SAME_BATCH_SETTINGS}
    runtime = re.search(r"^runtime: world_size:(\d+) grad_accum_steps:(\d+)", text, flags=re.M)
    data = re.search(r"^train_data: (\d+) shards?, ([\d,]+) tokens", text, flags=re.M)  # older logs: "1 shards"
    settings["world size x gradient accumulation"] = f"{runtime[1]} x {runtime[2]}" if runtime else "(not logged)"
    settings["training text"] = f"{data[1]} shard(s), {data[2]} tokens" if data else "(not logged)"
    windows, previous = {}, 0
    for match in STEP_LINE.finditer(text):
        step = int(match[1])
        if step > previous:  # a step line repeated (a warm-up's) or out of order would make a window of no steps
            windows[(previous + 1, step)] = float(match[2])
            previous = step
    if not windows:
        raise ValueError(f"{path}: no `step:N/M train_loss:...` lines in its last run; did it train?")
    return TrainLog(path, settings, windows)


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
    """One row per range: its windows, steps, each run's mean loss over those steps and the difference A - B."""
    common = sorted(set(a.windows) & set(b.windows), key=lambda w: w[1])
    if not common:
        raise ValueError(f"{a.path} and {b.path} log no window of the same steps (TRAIN_LOG_EVERY differs?)")
    rows = []
    for lo, hi in ranges or default_ranges(common[-1][1]):
        inside = [w for w in common if lo <= w[1] <= hi]
        steps = sum(w[1] - w[0] + 1 for w in inside)
        row = dict(first=lo, last=hi, windows=len(inside), steps=steps, a=None, b=None, diff=None)
        if inside:
            row["a"], row["b"] = (sum(log.windows[w] * (w[1] - w[0] + 1) for w in inside) / steps for log in (a, b))
            row["diff"] = row["a"] - row["b"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], a: TrainLog, b: TrainLog) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    lines = [f"| window ends at steps | windows | steps | A {a.path.stem} | B {b.path.stem} | A - B |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['first']:,}–{r['last']:,} | {r['windows']} | {r['steps']:,} | {cell(r['a'], '.4f')} | "
                     f"{cell(r['b'], '.4f')} | {cell(r['diff'], '+.4f')} |")
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
