#!/bin/bash
# The third session's H100 calls (2026-11-24). Timings run alone on the GPU first, then the quality runs
# share it (their tokens/s are indicative only). Run as
#   source .devsrc/env.sh; TOTAL_S=480 bash benchmarks/traces/gpu_call3.sh
# Every step has its own timeout; the quality runs get what is left of TOTAL_S (a train.time_budget_s).
# The first call ran attn_kernels.py with the FlexAttention cases, step_time.py --sdpa --tiles-from (the
# FlexAttention default then) and vs_nanogpt.py with 10 rounds; see docs/benchmarks.md.
export TORCHINDUCTOR_COMPILE_THREADS=16
T0=$(date +%s)
left() { echo $(( ${TOTAL_S:-480} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
echo "== attn_kernels $(date +%T)"
timeout ${ATTN_S:-60} python3 benchmarks/traces/attn_kernels.py --no-flex --json $OUT/attn.json > $OUT/attn_kernels.log 2>&1
grep -v Warning $OUT/attn_kernels.log | tail -14
# the fastest bias_chunks in the kernel benchmark, timed in the training step if it is not the default (4)
BEST=$(python3 -c "import json,re;d=json.load(open('$OUT/attn.json'));r=[(v,int(re.search(r'in (\d+) query',k).group(1))) for k,v in d.items() if 'query blocks' in k and v==v];print(min(r)[1])" 2>/dev/null)
CH=""; [ -n "$BEST" ] && [ "$BEST" != "4" ] && CH="--chunks $BEST"
echo "== step_time $CH $(date +%T)"
timeout ${STEP_S:-150} python3 benchmarks/traces/step_time.py --device cuda $CH ${STEP_ARGS} --out $OUT/step_time.md > $OUT/step_time.log 2>&1
grep -v Warning $OUT/step_time.log | tail -16
echo "== vs_nanogpt $(date +%T)"
timeout ${VS_S:-110} python3 benchmarks/traces/vs_nanogpt.py --device cuda --rounds 30 --steps 30 --profile --out $OUT/vs_nanogpt.md > $OUT/vs_nanogpt.log 2>&1
grep -v Warning $OUT/vs_nanogpt.log | grep -v "^round" | tail -14
B=$(( $(left) - 25 ))
echo "== evaluate + motif_flops (concurrent quality runs, budget ${B}s each) $(date +%T)"
if [ $B -gt 40 ]; then
  timeout $((B + 20)) python3 benchmarks/traces/motif_flops.py --device cuda --steps ${MOTIF_STEPS:-1000} --full --time-budget $B --out $OUT/motif_flops.md > $OUT/motif_flops.log 2>&1 &
  timeout $((B + 20)) python3 benchmarks/traces/evaluate.py --device cuda --steps ${EVAL_STEPS:-1000} --parallel --copy-steps 300 --time-budget $B --out $OUT/evaluate.md > $OUT/evaluate.log 2>&1
  grep -v Warning $OUT/evaluate.log | tail -26
  wait; grep -v Warning $OUT/motif_flops.log | tail -10
fi
echo "== done $(date +%T)"
