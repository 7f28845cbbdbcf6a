#!/usr/bin/env bash
# The passkey model of docs/benchmarks.md: configs/then.yaml's model at d_model 64 with a short-memory
# mamba backbone (dt in [0.05, 0.5]: long range is the trace memory's job), trained on passkey-format
# documents only (data.kind passkey: loss on the answer " K"), on the CPU, in two stages:
# 1000 steps of 129-token documents, then 300 steps of 513-token documents (more filler "X is "
# distractors, so the first digit's lookup must tell "pass key is" from "sky is").
#   bash benchmarks/then/passkey_cpu.sh OUT_DIR [--set K=V ...]   -> OUT_DIR/thenpk (then: statelab probe OUT_DIR/thenpk ...)
# Extra arguments go to the first stage (the second resumes its spec).
set -euo pipefail
out=${1:?out dir}
shift
common=(--out "$out" --set name=thenpk --set data.kind=passkey --set data.path=null --set model.d_model=64
  --set model.backbone.headdim=32 --set model.backbone.dt_min=0.05 --set model.backbone.dt_max=0.5
  --set train.batching=random --set train.batch_size=8 --set train.eval_interval=50 --set train.eval_batches=2
  --set train.checkpoint_interval=50 --set train.sample_tokens=0 --set train.warmup_steps=20
  --set tracking.enabled=false --set 'probes=[]' --set train.time_budget_s=null)
statelab train configs/then.yaml "${common[@]}" --set 'data.passkey.lengths=[129]' --set train.seq_len=128 --set train.steps=1000 "$@"
statelab train "$out/thenpk/spec.yaml" --out "$out" --resume --set train.steps=1300 --set train.seq_len=512 \
  --set 'data.passkey.lengths=[513]'
