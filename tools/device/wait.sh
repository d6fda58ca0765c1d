#!/usr/bin/env bash
# On the GPU machine, after tools/device/start.sh:
#     bash tools/device/wait.sh JOBNAME RUN_ID [LIMIT_S]          (carry: .gpujobs, or nothing)
#     bash tools/device/wait.sh JOBNAME --end [LIMIT_S]           (the whole job: what runs after its sweeps)
# Waits until the sweep in WORK/logs/JOBNAME.out reports RUN_ID's end (with --end: until the job itself has exited,
# which start.sh records with its exit status in WORK/.job_rc) or LIMIT_S (575) seconds pass, then puts into $OUT
# every file under WORK/logs written since the start (logs.tgz) and RUN_ID's artifact, and prints the job's output
# and the run's final lines. Exit status 0 when the run (or the job) ended, 3 when the wait ran out first (what is
# there still comes back).
set -uo pipefail
USAGE="usage: wait.sh JOBNAME RUN_ID|--end [LIMIT_S]"
NAME="${1:?$USAGE}"; RUN="${2:?$USAGE}"
LIMIT="${3:-575}"; WORK="${WORK:-/tmp/w}"; : "${OUT:?OUT is not set (the device sets it)}"
S="$WORK/logs/$NAME.out"
[ -f "$WORK/.start_marker" ] || { echo "wait.sh: no $WORK/.start_marker: start.sh did not run" >&2; exit 1; }
t0=$(date +%s); ended=0
while :; do
    if [ "$RUN" = --end ]; then
        [ -f "$WORK/.job_rc" ] && { ended=1; break; }
    else
        grep -q "sweep: $RUN ended" "$S" 2>/dev/null && { ended=1; break; }
    fi
    [ $(( $(date +%s) - t0 )) -ge "$LIMIT" ] && break
    sleep 5
done
what="$RUN"; status="has not ended"
[ "$RUN" = --end ] && what="the job"
[ $ended = 1 ] && status=ended && [ "$RUN" = --end ] && status="ended (exit $(cat "$WORK/.job_rc"))"
echo "wait.sh: waited $(( $(date +%s) - t0 )) s; $what $status"
cd "$WORK"
find logs -type f -newer .start_marker -print0 | tar czf "$OUT/logs.tgz" --null -T -
tar tzf "$OUT/logs.tgz"
art="artifacts/$RUN.pgz"
[ -f "$art" ] && cp "$art" "$OUT/" && sha256sum "$art"
cat "$S" 2>/dev/null
[ -f "logs/$RUN.txt" ] && grep -E "^(final_|ttt_gain|summary)" "logs/$RUN.txt" | grep -v _exact
[ $ended = 1 ] || exit 3
