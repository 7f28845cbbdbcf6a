"""The Tiny Shakespeare race: train specs under a wall-clock budget and compare.

    python benchmarks/race/race.py configs/race/transformer.yaml configs/race/mamba.yaml          # on the GPU
    python benchmarks/race/race.py --smoke configs/race/transformer.yaml configs/race/mamba.yaml  # CPU check

Each spec trains in its own process, so its budget counts everything from that process'
start (imports, data, compilation, evaluations). Validation runs over the whole split (the
last 10% of the corpus) every `train.eval_interval` steps. The table gives the best
validation loss, the elapsed time at which each threshold was first reached, training
tokens/s and peak GPU memory. `--smoke` shrinks the model and budget so the same command
checks itself on a CPU in a couple of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

THRESHOLDS = (1.60, 1.50, 1.47, 1.45)
SMOKE = [
    "model.d_model=96", "model.backbone.n_layers=2", "train.batch_size=8", "train.seq_len=64",
    "train.eval_interval=50", "train.warmup_steps=10", "train.compile=false", "train.sample_tokens=0",
]


def run_one(spec: str, budget: float, overrides: list[str], out_json: Path, out_dir: str) -> None:
    """Child process: train one spec and write its summary as JSON."""
    import torch

    from statelab.train import train

    res = train(
        spec,
        overrides=[f"train.time_budget_s={budget}", "train.eval_batches=null", "tracking.enabled=false", *overrides],
        out_dir=out_dir,
        progress=False,
    )
    vals = res.history.get("val", [])
    reached = {}
    for thr in THRESHOLDS:
        hit = next((v for v in vals if v["val/loss"] <= thr), None)
        reached[str(thr)] = None if hit is None else round(hit["val/elapsed_s"], 1)
    model = res.model
    summary = {
        "spec": spec,
        "params": model.num_parameters() if model is not None else None,
        "steps": res.step,
        "status": res.status,
        "best_val_loss": res.best_val_loss,
        "reached_s": reached,
        "tokens_per_s": res.tokens_per_s,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "evals": [{"step": v["step"], "elapsed_s": v["val/elapsed_s"], "val_loss": v["val/loss"]} for v in vals],
    }
    out_json.write_text(json.dumps(summary, indent=2))


def table(rows: list[dict]) -> str:
    head = ["spec", "params", "steps", "best val", *[f"t<={t}" for t in THRESHOLDS], "tok/s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            Path(r["spec"]).name,
            f"{r['params'] / 1e6:.2f}M" if r["params"] else "?",
            str(r["steps"]),
            f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-",
            *[f"{r['reached_s'][str(t)]:.0f}s" if r["reached_s"][str(t)] is not None else "-" for t in THRESHOLDS],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_gpu_mem_gib']:.2f}" if r["peak_gpu_mem_gib"] is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+")
    p.add_argument("--budget", type=float, default=None, help="seconds per spec from process start (default 205; 60 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="small model and budget, for a CPU check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra spec override for every spec")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--out-dir", default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    budget = args.budget or (60.0 if args.smoke else 205.0)
    overrides = (SMOKE if args.smoke else []) + args.set
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="race-")
    if args._child:
        run_one(args._child[0], budget, overrides, Path(args._child[1]), out_dir)
        return 0
    rows = []
    for spec in args.specs:
        out = Path(out_dir) / f"{Path(spec).stem}.json"
        cmd = [sys.executable, __file__, spec, "--budget", str(budget), "--out-dir", out_dir, "--_child", spec, str(out)]
        if args.smoke:
            cmd.append("--smoke")
        for s in args.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        rows.append(json.loads(out.read_text()))
        print(f"{spec}: best {rows[-1]['best_val_loss']}", flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
