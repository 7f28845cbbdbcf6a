#!/usr/bin/env bash
# Train configs/then.yaml (Shakespeare + passkey, stream) on a GPU and run the full passkey grid.
# Written for a device run that did not happen (no device time was left): untested on a GPU.
#   bash benchmarks/then/passkey_gpu.sh OUT_DIR TRAIN_SECONDS [probe args...]
# Writes OUT_DIR/then/ (the run; the probe reads its last checkpoint) and the probe's passkey.md / passkey.png.
set -euo pipefail
out=${1:?out dir}; secs=${2:?train seconds}; shift 2
py=${PYTHON:-python3}
mkdir -p "$out"
$py -m statelab memory corpus --out "$out/corpus.txt" --docs 900 --lengths 256 512 1024 --min-gap 1024
$py -m statelab train configs/then.yaml --out "$out" --set data.path="$out/corpus.txt" \
  --set train.device=cuda --set train.batch_size=64 --set train.seq_len=512 --set train.steps=100000 \
  --set train.decay_steps=2000 --set train.time_budget_s="$secs" --set train.eval_interval=250 \
  --set train.checkpoint_interval=250 --set train.sample_tokens=0 --set tracking.enabled=false --set 'probes=[]'
$py -m statelab probe "$out/then/last" --probe passkey --device cuda --no-log --out "$out/probe" "$@"
