#!/usr/bin/env bash
# On the GPU machine, after tools/device/start.sh:
#     bash tools/device/wait.sh JOBNAME RUN_ID [LIMIT_S]          (carry: .gpujobs, or nothing)
# Waits until the sweep in WORK/logs/JOBNAME.out reports RUN_ID's end or LIMIT_S (575) seconds pass, then puts into
# $OUT every file under WORK/logs written since the start (logs.tgz) and RUN_ID's artifact, and prints the sweep's
# output and the run's final lines. Exit status 0 when the run ended, 3 when the wait ran out first (what is there
# still comes back).
set -uo pipefail
NAME="${1:?usage: wait.sh JOBNAME RUN_ID [LIMIT_S]}"; RUN="${2:?usage: wait.sh JOBNAME RUN_ID [LIMIT_S]}"
LIMIT="${3:-575}"; WORK="${WORK:-/tmp/w}"; : "${OUT:?OUT is not set (the device sets it)}"
S="$WORK/logs/$NAME.out"
[ -f "$WORK/.start_marker" ] || { echo "wait.sh: no $WORK/.start_marker: start.sh did not run" >&2; exit 1; }
t0=$(date +%s); ended=0
while :; do
    grep -q "sweep: $RUN ended" "$S" 2>/dev/null && { ended=1; break; }
    [ $(( $(date +%s) - t0 )) -ge "$LIMIT" ] && break
    sleep 5
done
echo "wait.sh: waited $(( $(date +%s) - t0 )) s; $RUN $([ $ended = 1 ] && echo ended || echo 'has not ended')"
cd "$WORK"
find logs -type f -newer .start_marker -print0 | tar czf "$OUT/logs.tgz" --null -T -
tar tzf "$OUT/logs.tgz"
art="artifacts/$RUN.pgz"
[ -f "$art" ] && cp "$art" "$OUT/" && sha256sum "$art"
cat "$S" 2>/dev/null
[ -f "logs/$RUN.txt" ] && grep -E "^(final_|ttt_gain|summary)" "logs/$RUN.txt" | grep -v _exact
[ $ended = 1 ] || exit 3
