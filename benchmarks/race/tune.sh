#!/usr/bin/env bash
# How the race's Mamba spec was tuned on the H100 (one device call, about 7 minutes).
#
#   bash benchmarks/race/tune.sh OUT_DIR
#
# 1. Throughput, one variant at a time (nothing else on the GPU): 150 steps of the race spec
#    with each execution path; tokens/s leaves out the first logging window (compilation).
# 2. Quality, variants side by side on the GPU (not a timing figure): the same spec with other
#    learning rates, dropout and mixers, for a fixed number of steps with a validation pass
#    over the whole split every 100 steps. The race spec then takes the variant whose best
#    validation loss is lowest, with its decay length set to the steps the fastest path fits
#    into 205 s.
set -euo pipefail
out=${1:?usage: tune.sh OUT_DIR}
mkdir -p "$out"
spec=configs/race/mamba.yaml
race() { python3 benchmarks/race/race.py "$spec" --out-dir "$(mktemp -d)" --json "$out/$1.json" "${@:2}"; }
common=(--set tracking.enabled=false --set train.checkpoint_interval=100000)

echo "== throughput (150 steps each, alone on the GPU)"
for v in "torch:never:false" "torch-compile:never:true" "kernels:always:false" "kernels-compile:always:true"; do
  IFS=: read -r name kern comp <<<"$v"
  race "tp-$name" --budget 150 "${common[@]}" --set train.steps=150 --set train.eval_interval=150 \
    --set train.log_interval=25 --set model.backbone.use_kernels="$kern" --set train.compile="$comp" \
    || echo "variant $name failed"
done

echo "== quality (side by side, ${STEPS:=1000} steps each, eval every 100)"
q=(--budget 1000 "${common[@]}" --set train.steps="$STEPS" --set train.decay_steps="$STEPS"
   --set train.eval_interval=100 --set train.compile=false)
race q-lr1e-3-do0.2 "${q[@]}" --set train.lr=1e-3 --set model.backbone.dropout=0.2 --set model.dropout=0.2 &
race q-lr2e-3-do0.2 "${q[@]}" --set train.lr=2e-3 --set model.backbone.dropout=0.2 --set model.dropout=0.2 &
race q-lr1e-3-do0.3 "${q[@]}" --set train.lr=1e-3 --set model.backbone.dropout=0.3 --set model.dropout=0.3 &
race q-mamba1-lr1e-3-do0.2 "${q[@]}" --set train.lr=1e-3 --set model.backbone.mixer=mamba1 \
  --set model.backbone.d_state=16 --set model.backbone.dropout=0.2 --set model.dropout=0.2 &
wait
python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(f.read_text()):
        best = min(r["evals"], key=lambda e: e["val_loss"]) if r["evals"] else None
        print(f"{f.stem:28s} params {r['params']:,} steps {r['steps']} tok/s {r['tokens_per_s']:,.0f} "
              f"best {r['best_val_loss']} at step {best and best['step']}  curve "
              + " ".join(f"{e['val_loss']:.3f}" for e in r["evals"]))
PY
