#!/usr/bin/env bash
# Stage a lease on the offline GPU machine in two calls (README, "Leases on the GPU machine"). Run here, in the
# project root, with ../shared beside it:
#     bash tools/device/pack.sh
# It writes two ignored folders (three with a large COMPILE_CACHE), each of which travels in one call beside the
# tracked files (64 MiB a call):
#   .devextra1/  the first training file of ../shared/data/corpus          (call 1 copies it to /tmp/extra)
#   .devcarry/   ../shared/gpu/stage.sh's folder: the wheels, the tokenizers of VOCABS, the validation documents,
#                and the second training file                              (call 2: tools/device/start.sh)
#                and, in heldout/, the third training file, which no training shard holds: start.sh makes text of
#                the training kind from it to rescore artifacts on (HELDOUT_PATH)
# The two files are the text the 300 s comparisons of issue 6 train on (93,535,700 sp1024 tokens). Settings:
#   SHARED=../shared   VOCABS="1024"   the tokenizers kept (setup.sh builds shards for SETUP_VOCABS only)
#   ARTIFACTS=""   artifacts (.pgz) kept here to rescore on the device: they travel in .devextra1 beside the first
#                  training file (one ~16 MB artifact fits) and start.sh puts them in the job's artifacts/
#   COMPILE_CACHE=""   a folder holding the parts of a compile cache an earlier lease sent back (tools/device/
#                  cache.sh: compile_cache.tgz.part00, ...): joined and checked here into compile_cache.tgz, which
#                  travels in .devextra1 where it fits beside the first training file and the artifacts, else in
#                  .devextra2, a call of its own (the same command as the first call's, from .devextra2); start.sh
#                  unpacks it where the job's runs compile
set -euo pipefail
ROOT="$(git rev-parse --show-toplevel)"; cd "$ROOT"
SHARED="${SHARED:-$ROOT/../shared}"; VOCABS="${VOCABS:-1024}"; ARTIFACTS="${ARTIFACTS:-}"
COMPILE_CACHE="${COMPILE_CACHE:-}"
LIMIT=$((64 * 1024 * 1024))
corpus="$SHARED/data/corpus"
first="$corpus/train_docs_000.jsonl.zst"; second="$corpus/train_docs_001.jsonl.zst"
heldout="$corpus/train_docs_002.jsonl.zst"
for f in "$SHARED/gpu/stage.sh" "$first" "$second" "$heldout"; do
    [ -f "$f" ] || { echo "pack.sh: $f is missing (SHARED=$SHARED)" >&2; exit 1; }
done
declare -A seen=()
for a in $ARTIFACTS; do
    [ -f "$a" ] || { echo "pack.sh: artifact $a (ARTIFACTS) does not exist" >&2; exit 1; }
    [[ "$a" == *.pgz ]] || { echo "pack.sh: artifact $a (ARTIFACTS) is not a .pgz file" >&2; exit 1; }
    name=$(basename "$a")
    [ -z "${seen[$name]:-}" ] || { echo "pack.sh: two artifacts are named $name (ARTIFACTS)" >&2; exit 1; }
    seen[$name]=1
done
cache_tgz=""
if [ -n "$COMPILE_CACHE" ]; then
    shopt -s nullglob; parts=("$COMPILE_CACHE"/compile_cache.tgz.part*); shopt -u nullglob
    [ ${#parts[@]} -gt 0 ] \
        || { echo "pack.sh: no compile_cache.tgz.part* in $COMPILE_CACHE (COMPILE_CACHE)" >&2; exit 1; }
    cache_tgz=$(mktemp) && trap 'rm -f "$cache_tgz"' EXIT
    cat "${parts[@]}" > "$cache_tgz"
    origin=$(tar xzf "$cache_tgz" -O ./ORIGIN 2>/dev/null) || {
        echo "pack.sh: the parts in $COMPILE_CACHE (COMPILE_CACHE) do not join into a compile cache cache.sh wrote" \
             "(a part missing or corrupt, or no ORIGIN)" >&2; exit 1; }
    echo "pack.sh: compile cache of ${#parts[@]} parts, $(stat -c %s "$cache_tgz") bytes: $origin"
fi
for pattern in '/.devcarry/' '/.devextra*/' '/.gpujobs/'; do
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
done
TRAIN_FILES=0 bash "$SHARED/gpu/stage.sh" > /dev/null
rm -f .devcarry/data/tokenizers/*          # stage.sh's choice (sp1024, sp8192), replaced by VOCABS
for v in $VOCABS; do
    tok="$SHARED/data/tokenizers/fineweb_${v}_bpe.model"
    [ -f "$tok" ] || { echo "pack.sh: no tokenizer $tok for VOCABS=$VOCABS" >&2; exit 1; }
    cp "$tok" .devcarry/data/tokenizers/
done
cp "$second" .devcarry/data/corpus/
mkdir .devcarry/heldout && cp "$heldout" .devcarry/heldout/   # not in data/corpus: setup.sh trains on all of that
rm -rf .devextra1 .devextra2 && mkdir .devextra1 && cp "$first" .devextra1/
for a in $ARTIFACTS; do cp "$a" .devextra1/; done
# every call sends the working tree (tracked and untracked-not-ignored files); .gpujobs, the lease's job, goes too
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
carried() {  # the bytes a call carrying folder $1 sends beside the working tree (.gpujobs goes too)
    local paths=("$1"); [ -d .gpujobs ] && paths+=(.gpujobs)
    du -sb "${paths[@]}" | awk '{s += $1} END {print s}'
}
carries=(.devextra1 .devcarry)
if [ -n "$cache_tgz" ]; then
    if [ $(($(carried .devextra1) + $(stat -c %s "$cache_tgz") + tree)) -le $LIMIT ]; then
        cp "$cache_tgz" .devextra1/compile_cache.tgz
        echo "pack.sh: the compile cache travels in .devextra1"
    else
        mkdir .devextra2 && cp "$cache_tgz" .devextra2/compile_cache.tgz && carries+=(.devextra2)
        echo "pack.sh: the compile cache travels in .devextra2: a call of its own, carry .devextra2," \
             "mkdir -p /tmp/extra && cp .devextra2/* /tmp/extra/"
    fi
fi
for carry in "${carries[@]}"; do
    size=$(carried "$carry")
    echo "pack.sh: $carry $size bytes + working tree $tree = $((size + tree)) of $LIMIT"
    [ $((size + tree)) -le $LIMIT ] || { echo "pack.sh: $carry does not fit beside the working tree" >&2; exit 1; }
done
