"""Planned vs off vs matched random vs oracle, on the lookahead task and on text, over seeds.

Per seed: a small Mamba-2 LM is trained, the planner fitted (latent model, value, critic,
gate), and then

* the ``lookahead`` task (reach a goal reachable only through another hidden mode within
  ``horizon`` steps): per-episode success off / planned (gated, with the task reward on the
  goal's edges) / forced (the plans at a fixed alpha) / random (matched: the planner's
  subspace, same length and alpha) / oracle (gradient of a shortest path's loss);
* ``planner-effect`` on mode-switch text: per-row teacher-forced loss off / on / planned /
  random / stale / oracle / future.

Rows are pooled over seeds and compared paired (episode or window row, seed) with
:func:`statelab.stats.paired_difference`. Prints a markdown table and writes JSON.

    python benchmarks/crsm/planner_bench.py --seeds 0 1 2 --out benchmarks/crsm/results/planner_bench.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

MAMBA2 = {"kind": "mamba", "n_layers": 2, "d_state": 16, "headdim": 16, "chunk_size": 16, "mixer": "mamba2"}


def lookahead_seed(seed: int, args) -> dict[str, list[float]]:
    from statelab.interfaces import TaskContext
    from statelab.tasks import make_task

    from crsm_planner.planner_testing import planner_model, train_lm

    task = make_task("lookahead", {"episodes": args.episodes, "batch_size": 16})
    data = task.make_data(None, seed)
    model = planner_model(backbone=MAMBA2, d_model=32, seed=seed, simulations=16, d_latent=16, gate_steps=16)
    step = iter(range(10**9))

    def batches():
        b = data.train_batch(next(step), 16, task.params.seq_len)
        return torch.cat([b.x, b.y[:, -1:]], dim=1)  # (B, T+1)

    train_lm(model, batches, args.lm_steps, lr=3e-3)
    fit = model.planner.fit(model, lambda: batches()[:8, :40], steps=args.fit_steps, lr=3e-3)
    res = task.evaluate(model, data, TaskContext(seed=seed))
    return {"fit": fit, "success": res.samples}


def text_seed(seed: int, args) -> dict:
    import statelab

    from crsm_planner.planner_testing import mode_switch_tokens, planner_model, train_lm, window_batches

    tokens = mode_switch_tokens(40000, seed=seed)
    train, val = tokens[:30000], tokens[30000:]
    model = planner_model(backbone=MAMBA2, d_model=32, seed=seed, simulations=16, d_latent=16, gate_steps=16,
                          plan_every=2)
    train_lm(model, window_batches(train, 16, 32, seed=seed), args.lm_steps, lr=3e-3)
    fit = model.planner.fit(model, window_batches(train, 8, 40, seed=seed + 1), steps=args.fit_steps, lr=3e-3)
    probe = statelab.make_probe("planner-effect", {"seeds": 2, "loss_batches": 2, "batch_size": 8, "seq_len": 64,
                                                   "samples": False}, model)
    rows, alpha = probe.losses(model, val, seed)
    return {"fit": fit, "rows": {k: {str(kk): v for kk, v in r.items()} for k, r in rows.items()},
            "mean_alpha_on": alpha}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lm-steps", type=int, default=300)
    ap.add_argument("--fit-steps", type=int, default=80)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/crsm/results/planner_bench.json"))
    args = ap.parse_args()

    from statelab.stats import interval, paired_difference

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    look: dict[str, dict] = {}
    text: dict[str, dict] = {}
    fits = {}
    for s in args.seeds:
        r = lookahead_seed(s, args)
        fits[f"lookahead/{s}"] = r["fit"]
        for name, v in r["success"].items():
            look.setdefault(name.removeprefix("success_"), {}).update({(s, i): x for i, x in enumerate(v)})
        t = text_seed(s, args)
        fits[f"text/{s}"] = {**t["fit"], "mean_alpha_on": t["mean_alpha_on"]}
        for name, v in t["rows"].items():
            text.setdefault(name, {}).update({(s, k): x for k, x in v.items()})
        print(f"seed {s} done at {time.perf_counter() - t0:.0f} s", flush=True)

    report: dict = {"seeds": args.seeds, "lm_steps": args.lm_steps, "fit_steps": args.fit_steps,
                    "elapsed_s": time.perf_counter() - t0, "fits": fits, "lookahead": {}, "text": {}}
    lines = ["| suite | setting | mean | vs off (paired, 95%) | verdict |", "|---|---|---|---|---|"]
    for suite, rows, hib, base_pairs in (
        ("lookahead", look, True, [("planned", "off"), ("forced", "off"), ("random", "off"), ("oracle", "off"),
                                   ("forced", "random")]),
        ("text", text, False, [("on", "off"), ("planned", "off"), ("random", "off"), ("stale", "off"),
                               ("oracle", "off"), ("future", "off"), ("planned", "random"), ("planned", "stale")]),
    ):
        for name, r in rows.items():
            report[suite][name] = interval(list(r.values())).to_dict()
        for cand, base in base_pairs:
            d = paired_difference(rows[cand], rows[base], higher_is_better=hib)
            report[suite][f"{cand}_minus_{base}"] = {**d.diff.to_dict(), "verdict": d.verdict}
            lines.append(f"| {suite} ({'success' if hib else 'loss'}) | {cand} - {base} | "
                         f"{interval(list(rows[cand].values())).mean:.4f} | {d.diff.format(4)} (n={d.diff.n}) | "
                         f"{d.verdict} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
