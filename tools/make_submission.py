#!/usr/bin/env python3
"""Write a challenge submission.json from the logs that train_gpt.py wrote (one log per seed), never by hand.

    python3 tools/make_submission.py logs/seed1337.txt logs/seed42.txt logs/seed7.txt \
        --author "Name" --github-id handle --name "GDN hybrid" --blurb "..." --out submission.json

Each log must end with train_gpt.py's `summary {...}` line (a finished training run on the full validation split)
and hold the copy of the code that ran, which train_gpt.py logs first (a log that tools/log_code.py stripped is
refused until `tools/log_code.py restore` puts it back). The logs must be seeds of one configuration: the same
settings but for SEED, RUN_ID and paths, the same code (the logged copies' sha256; with --script FILE, FILE's too),
the same GPUs and torch, scored on the same validation text (targets and bytes). The track is 10min_16mb only if
every run used 8 H100s (SXM, as the record track requires) and every compliance check holds (training within 600 s,
artifact + code within 16,000,000 bytes, evaluation within 600 s); otherwise non_record_16mb.
"""

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_gpt, for the layout

LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_MS = 600_000
EVAL_LIMIT_S = 600.0
RECORD_GPUS = 8
PER_SEED_SETTINGS = {"SEED", "RUN_ID", "ARTIFACT_PATH", "CHECKPOINT_PATH", "DATA_PATH", "TOKENIZER_PATH",
                     "STATE_PATH", "STATE_EVERY", "RESUME_FROM"}  # the last three never change what is trained


def record_hardware(run: dict) -> bool:
    """8 H100s of the SXM form (torch names it 'NVIDIA H100 80GB HBM3'; the PCIe and NVL parts say so)."""
    device = run["device"]
    return run["world_size"] == RECORD_GPUS and "H100" in device and not any(s in device for s in ("PCIe", "NVL"))


def validation_text(run: dict) -> tuple[int, int] | None:
    """The (targets, bytes) a run's scores cover: which validation text it was scored on (DATA_PATH is a per-seed
    path, and the held-out text of the leases is another set); None for a summary without them."""
    score = run.get("final") or run.get("pre_quant")
    return (score["tokens"], score["bytes"]) if score and "tokens" in score and "bytes" in score else None


def require_one_configuration(runs: list[dict]) -> None:
    """The runs are seeds of one submission: refuses, naming the logs and what differs, runs whose settings (but for
    PER_SEED_SETTINGS), code (bytes, and the logged copy's sha256), GPU, number of GPUs, torch or validation text
    differ."""
    first = runs[0]
    for run in runs[1:]:
        keys = (set(first["config"]) | set(run["config"])) - PER_SEED_SETTINGS
        differ = {k: (first["config"].get(k), run["config"].get(k)) for k in sorted(keys)
                  if first["config"].get(k) != run["config"].get(k)}
        for key in ("code_bytes", "code_sha256", "device", "world_size", "torch"):
            if first.get(key) != run.get(key):
                differ[key] = (first.get(key), run.get(key))
        if validation_text(first) != validation_text(run):
            differ["validation text (targets, bytes)"] = (validation_text(first), validation_text(run))
        if differ:
            raise ValueError(f"{first['log']} and {run['log']} are not seeds of one configuration: "
                             + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))


class NoSummaryError(ValueError):
    """A log without train_gpt.py's `summary {...}` line: the run has not finished (or was stopped)."""


def last_run(text: str) -> tuple[str, int]:
    """The last run of a train_gpt.py log (from its `run_id:` line on; the whole text if there is none) and how many
    runs the log holds."""
    starts = [m.start() for m in re.finditer(r"^run_id:", text, flags=re.M)]
    return (text[starts[-1]:] if starts else text), len(starts)


def logged_config(run_text: str) -> dict[str, str]:
    """The settings one run logged (its `config KEY=VALUE` lines), as strings."""
    return dict(re.findall(r"^config (\w+)=(.*)$", run_text, flags=re.M))


def trained(config: dict[str, str]) -> bool:
    """Whether the run trained its model: a rescoring (EVAL_ONLY) takes it from an artifact, an EXPORT_FROM run from
    a checkpoint; the seed of either is the process's, not the model's."""
    return config.get("EVAL_ONLY") != "True" and not config.get("EXPORT_FROM")


def read_log(path: Path) -> dict:
    """The `summary {...}` of the last run in one train_gpt.py log, with that run's settings under "config" (as
    logged, strings) and the log's path under "log". train_gpt.py appends to the log of a RUN_ID used before, so a
    log can hold several runs, each from its `run_id:` line on; only the last one counts (an earlier run's summary
    beside a later run's settings would describe neither). A last run that failed or has no summary is an error that
    names the log."""
    last, runs = last_run(path.read_text(encoding="utf-8"))
    which = f" (the last of {runs} runs in it)" if runs > 1 else ""
    failed = re.search(r"^run failed: (.*)$", last, flags=re.M)
    if failed:
        raise ValueError(f"{path}: the run{which} failed: {failed.group(1)[:200]}")
    lines = [line for line in last.splitlines() if line.startswith("summary {")]
    if not lines:
        raise NoSummaryError(f"{path}: no 'summary {{...}}' line{which}; did the run finish?")
    summary = json.loads(lines[-1][len("summary "):])
    summary["config"] = logged_config(last)
    summary["log"] = str(path)
    return summary


def logged_code_sha256(path: Path) -> str:
    """The sha256 of the code the log's last run logged at its head (train_gpt.py's first lines of a run: its own
    bytes, then a rule and `run_id:`). Refuses a log without that copy, or with only tools/log_code.py's line for it,
    since a submission's log shows the code that made it."""
    from log_code import SCRIPT_START, runs, stub_at  # noqa: PLC0415 (train_gpt and torch; only needed here)

    data = path.read_bytes()
    ends = runs(data)
    if not ends:
        raise ValueError(f"{path}: no copy of the code at the head of its run (train_gpt.py logs its own bytes first)")
    start, end = (ends[-2] if len(ends) > 1 else 0), ends[-1]
    if stub_at(data, start, end)[1] is not None:
        raise ValueError(f"{path}: its copy of the code was elided (tools/log_code.py strip); `python3 "
                         f"tools/log_code.py restore {path}` puts it back, and a submission's log shows its code")
    opening = SCRIPT_START.search(data, start, end)
    if opening is None:
        raise ValueError(f"{path}: no copy of the code at the head of its last run")
    return hashlib.sha256(data[opening.start():end]).hexdigest()


def read_run(path: Path) -> dict:
    """The summary and the config of one finished training run's log, with the sha256 of the code it logged;
    errors name the log and what is wrong."""
    summary = read_log(path)
    if summary.get("eval_only"):
        raise ValueError(f"{path}: an EVAL_ONLY rescoring log, not a training run")
    if summary.get("export_from"):
        raise ValueError(f"{path}: an EXPORT_FROM log (weights from {summary['export_from']}), not a training run; "
                         "a submission cites the log of the run that trained them")
    if summary.get("partial_validation"):
        raise ValueError(f"{path}: scored on part of the validation split (VAL_MAX_TOKENS); not a submission score")
    if summary["total_bytes"] > LIMIT_BYTES:
        raise ValueError(f"{path}: artifact + code is {summary['total_bytes']:,} bytes, over the {LIMIT_BYTES:,}-byte "
                         "limit that both tracks share; not a submission")
    summary["code_sha256"] = logged_code_sha256(path)
    return summary


def eval_seconds(run: dict) -> float:
    return float(run["final"]["seconds"])


def build(runs: list[dict], args: argparse.Namespace) -> dict:
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two logs share a seed: {seeds}")
    require_one_configuration(runs)
    script = getattr(args, "script", None)
    if script is not None:
        sha = hashlib.sha256(script.read_bytes()).hexdigest()
        if sha != runs[0]["code_sha256"]:
            raise ValueError(f"{script} (sha256 {sha[:16]}…) is not the code the logs ran (sha256 "
                             f"{runs[0]['code_sha256'][:16]}…): the submission's script must be the one that made them")
    bpbs = [r["final"]["bpb"] for r in runs]
    compliance = dict(
        train_under_600s=all(r.get("budget_used_ms", r["train_time_ms"]) <= TRAIN_LIMIT_MS for r in runs),
        artifact_under_16mb=all(r["total_bytes"] <= LIMIT_BYTES for r in runs),
        eval_under_600s=all(eval_seconds(r) <= EVAL_LIMIT_S for r in runs),
        score_first_ttt=True,  # train_gpt.py never adapts before scoring
        full_validation_split=True,
        scored_from_artifact_on_disk=True,
        training_in_one_log=all(r.get("resumed_from_step") is None for r in runs),  # RESUME_FROM: the rest is elsewhere
    )
    record = all(record_hardware(r) for r in runs) and all(compliance.values())
    return dict(
        author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb,
        date=args.date or dt.date.today().isoformat(),
        track="10min_16mb" if record else "non_record_16mb",
        val_loss=round(statistics.mean(r["final"]["loss"] for r in runs), 8),
        val_bpb=round(statistics.mean(bpbs), 8),
        val_bpb_std=round(statistics.stdev(bpbs), 8) if len(bpbs) > 1 else 0.0,
        seeds=seeds,
        seed_results={str(r["seed"]): dict(val_loss=r["final"]["loss"], val_bpb=r["final"]["bpb"],
                                           artifact_bytes=r["total_bytes"], steps=r["steps"],
                                           step_avg_ms=r["step_avg_ms"], eval_time_s=round(eval_seconds(r), 2),
                                           log=r["log"], **({"resumed_from_step": r["resumed_from_step"]}
                                                            if r.get("resumed_from_step") is not None else {}))
                       for r in runs},
        bytes_total=max(r["total_bytes"] for r in runs),
        bytes_code=max(r["code_bytes"] for r in runs),
        hardware=f"{runs[0]['world_size']}x {runs[0]['device']}",
        pytorch_version=runs[0]["torch"],
        technique_summary=args.technique or technique_summary(runs[0]["config"]),
        compliance=compliance,
    )


def technique_summary(config: dict) -> str:
    c = config
    seq = c.get("EVAL_SEQ_LEN", "0") if c.get("EVAL_SEQ_LEN", "0") != "0" else c.get("TRAIN_SEQ_LEN")
    stride = str(min(int(c.get("EVAL_STRIDE", "0")) or int(seq), int(seq)))  # train_gpt.py caps it at the window
    if c.get("EVAL_MODE") == "stream":
        evaluation = f"streaming evaluation (carried GDN/SWA state, {c.get('STREAM_SEGMENT')}-token segments)"
    elif stride not in ("0", seq):
        evaluation = f"sliding-window evaluation (length {seq}, stride {stride})"
    else:
        evaluation = f"plain {seq}-token windows"
    if c.get("TTT_ENABLED") == "True":
        evaluation += (f" + score-first TTT ({c.get('TTT_OPTIMIZER')} lr {c.get('TTT_LR')}, {c.get('TTT_EPOCHS')} epochs, "
                       f"{c.get('TTT_CHUNK_TOKENS')}-token chunks, params {c.get('TTT_PARAMS')})")
    return (f"{model_summary(c)}; {optimizer_summary(c)}; "
            f"{c.get('QUANT_METHOD', 'rtn')} int{c.get('MATRIX_BITS')} matrices / int{c.get('EMBED_BITS')} embedding "
            f"+ {c.get('COMPRESSOR')}; {evaluation}")


MIXER_NAMES = dict(gdn="Gated DeltaNet", attn="full attention", nope="full attention without position encoding",
                   swa="sliding-window attention", par="full attention + Gated DeltaNet side by side")


def model_summary(c: dict) -> str:
    """The layers as they ran (from LAYOUT, repeats counted), width, vocabulary and the input/skip features on."""
    import train_gpt as tg  # noqa: PLC0415 (torch; only needed here)

    try:
        specs = tg.parse_layout(c["LAYOUT"])
    except (KeyError, ValueError):  # not a layout this train_gpt.py reads: name it as logged
        return f"layout {c.get('LAYOUT', 'not logged')}, d{c.get('MODEL_DIM')}, vocab {c.get('VOCAB_SIZE')}"
    kinds = [kind for kind in MIXER_NAMES if any(s.kind == kind for s in specs)]
    mixers = " + ".join(f"{sum(s.kind == kind for s in specs)} {MIXER_NAMES[kind]}"
                        + (f" (window {c.get('SWA_WINDOW')})" if kind == "swa" else "") for kind in kinds)
    features = [name for key, name in (("UNET_SKIPS", "U-Net skips"), ("SMEAR_GATE", "SmearGate")) if c.get(key) == "True"]
    if c.get("BIGRAM_BUCKETS", "0") != "0":
        features.append(f"BigramHash ({c['BIGRAM_BUCKETS']} buckets)")
    if set(kinds) & tg.GDN_KINDS and c.get("GDN_NEG_EIGVAL") == "True":
        features.append("GDN beta in (0, 2) (negative eigenvalues)")
    n_xsa = len(tg.xsa_mixers(specs, int(c.get("XSA_LAST", "0"))))
    if n_xsa:
        every = n_xsa == len(tg.xsa_mixers(specs, len(specs)))
        features.append("XSA in all attention mixers" if every else f"XSA in the last {n_xsa} attention mixers")
    if float(c.get("QK_GAIN_INIT", "0")) and kinds != ["gdn"]:
        features.append(f"learnable query gains (from {c['QK_GAIN_INIT']})")
    if c.get("ATTN_HEAD_GATE") == "True" and kinds != ["gdn"]:
        features.append("sigmoid-gated attention heads")
    if c.get("RESID_MIX") == "True":
        features.append("per-layer mixes of the stream with the embedding")
    if c.get("BRANCH_SCALES") == "True":
        features.append("per-channel branch scales")
    slope = c.get("MLP_NEG_SLOPE", "0.0")
    act = f"LeakyReLU({slope})^2" if float(slope) else "ReLU^2"
    return (f"{len(specs)} layers ({mixers}), layout {c.get('LAYOUT')}, d{c.get('MODEL_DIM')}, "
            f"MLP {c.get('MLP_MULT')}x {act}, vocab {c.get('VOCAB_SIZE')}" + (", " + ", ".join(features) if features else ""))


MUON_NAMES = dict(muon="Muon", normuon="NorMuon", normuon_gdn="NorMuon on the GDN matrices, Muon on the others")


def optimizer_summary(c: dict) -> str:
    decay = c.get("MUON_WEIGHT_DECAY", "0")
    variant = c.get("MUON_VARIANT", "muon")
    return (f"{MUON_NAMES.get(variant, variant)} (lr {c.get('MATRIX_LR')}"
            + (f", weight decay {decay}" if float(decay) else "") + f") + Adam, EMA {c.get('EMA_DECAY')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--blurb", default="")
    p.add_argument("--technique", default="", help="technique_summary; default: derived from the config")
    p.add_argument("--date", default="", help="YYYY-MM-DD; default: today")
    p.add_argument("--out", type=Path, default=Path("submission.json"))
    p.add_argument("--script", type=Path, default=None,
                   help="the train_gpt.py the submission ships: refused unless the logs ran exactly it")
    args = p.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.logs]
        sub = build(runs, args)
        if not args.out.parent.is_dir():
            raise ValueError(f"--out {args.out}: the folder {args.out.parent} does not exist")
    except (ValueError, OSError) as e:
        print(f"make_submission: {e}", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")  # an earlier file is never left half-written
    try:
        tmp.write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        with open(tmp, "rb") as f:  # on the disk before it replaces the earlier file
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.out}: {sub['track']} val_bpb {sub['val_bpb']:.4f} ± {sub['val_bpb_std']:.4f} "
          f"over seeds {sub['seeds']}, {sub['bytes_total']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
