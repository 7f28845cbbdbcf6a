#!/bin/bash
# The second session's one H100 call (2026-11-23), run as
#   STEP_S=80 VS_S=105 EVAL_S=50 bash benchmarks/traces/gpu_call1.sh
# step_time and vs_nanogpt finished; the 50 s limit cut evaluate.py and motif_flops.py short (no figures):
# give those several minutes (see RESULTS.md).
set -o pipefail
export TORCHINDUCTOR_COMPILE_THREADS=16
echo "== step_time $(date +%T)"
timeout ${STEP_S:-90} python3 benchmarks/traces/step_time.py --device cuda --out $OUT/step_time.md > $OUT/step_time.log 2>&1
grep -v Warning $OUT/step_time.log | tail -16
echo "== vs_nanogpt $(date +%T)"
timeout ${VS_S:-110} python3 benchmarks/traces/vs_nanogpt.py --device cuda --steps 30 --warmup 8 --rounds 1 ${VS_ARGS:---diagnose} --out $OUT/vs_nanogpt.md > $OUT/vs_nanogpt.log 2>&1
grep -i "tok/s\|ratio\|Error" $OUT/vs_nanogpt.log | tail -12
echo "== evaluate + motif_flops (concurrent quality runs) $(date +%T)"
timeout ${EVAL_S:-60} python3 benchmarks/traces/motif_flops.py --device cuda --steps ${EVAL_STEPS:-400} --full --out $OUT/motif_flops.md > $OUT/motif_flops.log 2>&1 &
timeout ${EVAL_S:-60} python3 benchmarks/traces/evaluate.py --device cuda --steps ${EVAL_STEPS:-400} --parallel --copy-steps 300 --out $OUT/evaluate.md > $OUT/evaluate.log 2>&1
tail -28 $OUT/evaluate.log
wait; tail -12 $OUT/motif_flops.log
echo "== done $(date +%T)"
