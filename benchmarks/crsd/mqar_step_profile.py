"""Where the time of one MQAR training step goes (the sweep's models, batch 128).

    python benchmarks/crsd/mqar_step_profile.py --device cuda --configs 128x8@64,256x64@128

For each model and (cell, d_model), milliseconds per optimizer step, each the mean of
``--steps`` steps after ``--warmup`` (synchronised at both ends only), for five ways of
running the same step (same model, optimizer, schedule and bf16 autocast as the sweep):

  runtime   what ``statelab.train`` does: the batch made on the host by the runtime's MQAR
            source and copied over, the head at all T positions, the loss masked to queries
  dev-data  the same, with the batch picked from examples already on the device
  q-head    also the head only at the P query positions (mqar_fast.query_loss)
  graph     also the whole step captured in one CUDA graph and replayed
  graph x4  four such runs (the four learning rates) side by side on four CUDA streams:
            the time of one step of all four, divided by four

plus ``host data``: the runtime's host-side batch alone (numpy generation and indexing).
``graph`` and ``q-head`` start from the same weights and see the same batches, so their
losses after the timed steps are printed side by side (equal up to bf16 rounding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mqar_fast as fast  # noqa: E402
import mqar_sweep as sweep  # noqa: E402

from statelab.data import make_data  # noqa: E402


def timed(fn, n: int, device: torch.device) -> float:
    """Mean ms per call of ``fn`` over ``n`` calls, synchronised at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - t) / n


def full_logits_step(run: fast.Run, x, y, mask) -> None:
    """One step as train() computes it: logits at every position, cross-entropy masked to queries."""
    with run.autocast():
        logits, _, _ = run.model(x)  # (B, T, V)
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="none")  # (B*T,)
        m = mask.reshape(-1).to(ce.dtype)
        loss = (ce * m).sum() / m.sum().clamp(min=1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1


def profile(args, model: str, d_model: int, seq_len: int, kv: int, device: torch.device) -> dict:
    task = {"model": model, "d_model": d_model, "seq_len": seq_len, "kv": kv, "planned_steps": 1000}
    doc = sweep.run_spec(args, model, d_model, seq_len, kv, args.lr, 1000)
    n = args.warmup + args.steps
    cell = fast.CellData(doc, 4 * n * args.batch_size, device)
    data = make_data(doc)
    out = {}

    def host_batch(step):
        return data.train_batch(step, args.batch_size, seq_len)

    host_steps = iter(range(10**6))
    out["host data"] = timed(lambda: host_batch(next(host_steps)), 4 * args.steps, torch.device("cpu"))

    run = fast.Run(args, task, args.lr, cell, device)

    def runtime_step():
        b = host_batch(run.step)
        full_logits_step(run, *(t.to(device, non_blocking=True) for t in (b.x, b.y, b.mask)))

    def dev_data_step():
        n_ex = cell.x.shape[0]
        idx = (run.arange + run.step * run.B) % n_ex
        x = cell.x.index_select(0, idx)  # (B, T)
        q, t = cell.qpos.index_select(0, idx), cell.target.index_select(0, idx)  # (B, P)
        y = torch.zeros_like(x).scatter_(1, q, t)  # (B, T)
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(1, q, True)  # (B, T)
        full_logits_step(run, x, y, mask)

    for name, fn in (("runtime", runtime_step), ("dev-data", dev_data_step)):
        for _ in range(args.warmup):
            fn()
        out[name] = timed(fn, args.steps, device)

    # q-head (eager) against graph, from the same weights and batches
    pair = [fast.Run(args, task, args.lr, cell, device) for _ in range(2)]
    for _ in range(args.warmup):
        pair[0].eager_step()
    out["q-head"] = timed(pair[0].eager_step, args.steps, device)
    if device.type == "cuda":
        pair[1].capture(warmup=args.warmup)
        out["graph"] = timed(pair[1].advance, args.steps, device) if pair[1].graph is not None else float("nan")
        out["graph_error"] = pair[1].graph_error
        out["loss eager / graph"] = f"{float(pair[0].loss):.4f} / {float(pair[1].loss):.4f}"
        group = [fast.Run(args, task, lr, cell, device) for lr in (args.lr, args.lr / 3, args.lr * 3, args.lr / 10)]
        for r in group:
            r.capture(warmup=args.warmup)

        def all_four():
            for r in group:
                r.advance()

        out["graph x4"] = timed(all_four, args.steps, device) / 4
        out["peak GB"] = torch.cuda.max_memory_allocated(device) / 2**30
        del group, pair, run
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="128x8@64,256x64@128", help="SEQxKV@D_MODEL, comma-separated")
    ap.add_argument("--models", default="mamba,mamba+hebbian,mamba+episodic,mamba+dual,crsd,transformer")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mamba-kernels", default="never")
    args = ap.parse_args(argv)
    args.no_tracking, args.experiment, args.tracking_uri, args.runs = True, "x", None, Path("runs/mqar-profile")
    args.num_train, args.num_val, args.seed = 100_000, 1_000, 1337
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    cols = ["host data", "runtime", "dev-data", "q-head", "graph", "graph x4"]
    print("| model | cell | d_model | " + " | ".join(f"{c} (ms)" for c in cols) + " | loss eager / graph | peak GB |")
    print("|---|---|---|" + "---|" * (len(cols) + 2))
    for item in args.configs.split(","):
        cell, _, d = item.partition("@")
        seq_len, kv = sweep.parse_cells(cell)[0]
        for model in args.models.split(","):
            try:
                r = profile(args, model, int(d), seq_len, kv, device)
            except Exception as e:  # noqa: BLE001  (report and go on to the next model)
                print(f"| {model} | ({seq_len}, {kv}) | {d} | failed: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            vals = " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols)
            print(f"| {model} | ({seq_len}, {kv}) | {d} | {vals} | {r.get('loss eager / graph', '-')} | "
                  f"{r.get('peak GB', float('nan')):.1f} |", flush=True)
            if r.get("graph_error"):
                print(f"  graph capture failed: {r['graph_error']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
