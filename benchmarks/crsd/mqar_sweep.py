"""MQAR sweep (Zoology protocol) for crsd-memory: accuracy against recurrent state size.

    python benchmarks/crsd/mqar_sweep.py --device cuda                     # the full grid
    python benchmarks/crsd/mqar_sweep.py --device cpu --cells 64x4 --d-models 64 --steps 300

Grid (defaults follow the issue): vocabulary 8192; (seq_len, kv pairs) in 64x4, 128x8,
256x16, 256x64; 2 layers; d_model 64 and 128; learning rates 1e-4, 3e-4, 1e-3, 3e-3; models
``crsd`` and ``mamba`` (crsm-planner; ``toy-rnn`` stands in if it is not installed) alone and
with ``hebbian``, ``episodic`` or ``dual`` after layer 1. Every run goes through the statelab
runtime (``statelab.train.train``: MQAR data, mlflow tracking) and its final validation
accuracy (query positions only) is recorded.

Results are appended to ``--results`` (JSON lines; runs already there are skipped, so an
interrupted sweep resumes) and the markdown table ``--out`` is rewritten from all recorded
runs: per model and size, the best accuracy over the learning rates, and the recurrent state
size in bytes per sequence (every tensor of ``model.init_state(1)``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import statelab
from statelab.plugins import get_registry
from statelab.train import train

HERE = Path(__file__).resolve().parent
MEMORIES = {
    "hebbian": {"kind": "hebbian", "n_heads": 4},
    "episodic": {"kind": "episodic", "slots": 64, "temperature": 0.1},
    "dual": {"kind": "dual", "hebbian": {"n_heads": 4}, "episodic": {"slots": 64, "temperature": 0.1}},
}


def backbones() -> dict[str, dict]:
    reg = get_registry()
    out = {"crsd": {"kind": "crsd", "n_layers": 2, "d_reservoir": 64, "hebbian": {"n_heads": 4},
                    "episodic": {"slots": 64, "temperature": 0.1}}}
    if ("backbone", "mamba") in reg:
        out["mamba"] = {"kind": "mamba", "n_layers": 2, "mixer": "mamba2", "d_state": 64, "headdim": 32}
    else:
        print("mqar_sweep: backbone 'mamba' (crsm-planner) is not installed; using 'toy-rnn' in its place",
              file=sys.stderr)
        out["mamba"] = {"kind": "toy-rnn", "n_layers": 2, "d_state": 64}
    return out


def model_spec(model: str, d_model: int) -> dict:
    """``crsd``, ``mamba`` or ``mamba+<memory>`` -> the spec's model section."""
    base, _, mem = model.partition("+")
    bb = backbones()[base]
    memories = [{**MEMORIES[mem], "after_layer": 1}] if mem else []
    return {"d_model": d_model, "backbone": bb, "memories": memories}


def run_spec(args, model: str, d_model: int, seq_len: int, kv: int, lr: float) -> dict:
    name = f"mqar-{model.replace('+', '-')}-d{d_model}-s{seq_len}-kv{kv}-lr{lr:g}"
    return {
        "name": name,
        "seed": args.seed,
        "data": {"kind": "mqar", "mqar": {"vocab_size": args.vocab, "seq_len": seq_len, "num_kv_pairs": kv,
                                          "num_train": args.num_train, "num_val": args.num_val}},
        "model": model_spec(model, d_model),
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": seq_len, "lr": lr,
                  "min_lr": lr / 10, "warmup_steps": max(1, args.steps // 10), "weight_decay": 0.1,
                  "eval_interval": args.steps, "eval_batches": None, "log_interval": max(1, args.steps // 10),
                  "checkpoint_interval": 10 * args.steps, "sample_tokens": 0, "device": args.device,
                  "time_budget_s": None, "out_dir": str(args.runs)},
        "tracking": {"enabled": not args.no_tracking, "experiment": args.experiment, "uri": args.tracking_uri},
    }


def state_bytes(spec: dict) -> int:
    """Bytes of the recurrent state of one sequence (what a decoder carries between tokens)."""
    model = statelab.build({**spec, "tracking": {"enabled": False}})
    return sum(t.numel() * t.element_size() for t in model.init_state(1, "cpu").values())


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_table(rows: list[dict], out: Path, command: str) -> None:
    cells = sorted({(r["seq_len"], r["kv"]) for r in rows})
    groups: dict[tuple[str, int], dict] = {}
    for r in rows:
        g = groups.setdefault((r["model"], r["d_model"], r["device"]),
                              {"state_bytes": r["state_bytes"], "best": {}, "lrs": {}})
        key = (r["seq_len"], r["kv"])
        g["lrs"].setdefault(key, []).append(r["lr"])
        if key not in g["best"] or (r["acc"], -r["loss"]) > (g["best"][key]["acc"], -g["best"][key]["loss"]):
            g["best"][key] = r
    lines = [
        "# MQAR: accuracy against recurrent state size (crsd-memory)",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "Each cell: the best final validation accuracy (query positions; ties broken by loss) over the learning "
        "rates tried, "
        "with that learning rate and the number of learning rates tried; `-` = not run. "
        "State = bytes of `model.init_state(1)` (one sequence).",
        "",
        "| model | d_model | device | state (bytes) | " + " | ".join(f"({s}, {k})" for s, k in cells) + " |",
        "|---|---|---|---|" + "---|" * len(cells),
    ]
    for (model, d, dev), g in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        vals = []
        for c in cells:
            b = g["best"].get(c)
            if b is None:
                vals.append("-")
            else:
                vals.append(f"{b['acc']:.3f} (lr {b['lr']:g}, {len(g['lrs'][c])} lr, {b['steps']} steps)")
        lines.append(f"| {model} | {d} | {dev} | {g['state_bytes']:,} | " + " | ".join(vals) + " |")
    lines += ["", "All runs:", "", "| model | d_model | seq | kv | lr | steps | val acc | val loss | tok/s | device |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["d_model"], r["model"], r["seq_len"], r["kv"], r["lr"])):
        lines.append(f"| {r['model']} | {r['d_model']} | {r['seq_len']} | {r['kv']} | {r['lr']:g} | {r['steps']} | "
                     f"{r['acc']:.4f} | {r['loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['device']} |")
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="64x4,128x8,256x16,256x64", help="comma-separated SEQxKV")
    ap.add_argument("--d-models", default="64,128")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--models", default="crsd,mamba,mamba+hebbian,mamba+episodic,mamba+dual")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=100_000)
    ap.add_argument("--num-val", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--runs", type=Path, default=Path("runs/mqar-sweep"), help="run directories")
    ap.add_argument("--results", type=Path, default=HERE / "mqar_results.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "MQAR.md")
    ap.add_argument("--experiment", default="crsd-mqar", help="mlflow experiment")
    ap.add_argument("--tracking-uri", default=None,
                    help="mlflow URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new run after this many minutes (recorded runs are kept; rerun to continue)")
    args = ap.parse_args(argv)
    t_start = time.time()

    cells = [tuple(int(p) for p in c.lower().split("x")) for c in args.cells.split(",")]
    d_models = [int(d) for d in args.d_models.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    models = args.models.split(",")
    command = "python benchmarks/crsd/mqar_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    done = {(r["model"], r["d_model"], r["seq_len"], r["kv"], r["lr"], r["steps"], r["device"])
            for r in load_results(args.results)}
    # every model at the first learning rate before any at the second, so that a run cut short by
    # --max-minutes still compares all models (list the most promising learning rate first)
    for d_model in d_models:
        for seq_len, kv in cells:
            for lr in lrs:
                for model in models:
                    key = (model, d_model, seq_len, kv, lr, args.steps, args.device)
                    if key in done:
                        continue
                    if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                        print(f"mqar_sweep: --max-minutes {args.max_minutes:g} reached; rerun to continue", flush=True)
                        write_table(load_results(args.results), args.out, command)
                        return 0
                    spec = run_spec(args, model, d_model, seq_len, kv, lr)
                    t0 = time.time()
                    res = train(spec, progress=False)
                    row = {
                        "model": model, "backbone": spec["model"]["backbone"]["kind"], "d_model": d_model,
                        "seq_len": seq_len, "kv": kv, "lr": lr, "steps": res.step, "device": args.device,
                        "acc": res.metrics.get("val/acc", float("nan")),
                        "loss": res.metrics.get("val/loss", float("nan")),
                        "tokens_per_s": res.tokens_per_s, "wall_s": time.time() - t0,
                        "state_bytes": state_bytes(spec), "mlflow_run_id": res.mlflow_run_id,
                    }
                    append_result(args.results, row)
                    print(f"{model:<16} d={d_model:<4} ({seq_len},{kv}) lr={lr:<7g} acc={row['acc']:.4f} "
                          f"loss={row['loss']:.3f} state={row['state_bytes']:,}B {row['wall_s']:.0f}s", flush=True)
                    write_table(load_results(args.results), args.out, command)
    rows = load_results(args.results)
    if rows:
        write_table(rows, args.out, command)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    raise SystemExit(main())
