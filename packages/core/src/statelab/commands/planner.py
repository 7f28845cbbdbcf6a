"""``statelab planner fit CKPT``: fit a checkpoint's planner and save it back atomically."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    fit = sub.add_parser("fit", help="fit the planner's learned parts on the checkpoint's training data")
    fit.add_argument("checkpoint", help="checkpoint directory or run directory (uses best/)")
    fit.add_argument("--steps", type=int, default=None, help="default: the spec's train.planner_fit.steps")
    fit.add_argument("--batch-size", type=int, default=None)
    fit.add_argument("--seq-len", type=int, default=None)
    fit.add_argument("--lr", type=float, default=None)
    fit.add_argument("--device", default="auto")
    fit.add_argument("--uri", default=None,
                     help="tracking store holding the checkpoint's mlflow run, to log the fit into "
                     "(default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; never the one the checkpoint names)")
    fit.add_argument("--no-log", action="store_true", help="do not log into the checkpoint's mlflow run")


def run(args) -> int:
    if args.action != "fit":
        print("usage: statelab planner fit CKPT [--steps N] [--batch-size B] [--seq-len T] [--lr LR]", file=sys.stderr)
        return 2
    from statelab import checkpoint as ckpt
    from statelab.commands.evaluate import load_with_data

    model, data, dev = load_with_data(args.checkpoint, args.device)
    if getattr(model, "planner", None) is None:
        from statelab.errors import UserError

        raise UserError(f"the model in {model.checkpoint_path} has no planner (model.planner is null)")
    pf = model.spec.train.planner_fit
    steps = args.steps if args.steps is not None else pf.steps
    bs = args.batch_size or pf.batch_size
    T = args.seq_len or pf.seq_len
    lr = args.lr or pf.lr
    counter = iter(range(10**12))

    def batches_fn():
        return data.train_batch(10**9 + next(counter), bs, T).x.to(dev)  # (B, T)

    metrics = model.planner.fit(model, batches_fn, steps=steps, batch_size=bs, seq_len=T, lr=lr) or {}
    path = model.checkpoint_path
    ck = ckpt.read_checkpoint(path)
    ts = ck.trainer_state()
    meta = {k: v for k, v in ck.meta.items() if k.startswith("statelab.mlflow_")}
    ckpt.save(path, model, tokenizer=model.tokenizer, trainer_state=ts[0] if ts else None,
              trainer_tensors=ts[1] if ts else None, extra_meta=meta)
    for k, v in metrics.items():
        print(f"  planner/{k}: {float(v):.6g}")
    print(f"planner fitted ({steps} steps); saved to {path}")
    if not args.no_log:
        from statelab.tracking import checkpoint_run

        opened = checkpoint_run(meta, args.uri, command="planner fit")
        if opened is not None:
            tracker, step = opened
            tracker.log_metrics({f"planner/{k}": float(v) for k, v in metrics.items()}, step)
            tracker.close()
            print(f"logged to mlflow run {tracker.run_id} at step {step}", file=sys.stderr)
    return 0
