#!/usr/bin/env bash
# The five prototype configs, short CPU versions, trained into one mlflow experiment and
# compared:  bash benchmarks/prototypes/compare_short.sh [STEPS] [OUT_DIR]
# Writes OUT_DIR/compare.txt (the table) and OUT_DIR/compare.png (validation curves).
set -euo pipefail
steps=${1:-60}
out=${2:-runs/prototypes-short}
mkdir -p "$out"
uri="sqlite:///$(cd "$out" && pwd)/mlflow.db"
export MLFLOW_DISABLE_TELEMETRY=true
# then.yaml trains on Shakespeare interleaved with passkey documents, written by its plugin
statelab memory corpus --out "$out/then-corpus.txt" >/dev/null
for cfg in crsm crsd kssm then traces; do
  extra=()
  [ "$cfg" = then ] && extra=(--set data.path="$out/then-corpus.txt")
  statelab train "configs/$cfg.yaml" --out "$out/runs" "${extra[@]}" --set train.planner_fit.steps=20 \
    --set train.steps="$steps" --set train.warmup_steps=10 --set train.eval_interval="$steps" \
    --set train.eval_batches=4 --set train.checkpoint_interval="$steps" --set train.sample_tokens=50 \
    --set train.device=cpu --set train.time_budget_s=null \
    --set tracking.uri="$uri" --set tracking.experiment=prototypes-short
done
statelab compare --experiment prototypes-short --uri "$uri" --output "$out/compare.png" | tee "$out/compare.txt"
