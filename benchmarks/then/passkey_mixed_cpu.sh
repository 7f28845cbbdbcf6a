#!/usr/bin/env bash
# A passkey model that also saw Tiny Shakespeare: passkey_cpu.sh's two passkey-only stages (byte tokenizer,
# so that the vocabulary does not depend on the corpus), then a third stage that starts from those weights
# (train.init_from) and trains configs/then.yaml's stateful recipe on Tiny Shakespeare interleaved with
# passkey documents (stream batching, loss on every token).
#   bash benchmarks/then/passkey_mixed_cpu.sh OUT_DIR   -> OUT_DIR/thenpk (passkey only), OUT_DIR/thenmix
set -euo pipefail
out=${1:?out dir}
steps=${MIX_STEPS:-1000}
bash "$(dirname "$0")/passkey_cpu.sh" "$out" --set tokenizer.kind=byte
[ -f "$out/corpus.txt" ] || statelab memory corpus --out "$out/corpus.txt" --docs 900 --lengths 256 512 1024 --min-gap 1024
statelab train configs/then.yaml --out "$out" --set name=thenmix --set tokenizer.kind=byte --set data.path="$out/corpus.txt" \
  --set model.d_model=64 --set model.backbone.headdim=32 --set model.backbone.dt_min=0.05 --set model.backbone.dt_max=0.5 \
  --set train.init_from="$out/thenpk" --set train.steps="$steps" --set train.lr=1e-3 --set train.warmup_steps=20 \
  --set train.sample_tokens=0 --set tracking.enabled=false --set train.time_budget_s=null \
  --set train.checkpoint_interval=250 --set train.eval_interval=250
