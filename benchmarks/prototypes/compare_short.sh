#!/usr/bin/env bash
# The five prototype configs, short CPU versions, side by side: a thin wrapper over the bench suite
# configs/bench/prototypes.yaml (60 steps each, two seeds, bits per byte on held-out Tiny Shakespeare
# with intervals and paired differences against the traces transformer).
#   bash benchmarks/prototypes/compare_short.sh [OUT_DIR] [--size gpu]
# Writes OUT_DIR/prototypes/report/report.md (tables, plots) and OUT_DIR/mlflow.db.
set -euo pipefail
out=${1:-runs/prototypes-short}
shift || true
mkdir -p "$out"
export MLFLOW_DISABLE_TELEMETRY=true
MLFLOW_TRACKING_URI="sqlite:///$(cd "$out" && pwd)/mlflow.db" statelab bench configs/bench/prototypes.yaml --out "$out" "$@"
