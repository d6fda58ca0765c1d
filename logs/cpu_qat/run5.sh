# The embedding's clip on both stacks at d128 (CPU, one thread each, EMA on, seed 1337): is the gain the same?
source /tmp/cpuqat/env.sh  # a copy of logs/cpu_qat/env.sh
export ITERATIONS=500 MATRIX_CLIP_SIGMAS=10.6
M_hyb=''
M_attn='LAYOUT=AAAA MUON_VARIANT=muon UNET_SKIPS=0 XSA_LAST=99'
cd /tmp/cpuqat
for m in hyb attn; do v=M_$m
  env ${!v} RUN_ID=e_$m CHECKPOINT_PATH=/tmp/cpuqat/e_$m.pt python3 /work/main/train_gpt.py > e_$m.out 2>&1 &
done; wait
for m in hyb attn; do v=M_$m
  (cd /work/main && env ${!v} EMBED_CLIP_SIGMAS=20 QUANT_DAMAGE_EMBED_CLIPS=12,8,6,4 python3 tools/quant_damage.py /tmp/cpuqat/e_$m.pt > /tmp/cpuqat/quant_damage_e_$m.out 2>&1) &
done; wait
for m in hyb attn; do v=M_$m; for k in 20 6; do
  env ${!v} EXPORT_FROM=/tmp/cpuqat/e_$m.pt EMBED_CLIP_SIGMAS=$k RUN_ID=e_${m}_emb$k python3 /work/main/train_gpt.py > e_${m}_emb$k.out 2>&1 &
done; wait; done
echo done
