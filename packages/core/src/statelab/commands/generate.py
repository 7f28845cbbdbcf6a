"""``statelab generate CKPT --prompt TEXT``: sample continuations from a checkpoint."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, run directory (uses best/), or an mlflow run: runs:/RUN_ID[/PATH] or RUN_ID")
    parser.add_argument("--uri", default=None,
                        help="tracking store of an mlflow run given as the checkpoint "
                        "(default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable: a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-planner", action="store_true", help="do not install the planner's generation hook")


def run(args) -> int:
    import statelab
    from statelab.distributed import resolve_device
    from statelab.errors import UserError
    from statelab.generation import generate
    from statelab.tracking import resolve_checkpoint

    model = statelab.load(resolve_checkpoint(args.checkpoint, args.uri), map_location=resolve_device(args.device))
    if model.tokenizer is None:
        raise UserError("this checkpoint has no tokenizer.json, so text prompts cannot be encoded")
    prompts = args.prompt or ["\n"]
    if any(p == "" for p in prompts):
        raise UserError("an empty --prompt has no token to start from; give at least one character")
    res = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed,
                   use_planner=not args.no_planner)
    for i, (p, t) in enumerate(zip(prompts, res.texts)):
        if len(prompts) > 1:
            print(f"--- {i} ---")
        print(p + t)
    print(f"[{res.stats['new_tokens']} tokens, {res.stats['tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0
