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
with the same schedule; the table (best validation bpc, parameters, tokens/s) is written to
--out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from statelab.train import train

HERE = Path(__file__).resolve().parent


def mamba(n_layers: int) -> dict:
    return {"kind": "mamba", "n_layers": n_layers, "mixer": "mamba2", "d_state": 32, "headdim": 32}


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
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-tracking", action="store_true")
    args = ap.parse_args(argv)
    rows = []
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
                      "checkpoint_interval": 10 * args.steps, "device": args.device, "out_dir": str(args.runs)},
            "tracking": {"enabled": not args.no_tracking, "experiment": "crsd-shakespeare", "uri": args.tracking_uri},
        }
        t0 = time.time()
        res = train(spec, progress=False)
        n_params = res.model.num_parameters() if res.model is not None else -1
        best_bpc = min((h["val/bpc"] for h in res.history.get("val", []) if "val/bpc" in h),
                       default=res.metrics.get("val/bpc", float("nan")))
        rows.append({"model": name, "params": n_params, "bpc": best_bpc, "tok_s": res.tokens_per_s,
                     "wall_s": time.time() - t0})
        print(f"{name:<14} params {n_params:>9,}  best val bpc {best_bpc:.4f}  {res.tokens_per_s:,.0f} tok/s",
              flush=True)
    cmd = "python benchmarks/crsd/shakespeare.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    lines = ["# Tiny Shakespeare (character level): crsd-memory models against plain Mamba", "",
             f"`{cmd}` ({args.device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}); "
             f"{args.steps} steps of {args.batch_size} x {args.seq_len} characters, lr {args.lr:g}, d_model 128.", "",
             "| model | parameters | best validation bpc | train tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['bpc']:.4f} | {r['tok_s']:,.0f} |" for r in rows]
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
