"""The benchmark tool runs end to end (tiny configuration on the CPU) and reports both stacks and the breakdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_reports_both_stacks_and_a_breakdown(tmp_path):
    env = {**os.environ, "PRESET": "tiny", "BENCH_STEPS": "2", "BENCH_WARMUP": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("bench "))[6:])
    hybrid, attn = bench["runs"]
    assert hybrid["layout"] == "GSGs" and set(attn["layout"]) == {"A"}
    assert abs(attn["params"] - hybrid["params"]) < 0.2 * hybrid["params"]
    assert bench["ratio"] == round(hybrid["tokens_per_s"] / attn["tokens_per_s"], 4)
    assert {"gdn mixer x2", "swa mixer x2", "mlp x4", "optimizer (Muon + Adam)", "data loader"} <= set(bench["breakdown_ms"])
    assert all(v > 0 for v in bench["breakdown_ms"].values())
