#!/usr/bin/env bash
# On the GPU machine, after tools/device/start.sh:
#     bash tools/device/stop.sh [LIMIT_S]                          (carry: nothing)
# Stops the lease's job: SIGTERM to its process group (the job script and the sweep it is running; tools/sweep.py
# then stops its runs, which sit in sessions of their own, before it exits), waits up to LIMIT_S (60) seconds for
# every process of the group to end, and SIGKILLs what is left after that. start.sh records the job's end in
# WORK/.job_rc. Matches no process by its command line, so it cannot stop the call that runs it (lease 54's
# `pkill -f tools/sweep.py` did). Then `wait.sh JOBNAME --end 0` brings back the logs, and the next call can run
# what the job did not reach.
# Exit status 0 when the job ended (or had already), 1 when there is no job to stop, 3 when it had to be killed.
set -uo pipefail
LIMIT="${1:-60}"; WORK="${WORK:-/tmp/w}"
[ -f "$WORK/.job_pid" ] || { echo "stop.sh: no $WORK/.job_pid: start.sh did not start a job here" >&2; exit 1; }
leader=$(cat "$WORK/.job_pid")
if [ -f "$WORK/.job_rc" ]; then
    echo "stop.sh: the job had already ended (exit $(cat "$WORK/.job_rc"))"; exit 0
fi
# the job's wrapper leads its own session and process group (start.sh: setsid), and traps TERM to record the end
kill -TERM -- "-$leader" 2>/dev/null || { echo "stop.sh: no process group $leader: the job is gone" >&2; exit 1; }
t0=$(date +%s)
while kill -0 -- "-$leader" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$LIMIT" ]; do sleep 1; done
if ! kill -0 -- "-$leader" 2>/dev/null; then
    echo "stop.sh: the job ended (exit $(cat "$WORK/.job_rc" 2>/dev/null || echo unknown)) $(( $(date +%s) - t0 )) s" \
         "after SIGTERM"
    exit 0
fi
kill -KILL -- "-$leader" 2>/dev/null
echo "stop.sh: the job did not end within $LIMIT s of SIGTERM; its process group was killed (runs the sweep started" \
     "run in sessions of their own: check nvidia-smi)" >&2
exit 3
