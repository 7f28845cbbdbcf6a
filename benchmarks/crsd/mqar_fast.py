"""The MQAR grid of mqar_sweep.py with a training loop built for sweeping on one GPU.

    python benchmarks/crsd/mqar_fast.py --device cuda --cells 128x8,256x64 --d-models 128,64 \
        --steps 128x8=1000,256x64=2000 --hard-stop-s 400 --results $OUT/mqar_fast.jsonl
    python benchmarks/crsd/mqar_fast.py --device cpu --cells 64x4 --d-models 64 --steps 64x4=300   # slow

The task, models, data, optimizer and schedule are those of ``mqar_sweep.py`` (which trains
through ``statelab.train.train``): the same examples in the same order (the runtime's MQAR
source), AdamW (betas 0.9, 0.99; weight decay 0.1 on matrices), gradient clipping at 1.0,
linear warm-up over 10% of the steps and a cosine to lr/10, bf16 autocast on CUDA and fp32 on
the CPU. On the CPU one run here gives the same losses as ``train`` (tests/test_mqar_fast.py).
What differs is only how the work reaches the device:

* the training examples are generated once per cell and kept on the device; a step picks its
  batch there (no per-step numpy, no host-to-device copy);
* the 8192-way head runs only at the P query positions, the only ones the loss counts (the
  runtime computes all T positions and masks the rest away);
* on CUDA one whole step (forward, backward, clipping, fused AdamW) is captured once in a CUDA
  graph and replayed (pure-PyTorch Mamba-2 and the memories are hundreds to thousands of small
  kernels per step, so eager steps are bound by kernel launches); a run whose capture fails
  falls back to eager steps (recorded as ``graph: false``);
* the learning rates of one (model, cell, d_model) train side by side in one process, each on
  its own CUDA stream, so that small runs fill the GPU together;
* no host synchronisation per step (the clock is read every ``--sync-every`` steps); the
  evaluation runs once, at the end, over the ``num_val`` held-out examples.

Steps per cell are set by ``--steps CELL=N,...``. Runs are done in the order of ``--cells``,
then ``--d-models``, then ``--models``. ``--hard-stop-s`` stops every run still going at that
time after the start (their evaluation still happens; status ``time_budget``) and starts
nothing after it. Results go to ``--results`` as JSON lines with the fields of
``mqar_sweep.py`` (runs already there are skipped), and ``--out`` is rewritten from them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mqar_sweep as sweep  # noqa: E402  (the grid's models and the table)

import statelab  # noqa: E402
from statelab.data import make_data  # noqa: E402
from statelab.data.base import TRAIN, VAL  # noqa: E402
from statelab.spec import parse_spec  # noqa: E402


# -- the trainer's optimizer rules, restated (statelab's trainer is the reference; the equality of
# one run with train() is tested in packages/crsd-memory/tests/test_mqar_fast.py) ----------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only; never on norms, biases, scalars or embeddings
    (a head tied to the embedding included); tied parameters once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg) -> float:
    """Linear warmup to ``cfg.lr``, then a cosine to ``cfg.min_lr`` over ``decay_steps`` (default: steps)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, (cfg.decay_steps or cfg.steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# -- data ---------------------------------------------------------------------------------


class CellData:
    """One MQAR cell's examples on the device: inputs, query positions and their targets."""

    def __init__(self, doc: dict, n_train: int, device: torch.device) -> None:
        data = make_data(doc)
        P = doc["data"]["mqar"]["num_kv_pairs"]
        self.x, self.qpos, self.target = self._split(data, TRAIN, n_train, P, device)
        self.vx, self.vqpos, self.vtarget = self._split(data, VAL, doc["data"]["mqar"]["num_val"], P, device)

    @staticmethod
    def _split(data, split: int, n: int, P: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        b = data.examples(split, np.arange(n, dtype=np.int64))
        # every example has exactly P query positions: their indices, in order
        qpos = torch.nonzero(b.mask)[:, 1].reshape(n, P)  # (n, P)
        target = torch.gather(b.y, 1, qpos)  # (n, P)
        return b.x.to(device), qpos.to(device), target.to(device)


def query_loss(model, x: Tensor, qpos: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy at the query positions, and the logits there ``(B, P, V)``."""
    h, _, _ = model.hidden(x)  # (B, T, D)
    hq = torch.gather(h, 1, qpos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, P, D)
    logits = model.head(hq)  # (B, P, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())  # (B*P, V)
    return loss, logits


# -- one run --------------------------------------------------------------------------------


class Run:
    """One learning rate of one (model, cell, d_model): the model, its optimizer, its step."""

    def __init__(self, args, task: dict, lr: float, cell: CellData, device: torch.device) -> None:
        self.task, self.lr, self.cell, self.device = task, lr, cell, device
        self.doc = sweep.run_spec(args, task["model"], task["d_model"], task["seq_len"], task["kv"], lr,
                                  task["planned_steps"])
        self.cfg = parse_spec(self.doc).train
        torch.manual_seed(self.doc["seed"])  # the runtime's seeding: the same initial weights as train()
        self.model = statelab.build({**self.doc, "tracking": {"enabled": False}}).to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.cuda = device.type == "cuda"
        groups = param_groups(self.model, self.cfg.weight_decay)
        betas = (self.cfg.beta1, self.cfg.beta2)
        if self.cuda:  # a tensor learning rate, set in place, so a captured step sees each new value
            self.lr_t = torch.tensor(lr_at(0, self.cfg), device=device)
            self.opt = torch.optim.AdamW(groups, lr=self.lr_t, betas=betas, fused=True, capturable=True)
        else:
            self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
        self.B = self.cfg.batch_size
        self.x = torch.empty(self.B, task["seq_len"], dtype=torch.long, device=device)  # (B, T) static inputs
        self.q = torch.empty(self.B, task["kv"], dtype=torch.long, device=device)  # (B, P)
        self.t = torch.empty(self.B, task["kv"], dtype=torch.long, device=device)  # (B, P)
        self.arange = torch.arange(self.B, device=device)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.loss: Tensor | None = None
        self.step = 0

    def autocast(self):
        # cache_enabled=False: a cast cached across steps would be stale inside a replayed graph
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.cuda else nullcontext()

    def _load_batch(self) -> None:
        """Batch ``step``: examples ``step*B .. step*B+B-1`` modulo the training set, as in train()."""
        n = self.cell.x.shape[0]
        idx = (self.arange + self.step * self.B) % n  # (B,)
        self.x.copy_(self.cell.x.index_select(0, idx))
        self.q.copy_(self.cell.qpos.index_select(0, idx))
        self.t.copy_(self.cell.target.index_select(0, idx))
        if self.cuda:
            self.lr_t.fill_(lr_at(self.step, self.cfg))
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, self.cfg)

    def _compute(self) -> Tensor:
        with self.autocast():
            loss, _ = query_loss(self.model, self.x, self.q, self.t)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        return loss.detach()

    def eager_step(self) -> None:
        self._load_batch()
        self.loss = self._compute()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def capture(self, warmup: int = 3) -> None:
        """Run ``warmup`` eager steps on the run's stream, then capture one step as a graph."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the weights and data are ready
        with torch.cuda.stream(self.stream):
            for _ in range(warmup):
                self.eager_step()
            try:
                graph = torch.cuda.CUDAGraph()
                self.opt.zero_grad(set_to_none=True)  # grads are then allocated (and written, not summed) in-graph
                with torch.cuda.graph(graph, stream=self.stream):
                    self.loss = self._compute()
                self.graph = graph
            except Exception as e:  # noqa: BLE001  (any capture failure: train this run eagerly)
                self.graph_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.graph = None
                torch.cuda.synchronize(self.device)
                self.opt.zero_grad(set_to_none=True)

    def advance(self) -> None:
        if self.graph is None:
            ctx = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
            with ctx:
                self.eager_step()
            return
        with torch.cuda.stream(self.stream):
            self._load_batch()
            self.graph.replay()
        self.step += 1

    @torch.no_grad()
    def evaluate(self, batch_size: int = 250) -> tuple[float, float]:
        """Accuracy and mean loss at the query positions of the held-out examples."""
        self.model.eval()
        c = self.cell
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        hits = torch.zeros((), device=self.device, dtype=torch.float64)
        for lo in range(0, c.vx.shape[0], batch_size):
            sl = slice(lo, lo + batch_size)
            with self.autocast():
                _, logits = query_loss(self.model, c.vx[sl], c.vqpos[sl], c.vtarget[sl])  # (b, P, V)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), c.vtarget[sl].flatten(), reduction="none")  # (b*P,)
            loss_sum += ce.double().sum()
            hits += (logits.argmax(-1) == c.vtarget[sl]).double().sum()
        self.model.train()
        n = c.vtarget.numel()
        return hits.item() / n, loss_sum.item() / n


# -- a group of runs: the learning rates of one (model, cell, d_model) -------------------------


def run_group(args, task: dict, lrs: list[float], cell: CellData, device: torch.device, deadline: float) -> list[dict]:
    t0 = time.time()
    runs = [Run(args, task, lr, cell, device) for lr in lrs]
    steps = task["planned_steps"]
    if device.type == "cuda" and not args.no_graphs:
        for r in runs:
            r.capture()
        torch.cuda.synchronize(device)
    t_train = time.time()
    status = "finished"
    step0 = runs[0].step
    while runs[0].step < steps:
        for r in runs:
            r.advance()
        if runs[0].step % args.sync_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if time.time() > deadline:
                status = "time_budget"
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.time() - t_train
    rows = []
    for r in runs:
        acc, loss = r.evaluate()
        tokens = (r.step - step0) * r.B * task["seq_len"]
        rows.append({
            **task, "lr": r.lr, "backbone": r.doc["model"]["backbone"]["kind"], "steps": r.step, "status": status,
            "device": args.device, "batch_size": r.B, "mamba_kernels": args.mamba_kernels,
            "acc": acc, "loss": loss, "train_loss_last": float(r.loss) if r.loss is not None else float("nan"),
            # tokens/s of this run while its group trained side by side (the group's total is the sum)
            "tokens_per_s": tokens / train_s if train_s > 0 else float("nan"),
            "group_size": len(runs), "wall_s": time.time() - t0, "train_s": train_s,
            "state_bytes": sweep.state_bytes(r.doc, task["seq_len"]), "mlflow_run_id": None,
            "loop": "mqar_fast", "graph": r.graph is not None, "graph_error": r.graph_error,
            "precision": "bf16" if device.type == "cuda" else "fp32",
        })
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parse_steps(text: str) -> dict[tuple[int, int], int]:
    out = {}
    for item in text.split(","):
        if item:
            cell, _, n = item.partition("=")
            out[sweep.parse_cells(cell)[0]] = int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="128x8,256x64", help="comma-separated SEQxKV, in run order")
    ap.add_argument("--d-models", default="128,64")
    ap.add_argument("--lrs", default="3e-3,1e-3,1e-2,3e-4")
    ap.add_argument("--models", default="mamba+dual,mamba+episodic,mamba,transformer,crsd,mamba+hebbian")
    ap.add_argument("--steps", default="64x4=300,128x8=1000,256x16=3000,256x64=2000",
                    help="optimizer steps per cell, CELL=N comma-separated")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-train", type=int, default=100_000)
    ap.add_argument("--num-val", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--mamba-kernels", default="never", choices=["auto", "never", "always"])
    ap.add_argument("--no-graphs", action="store_true", help="eager steps on CUDA too")
    ap.add_argument("--sync-every", type=int, default=50, help="steps between host syncs (clock checks)")
    ap.add_argument("--hard-stop-s", type=float, default=None,
                    help="stop runs still going this many seconds after the start, and start none after it")
    ap.add_argument("--results", type=Path, default=HERE / "mqar_results_fast.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (mqar_sweep's format); none by default")
    args = ap.parse_args(argv)
    # fields mqar_sweep.run_spec reads
    args.no_tracking, args.experiment, args.tracking_uri, args.runs = True, "crsd-mqar", None, Path("runs/mqar-fast")
    t_start = time.time()
    deadline = t_start + args.hard_stop_s if args.hard_stop_s is not None else float("inf")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train() does on CUDA
    steps = parse_steps(args.steps)
    lrs = [float(x) for x in args.lrs.split(",")]
    done = {(r["model"], r["d_model"], r["seq_len"], r["kv"], r["lr"], r["device"])
            for r in sweep.load_results(args.results)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seq_len, kv in sweep.parse_cells(args.cells):
        if time.time() > deadline:
            break
        if (seq_len, kv) not in steps:
            raise SystemExit(f"mqar_fast: no step count for cell {seq_len}x{kv}; add {seq_len}x{kv}=N to --steps")
        n = steps[(seq_len, kv)]
        n_train = min(args.num_train, n * args.batch_size)
        cell = None
        for d_model in [int(d) for d in args.d_models.split(",")]:
            for model in args.models.split(","):
                todo = [lr for lr in lrs if (model, d_model, seq_len, kv, lr, args.device) not in done]
                if not todo or time.time() > deadline:
                    continue
                if cell is None:
                    t = time.time()
                    cell = CellData(sweep.run_spec(args, model, d_model, seq_len, kv, lrs[0], n), n_train, device)
                    print(f"mqar_fast: ({seq_len}, {kv}) data, {n_train} examples: {time.time() - t:.1f}s", flush=True)
                task = {"model": model, "d_model": d_model, "seq_len": seq_len, "kv": kv, "planned_steps": n}
                try:
                    rows = run_group(args, task, todo, cell, device, deadline)
                except torch.cuda.OutOfMemoryError as e:
                    print(f"mqar_fast: {task} ran out of GPU memory: {e}".splitlines()[0], flush=True)
                    torch.cuda.empty_cache()
                    continue
                for row in rows:
                    sweep.append_result(args.results, row)
                    print(f"{model:<16} d={d_model:<4} ({seq_len},{kv}) lr={row['lr']:<7g} acc={row['acc']:.4f} "
                          f"loss={row['loss']:.3f} steps={row['steps']} {row['status']} graph={row['graph']} "
                          f"{row['tokens_per_s']:,.0f} tok/s train {row['train_s']:.0f}s wall {row['wall_s']:.0f}s "
                          f"(t={time.time() - t_start:.0f}s)", flush=True)
                    if row["graph_error"]:
                        print(f"  graph capture failed: {row['graph_error']}", flush=True)
        del cell
    if args.out is not None:
        rows = sweep.load_results(args.results)
        if rows:
            sweep.write_table(rows, args.out, "python benchmarks/crsd/mqar_fast.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
