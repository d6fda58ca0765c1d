source /tmp/cpuqat/env.sh
export MODEL_DIM=256 GDN_HEADS=4 OMP_NUM_THREADS=2 ITERATIONS=500 MATRIX_CLIP_SIGMAS=10.6
RUN_ID=d256_plain_ck CHECKPOINT_PATH=/tmp/cpuqat/d256_plain.pt python3 /work/main/train_gpt.py > /tmp/cpuqat/d256_plain_ck.out 2>&1
cd /work/main && QUANT_DAMAGE_EMBED_CLIPS=12,8,6,4 python3 tools/quant_damage.py /tmp/cpuqat/d256_plain.pt > /tmp/cpuqat/quant_damage_d256_plain.out 2>&1
echo done
