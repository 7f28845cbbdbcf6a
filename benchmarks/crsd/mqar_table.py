"""The MQAR table of crsd-memory, from the result files of the sweeps (H100, and a few CPU runs).

    python benchmarks/crsd/mqar_table.py            # writes benchmarks/crsd/MQAR.md

Reads the JSON lines written by ``mqar_sweep.py`` (training through ``statelab.train``) and
``mqar_fast.py`` (the same training, a faster loop) and writes:

1. accuracy against state size: per model and d_model, the bytes of state one sequence carries,
   and per cell the best validation accuracy over the learning rates at the largest step budget
   run there (with that learning rate, the steps and how many learning rates were tried);
2. the learning-rate window: every (cell, steps, model, d_model) with its accuracy at each
   learning rate (``-`` = not run);
3. per cell, the models ordered by state size with their best accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {
    "mqar_results.jsonl": "sweep",  # mqar_sweep.py: statelab.train, 12 processes sharing the GPU
    "mqar_results_h100_goal_cell.jsonl": "goal",  # mqar_sweep.py: the goal cell, 1-2 processes
    "mqar_results_h100_fast.jsonl": "fast",  # mqar_fast.py: the 4 learning rates side by side
    "mqar_results_cpu_fast.jsonl": "fast-cpu",  # mqar_fast.py on the 2-core CPU: fp32, no CUDA graph
}
MODELS = ["mamba", "mamba+hebbian", "mamba+hebbian-gated", "mamba+hebbian-1head", "crsd", "mamba+episodic", "mamba+dual", "transformer"]
LRS = [3e-4, 1e-3, 3e-3, 1e-2]


def load(paths: dict[Path, str]) -> list[dict]:
    rows = []
    for path, tag in paths.items():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["source"] = tag
                r.setdefault("planned_steps", r["steps"])
                rows.append(r)
    return rows


def fmt_acc(a: float) -> str:
    return f"**{a:.4f}**" if a >= 0.99 else f"{a:.3f}"


def best(rs: list[dict]) -> dict:
    return max(rs, key=lambda r: (r["acc"], -r["loss"]))


def tables(rows: list[dict]) -> str:
    cells = sorted({(r["seq_len"], r["kv"]) for r in rows})
    # (model, d, cell) -> rows at the largest planned step budget run there
    top: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], r["d_model"], (r["seq_len"], r["kv"]))
        cur = top.get(key)
        if cur is None or r["planned_steps"] > cur[0]["planned_steps"]:
            top[key] = [r]
        elif r["planned_steps"] == cur[0]["planned_steps"]:
            cur.append(r)
    state = {(r["model"], r["d_model"], r["seq_len"]): r["state_bytes"] for r in rows}

    def state_of(model: str, d: int) -> str:
        if model == "transformer":
            per_tok = {state[k] // k[2] for k in state if k[:2] == (model, d)}
            return f"KV cache, {min(per_tok):,} per token ({max(v for k, v in state.items() if k[:2] == (model, d)):,} at T=256)"
        vals = {v for k, v in state.items() if k[:2] == (model, d)}
        return ", ".join(f"{v:,}" for v in sorted(vals))

    out = ["| model | d_model | state (bytes) | " + " | ".join(f"({s}, {k})" for s, k in cells) + " |",
           "|---|---|---|" + "---|" * len(cells)]
    for d in (128, 64):
        for m in MODELS:
            if not any((m, d, c) in top for c in cells):
                continue
            vals = []
            for c in cells:
                rs = top.get((m, d, c))
                if rs is None:
                    vals.append("-")
                    continue
                b = best(rs)
                steps = b["steps"] if b["status"] == "finished" else f"{b['steps']} of {b['planned_steps']}"
                vals.append(f"{fmt_acc(b['acc'])} (lr {b['lr']:g}, {steps} steps, {len(rs)} lr)")
            out.append(f"| {m} | {d} | {state_of(m, d)} | " + " | ".join(vals) + " |")

    out += ["", "Learning-rate window: validation accuracy at each learning rate (`-` = not run; the best in bold "
            "when it is above 0.05). Loop: `fast` = mqar_fast.py, the four learning rates side by side; `sweep` = "
            "mqar_sweep.py through statelab.train, 12 processes sharing the GPU; `goal` = mqar_sweep.py, the goal "
            "cell's runs.", "",
            "| cell | steps | model | d_model | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | loop |",
            "|---|---|---|---|" + "---|" * len(LRS) + "---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(((r["seq_len"], r["kv"]), r["planned_steps"], r["d_model"], r["model"]), []).append(r)
    order = sorted(groups, key=lambda k: (k[0], k[1], -k[2], MODELS.index(k[3])))
    for key in order:
        rs = groups[key]
        by_lr = {r["lr"]: r for r in rs}
        b = best(rs)
        vals = []
        for lr in LRS:
            r = by_lr.get(lr)
            if r is None:
                vals.append("-")
                continue
            txt = f"{r['acc']:.3f}" + ("" if r["status"] == "finished" else f" ({r['steps']} steps)")
            vals.append(f"**{txt}**" if r is b and len(rs) > 1 and r["acc"] > 0.05 else txt)
        (cell, steps, d, m) = key
        loops = ",".join(sorted({r["source"] for r in rs}))
        out.append(f"| ({cell[0]}, {cell[1]}) | {steps} | {m} | {d} | " + " | ".join(vals) + f" | {loops} |")

    out += ["", "Accuracy against state size, per cell (best over learning rates at the largest budget):", ""]
    for c in cells:
        pts = sorted((best(rs)["state_bytes"], best(rs)["acc"], m, d, best(rs)["steps"])
                     for (m, d, cc), rs in top.items() if cc == c)
        out.append(f"- ({c[0]}, {c[1]}): " + "; ".join(f"{m} d{d} {s:,} B -> {a:.3f} ({n})" for s, a, m, d, n in pts))
    return "\n".join(out) + "\n"


HEADER = """# MQAR: accuracy against state size (crsd-memory)

Written by `python benchmarks/crsd/mqar_table.py` from {sources}.

All runs: one H100 80GB (loop `fast-cpu`: a 2-core CPU in fp32 instead of bf16 autocast), vocabulary 8192,
2 layers, batch 128, AdamW (betas 0.9/0.99, weight decay 0.1), 10% warm-up then cosine to lr/10, gradient
clipping 1.0, bf16 autocast, Mamba-2 in pure PyTorch; every memory
after layer 1; the episodic buffer with 64 slots, no recency bonus, temperature 0.1. Accuracy: query positions of
1000 held-out examples. State: the bytes one sequence carries after `seq_len` tokens (recurrent state; for the
transformer, its KV cache). One seed per run. Commands: docs/benchmarks.md (crsd-memory).

"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "MQAR.md")
    args = ap.parse_args(argv)
    paths = {HERE / name: tag for name, tag in SOURCES.items() if (HERE / name).exists()}
    text = HEADER.format(sources=", ".join(f"`{p.name}`" for p in paths)) + tables(load(paths))
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
