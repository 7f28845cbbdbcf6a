#!/bin/bash
# The third session's H100 call (2026-11-24): timings alone on the GPU first, then the quality runs.
#   source .devsrc/env.sh; TOTAL_S=330 bash benchmarks/traces/gpu_call3.sh
# Every step has its own timeout; the quality runs get what is left of TOTAL_S (a train.time_budget_s).
export TORCHINDUCTOR_COMPILE_THREADS=16
T0=$(date +%s)
left() { echo $(( ${TOTAL_S:-330} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
echo "== attn_kernels $(date +%T)"
timeout ${ATTN_S:-80} python3 benchmarks/traces/attn_kernels.py --json $OUT/attn.json > $OUT/attn_kernels.log 2>&1
grep -v Warning $OUT/attn_kernels.log | tail -20
echo "== step_time $(date +%T)"
timeout ${STEP_S:-130} python3 benchmarks/traces/step_time.py --device cuda --sdpa --tiles-from $OUT/attn.json --top ${TOP:-2} --out $OUT/step_time.md > $OUT/step_time.log 2>&1
grep -v Warning $OUT/step_time.log | tail -22
echo "== vs_nanogpt $(date +%T)"
timeout ${VS_S:-90} python3 benchmarks/traces/vs_nanogpt.py --device cuda ${VS_ARGS} --out $OUT/vs_nanogpt.md > $OUT/vs_nanogpt.log 2>&1
tail -16 $OUT/vs_nanogpt.log
B=$(( $(left) - 25 ))
echo "== evaluate + motif_flops (concurrent quality runs, budget ${B}s each) $(date +%T)"
if [ $B -gt 40 ]; then
  timeout $((B + 20)) python3 benchmarks/traces/motif_flops.py --device cuda --steps ${MOTIF_STEPS:-1000} --full --time-budget $B --out $OUT/motif_flops.md > $OUT/motif_flops.log 2>&1 &
  timeout $((B + 20)) python3 benchmarks/traces/evaluate.py --device cuda --parallel --copy-steps 300 --time-budget $B --out $OUT/evaluate.md > $OUT/evaluate.log 2>&1
  grep -v Warning $OUT/evaluate.log | tail -28
  wait; grep -v Warning $OUT/motif_flops.log | tail -12
fi
echo "== done $(date +%T)"
