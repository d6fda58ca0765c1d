source /tmp/cpuqat/env.sh
export ITERATIONS=500
run() { env "$@" python3 /work/main/train_gpt.py > /tmp/cpuqat/$(echo "$@" | grep -o 'RUN_ID=[^ ]*' | cut -d= -f2).out 2>&1; }
run RUN_ID=i6_plain MATRIX_CLIP_SIGMAS=10.6 &
run RUN_ID=i6_qat30 MATRIX_CLIP_SIGMAS=10.6 QAT_FRAC=0.3 &
wait
run RUN_ID=i4_plain MATRIX_BITS=4 MATRIX_CLIP_SIGMAS=3 &
run RUN_ID=i4_qat30 MATRIX_BITS=4 MATRIX_CLIP_SIGMAS=3 QAT_CLIP_SIGMAS=3 QAT_FRAC=0.3 &
wait
echo done
