"""MQAR sweep (Zoology protocol) for crsd-memory: accuracy against recurrent state size.

    python benchmarks/crsd/mqar_sweep.py --device cuda --jobs 12 --steps 600 --no-tracking   # the grid, 12 at a time
    python benchmarks/crsd/mqar_sweep.py --device cpu --cells 64x4 --d-models 64 --steps 300

Grid (defaults follow the issue): vocabulary 8192; (seq_len, kv pairs) in 256x16 (the goal
cell, run first), 64x4, 128x8, 256x64; 2 layers; d_model 128 and 64; learning rates 3e-3,
1e-3, 1e-2, 3e-4 (the most promising first); models ``crsd`` and ``mamba`` (crsm-planner;
``toy-rnn`` stands in if it is not installed) alone and with ``hebbian``, ``episodic`` or
``dual`` after layer 1, plus a 2-layer attention ``transformer`` as the reference at the
cells of ``--transformer-cells``. Every run goes through the statelab runtime
(``statelab.train.train``: MQAR data, optional mlflow tracking) with the same fixed number of
optimizer steps, and its final validation accuracy (query positions only) is recorded.

Memory settings for MQAR (see MEMORIES): the episodic buffer has 64 slots (>= the pairs of
every cell) and no recency bonus (the key-value pairs come first, so a bonus for recent
tokens works against keeping them); its recall temperature is 0.1.

``--goal-steps`` gives the goal cell ((256, 16) at d_model 128) its own, larger, fixed step
budget; every other run has ``--steps``.

``--jobs N`` runs N worker processes at once on the one device; each claims the next run
from a shared list. Mind the memory: at batch 128 and seq_len 256 a process holds 5-7.5 GB
of an H100 (the 8192-way logits dominate), so 12 at once ran out of its 80 GB; use at most
about 8 there (a run that runs out of memory waits and is retried, ``--oom-retries``). More
processes do not buy throughput once the GPU is busy: on the H100, 12 workers together
trained about as many tokens/s as one plain Mamba alone (docs/benchmarks.md).
``--max-minutes`` starts no new run after that many minutes; ``--hard-stop-minutes`` makes
runs still going at that time stop there (their final evaluation still happens; the row
records the steps done and status ``time_budget``).

``mqar_fast.py`` runs the same training (same data order, initial weights, optimizer, schedule,
precision) 1.7-12x faster per step on the H100: the examples stay on the device, the head runs
only at the query positions, each step is one CUDA graph and the learning rates of a model train
side by side on CUDA streams (benchmarks/crsd/MQAR-step-profile.md). ``mqar_table.py`` writes
the table from the results of both.

Results are appended to ``--results`` (JSON lines; runs already there are skipped, so an
interrupted sweep resumes) and the markdown table ``--out`` is rewritten from all recorded
runs: per model and size, the best accuracy over the learning rates, and the state size in
bytes per sequence (every tensor of the state after one ``seq_len`` sequence: the recurrent
state, or the transformer's KV cache).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import statelab
from statelab.plugins import get_registry
from statelab.train import process_start_time, train

HERE = Path(__file__).resolve().parent
EPISODIC = {"slots": 64, "temperature": 0.1, "recency": 0.0}
MEMORIES = {
    "hebbian": {"kind": "hebbian", "n_heads": 4},
    "hebbian-gated": {"kind": "hebbian", "n_heads": 4, "write_gate": True},  # learned per-token write strength
    "hebbian-1head": {"kind": "hebbian", "n_heads": 1},  # one d_model-wide matrix: less cross-talk per read
    "episodic": {"kind": "episodic", **EPISODIC},
    "dual": {"kind": "dual", "hebbian": {"n_heads": 4}, "episodic": EPISODIC},
}


def backbones(mamba_kernels: str = "auto") -> dict[str, dict]:
    reg = get_registry()
    out = {"crsd": {"kind": "crsd", "n_layers": 2, "d_reservoir": 64, "hebbian": {"n_heads": 4},
                    "episodic": EPISODIC},
           "transformer": {"kind": "transformer", "n_layers": 2, "n_heads": 4, "max_seq_len": 256}}
    if ("backbone", "mamba") in reg:
        out["mamba"] = {"kind": "mamba", "n_layers": 2, "mixer": "mamba2", "d_state": 64, "headdim": 32,
                         "use_kernels": mamba_kernels}
    else:
        print("mqar_sweep: backbone 'mamba' (crsm-planner) is not installed; using 'toy-rnn' in its place",
              file=sys.stderr)
        out["mamba"] = {"kind": "toy-rnn", "n_layers": 2, "d_state": 64}
    return out


def model_spec(model: str, d_model: int, seq_len: int, mamba_kernels: str = "auto") -> dict:
    """``crsd``, ``mamba``, ``transformer`` or ``mamba+<memory>`` -> the spec's model section."""
    base, _, mem = model.partition("+")
    bb = dict(backbones(mamba_kernels)[base])
    if base == "transformer":
        bb["max_seq_len"] = seq_len
    memories = [{**MEMORIES[mem], "after_layer": 1}] if mem else []
    return {"d_model": d_model, "backbone": bb, "memories": memories}


def run_spec(args, model: str, d_model: int, seq_len: int, kv: int, lr: float, steps: int | None = None) -> dict:
    steps = steps or args.steps
    name = f"mqar-{model.replace('+', '-')}-d{d_model}-s{seq_len}-kv{kv}-lr{lr:g}-n{steps}"
    return {
        "name": name,
        "seed": args.seed,
        "data": {"kind": "mqar", "mqar": {"vocab_size": args.vocab, "seq_len": seq_len, "num_kv_pairs": kv,
                                          "num_train": args.num_train, "num_val": args.num_val}},
        "model": model_spec(model, d_model, seq_len, args.mamba_kernels),
        "train": {"steps": steps, "batch_size": args.batch_size, "seq_len": seq_len, "lr": lr,
                  "min_lr": lr / 10, "warmup_steps": max(1, steps // 10), "weight_decay": 0.1,
                  "eval_interval": steps, "eval_batches": None, "log_interval": max(1, steps // 10),
                  "checkpoint_interval": 10 * steps, "sample_tokens": 0, "device": args.device,
                  "time_budget_s": None, "out_dir": str(args.runs)},
        "tracking": {"enabled": not args.no_tracking, "experiment": args.experiment, "uri": args.tracking_uri},
    }


def state_bytes(spec: dict, seq_len: int) -> int:
    """Bytes of the state one sequence leaves after ``seq_len`` tokens (what a decoder carries
    between tokens: the recurrent state, or a transformer's KV cache)."""
    model = statelab.build({**spec, "tracking": {"enabled": False}}).eval()
    with torch.no_grad():
        _, state, _ = model(torch.zeros(1, seq_len, dtype=torch.long), model.init_state(1, "cpu"))
    return sum(t.numel() * t.element_size() for t in state.values())


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_result(path: Path, row: dict) -> None:
    with locked(path.with_name(path.name + ".lock")):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fmt_bytes(vals: set[int]) -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:,}" if lo == hi else f"{lo:,} - {hi:,} (KV cache, grows with T)"


def write_table(rows: list[dict], out: Path, command: str) -> None:
    cells = sorted({(r["seq_len"], r["kv"]) for r in rows})
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["model"], r["d_model"], r["device"]), {"state": {}, "best": {}, "lrs": {}})
        key = (r["seq_len"], r["kv"])
        g["state"][key] = r["state_bytes"]
        g["lrs"].setdefault(key, []).append(r["lr"])
        if key not in g["best"] or (r["acc"], -r["loss"]) > (g["best"][key]["acc"], -g["best"][key]["loss"]):
            g["best"][key] = r
    lines = [
        "# MQAR: accuracy against recurrent state size (crsd-memory)",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "Each cell: the best final validation accuracy (query positions; ties broken by loss) over the learning "
        "rates tried, with that learning rate, the number of learning rates tried and the optimizer steps done; "
        "`-` = not run. State = bytes of the state one sequence carries after `seq_len` tokens.",
        "",
        "| model | d_model | device | state (bytes) | " + " | ".join(f"({s}, {k})" for s, k in cells) + " |",
        "|---|---|---|---|" + "---|" * len(cells),
    ]
    for (model, d, dev), g in sorted(groups.items(), key=lambda kv: (kv[0][2], -kv[0][1], kv[0][0])):
        vals = []
        for c in cells:
            b = g["best"].get(c)
            vals.append("-" if b is None else
                        f"{b['acc']:.3f} (lr {b['lr']:g}, {len(g['lrs'][c])} lr, {b['steps']} steps)")
        lines.append(f"| {model} | {d} | {dev} | {_fmt_bytes(set(g['state'].values()))} | " + " | ".join(vals) + " |")
    lines += ["", "Accuracy against state size, per cell (best over learning rates):", ""]
    for c in cells:
        pts = sorted((g["state"][c], g["best"][c]["acc"], m, d, dev) for (m, d, dev), g in groups.items()
                     if c in g["best"])
        lines.append(f"- ({c[0]}, {c[1]}): " + "; ".join(f"{m} d{d} {s:,} B -> {a:.3f}" for s, a, m, d, dev in pts))
    lines += ["", "All runs:", "",
              "| model | d_model | seq | kv | lr | steps | status | val acc | val loss | tok/s | wall (s) | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["d_model"], r["model"], r["seq_len"], r["kv"], r["lr"])):
        lines.append(f"| {r['model']} | {r['d_model']} | {r['seq_len']} | {r['kv']} | {r['lr']:g} | {r['steps']} | "
                     f"{r.get('status', 'finished')} | {r['acc']:.4f} | {r['loss']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('wall_s', float('nan')):.0f} | {r['device']} |")
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)


def parse_cells(text: str) -> list[tuple[int, int]]:
    return [tuple(int(p) for p in c.lower().split("x")) for c in text.split(",") if c]


def task_list(args) -> list[dict]:
    """Every run of the grid not yet in --results, in order: the cells and d_models as listed,
    and within one (cell, d_model) every model at the first learning rate before any at the
    second (so a sweep cut short still compares all models; list the most promising lr first)."""
    done = {(r["model"], r["d_model"], r["seq_len"], r["kv"], r["lr"], r["device"]) for r in load_results(args.results)}
    tcells = set(parse_cells(args.transformer_cells))
    goal = (*parse_cells(args.goal_cell)[0], args.goal_d_model) if args.goal_steps else None
    out = []
    for seq_len, kv in parse_cells(args.cells):
        for d_model in [int(d) for d in args.d_models.split(",")]:
            for lr in [float(x) for x in args.lrs.split(",")]:
                for model in args.models.split(","):
                    if model == "transformer" and (seq_len, kv) not in tcells:
                        continue
                    if (model, d_model, seq_len, kv, lr, args.device) not in done:
                        steps = args.goal_steps if goal == (seq_len, kv, d_model) else args.steps
                        out.append({"model": model, "d_model": d_model, "seq_len": seq_len, "kv": kv, "lr": lr,
                                    "planned_steps": steps})
    return out


def run_task(args, task: dict, t_sweep: float) -> dict:
    spec = run_spec(args, task["model"], task["d_model"], task["seq_len"], task["kv"], task["lr"],
                    task["planned_steps"])
    if args.hard_stop_minutes is not None:  # train's budget counts from this process's start
        spec["train"]["time_budget_s"] = max(1.0, t_sweep + 60 * args.hard_stop_minutes - process_start_time())
    t0 = time.time()
    res = train(spec, progress=False)
    row = {
        **task, "backbone": spec["model"]["backbone"]["kind"], "steps": res.step, "status": res.status,
        "device": args.device, "batch_size": args.batch_size, "mamba_kernels": args.mamba_kernels,
        "acc": res.metrics.get("val/acc", float("nan")), "loss": res.metrics.get("val/loss", float("nan")),
        "tokens_per_s": res.tokens_per_s, "wall_s": time.time() - t0,
        "state_bytes": state_bytes(spec, task["seq_len"]), "mlflow_run_id": res.mlflow_run_id,
    }
    append_result(args.results, row)
    print(f"{row['model']:<16} d={row['d_model']:<4} ({row['seq_len']},{row['kv']}) lr={row['lr']:<7g} "
          f"acc={row['acc']:.4f} loss={row['loss']:.3f} steps={row['steps']} state={row['state_bytes']:,}B "
          f"{row['wall_s']:.0f}s", flush=True)
    return row


def worker(args) -> int:
    """Claim runs from the shared list (``--worker-dir``) one at a time until none is left."""
    wdir = args.worker_dir
    if args.jobs > 1 and args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    tasks = json.loads((wdir / "tasks.json").read_text())
    t_sweep = float((wdir / "t_start").read_text())
    while True:
        with locked(wdir / "counter") as f:
            f.seek(0)
            i = int(f.read() or 0)
            f.seek(0)
            f.truncate()
            f.write(str(i + 1))
            f.flush()
        if i >= len(tasks):
            return 0
        if args.max_minutes is not None and time.time() - t_sweep > 60 * args.max_minutes:
            return 0
        for attempt in range(1 + args.oom_retries):
            try:
                run_task(args, tasks[i], t_sweep)
                break
            except torch.cuda.OutOfMemoryError:
                # other workers hold the memory: wait for one of them to finish, then try again
                # (without this, a worker that fails fast burns through the list in seconds)
                print(f"mqar_sweep: run {tasks[i]} ran out of GPU memory (attempt {attempt + 1}); "
                      f"lower --jobs or --batch-size if this repeats", flush=True)
                torch.cuda.empty_cache()
                time.sleep(20)
            except Exception as e:  # one failed run must not stop the sweep: report it and go on
                print(f"mqar_sweep: run {tasks[i]} failed: {type(e).__name__}: {e}", flush=True)
                break


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="256x16,64x4,128x8,256x64", help="comma-separated SEQxKV, in run order")
    ap.add_argument("--d-models", default="128,64")
    ap.add_argument("--lrs", default="3e-3,1e-3,1e-2,3e-4")
    ap.add_argument("--models", default="crsd,mamba,mamba+hebbian,mamba+episodic,mamba+dual,transformer")
    ap.add_argument("--transformer-cells", default="256x16", help="cells at which the transformer reference runs")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (the same for every run)")
    ap.add_argument("--goal-steps", type=int, default=None,
                    help="optimizer steps for the goal cell's runs (--goal-cell at --goal-d-model); default --steps")
    ap.add_argument("--goal-cell", default="256x16")
    ap.add_argument("--goal-d-model", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-train", type=int, default=100_000)
    ap.add_argument("--num-val", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--mamba-kernels", default="never", choices=["auto", "never", "always"],
                    help="the mamba backbone's use_kernels. never (pure PyTorch): mamba-ssm's Mamba-2 Triton kernels "
                         "spend minutes compiling and autotuning in each new process, and ran no faster than the "
                         "PyTorch path on the H100 (docs/benchmarks.md, crsm-planner)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes on the one device)")
    ap.add_argument("--oom-retries", type=int, default=3, help="retries of a run that ran out of GPU memory")
    ap.add_argument("--runs", type=Path, default=Path("runs/mqar-sweep"), help="run directories")
    ap.add_argument("--results", type=Path, default=HERE / "mqar_results.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "MQAR.md")
    ap.add_argument("--experiment", default="crsd-mqar", help="mlflow experiment")
    ap.add_argument("--tracking-uri", default=None,
                    help="mlflow URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new run after this many minutes (recorded runs are kept; rerun to continue)")
    ap.add_argument("--hard-stop-minutes", type=float, default=None,
                    help="runs still going after this many minutes stop there (status time_budget)")
    ap.add_argument("--worker-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_dir is not None:
        return worker(args)
    raw = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/crsd/mqar_sweep.py " + " ".join(raw)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tasks = task_list(args)
    print(f"mqar_sweep: {len(tasks)} runs to do, {args.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory(prefix="mqar-sweep-") as wdir:
        wdir = Path(wdir)
        (wdir / "tasks.json").write_text(json.dumps(tasks))
        (wdir / "t_start").write_text(repr(time.time()))
        if args.jobs <= 1:
            worker(argparse.Namespace(**{**vars(args), "worker_dir": wdir}))
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), *raw, "--worker-dir", str(wdir)]
            procs = [subprocess.Popen(cmd) for _ in range(args.jobs)]
            codes = [p.wait() for p in procs]
            if any(codes):
                print(f"mqar_sweep: worker exit codes {codes}", file=sys.stderr)
    rows = load_results(args.results)
    left = len(task_list(args))
    if left:
        print(f"mqar_sweep: {left} runs not done (time limit); rerun the same command to continue", flush=True)
    if rows:
        write_table(rows, args.out, command)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    raise SystemExit(main())
