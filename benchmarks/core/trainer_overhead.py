"""Trainer overhead: tokens/s of ``statelab.train`` against a bare PyTorch loop.

Both run the same model (built from the same spec), the same batches (``data.train_batch``),
the same AdamW parameter groups, the same autocast/compile settings and gradient clipping.
The trainer adds what it does in production: the LR schedule, loss bookkeeping on the
device, the periodic log sync, signal/budget checks, the regularizer call and the dispatch
of its callbacks (tracking, evaluation, sampling, checkpointing, planner fit, probes) at
every optimizer step. Evaluation, sampling and checkpoints are pushed past the end of the
run so only the loop is compared.
The first ``--log-interval`` steps (warm-up, compilation) are excluded from both.

    python benchmarks/core/trainer_overhead.py --device cpu
    python benchmarks/core/trainer_overhead.py --device cuda --compile

Goal: ratio (trainer / bare) >= 0.95. Writes a JSON and a markdown section next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_spec(args) -> dict:
    if args.spec:  # a real run spec, e.g. configs/race/transformer.yaml, with only the loop kept
        from statelab.spec import load_document

        doc = load_document(args.spec)
        doc.setdefault("train", {}).update(
            steps=args.steps, eval_interval=10**9, checkpoint_interval=10**9, sample_tokens=0,
            log_interval=args.log_interval, time_budget_s=None, device=args.device,
        )
        if args.compile or args.no_compile:
            doc["train"]["compile"] = bool(args.compile)
        doc["tracking"] = {"enabled": False}
        doc["probes"] = []
        doc["name"] = "overhead"
        return doc
    backbone = {"kind": args.backbone, "n_layers": args.layers}
    return {
        "name": "overhead",
        "seed": 1,
        "tokenizer": {"kind": "byte"},
        "model": {"d_model": args.d_model, "backbone": backbone},
        "train": {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": 1e-3,
            "warmup_steps": 10, "eval_interval": 10**9, "checkpoint_interval": 10**9, "sample_tokens": 0,
            "log_interval": args.log_interval, "device": args.device, "compile": args.compile,
            "precision": "auto",
        },
        "tracking": {"enabled": False},
    }


def registry_for(args):
    from statelab.plugins import get_registry
    from statelab.testing.toys import toy_registry

    if args.backbone.startswith("toy-") and not args.spec:
        return toy_registry()
    return get_registry()


def run_trainer(args, reg) -> float:
    from statelab.train import train

    with tempfile.TemporaryDirectory() as out:
        res = train(make_spec(args), registry=reg, out_dir=out, progress=False)
    return res.tokens_per_s


def run_bare(args, reg) -> float:
    """The loop a researcher would write by hand around the same model and data."""
    import statelab
    from statelab.data import make_data
    from statelab.spec import parse_spec

    spec = parse_spec(make_spec(args))
    cfg = spec.train
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    data = make_data(spec)
    model = statelab.build(spec, vocab_size=data.vocab_size, registry=reg).to(device)
    # AdamW as the trainer sets it up: decay on matrices only, not on embeddings, norms or biases
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    groups = [{"params": [p for p in params if p.ndim >= 2 and id(p) not in emb], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2 or id(p) in emb], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            **({"fused": True} if device.type == "cuda" else {}))
    fwd = torch.compile(model) if cfg.compile else model
    amp = device.type == "cuda"
    model.train()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    def one(step: int) -> None:
        b = data.train_batch(step, cfg.batch_size, cfg.seq_len)
        if device.type == "cuda":  # pinned + non-blocking, as a careful hand-written loop does
            b.x, b.y = b.x.pin_memory().to(device, non_blocking=True), b.y.pin_memory().to(device, non_blocking=True)
        else:
            b = b.to(device)
        if amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, _, _ = fwd(b.x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.y.flatten())
        else:
            logits, _, _ = fwd(b.x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = args.log_interval
    for s in range(warm):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(warm, args.steps):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return (args.steps - warm) * cfg.batch_size * cfg.seq_len / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--spec", default=None,
                   help="benchmark this run spec's model and batch (e.g. configs/race/transformer.yaml)")
    p.add_argument("--backbone", default="toy-mlp", help="without --spec: toy-mlp (default) or an installed kind")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="alternating trainer/bare runs; the median is reported")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both loops)")
    p.add_argument("--no-compile", action="store_true", help="with --spec: override the spec's train.compile")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON output (default: results/trainer_overhead_<device>.json)")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.layers = args.layers or (6 if gpu else 2)
    args.d_model = args.d_model or (384 if gpu else 128)
    args.batch_size = args.batch_size or (64 if gpu else 16)
    args.seq_len = args.seq_len or (256 if gpu else 64)
    args.steps = args.steps or (300 if gpu else 60)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("STATELAB_CACHE_DIR", str(Path(tempfile.gettempdir()) / "statelab-bench-cache"))
    reg = registry_for(args)

    trainer, bare = [], []
    for i in range(args.repeats):  # alternate the order so neither side always runs first
        if i % 2 == 0:
            bare.append(run_bare(args, reg))
            trainer.append(run_trainer(args, reg))
        else:
            trainer.append(run_trainer(args, reg))
            bare.append(run_bare(args, reg))
        print(f"  bare {bare[-1]:,.0f} tok/s | trainer {trainer[-1]:,.0f} tok/s", file=sys.stderr)
    tr, br = statistics.median(trainer), statistics.median(bare)
    # each trainer run is paired with the bare run just before it: the median of the pair ratios
    # is robust to the machine's load drifting during the benchmark
    ratio = statistics.median(t / b for t, b in zip(trainer, bare))
    dev_name = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    result = {
        "benchmark": "trainer_overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(args, k) for k in ("spec", "backbone", "layers", "d_model", "batch_size", "seq_len",
                                                 "steps", "log_interval", "compile", "repeats")},
        "trainer_tok_s": trainer,
        "bare_tok_s": bare,
        "trainer_tok_s_median": tr,
        "bare_tok_s_median": br,
        "ratio": ratio,
        "ratio_of_medians": tr / br,
        "goal": 0.95,
        "pass": ratio >= 0.95,
    }
    if args.spec:
        t = make_spec(args)["train"]
        label, bxt = Path(args.spec).stem, f"{t.get('batch_size', 32)}x{t.get('seq_len', 128)}"
    else:
        label, bxt = f"{args.backbone} {args.layers}x{args.d_model}", f"{args.batch_size}x{args.seq_len}"
    tag = f"_{Path(args.spec).stem}" if args.spec else ""
    out = Path(args.out) if args.out else HERE / "results" / f"trainer_overhead_{args.device}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(
        f"### Trainer overhead ({args.device}, {dev_name})\n\n"
        f"`python benchmarks/core/trainer_overhead.py {' '.join(sys.argv[1:])}` "
        f"on {result['date']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end\n\n"
        f"| model | batch x seq | bare loop tok/s | statelab train tok/s | ratio (goal >= 0.95) |\n"
        f"|---|---|---|---|---|\n"
        f"| {label} | {bxt} | {br:,.0f} | {tr:,.0f} "
        f"| {ratio:.3f} {'pass' if ratio >= 0.95 else 'FAIL'} |\n\n"
        f"Ratio = median over {args.repeats} alternating pairs; pair ratios "
        f"{', '.join(f'{t / b:.3f}' for t, b in zip(trainer, bare))}.\n"
    )
    print(f"trainer {tr:,.0f} tok/s | bare {br:,.0f} tok/s | ratio {ratio:.3f} (goal >= 0.95: "
          f"{'pass' if ratio >= 0.95 else 'FAIL'})")
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
