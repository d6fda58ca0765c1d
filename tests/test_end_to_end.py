"""The whole script on synthetic shards: train (one process and torchrun with two), export, read back, score;
then EVAL_ONLY on the artifact reproduces the score to the last printed digit."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY = tg.PRESETS["tiny"]  # what every run here trains with
STEPS = TINY["iterations"]
SLIDING = f"final_int6_brotli_roundtrip_sliding{TINY['eval_stride']}"  # the default evaluation's tag, without TTT


def run_script(cwd: Path, env: dict, torchrun: int = 0, script: Path = SCRIPT) -> str:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("WORLD_SIZE", None), full_env.pop("RANK", None), full_env.pop("LOCAL_RANK", None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable]) + [str(script)]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def tiny_env(tiny_data, run_id: str) -> dict:
    return {"PRESET": "tiny", "RUN_ID": run_id, "DATA_PATH": tiny_data["data_path"],
            "TOKENIZER_PATH": tiny_data["tokenizer_path"], "VOCAB_SIZE": str(tiny_data["vocab_size"])}


def exact_line(text: str, tag: str = SLIDING + "_ttt") -> str:
    """The `<tag>_exact val_loss:... val_bpb:...` line (the default evaluation is sliding windows at the tiny
    preset's stride + score-first TTT)."""
    lines = [line for line in text.splitlines() if line.startswith(f"{tag}_exact val_loss:")]
    assert len(lines) == 1, text[-2000:]
    return lines[0]


def summary(text: str) -> dict:
    return json.loads(next(line for line in text.splitlines() if line.startswith("summary "))[len("summary "):])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    cwd = tmp_path_factory.mktemp("run")
    out = run_script(cwd, {**tiny_env(tiny_data, "e2e"), "CHECKPOINT_PATH": "ckpt/e2e.pt"})
    return cwd, out


def test_training_writes_log_artifact_and_final_score(trained, tiny_data):
    cwd, out = trained
    log = (cwd / "logs" / "e2e.txt").read_text()
    assert "def main()" in log  # the log carries the code that produced it
    assert exact_line(log) == exact_line(out)
    s = summary(out)
    assert s["steps"] == STEPS and s["world_size"] == 1
    assert (cwd / "artifacts" / "e2e.pgz").stat().st_size == s["model_bytes"]
    assert s["total_bytes"] == s["model_bytes"] + SCRIPT.stat().st_size
    assert s["final"]["tokens"] == s["final_no_ttt"]["tokens"] == s["pre_quant"]["tokens"] > 0
    assert 0 < s["final"]["bpb"] < 20
    assert abs(s["final_no_ttt"]["bpb"] - s["pre_quant"]["bpb"]) < 0.05  # int6/int8 barely moves a model this short
    assert exact_line(out, SLIDING)  # the round trip scored without TTT as well
    assert re.search(rf"step:{STEPS}/{STEPS} train_loss:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms tok/s:\d+", out)
    assert not list((cwd / "artifacts").glob("*.tmp*"))
    assert "replaces it at export" not in out and "holds an earlier run" not in out  # nothing was there before
    assert "bf16 matmuls can be slower" not in out  # the tiny preset's matrices are all multiples of 8
    # what the run trained on and how often it read it: the shards' token counts (from their headers) and the tokens
    # the timed steps took (the tiny preset's steps of its batch)
    shard_tokens = [int(np.fromfile(f, dtype="<i4", count=3)[2])
                    for f in sorted(Path(tiny_data["data_path"]).glob("fineweb_train_*.bin"))]
    assert len(shard_tokens) >= 2 and s["train_tokens"] == sum(shard_tokens)
    assert f"train_data: {len(shard_tokens)} shards, {sum(shard_tokens):,} tokens" in log
    batch = int(re.search(r"^config TRAIN_BATCH_TOKENS=(\d+)$", log, re.M).group(1))
    # the script's own formula, so what these pin down are its inputs: the shard headers and the steps' tokens
    read, total = STEPS * batch, sum(shard_tokens)
    assert s["train_passes"] == round(read / total, 4) > 0
    assert f"train_passes:{read / total:.2f} ({read:,} tokens read of {total:,})" in log


def test_the_packed_copy_trains_exports_and_scores_as_the_script_and_counts_its_own_bytes(trained, tiny_data,
                                                                                           tmp_path):
    """tools/pack_script.py's copy runs train_gpt.py's source: the same training losses, the same artifact to the
    byte and the same scores; what it counts and logs as the code is the copy itself."""
    cwd, out = trained
    packed = tmp_path / "build" / "train_gpt.py"
    subprocess.run([sys.executable, str(ROOT / "tools" / "pack_script.py"), "--out", str(packed)], check=True,
                   capture_output=True)
    again = run_script(tmp_path, tiny_env(tiny_data, "packed"), script=packed)

    def losses(text):
        return re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", text, re.M)
    assert losses(again) == losses(out) and len(losses(out)) > 1
    assert exact_line(again) == exact_line(out) and exact_line(again, SLIDING) == exact_line(out, SLIDING)
    assert (tmp_path / "artifacts" / "packed.pgz").read_bytes() == (cwd / "artifacts" / "e2e.pgz").read_bytes()
    s = summary(again)
    assert s["code_bytes"] == packed.stat().st_size < SCRIPT.stat().st_size // 2
    assert s["total_bytes"] == s["model_bytes"] + packed.stat().st_size
    assert (tmp_path / "logs" / "packed.txt").read_text().startswith(packed.read_text())  # the counted code


def test_qat_runs_through_the_script_and_leaves_nothing_in_the_artifact(tmp_path, tiny_data):
    """QAT_FRAC=0.5: fake quantization from the first step in the run's second half to the end of training; the
    artifact holds only the model (EVAL_ONLY rebuilds it and reproduces the score)."""
    out = run_script(tmp_path, {**tiny_env(tiny_data, "qat"), "QAT_FRAC": "0.5", "TTT_ENABLED": "0"})
    first = next(step for step in range(STEPS) if step / STEPS >= 0.5)  # no wallclock cap in the tiny preset
    assert summary(out)["qat_from_step"] == first
    grid = f"int{tg.Config().matrix_bits} at {tg.Config().qat_clip_sigmas:g} sigmas"  # the defaults' grid
    assert re.search(r"^qat: \d+ matrices \([\d,]+ params\) trained rounded to " + re.escape(grid), out, re.M)
    assert f"qat: fake quantization on from step {first} " in out
    assert f"qat: off after training, {STEPS - first} steps with fake quantization" in out
    assert out.index("qat: off after training") < out.index("pre_quant")
    rescore = {**tiny_env(tiny_data, "qat_rescore"), "EVAL_ONLY": "1", "TTT_ENABLED": "0",
               "ARTIFACT_PATH": str(tmp_path / "artifacts" / "qat.pgz")}
    assert exact_line(run_script(tmp_path, rescore), SLIDING) == exact_line(out, SLIDING)


def test_a_run_says_at_the_start_that_it_will_replace_an_artifact_and_append_to_a_log_of_its_run_id(tmp_path, tiny_data):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "again.pgz").write_bytes(b"an earlier run's artifact")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "again.txt").write_text("an earlier run's log\n")
    out = run_script(tmp_path, {**tiny_env(tiny_data, "again"), "ITERATIONS": "2", "TTT_ENABLED": "0"})
    warning = "WARNING: artifacts/again.pgz exists and this run replaces it at export"
    assert warning in out and out.index(warning) < out.index("train_done")
    appended = "WARNING: logs/again.txt holds an earlier run; this one is appended after it"
    assert appended in out and out.index(appended) < out.index("train_done")
    assert (tmp_path / "logs" / "again.txt").read_text().startswith("an earlier run's log\n")  # kept, not replaced


def test_eval_only_reproduces_the_score(trained, tiny_data):
    """The same line to the last digit, under the same tag: the tag names the file's bits and compressor, which
    export settings given to the rescoring do not change; and the artifact + this script's bytes, against the
    limit."""
    cwd, out = trained
    env = {**tiny_env(tiny_data, "rescore"), "EVAL_ONLY": "1", "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz"),
           "MATRIX_BITS": "5", "COMPRESSOR": "zstd"}
    again = run_script(cwd, env)
    assert exact_line(again) == exact_line(out)
    assert "train_done" not in again
    s = summary(again)
    assert s["total_bytes"] == summary(out)["total_bytes"] == s["artifact_bytes"] + SCRIPT.stat().st_size
    assert s["artifact_under_limit"] and "OVER THE LIMIT" not in again


def test_eval_only_reads_the_validation_shards_alone(trained, tiny_data, tmp_path):
    """Rescoring on other text (data/make_shards.py --val-only writes a folder without training shards): the
    validation shards alone reproduce the score."""
    cwd, out = trained
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    for shard in Path(tiny_data["data_path"]).glob("fineweb_val_*.bin"):
        shutil.copy(shard, val_only)
    env = {**tiny_env(tiny_data, "rescore_val_only"), "DATA_PATH": str(val_only), "EVAL_ONLY": "1",
           "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz")}
    assert exact_line(run_script(cwd, env)) == exact_line(out)


def test_eval_only_warns_when_the_artifact_and_the_script_are_over_the_limit(trained, tiny_data, monkeypatch):
    cwd, _ = trained
    cfg = tg.Config.from_env({**tiny_env(tiny_data, "over"), "EVAL_ONLY": "1", "TTT_ENABLED": "0",
                              "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz"), "VAL_MAX_TOKENS": "512"})
    rt = tg.Runtime(0, 1, 0, tg.torch.device("cpu"), 1)
    lines = []
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 1000)
    s = tg.eval_only(cfg, rt, lines.append, tg.load_val_tokens(cfg), tg.build_byte_tables(tg.load_tokenizer(cfg)))
    over = s["total_bytes"] - 1000
    assert over > 0 and f"WARNING: ARTIFACT OVER THE LIMIT by {over} bytes" in "\n".join(lines)


def untrained_artifact(tmp_path: Path, tiny_data, name: str, **settings: str) -> Path:
    cfg = tg.Config.from_env({"PRESET": "tiny", "VOCAB_SIZE": str(tiny_data["vocab_size"]), **settings})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    path = tmp_path / name
    path.write_bytes(tg.pack_artifact(tg.serialize_state(model.state_dict(), model.mc, cfg)[0], cfg.compressor))
    return path


NO_SCALARS = {"LAYOUT": "AA", "MUON_VARIANT": "muon", "UNET_SKIPS": "0"}  # all-attention without skips: no scalar


def test_a_ttt_selection_of_nothing_is_refused_before_training_or_scoring(tmp_path, tiny_data, monkeypatch):
    """TTT_PARAMS=scalar on a model that has no scalar parameters: the training run stops before its first step
    and the rescoring of such a model's artifact before its first score, not after them when TTT starts."""
    monkeypatch.chdir(tmp_path)
    env = {**tiny_env(tiny_data, "noscalar"), **NO_SCALARS, "TTT_PARAMS": "scalar"}
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime(0, 1, 0, tg.torch.device("cpu"), 1)
    val, tables = tg.load_val_tokens(cfg), tg.build_byte_tables(tg.load_tokenizer(cfg))
    refusal = r"TTT_PARAMS=scalar selects no parameters of this model \(layout AA\)"
    lines = []

    def log(msg, **_):  # the Logger's interface (console=...)
        lines.append(msg)
    with pytest.raises(ValueError, match=refusal):
        tg.train_and_eval(cfg, rt, log, "noscalar", val, tables)
    assert not any(line.startswith(("step:", "warmup")) for line in lines) and not (tmp_path / "artifacts").exists()
    # an artifact of such a model (untrained; training it would be the run refused above)
    art = untrained_artifact(tmp_path, tiny_data, "noscalar.pgz", **NO_SCALARS)
    rescore = tg.Config.from_env({**tiny_env(tiny_data, "rescore_noscalar"), "EVAL_ONLY": "1",
                                  "ARTIFACT_PATH": str(art), "TTT_PARAMS": "scalar"})
    lines.clear()
    with pytest.raises(ValueError, match=refusal):
        tg.eval_only(rescore, rt, log, val, tables)
    assert lines and not any("val_bpb" in line for line in lines)  # it read the artifact; it scored nothing
    without = tg.eval_only(dataclasses.replace(rescore, ttt_enabled=False), rt, log, val, tables)
    assert without["final"]["tokens"] > 0  # the same artifact scores without TTT: only the selection was refused


@pytest.mark.parametrize("mode,env,tag", [
    ("plain", {"EVAL_MODE": "window", "EVAL_STRIDE": "0", "TTT_ENABLED": "0"}, ""),
    ("sliding", {"EVAL_MODE": "window", "EVAL_STRIDE": str(TINY["eval_stride"]), "TTT_ENABLED": "0"},
     SLIDING.removeprefix("final_int6_brotli_roundtrip")),
    ("stream", {"EVAL_MODE": "stream", "TTT_ENABLED": "0"}, "_stream"),
    ("stream_reset", {"EVAL_MODE": "stream", "STREAM_RESET": "1", "TTT_ENABLED": "0"}, "_stream_reset"),
    ("sliding_ttt", {"EVAL_MODE": "window", "EVAL_STRIDE": "32", "TTT_ENABLED": "1"}, "_sliding32_ttt"),
    ("stream_ttt", {"EVAL_MODE": "stream", "TTT_ENABLED": "1"}, "_stream_ttt"),
])
def test_eval_only_rescoring_in_every_mode(trained, tiny_data, mode, env, tag):
    cwd, out = trained
    env = {**tiny_env(tiny_data, f"rescore_{mode}"), "EVAL_ONLY": "1",
           "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz"), **env}
    again = run_script(cwd, env)
    line = exact_line(again, f"final_int6_brotli_roundtrip{tag}")
    s = summary(again)
    assert s["final"]["tokens"] == summary(out)["final"]["tokens"]
    assert s["final"]["bytes"] == summary(out)["final"]["bytes"]
    plain = summary(out)["final_no_ttt"]["bpb"]
    if "ttt" in mode:  # adapting on this small synthetic split helps a lot; it must not hurt
        assert 0 < s["final"]["bpb"] < s["final_no_ttt"]["bpb"]
    elif mode == "sliding":  # the training run's own evaluation without TTT: the same score, to the last digit
        assert line == exact_line(out, SLIDING)
    else:  # another way of scoring the same model on the same tokens: a different score, but not a broken one
        assert abs(s["final"]["bpb"] - plain) < 0.3


def test_repeated_layers_plain_muon_and_sqrt_warmdown_train_and_rescore(tmp_path, tiny_data):
    """Depth recurrence, plain Muon (the default is normuon), the 1-sqrt warmdown and an MLP width that is not a
    multiple of 8 (132) through the whole script: the run notes the width, the artifact records the repeated layout
    and the width, and EVAL_ONLY rebuilds the model from it and reproduces the score."""
    env = {**tiny_env(tiny_data, "loop"), "LAYOUT": "G(Sg)2", "MUON_VARIANT": "muon", "WARMDOWN_SHAPE": "sqrt",
           "TTT_ENABLED": "0", "MLP_MULT": "2.0625"}
    out = run_script(tmp_path, env)
    assert "layout G(Sg)2 (5 layers, 2 distinct mixers, 3 distinct MLPs)" in out
    assert "note: bf16 matmuls can be slower on dimensions not a multiple of 8: 3 x 64x132, 3 x 132x64\n" in out
    rescore = {**tiny_env(tiny_data, "loop_rescore"), "EVAL_ONLY": "1",
               "ARTIFACT_PATH": str(tmp_path / "artifacts" / "loop.pgz"), "TTT_ENABLED": "0"}
    tag = SLIDING
    assert exact_line(run_script(tmp_path, rescore), tag) == exact_line(out, tag)


def test_ema_compare_scores_what_each_decay_would_have_given(tmp_path, tiny_data, trained):
    """EMA_COMPARE averages more decays beside EMA_DECAY and scores each pre-quant. Swapping the main decay with a
    compared one swaps their scores, the raw weights score the same under all, and the main score (and so the
    artifact) is the one a run without EMA_COMPARE gets (the `trained` run, EMA_DECAY 0.9). With EMA_DECAY=0 the raw
    weights are put back after the comparison is scored."""
    base = {**tiny_env(tiny_data, "emacmp"), "TTT_ENABLED": "0"}
    a = summary(run_script(tmp_path, {**base, "EMA_DECAY": "0.9", "EMA_COMPARE": "0,0.5,0.9"}))
    b = summary(run_script(tmp_path, {**base, "EMA_DECAY": "0.5", "EMA_COMPARE": "0.9, 0"}))
    assert set(a["ema_compare"]) == {"0", "0.5"} and set(b["ema_compare"]) == {"0", "0.9"}  # EMA_DECAY not repeated
    assert a["pre_quant"]["bpb"] == pytest.approx(summary(trained[1])["pre_quant"]["bpb"], abs=1e-9)
    assert a["pre_quant"]["bpb"] == pytest.approx(b["ema_compare"]["0.9"], abs=1e-9)
    assert b["pre_quant"]["bpb"] == pytest.approx(a["ema_compare"]["0.5"], abs=1e-9)
    assert a["ema_compare"]["0"] == pytest.approx(b["ema_compare"]["0"], abs=1e-9)
    c = summary(run_script(tmp_path, {**base, "EMA_DECAY": "0", "EMA_COMPARE": "0.9"}))
    assert c["pre_quant"]["bpb"] == pytest.approx(a["ema_compare"]["0"], abs=1e-9)
    assert c["ema_compare"]["0.9"] == pytest.approx(a["pre_quant"]["bpb"], abs=1e-9)
    scores = [a["pre_quant"]["bpb"], b["pre_quant"]["bpb"], a["ema_compare"]["0"]]
    assert len({round(x, 6) for x in scores}) == 3  # the three weightings really differ


def test_export_from_the_checkpoint_reproduces_the_runs_artifact_and_scores(trained, tiny_data):
    """The checkpoint holds what the run exported: calibrating, quantizing and scoring it again under the same
    settings gives the same artifact, byte for byte, and the same scores to the last digit."""
    cwd, out = trained
    assert "checkpoint: ckpt/e2e.pt (" in out and out.index("checkpoint: ckpt/e2e.pt") < out.index("calibration:")
    # a cap in the environment does not move the training run's (the tiny preset's: none)
    again = run_script(cwd, {**tiny_env(tiny_data, "reexport"), "EXPORT_FROM": "ckpt/e2e.pt",
                             "MAX_WALLCLOCK_SECONDS": "60"})
    assert "train_done" not in again and "export_from: checkpoint ckpt/e2e.pt" in again and "(cap 0s)" in again
    assert re.search(r"^calibration: .*\(cap 0ms\)$", again, re.M)
    assert (cwd / "artifacts" / "reexport.pgz").read_bytes() == (cwd / "artifacts" / "e2e.pgz").read_bytes()
    assert exact_line(again) == exact_line(out) and exact_line(again, SLIDING) == exact_line(out, SLIDING)
    first, second = summary(out), summary(again)
    assert second["pre_quant"] == {**first["pre_quant"], "seconds": second["pre_quant"]["seconds"]}
    assert (second["export_from"], second["steps"], second["params"], second["total_bytes"]) == \
        ("ckpt/e2e.pt", STEPS, first["params"], first["total_bytes"])
    assert not list((cwd / "ckpt").glob("*.tmp*"))


def test_a_checkpoint_that_cannot_be_written_is_a_warning_and_the_export_goes_on(tmp_path, tiny_data):
    (tmp_path / "ckpt").write_text("a file where the checkpoint's folder would be")
    out = run_script(tmp_path, {**tiny_env(tiny_data, "nockpt"), "ITERATIONS": "2", "TTT_ENABLED": "0",
                                "CHECKPOINT_PATH": "ckpt/run.pt"})
    assert "WARNING: CHECKPOINT_PATH=ckpt/run.pt was not written (FileExistsError" in out
    assert out.index("WARNING: CHECKPOINT_PATH") < out.index("calibration:")
    assert summary(out)["artifact_under_limit"] and (tmp_path / "artifacts" / "nockpt.pgz").is_file()
    assert (tmp_path / "ckpt").read_text() == "a file where the checkpoint's folder would be"


def test_export_from_applies_this_runs_export_settings(trained, tiny_data):
    """Other export settings on the same weights: the score before quantization is the training run's, the
    artifact is not (a coarser clip and round-to-nearest instead of GPTQ)."""
    cwd, out = trained
    again = run_script(cwd, {**tiny_env(tiny_data, "reexport_rtn"), "EXPORT_FROM": str(cwd / "ckpt" / "e2e.pt"),
                             "QUANT_METHOD": "rtn", "MATRIX_CLIP_FIT": "0", "MATRIX_CLIP_SIGMAS": "3",
                             "TTT_ENABLED": "0"})
    first, second = summary(out), summary(again)
    assert second["pre_quant"]["loss"] == first["pre_quant"]["loss"]
    assert second["final_no_ttt"]["loss"] != first["final_no_ttt"]["loss"]
    assert (cwd / "artifacts" / "reexport_rtn.pgz").read_bytes() != (cwd / "artifacts" / "e2e.pgz").read_bytes()
    assert "calibration:" not in again and "int6-rtn" in again


def test_clip_fit_exports_at_the_narrowest_allowed_clip_when_everything_fits(trained, tiny_data):
    """MATRIX_CLIP_FIT (on by default) in the script: the tiny model is far under 16,000,000 bytes, so the fit goes
    to MATRIX_CLIP_FIT_MIN; QUANT_COMPARE's round-to-nearest export uses the clip chosen for GPTQ, not a fit of its
    own. MATRIX_CLIP_FIT=0 exports at MATRIX_CLIP_SIGMAS itself."""
    cwd, _ = trained
    out = run_script(cwd, {**tiny_env(tiny_data, "reexport_fit"), "EXPORT_FROM": str(cwd / "ckpt" / "e2e.pt"),
                           "MATRIX_CLIP_FIT_MIN": "9.5", "QUANT_COMPARE": "1",
                           "TTT_ENABLED": "0"})
    s = summary(out)
    assert s["matrix_clip_sigmas"] == 9.5 and s["total_bytes"] < tg.ARTIFACT_LIMIT_BYTES
    assert "clip_fit: matrix clip 9.5000 sigmas (the narrowest allowed (MATRIX_CLIP_FIT_MIN))" in out
    assert "compare_rtn_roundtrip" in out and "quantization_gap rtn:" in out
    log = (cwd / "logs" / "reexport_fit.txt").read_text()
    matrix_clips = re.findall(r"^export \S+ \(.*\) int bits:6 method:(gptq|rtn) clip:(\S+) ", log, re.M)
    assert {m for m, _ in matrix_clips} == {"gptq", "rtn"}  # both exports logged their matrices ...
    assert {float(c) for _, c in matrix_clips} == {9.5}  # ... at the one clip
    plain = run_script(cwd, {**tiny_env(tiny_data, "reexport_95"), "EXPORT_FROM": str(cwd / "ckpt" / "e2e.pt"),
                             "MATRIX_CLIP_FIT": "0", "MATRIX_CLIP_SIGMAS": "9.5", "TTT_ENABLED": "0"})
    assert "clip_fit" not in plain  # the fit's earlier trials left nothing behind: its artifact is the plain export's
    assert (cwd / "artifacts" / "reexport_fit.pgz").read_bytes() == (cwd / "artifacts" / "reexport_95.pgz").read_bytes()


def test_export_from_rejects_a_missing_or_contradicted_checkpoint(trained, tiny_data, tmp_path):
    cwd, _ = trained
    missing = tmp_path / "none.pt"
    cases = [({"EXPORT_FROM": str(missing)}, f"FileNotFoundError: checkpoint {missing} does not exist"),
             ({"EXPORT_FROM": "ckpt/e2e.pt", "MODEL_DIM": "128"}, "ValueError: EXPORT_FROM: settings {'model_dim'")]
    for i, (extra, reason) in enumerate(cases):
        env = {**os.environ, **tiny_env(tiny_data, f"bad_export{i}"), **extra}
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0 and reason.split(": ", 1)[1] in proc.stderr
        assert (cwd / "logs" / f"bad_export{i}.txt").read_text().rsplit("\nrun failed: ", 1)[1].startswith(reason)
        assert not (cwd / "artifacts" / f"bad_export{i}.pgz").exists()


def test_eval_only_rejects_settings_that_contradict_the_artifact(trained, tiny_data):
    cwd, _ = trained
    env = {**tiny_env(tiny_data, "bad"), "EVAL_ONLY": "1", "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz"),
           "MODEL_DIM": "128"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "contradict the artifact" in proc.stderr
    log = (cwd / "logs" / "bad.txt").read_text()  # the run's log says why it ended, not only stderr
    reason = log.rsplit("\nrun failed: ", 1)[1]  # the last such line (the log begins with the code, which has one)
    assert reason.startswith("ValueError: EVAL_ONLY: settings") and "contradict the artifact" in reason


def test_a_failure_on_another_rank_than_0_is_in_the_runs_log(tmp_path, tiny_data):
    """Only rank 0 writes the log; when rank 1 fails (its GPU's kernel check, a bad token in its shard span), the
    log says so, with rank 1's error, instead of stopping mid-run without a reason."""
    wrapper = tmp_path / "fail_on_rank1.py"
    wrapper.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_gpt as tg
load = tg.load_val_tokens
def failing(cfg):
    if os.environ["RANK"] == "1":
        raise ValueError("injected failure on rank 1")
    return load(cfg)
tg.load_val_tokens = failing
tg.main()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **tiny_env(tiny_data, "rank1_fails")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    log = (tmp_path / "logs" / "rank1_fails.txt").read_text()
    assert "\nrun failed: rank 1: ValueError: injected failure on rank 1\n" in log


def test_torchrun_two_ranks_trains_and_writes_one_artifact(tmp_path, tiny_data, trained):
    out = run_script(tmp_path, {**tiny_env(tiny_data, "ddp"), "CHECKPOINT_PATH": "ckpt/ddp.pt"}, torchrun=2)
    s = summary(out)
    assert s["world_size"] == 2 and s["steps"] == STEPS
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["ddp.pgz"]
    assert out.count("summary ") == 1 and out.count("checkpoint: ckpt/ddp.pt") == 1  # only rank 0 logs and writes
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["ddp.pt"]
    assert tg.read_checkpoint(tmp_path / "ckpt" / "ddp.pt")[2]["steps"] == STEPS
    # exported again on two ranks (calibration split as in training): the same artifact
    again = run_script(tmp_path, {**tiny_env(tiny_data, "ddp_again"), "EXPORT_FROM": "ckpt/ddp.pt"}, torchrun=2)
    assert (tmp_path / "artifacts" / "ddp_again.pgz").read_bytes() == (tmp_path / "artifacts" / "ddp.pgz").read_bytes()
    assert exact_line(again) == exact_line(out)
    # same global batch, same data order: the loss trend matches the single-process run closely
    assert abs(s["pre_quant"]["loss"] - summary(trained[1])["pre_quant"]["loss"]) < 0.05
    # the ranks split one global batch: the passes over the training text are one process's, not half or twice them
    assert s["train_passes"] == summary(trained[1])["train_passes"] > 0
    # the tiny preset keeps GRAD_ACCUM_STEPS=4 on each rank: 8 spans of the stream per step against 4, so other
    # sequences, and tools/loss_diff.py refuses to compare its training losses with the one-process run's
    sys.path.insert(0, str(ROOT / "tools"))
    import loss_diff

    with pytest.raises(ValueError, match=r"spans per step \(world size x gradient accumulation\): 4 against 8"):
        loss_diff.check_same_batches(loss_diff.read_train_log(trained[0] / "logs" / "e2e.txt"),
                                     loss_diff.read_train_log(tmp_path / "logs" / "ddp.txt"))


def final_weights(path: Path) -> dict:
    return tg.read_checkpoint(path)[1]


def test_a_run_resumed_from_its_state_ends_as_the_run_that_went_on(tmp_path, tiny_data):
    """STATE_EVERY=7 of 12 steps, with QAT on from step 6 and a second average: the run that wrote the state and a
    run resumed from it end with the same weights, artifact and score, to the bit."""
    env = {"QAT_FRAC": "0.5", "EMA_COMPARE": "0.5", "TTT_ENABLED": "0"}
    whole = run_script(tmp_path, {**tiny_env(tiny_data, "whole"), **env, "CHECKPOINT_PATH": "ckpt/whole.pt",
                                  "STATE_PATH": "state/whole.pt", "STATE_EVERY": "7"})
    assert "qat: fake quantization on from step 6 " in whole and "state: state/whole.pt (" in whole
    out = run_script(tmp_path, {**tiny_env(tiny_data, "resumed"), **env, "CHECKPOINT_PATH": "ckpt/resumed.pt",
                                "RESUME_FROM": "state/whole.pt"})
    assert "resume: state/whole.pt after step 7 (" in out and "step:4/" not in out and f"step:{STEPS}/" in out
    a, b = final_weights(tmp_path / "ckpt" / "whole.pt"), final_weights(tmp_path / "ckpt" / "resumed.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    art = tmp_path / "artifacts"
    assert (art / "whole.pgz").read_bytes() == (art / "resumed.pgz").read_bytes()
    tag = SLIDING
    assert exact_line(out, tag) == exact_line(whole, tag)
    s, t = summary(whole), summary(out)
    assert (t["steps"], t["qat_from_step"], t["ema_compare"]) == (s["steps"], s["qat_from_step"], s["ema_compare"])
    assert (t["steps"], t["qat_from_step"], t["resumed_from_step"], s["resumed_from_step"]) == (STEPS, 6, 7, None)
    assert t["train_passes"] == s["train_passes"]  # the tokens of the steps before the resume counted


def test_torchrun_resumes_on_two_ranks_to_the_bit_and_on_one_rank_from_a_two_rank_state(tmp_path, tiny_data):
    """A two-rank run writes its state (Muon's momentum gathered from both ranks) at step 7; resumed on two ranks it
    ends as the run did, to the bit; resumed on one rank with twice the accumulation (the same sequences in each
    step) it ends within float rounding of it, which it could not with either rank's Muon state missing."""
    env = {"TTT_ENABLED": "0", "GRAD_ACCUM_STEPS": "2"}
    run_script(tmp_path, {**tiny_env(tiny_data, "two"), **env, "CHECKPOINT_PATH": "ckpt/two.pt",
                          "STATE_PATH": "state/two.pt", "STATE_EVERY": "7"}, torchrun=2)
    run_script(tmp_path, {**tiny_env(tiny_data, "two_again"), **env, "CHECKPOINT_PATH": "ckpt/two_again.pt",
                          "RESUME_FROM": "state/two.pt"}, torchrun=2)
    one = run_script(tmp_path, {**tiny_env(tiny_data, "one"), **env, "GRAD_ACCUM_STEPS": "4",
                                "CHECKPOINT_PATH": "ckpt/one.pt", "RESUME_FROM": "state/two.pt"})
    assert "GRAD_ACCUM_STEPS=2->4" in one
    two, again, single = (final_weights(tmp_path / "ckpt" / f"{n}.pt") for n in ("two", "two_again", "one"))
    assert all(torch.equal(two[k], again[k]) for k in two)
    assert max((two[k].float() - single[k].float()).abs().max().item() for k in two) < 1e-5


def test_loss_diff_reads_the_scripts_training_losses(trained, tmp_path, tiny_data):
    """tools/loss_diff.py on logs train_gpt.py wrote: the same training again (without TTT, which comes after) logs
    the same losses, window for window (the two-rank run is refused: test_torchrun_two_ranks_...)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import loss_diff

    run_script(tmp_path, {**tiny_env(tiny_data, "again"), "TTT_ENABLED": "0"})
    first, again = loss_diff.read_train_log(trained[0] / "logs" / "e2e.txt"), loss_diff.read_train_log(
        tmp_path / "logs" / "again.txt")
    log_every = TINY["train_log_every"]
    assert sorted(first.windows) == [(s - log_every + 1, s) for s in range(log_every, STEPS + 1, log_every)]
    loss_diff.check_same_batches(first, again)
    [row] = loss_diff.compare(first, again)
    assert row["steps"] == STEPS and row["diff"] == 0.0 and row["a"] > 0
    # the script logs every setting of its schedule and the step times, so each step's learning rate is known
    assert sorted(first.rates) == list(range(1, STEPS + 1)) and 0 < row["a_lr"] <= 1 and row["b_lr"] is not None


def test_submission_tool_reads_the_logs(trained, tmp_path, tiny_data):
    cwd, out = trained
    log2 = tmp_path / "seed2.txt"
    s = summary(out)
    other = dict(s, seed=7, final=dict(s["final"], bpb=s["final"]["bpb"] + 0.01))
    log2.write_text((cwd / "logs" / "e2e.txt").read_text() + "summary " + json.dumps(other) + "\n")
    dest = tmp_path / "submission.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_submission.py"), str(cwd / "logs" / "e2e.txt"),
                           str(log2), "--author", "A", "--github-id", "a", "--name", "n", "--out", str(dest)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sub = json.loads(dest.read_text())
    assert sub["seeds"] == [s["seed"], 7] and sub["track"] == "non_record_16mb"
    assert sub["val_bpb"] == pytest.approx(s["final"]["bpb"] + 0.005)
    assert sub["val_bpb_std"] == pytest.approx(0.01 / 2 ** 0.5)
    assert sub["seed_results"][str(s["seed"])]["artifact_bytes"] == s["total_bytes"]
    assert sub["compliance"]["artifact_under_16mb"] and sub["compliance"]["train_under_600s"]
    # what ran, from the log's settings: the tiny preset's GSGs layout, U-Net skips (the default) and NorMuon
    assert TINY["layout"] == "GSGs" and "muon_variant" not in TINY and "unet_skips" not in TINY
    assert sub["technique_summary"].startswith(
        f"4 layers (2 Gated DeltaNet + 2 sliding-window attention (window {TINY['swa_window']})), layout GSGs, "
        f"d{TINY['model_dim']}, MLP {TINY['mlp_mult']}x ReLU^2, vocab {tiny_data['vocab_size']}, U-Net skips; "
        f"NorMuon (lr {TINY['matrix_lr']}, weight decay {tg.Config().muon_weight_decay}) + Adam, "
        f"EMA {TINY['ema_decay']};"), sub
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_submission.py"), str(cwd / "logs" / "e2e.txt"),
                           str(cwd / "logs" / "e2e.txt"), "--author", "A", "--github-id", "a", "--name", "n",
                           "--out", str(dest)], capture_output=True, text=True)
    assert proc.returncode == 1 and "share a seed" in proc.stderr


def test_quant_damage_tool_scores_the_checkpoint_as_the_script_does(trained, tiny_data):
    """tools/quant_damage.py: `as trained` is the run's score before quantization and `all of them` the round trip
    of an export with QUANT_METHOD=rtn at the same clips (EXPORT_FROM); the embedding and the matrices each cost
    something, and another embedding clip gives another score."""
    cwd, _ = trained
    clip = {"MATRIX_CLIP_FIT": "0", "MATRIX_CLIP_SIGMAS": "3"}
    env = {**os.environ, **tiny_env(tiny_data, "damage"), **clip, "QUANT_DAMAGE_EMBED_CLIPS": "4",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "quant_damage.py"), str(cwd / "ckpt" / "e2e.pt")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("quant_damage "))
    rows = [(r["weights"], r["bpb"]) for r in json.loads(line[len("quant_damage "):])["rows"]]
    rtn = summary(run_script(cwd, {**tiny_env(tiny_data, "damage_rtn"), **clip, "QUANT_METHOD": "rtn",
                                   "EXPORT_FROM": str(cwd / "ckpt" / "e2e.pt"), "TTT_ENABLED": "0"}))
    scores = dict(rows)
    assert scores["as trained"] == pytest.approx(rtn["pre_quant"]["bpb"], rel=1e-9)
    assert scores["all of them (an export with QUANT_METHOD=rtn)"] == pytest.approx(rtn["final_no_ttt"]["bpb"],
                                                                                   rel=1e-9)
    default_clip = f"embedding int8 at {tg.Config().embed_clip_sigmas:g} "  # the row at the default embedding clip
    embed, matrices = (next(v for k, v in rows if k.startswith(prefix)) for prefix in (default_clip,
                                                                                      "matrices int6 at 3 "))
    assert embed != scores["as trained"] and matrices != scores["as trained"]
    assert scores["embedding int8 at 4 sigmas"] != embed


def test_attention_sharpness_tool_reads_the_artifact_and_scores_every_attention_call(trained, tiny_data):
    """tools/attn_sharpness.py on the run's artifact (GSGs: an S layer and its shared copy, window 16, heads 16
    wide): one row per attention call, each under its bound sqrt(16) = 4, with its window and one figure per head."""
    cwd, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1", **tiny_env(tiny_data, "unused")}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "attn_sharpness.py"), str(cwd / "artifacts" / "e2e.pgz"),
                           "--seqs", "2", "--seq-len", "64", "--skip", "8"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("attn_sharpness "))[15:])
    assert [(m["window"], m["bound"], len(m["head_p99"])) for m in out["mixers"]] == [(16, 4.0, 4)] * 2
    for m in out["mixers"]:
        assert 0 < m["top_logit"][0] <= m["top_logit"][1] <= m["top_logit"][2] <= 4.0
        assert 1 / 16 <= m["top_p"][0] <= m["top_p"][1] <= 1 and 0 < m["entropy"] <= math.log(16)


def test_layer_ablation_tool_reads_the_artifact_and_scores_every_module(trained, tiny_data):
    """tools/layer_ablation.py on the run's artifact (GSGs): its unablated loss is the loaded model's own loss on
    the same tokens, and it has a row for each of the three mixers (the S mixer run by layers 1 and 3) and four
    MLPs, whose increases over targets 0-15 and 16-63 average to the whole; too few validation tokens for the
    sequences asked is an error that says so."""
    cwd, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1", **tiny_env(tiny_data, "unused")}
    tool = [sys.executable, str(ROOT / "tools" / "layer_ablation.py"), str(cwd / "artifacts" / "e2e.pgz")]
    args = ["--seqs", "2", "--seq-len", "64", "--mode", "zero", "--positions", "0,16"]
    proc = subprocess.run(tool + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("layer_ablation "))[15:])
    assert [(m["module"], m["kind"], m["layers"]) for m in out["modules"]] == [
        ("mixers.0", "gdn", [0]), ("mixers.1", "swa", [1, 3]), ("mixers.2", "gdn", [2]),
        ("mlps.0", "mlp", [0]), ("mlps.1", "mlp", [1]), ("mlps.2", "mlp", [2]), ("mlps.3", "mlp", [3])]
    mc, state = tg.read_artifact(cwd / "artifacts" / "e2e.pgz")
    model = tg.GPT(mc, tg.Backends("torch", "sdpa"))
    tg.load_exported_state(model, state, "e2e.pgz")
    tokens = tg.load_val_tokens(tg.Config.from_env(env))
    with torch.no_grad():
        loss = float(model.eval()(tokens[:128].view(2, 64), tokens[1:129].view(2, 64)))
    assert out["loss"] == pytest.approx(loss, abs=1e-5)
    assert [(r["start"], r["end"]) for r in out["by_position"]] == [(0, 16), (16, 64)]
    for m in out["modules"]:
        assert m["delta"] == pytest.approx(m["loss"] - out["loss"], abs=2e-6)
        assert m["delta"] == pytest.approx((16 * m["by_position"][0] + 48 * m["by_position"][1]) / 64, abs=2e-6)
    proc = subprocess.run(tool + ["--seqs", "100000"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "the validation split has" in proc.stderr


def test_context_tool_splits_the_scripts_own_scores(trained, tiny_data):
    """tools/eval_by_context.py: its two totals are the script's EVAL_ONLY scores in those modes, and its rows
    partition the targets, bytes and losses of both."""
    cwd, _ = trained
    env = {**tiny_env(tiny_data, "ctx"), "ARTIFACT_PATH": str(cwd / "artifacts" / "e2e.pgz"), "STREAM_WARMUP": "16",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_by_context.py")], cwd=cwd,
                          env={**os.environ, **env, "EVAL_STRIDE": "16"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ctx = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("by_context "))[11:])
    window = summary(run_script(cwd, {**env, "EVAL_ONLY": "1", "EVAL_MODE": "window", "EVAL_STRIDE": "16",
                                      "TTT_ENABLED": "0"}))["final"]
    stream = summary(run_script(cwd, {**env, "EVAL_ONLY": "1", "EVAL_MODE": "stream", "TTT_ENABLED": "0"}))["final"]
    assert ctx["bpb_window"] == pytest.approx(window["bpb"], rel=1e-9)
    assert ctx["bpb_stream"] == pytest.approx(stream["bpb"], rel=1e-9)
    rows = ctx["rows"]
    assert len(rows) >= 2
    assert sum(r["targets"] for r in rows) == window["tokens"] == stream["tokens"]
    assert sum(r["bytes"] for r in rows) == window["bytes"]
    for mode, total in (("window", window), ("stream", stream)):
        nll = sum(r[f"nll_{mode}"] for r in rows)
        assert nll / (math.log(2) * window["bytes"]) == pytest.approx(total["bpb"], rel=1e-9)


def test_compare_tool_splits_both_artifacts_own_scores(trained, tiny_data):
    """tools/compare_artifacts.py: its two totals are the round-trip scores (default windows, no TTT) the script
    logged for each artifact, each grouping's rows partition the targets, bytes and both losses, and an artifact
    against itself differs by exactly nothing anywhere."""
    cwd, out = trained
    other = summary(run_script(cwd, {**tiny_env(tiny_data, "cmp_rtn"), "EXPORT_FROM": str(cwd / "ckpt" / "e2e.pt"),
                                     "QUANT_METHOD": "rtn", "MATRIX_CLIP_FIT": "0", "MATRIX_CLIP_SIGMAS": "3",
                                     "TTT_ENABLED": "0"}))
    env = {**os.environ, **tiny_env(tiny_data, "cmp"), "OMP_NUM_THREADS": "1"}

    def compare(a: str, b: str, *flags: str) -> dict:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_artifacts.py"), *flags,
                               str(cwd / "artifacts" / a), str(cwd / "artifacts" / b)],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("compare "))[8:])

    cmp = compare("e2e.pgz", "cmp_rtn.pgz")
    assert cmp["bpb_a"] == pytest.approx(summary(out)["final_no_ttt"]["bpb"], rel=1e-9)
    assert cmp["bpb_b"] == pytest.approx(other["final_no_ttt"]["bpb"], rel=1e-9)
    assert cmp["bpb_a"] != cmp["bpb_b"]
    assert len(cmp["groups"]["position in document"]) >= 2  # (the synthetic text uses 64 token ids or fewer)
    for rows in cmp["groups"].values():
        assert sum(r["targets"] for r in rows) == cmp["tokens"] and sum(r["bytes"] for r in rows) == cmp["bytes"]
        for side in ("a", "b"):
            nll = sum(r[f"nll_{side}"] for r in rows)
            assert nll / (math.log(2) * cmp["bytes"]) == pytest.approx(cmp[f"bpb_{side}"], rel=1e-9)
    docs = cmp["documents"]
    assert docs["a_better"] + docs["b_better"] == docs["documents"] >= 2  # no document ties between two roundings
    assert docs["bytes_a_better"] + docs["bytes_b_better"] == cmp["bytes"]
    same = compare("e2e.pgz", "e2e.pgz")
    assert all(r["nll_a"] == r["nll_b"] for rows in same["groups"].values() for r in rows)
    assert same["documents"]["a_better"] == same["documents"]["b_better"] == 0
    # one side with score-first TTT (`--b`): the training run's own TTT score, split target by target
    ttt = compare("e2e.pgz", "e2e.pgz", "--b", "TTT_ENABLED=1")
    assert ttt["bpb_a"] == pytest.approx(summary(out)["final_no_ttt"]["bpb"], rel=1e-9)
    assert ttt["bpb_b"] == pytest.approx(summary(out)["final"]["bpb"], rel=1e-9) != ttt["bpb_a"]
    assert ttt["eval_a"].endswith("no TTT") and ", TTT sgd lr " in ttt["eval_b"]
    for rows in ttt["groups"].values():
        nll = sum(r["nll_b"] for r in rows)
        assert nll / (math.log(2) * ttt["bytes"]) == pytest.approx(ttt["bpb_b"], rel=1e-9)
    # and each side its own TTT setting (a larger learning rate on A: another score than the default's)
    both = compare("e2e.pgz", "e2e.pgz", "--a", "TTT_ENABLED=1 TTT_LR=0.05", "--b", "TTT_ENABLED=1")
    assert both["bpb_b"] == ttt["bpb_b"] and both["bpb_a"] != both["bpb_b"] and "lr 0.05," in both["eval_a"]
    # a side may stream, though LAYOUT's default (with full attention) could not: the model is the artifact's
    stream = compare("e2e.pgz", "e2e.pgz", "--b", "EVAL_MODE=stream")
    assert stream["eval_b"] == "streaming, no TTT" and stream["bpb_a"] == cmp["bpb_a"] != stream["bpb_b"]


VOCAB_REFUSAL = "{{'vocab_size': ({v}, {n})}} (environment, artifact) contradict the artifact"  # VOCAB_SIZE is set


def other_vocabulary_artifact(tmp_path: Path, vocab_size: int) -> Path:
    """An artifact of an untrained tiny model of another vocabulary than the tokenizer's."""
    cfg = tg.Config.from_env({"PRESET": "tiny", "VOCAB_SIZE": str(vocab_size)})
    model = tg.GPT(tg.ModelConfig.from_config(cfg), tg.Backends("torch", "sdpa"))
    frames, _ = tg.serialize_state(model.state_dict(), model.mc, cfg)
    path = tmp_path / "other_vocab.pgz"
    path.write_bytes(tg.pack_artifact(frames, cfg.compressor))
    return path


def test_compare_tool_refuses_an_artifact_of_another_vocabulary_or_none(trained, tiny_data, tmp_path):
    cwd, _ = trained
    env = {**os.environ, **tiny_env(tiny_data, "cmp"), "OMP_NUM_THREADS": "1"}
    art = str(cwd / "artifacts" / "e2e.pgz")
    other = str(other_vocabulary_artifact(tmp_path, 2 * tiny_data["vocab_size"]))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_artifacts.py"), art, other], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    v = tiny_data["vocab_size"]
    assert proc.returncode != 0 and VOCAB_REFUSAL.format(v=v, n=2 * v) in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_artifacts.py"), art, str(tmp_path / "none")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "none is not a file" in proc.stderr


def test_compare_tool_checks_both_sides_settings_against_their_artifacts_before_scoring(trained, tiny_data, tmp_path):
    """B's settings ask what B's model cannot do (streaming with full attention; TTT on scalars it lacks): refused
    before A is scored, with the side and the artifact named."""
    cwd, _ = trained
    art = str(cwd / "artifacts" / "e2e.pgz")
    env = {**os.environ, **tiny_env(tiny_data, "cmp"), "OMP_NUM_THREADS": "1"}
    full = str(untrained_artifact(tmp_path, tiny_data, "full_attention.pgz", LAYOUT="GA"))
    bare = str(untrained_artifact(tmp_path, tiny_data, "no_scalars.pgz", **NO_SCALARS))
    for other, flags, needle in (
            (full, ["--b", "EVAL_MODE=stream"], f"--b: EVAL_MODE=stream: artifact {full} has layout GA, with full "
                                                "attention (A or N): streaming needs layers with bounded state (G, S)"),
            (bare, ["--b", "TTT_ENABLED=1 TTT_PARAMS=scalar"],
             f"--b: {bare}: TTT_PARAMS=scalar selects no parameters of this model (layout AA)")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_artifacts.py"), *flags, art, other],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "validation tokens" not in proc.stdout  # nothing was scored


def test_context_tool_refuses_an_artifact_it_cannot_stream_before_scoring_it(trained, tiny_data, tmp_path):
    cwd, _ = trained
    path = untrained_artifact(tmp_path, tiny_data, "full_attention.pgz", LAYOUT="GA")
    env = {**os.environ, **tiny_env(tiny_data, "ctx"), "ARTIFACT_PATH": str(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_by_context.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "has layout GA, with full attention (A or N)" in proc.stderr
    assert "Traceback" not in proc.stderr  # refused up front, not by the streaming scorer after the window pass


def test_context_tool_refuses_an_artifact_of_another_vocabulary(trained, tiny_data, tmp_path):
    cwd, _ = trained
    other = other_vocabulary_artifact(tmp_path, 2 * tiny_data["vocab_size"])
    env = {**os.environ, **tiny_env(tiny_data, "ctx"), "ARTIFACT_PATH": str(other), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_by_context.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    v = tiny_data["vocab_size"]
    assert proc.returncode != 0 and VOCAB_REFUSAL.format(v=v, n=2 * v) in proc.stderr
