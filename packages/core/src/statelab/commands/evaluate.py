"""``statelab eval CKPT``: validation loss, accuracy, bits per char/byte and perplexity."""

from __future__ import annotations

import json


def configure(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, run directory (uses best/), or an mlflow run: runs:/RUN_ID[/PATH] or RUN_ID")
    parser.add_argument("--uri", default=None,
                        help="tracking store of an mlflow run given as the checkpoint "
                        "(default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--batches", type=int, default=None, help="validation batches (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the spec's train.batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the spec's train.seq_len")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def load_with_data(path: str, device: str, uri: str | None = None):
    """The checkpoint's model on ``device`` and its data source, with matching tokenizers;
    ``path`` may name an mlflow run (see :func:`statelab.tracking.resolve_checkpoint`)."""
    import statelab
    from statelab.data import make_data
    from statelab.distributed import resolve_device
    from statelab.tracking import resolve_checkpoint

    dev = resolve_device(device)
    model = statelab.load(resolve_checkpoint(path, uri), map_location=dev)
    data = make_data(model.spec)
    if model.tokenizer is not None and data.tokenizer.to_json() != model.tokenizer.to_json():
        from statelab.errors import UserError

        raise UserError(
            "the data of this checkpoint's spec now yields a different tokenizer than the one it was "
            "trained with (the corpus changed?); evaluate on the original corpus"
        )
    return model, data, dev


def run(args) -> int:
    from statelab.train import evaluate

    model, data, dev = load_with_data(args.checkpoint, args.device, args.uri)
    cfg = model.spec.train
    autocast = None
    if dev.type == "cuda":
        import torch

        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    m = evaluate(model, data, batch_size=args.batch_size or cfg.batch_size, seq_len=args.seq_len or cfg.seq_len,
                 max_batches=args.batches, device=dev, autocast=autocast)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(f"{model.checkpoint_path}: val loss {m['val/loss']:.4f} | bpc {m['val/bpc']:.4f} | "
              f"acc {m['val/acc']:.4f} | ppl {m['val/ppl']:.2f} | {int(m['val/tokens']):,} tokens")
    return 0
