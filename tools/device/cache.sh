#!/usr/bin/env bash
# On the GPU machine, at a lease's end (after the job has ended: wait.sh JOBNAME --end):
#     bash tools/device/cache.sh                                   (carry: nothing)
# Sends back the compile cache the lease's runs filled, so that the next lease starts with it: start.sh points Triton
# (TRITON_CACHE_DIR: fla's kernels and Inductor's) and Inductor (TORCHINDUCTOR_CACHE_DIR: its FX graphs and generated
# code) at CACHE_DIR (/tmp/compile_cache). In leases 47-54 the first run with fla paid 80-108 s of kernel compiles in
# its kernel checks, the first run of each configuration 40-56 s of torch.compile in its warmup; later runs, finding
# what those compiled, paid 0-2 s and 6-15 s. The cache goes as one gzipped tar stream cut into parts of
# CACHE_PART_BYTES (15 MiB; a file that comes back holds at most 16 MiB), $OUT/compile_cache.tgz.part00, .part01, ...,
# holding at its root ORIGIN (when, on which GPU, with which torch and Triton it was saved), triton/ and inductor/.
# Back here, keep the parts in a folder of the ignored ckpt/ and stage the next lease with COMPILE_CACHE=that folder
# (pack.sh). CACHE_WHAT ("triton inductor") names the caches sent. Refuses more than CACHE_MAX_PARTS (3) parts: 45 MiB
# leave room for the logs and an artifact in the call (8 files, 64 MiB) and fit one call of the next lease beside the
# working tree; when Inductor's cache makes it too large, CACHE_WHAT=triton sends the Triton kernels alone (fla's,
# and Inductor's generated ones) without Inductor's graphs.
# Triton keys its cache by each kernel's source, its own version, ptxas's and the GPU's architecture (sm_90 on the
# H100 and the H200 alike), Inductor its own also by the GPU's name: a cache saved on the other card should still
# save the fla compiles, not the warmups (not yet seen on a lease). A kernel taken from the cache is compiled from
# the same source; every run's kernel checks still compare it with its reference on the GPU in use.
set -euo pipefail
CACHE_DIR="${CACHE_DIR:-/tmp/compile_cache}"; PART_BYTES="${CACHE_PART_BYTES:-15728640}"
MAX_PARTS="${CACHE_MAX_PARTS:-3}"; WHAT="${CACHE_WHAT:-triton inductor}"
: "${OUT:?OUT is not set (the device sets it)}"
die() { echo "cache.sh: $*" >&2; exit 1; }
[ -d "$CACHE_DIR" ] || die "no compile cache at $CACHE_DIR: start.sh did not run on this machine"
dirs=()
for d in $WHAT; do
    case "$d" in triton|inductor) ;; *) die "CACHE_WHAT=$WHAT: $d is neither triton nor inductor" ;; esac
    [ -d "$CACHE_DIR/$d" ] && dirs+=("./$d")
done
files=0; [ ${#dirs[@]} -gt 0 ] && files=$(cd "$CACHE_DIR" && find "${dirs[@]}" -type f | wc -l)
[ "$files" -gt 0 ] || die "the compile cache at $CACHE_DIR holds nothing of CACHE_WHAT=$WHAT: nothing compiled"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || true
versions=$(python3 -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' \
    2>/dev/null) || versions="torch and triton versions unknown (not importable here)"
echo "saved $(date -u +%Y-%m-%dT%H:%M:%SZ) on ${gpu:-no GPU}; $versions; $WHAT: $files files" > "$CACHE_DIR/ORIGIN"
rm -f "$OUT"/compile_cache.tgz.part*
tar czf - -C "$CACHE_DIR" ./ORIGIN "${dirs[@]}" | split -b "$PART_BYTES" -d -a 2 - "$OUT/compile_cache.tgz.part"
parts=("$OUT"/compile_cache.tgz.part*)
if [ ${#parts[@]} -gt "$MAX_PARTS" ]; then
    total=$(cat "${parts[@]}" | wc -c)
    rm -f "${parts[@]}"
    die "the compile cache is $total bytes compressed, ${#parts[@]} parts of $PART_BYTES bytes:" \
        "more than CACHE_MAX_PARTS=$MAX_PARTS; CACHE_WHAT=triton sends the Triton kernels alone"
fi
echo "cache.sh: $(cat "$CACHE_DIR/ORIGIN"), $(cd "$CACHE_DIR" && du -scb "${dirs[@]}" | tail -1 | cut -f1) bytes"
for p in "${parts[@]}"; do echo "cache.sh: $(basename "$p") $(stat -c %s "$p") bytes"; done
echo "cache.sh: sha256 of the whole stream $(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)"
