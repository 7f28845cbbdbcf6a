"""The planner-effect probe on a toy Mamba-2 where the value head can learn something.

The text (``mode_switch_tokens``) alternates between predictable stretches and random bytes,
so the loss over the next tokens is readable from the state. Trains a small Mamba-2 LM,
fits the planner, prints the fit metrics (dynamics vs "state unchanged", value-head
correlation and held-out skill, gate) and the probe's off / on / random-injection results.

    python benchmarks/crsm/planner_effect_toy.py            # about 5 minutes on a loaded 2-core CPU
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--fit-steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import statelab
    from statelab.interfaces import ProbeContext

    from crsm_planner.planner_testing import mode_switch_tokens, planner_model, train_lm, window_batches

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    backbone = {"kind": "mamba", "n_layers": 2, "d_state": 16, "headdim": 16, "chunk_size": 16, "mixer": "mamba2"}
    model = planner_model(backbone=backbone, d_model=32, seed=args.seed, simulations=16, d_latent=16, gate_steps=20,
                          plan_every=2)
    tokens = mode_switch_tokens(40000, seed=args.seed)
    train, val = tokens[:30000], tokens[30000:]
    print(f"LM loss after {args.lm_steps} steps: {train_lm(model, window_batches(train, 16, 32), args.lm_steps):.4f}")
    fit = model.planner.fit(model, window_batches(train, 8, 40, seed=1), steps=args.fit_steps, lr=3e-3)
    print(json.dumps({k: round(v, 4) for k, v in fit.items()}, indent=1))
    params = {"loss_batches": 4, "batch_size": 4, "seq_len": 64, "prompt_len": 16, "new_tokens": 48}
    res = statelab.make_probe("planner-effect", params, model).run(model, ProbeContext(val_tokens=val, seed=args.seed))
    print(json.dumps({"verdict": res.verdict, **{k: round(v, 5) for k, v in res.metrics.items()}}, indent=1))


if __name__ == "__main__":
    main()
