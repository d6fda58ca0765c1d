#!/usr/bin/env bash
# Set up and run the main job on this machine's GPUs: install, download the sp1024 data, train, export, score.
#   bash run.sh                 all GPUs (8 for a record run)
#   NPROC=1 bash run.sh         one GPU
# Any train_gpt.py setting can be passed through the environment, e.g. SEED=42 RUN_ID=seed42 bash run.sh
set -euo pipefail
cd "$(dirname "$0")"
NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
python3 -m pip install -q -r requirements.txt
if ! python3 -m pip install -q -r requirements-kernels.txt; then
    echo "run.sh: WARNING: the optional kernels (tilelang, flash-qla) did not install. The default GDN heads" \
         "(8 x 64) run on fla's Triton kernels either way; GDN_HEAD_DIM=128 would too, more slowly than on" \
         "FlashQLA's (README, Throughput). The run's log names the backend it used." >&2
fi
python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards "${TRAIN_SHARDS:-80}"
torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py
