source /tmp/cpuqat/env.sh
export ITERATIONS=500 MATRIX_CLIP_SIGMAS=10.6
run() { env "$@" python3 /work/main/train_gpt.py > /tmp/cpuqat/$(echo "$@" | grep -o 'RUN_ID=[^ ]*' | cut -d= -f2).out 2>&1; }
run RUN_ID=i6_plain_noema_ck EMA_DECAY=0 CHECKPOINT_PATH=/tmp/cpuqat/plain_noema.pt &
run RUN_ID=i6_qat30_noema_ck QAT_FRAC=0.3 EMA_DECAY=0 CHECKPOINT_PATH=/tmp/cpuqat/qat30_noema.pt &
wait
python3 /tmp/cpuqat/ablate.py /tmp/cpuqat/plain_noema.pt &
python3 /tmp/cpuqat/ablate.py /tmp/cpuqat/qat30_noema.pt &
wait
echo done
