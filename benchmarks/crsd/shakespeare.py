"""Tiny Shakespeare (character level): validation bits per character of `crsd` and of Mamba
with `dual`, each against plain Mamba of about the same parameter count.

    python benchmarks/crsd/shakespeare.py --device cuda --steps 2000
    python benchmarks/crsd/shakespeare.py --device cpu --steps 100 --batch-size 8   (smoke scale)

Models at d_model 128 (parameter counts with the 65-character vocabulary):
  mamba-4            plain Mamba-2, 4 layers           ~447k   (baseline for mamba-3+dual)
  mamba-3+dual       3 layers, `dual` after layer 1    ~485k
  mamba-5            plain Mamba-2, 5 layers           ~556k   (baseline for crsd-2)
  crsd-2             `crsd`, 2 cells                   ~520k
Every run uses the statelab runtime (bundled corpus, last 10% validation, mlflow tracking)
with the same schedule and the same training tokens; each result is appended to --results
(JSON lines) and the table (best validation bpc, parameters, tokens/s) is rewritten to --out
from every recorded row, so the models can run as separate processes at once:

    for m in mamba-4 mamba-3+dual mamba-5 crsd-2; do
      python benchmarks/crsd/shakespeare.py --device cuda --steps 1500 --models $m --no-tracking &
    done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from statelab.train import train

HERE = Path(__file__).resolve().parent


def mamba(n_layers: int) -> dict:
    # pure PyTorch Mamba-2 (use_kernels never): mamba-ssm's Triton SSD kernels take minutes to compile
    # and autotune in a fresh process and ran no faster on the H100 (docs/benchmarks.md, crsm-planner)
    return {"kind": "mamba", "n_layers": n_layers, "mixer": "mamba2", "d_state": 32, "headdim": 32,
            "use_kernels": "never"}


MODELS = {
    "mamba-4": (mamba(4), []),
    "mamba-3+dual": (mamba(3), [{"kind": "dual", "after_layer": 1, "hebbian": {"n_heads": 4},
                                 "episodic": {"slots": 32}}]),
    "mamba-5": (mamba(5), []),
    "crsd-2": ({"kind": "crsd", "n_layers": 2}, []),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=Path, default=Path("runs/crsd-shakespeare"))
    ap.add_argument("--out", type=Path, default=HERE / "SHAKESPEARE.md")
    ap.add_argument("--results", type=Path, default=HERE / "shakespeare_results.jsonl")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="safety stop (seconds since process start); a run it stops is marked, its tokens differ")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-tracking", action="store_true")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        backbone, memories = MODELS[name]
        spec = {
            "name": f"shakespeare-{name.replace('+', '-')}",
            "tokenizer": {"kind": "char"},
            "data": {"kind": "text"},
            "model": {"d_model": 128, "backbone": backbone, "memories": memories},
            "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                      "min_lr": args.lr / 10, "warmup_steps": max(1, args.steps // 20),
                      "eval_interval": max(1, args.steps // 4), "eval_batches": 40, "sample_tokens": 0,
                      "checkpoint_interval": 10 * args.steps, "device": args.device, "out_dir": str(args.runs),
                      "time_budget_s": args.time_budget_s},
            "tracking": {"enabled": not args.no_tracking, "experiment": "crsd-shakespeare", "uri": args.tracking_uri},
        }
        t0 = time.time()
        res = train(spec, progress=False)
        n_params = res.model.num_parameters() if res.model is not None else -1
        best_bpc = min((h["val/bpc"] for h in res.history.get("val", []) if "val/bpc" in h),
                       default=res.metrics.get("val/bpc", float("nan")))
        curve = [[h["step"], h["val/bpc"]] for h in res.history.get("val", []) if "val/bpc" in h and "step" in h]
        row = {"model": name, "params": n_params, "bpc": best_bpc, "curve": curve, "tok_s": res.tokens_per_s,
               "wall_s": time.time() - t0, "steps": res.step, "status": res.status, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": args.lr, "device": args.device, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:<14} params {n_params:>9,}  best val bpc {best_bpc:.4f}  {res.tokens_per_s:,.0f} tok/s "
              f"({res.step} steps, {res.status})", flush=True)
    rows = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    cmd = "python benchmarks/crsd/shakespeare.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    lines = ["# Tiny Shakespeare (character level): crsd-memory models against plain Mamba", "",
             f"Rows of `{args.results.name}`, last written by `{cmd}`; d_model 128, the runtime's bundled corpus "
             "(last 10% validation). Pairs to compare: mamba-3+dual against mamba-4, crsd-2 against mamba-5.", "",
             "| model | parameters | steps x batch x seq_len | lr | best validation bpc | train tokens/s | device |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['steps']} x {r['batch_size']} x {r['seq_len']}"
              f"{'' if r['status'] == 'finished' else ' (' + r['status'] + ')'} | {r['lr']:g} | {r['bpc']:.4f} | "
              f"{r['tok_s']:,.0f} | {r['device']} |" for r in rows]
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
