source /tmp/cpuqat/env.sh
export ITERATIONS=500 MATRIX_CLIP_SIGMAS=10.6 QUANT_COMPARE=1
run() { env "$@" python3 /work/main/train_gpt.py > /tmp/cpuqat/$(echo "$@" | grep -o 'RUN_ID=[^ ]*' | cut -d= -f2).out 2>&1; }
run RUN_ID=i6_qat30_cmp QAT_FRAC=0.3 &
run RUN_ID=i6_qat30_noema_cmp QAT_FRAC=0.3 EMA_DECAY=0 &
wait
run RUN_ID=i6_plain_cmp &
run RUN_ID=i6_plain_noema_cmp EMA_DECAY=0 &
wait
echo done
