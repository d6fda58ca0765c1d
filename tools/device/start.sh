#!/usr/bin/env bash
# On the GPU machine, the lease's second call (README, "Leases on the GPU machine"):
#     bash tools/device/start.sh .gpujobs/job.sh        (carry: .devcarry and .gpujobs)
# Copies the checkout to WORK (/tmp/w), where the calls' copying of the working tree cannot touch what runs write;
# adds the training file the first call left in EXTRA (/tmp/extra), and any artifacts (*.pgz, pack.sh's ARTIFACTS)
# to WORK/artifacts, printing each one's sha256; sources .devcarry/setup.sh (wheels, shards);
# checks every shard's header with train_gpt.py's own reader and prints its token count; then starts JOB in the
# background in WORK, in its own session (it outlives the call while the machine stays warm), with DATA_PATH and
# TOKENIZER_PATH set for sp1024, its output in WORK/logs/JOBNAME.out. tools/device/wait.sh brings results back.
# With held-out text carried (.devcarry/heldout, from pack.sh) it also writes a validation-only folder of its first
# HELDOUT_DOCS (666) documents (data/make_shards.py --val-only) and gives the job its path as HELDOUT_PATH, for
# rescoring artifacts on text of the training kind: EVAL_ONLY=1 DATA_PATH=$HELDOUT_PATH ARTIFACT_PATH=...
# The job's runs compile into CACHE_DIR (/tmp/compile_cache), which starts with the cache an earlier lease saved
# (tools/device/cache.sh) when the first call carried it.
set -euo pipefail
JOB="${1:?usage: start.sh JOB_SCRIPT}"
WORK="${WORK:-/tmp/w}"; EXTRA="${EXTRA:-/tmp/extra}"
die() { echo "start.sh: $*" >&2; exit 1; }
[ -f "$JOB" ] || die "job script $JOB does not exist"
[ -f .devcarry/setup.sh ] || die ".devcarry/setup.sh is missing: carry .devcarry (tools/device/pack.sh)"
t0=$(date +%s)
rm -rf "$WORK" && mkdir -p "$WORK" && cp -a . "$WORK/" && rm -rf "$WORK"/.devextra*
shopt -s nullglob; extra=("$EXTRA"/*.jsonl.zst); shopt -u nullglob
[ ${#extra[@]} -gt 0 ] || die "no training file in $EXTRA: the first call did not run on this machine"
cp "${extra[@]}" "$WORK/.devcarry/data/corpus/"
shopt -s nullglob; carried=("$EXTRA"/*.pgz); shopt -u nullglob
if [ ${#carried[@]} -gt 0 ]; then
    mkdir -p "$WORK/artifacts" && cp "${carried[@]}" "$WORK/artifacts/"
    for a in "${carried[@]}"; do
        (cd "$WORK" && echo "start.sh: carried $(sha256sum "artifacts/$(basename "$a")")")
    done
fi
# The compile cache (tools/device/cache.sh): Triton's and Inductor's caches under CACHE_DIR, which the job's runs
# use (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR); one saved by an earlier lease, carried by the first call as
# compile_cache.tgz (pack.sh COMPILE_CACHE), is unpacked there first, over what this machine has compiled already.
CACHE_DIR="${CACHE_DIR:-/tmp/compile_cache}"; mkdir -p "$CACHE_DIR"
if [ -f "$EXTRA/compile_cache.tgz" ]; then
    origin=$(tar xzf "$EXTRA/compile_cache.tgz" -O ./ORIGIN 2>/dev/null) \
        || die "the carried compile cache $EXTRA/compile_cache.tgz is not one cache.sh wrote (no ORIGIN, or corrupt)"
    tar xzf "$EXTRA/compile_cache.tgz" -C "$CACHE_DIR" || die "the carried compile cache could not be unpacked"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || true
    echo "start.sh: compile cache unpacked into $CACHE_DIR ($(find "$CACHE_DIR" -type f | wc -l) files): $origin;" \
        "this machine: ${gpu:-no GPU}"
else
    echo "start.sh: no compile cache carried ($EXTRA/compile_cache.tgz): the lease's first compiles are paid in full"
fi
export TRITON_CACHE_DIR="$CACHE_DIR/triton" TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor"
cd "$WORK"
source .devcarry/setup.sh > setup.out 2>&1; cat setup.out
grep -q FAILED setup.out && die "setup failed"
export DATA_PATH="$DATA_ROOT/datasets/fineweb10B_sp1024" TOKENIZER_PATH="$DATA_ROOT/tokenizers/fineweb_1024_bpe.model"
[ -f "$TOKENIZER_PATH" ] || die "TOKENIZER_PATH=$TOKENIZER_PATH does not exist"
shopt -s nullglob; held=(.devcarry/heldout/*.jsonl.zst); shopt -u nullglob
if [ ${#held[@]} -gt 0 ]; then
    export HELDOUT_PATH="$DATA_ROOT/datasets/heldout_sp1024"
    python3 data/make_shards.py --val-only --val "${held[@]}" --max-val-docs "${HELDOUT_DOCS:-666}" \
        --tokenizer "$TOKENIZER_PATH" --out-dir "$HELDOUT_PATH" > heldout.out 2>&1 \
        || { cat heldout.out >&2; die "the held-out text's shard could not be written"; }
else
    echo "start.sh: no held-out text carried (.devcarry/heldout): HELDOUT_PATH is not set"
fi
python3 - <<'PY'
import os, train_gpt as tg
folders = [(os.environ["DATA_PATH"], ("train", "val"))]
folders += [(os.environ["HELDOUT_PATH"], ("val",))] if os.environ.get("HELDOUT_PATH") else []
for folder, splits in folders:
    for split in splits:
        for f in tg.shard_files(folder, split):
            print(f"start.sh: {f} {len(tg.read_shard(f)):,} tokens")
PY
name=$(basename "$JOB" .sh); mkdir -p logs; touch .start_marker
# .job_rc, written when the job exits, holds its exit status (wait.sh JOBNAME --end waits for it). The wrapper leads
# the job's session and process group, whose id it leaves in .job_pid for stop.sh; it traps TERM (a handler, which
# the job does not inherit) so that a stopped job's end is recorded too.
setsid nohup bash -c 'echo $$ > .job_pid; trap : TERM; bash "$1"; echo $? > .job_rc' job "$JOB" \
    > "logs/$name.out" 2>&1 < /dev/null &
for _ in $(seq 50); do [ -s .job_pid ] && break; sleep 0.1; done
[ -s .job_pid ] || die "the job did not start (no .job_pid after 5 s)"
echo "start.sh: $JOB started in $WORK after $(( $(date +%s) - t0 )) s, output in $WORK/logs/$name.out"
