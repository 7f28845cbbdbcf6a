"""Generation with the asynchronous MCTS planner on vs off: tokens/s, stutter, simulations per token.

    python benchmarks/crsm/planner_generation.py --device cpu
    python benchmarks/crsm/planner_generation.py --device cuda --markdown docs/benchmarks.md
    python benchmarks/crsm/planner_generation.py --ckpt runs/crsm/best --device cuda

Without ``--ckpt`` it builds a randomly initialised byte-level model (``mamba`` backbone,
``toy-rnn`` if the mamba backbone cannot be built) with the ``mcts`` planner and fits the
planner for a few steps so that it injects (an unfitted planner searches but never
injects). Each repeat generates the same prompts with the planner off and on (same
seed, alternating order). Reported: tokens/s off and on (medians) and the on/off ratio
of each repeat's pair (mean, standard deviation, min..max; goal >= 0.9 on the H100),
per-step wall time p50/p99 off vs on (p99 on vs off is the stutter), the time generation
spends inside the planner's hook per step, the worker's time per plan (issuing it, and in
all with the GPU wait), plans requested / completed / applied, the mean lag of applied
results, and search simulations per emitted token (completed plans x simulations / new
tokens). ``--markdown`` appends the table as a section to the given file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def build_model(args):
    import statelab

    if args.ckpt:
        model = statelab.load(args.ckpt, map_location=args.device)
        if model.planner is None:
            sys.exit(f"{args.ckpt}: the model has no planner; "
                     "train one with a spec that sets model.planner (kind: mcts)")
        return model, "checkpoint"
    planner = {"kind": "mcts", "simulations": args.simulations, "depth": args.depth, "top_k": args.top_k,
               "plan_every": args.plan_every, "max_lag": args.max_lag, "gate_steps": 0, "alpha_max": 0.2,
               "gate_init": 2.0, "device": args.planner_device, "cuda_graphs": not args.no_cuda_graphs,
               "worker_duty": args.duty, "async_mode": args.async_mode}
    spec = {"name": "planner-bench", "tokenizer": {"kind": "byte"}, "tracking": {"enabled": False},
            "model": {"d_model": args.d_model, "planner": planner}}
    tried = []
    for bb in ([args.backbone] if args.backbone != "auto" else ["mamba", "toy-rnn"]):
        params = {"kind": bb, "n_layers": args.layers}
        if bb == "mamba":
            params["use_kernels"] = args.use_kernels
        if bb == "toy-rnn":
            params["d_state"] = args.d_model
        spec["model"]["backbone"] = params
        try:
            if bb == "toy-rnn":
                from statelab.testing.toys import toy_registry

                import crsm_planner.plugin as plugin

                reg = toy_registry()
                reg.register_plugin(plugin, distribution="crsm-planner", version="0")
                return statelab.build(spec, registry=reg), bb
            return statelab.build(spec), bb
        except Exception as e:  # noqa: BLE001 - report and fall back
            tried.append(f"{bb}: {e}")
    sys.exit("could not build a model: " + "; ".join(tried))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--ckpt", default=None, help="a checkpoint with a fitted planner (default: random model)")
    ap.add_argument("--backbone", default="auto", choices=["auto", "mamba", "toy-rnn"])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--simulations", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--plan-every", type=int, default=4)
    ap.add_argument("--max-lag", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=10)
    ap.add_argument("--planner-device", default="auto", choices=["auto", "cpu"],
                    help="auto: search on the model's device (CUDA graphs on CUDA); cpu: on a CPU copy of the planner")
    ap.add_argument("--async-mode", default="auto", choices=["auto", "stream", "thread"],
                    help="stream: graph replays launched and polled from the generating thread (auto on CUDA); "
                         "thread: the background worker thread")
    ap.add_argument("--duty", type=float, default=None,
                    help="worker_duty: max fraction of time the worker plans (default: the planner's, auto)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="plan eagerly on CUDA (to measure what graphs buy)")
    ap.add_argument("--use-kernels", default="auto", choices=["auto", "never"],
                    help="mamba backbone: mamba-ssm kernels on CUDA when installed (auto) or pure PyTorch (never)")
    ap.add_argument("--autotune", default="full", choices=["full", "first"],
                    help="with mamba-ssm kernels: full autotuning, or one config per Triton kernel (first: "
                         "seconds instead of minutes of compiling; the prefill is not what is timed)")
    ap.add_argument("--markdown", default=None, help="append the results as a section to this file")
    args = ap.parse_args()
    if args.autotune == "first" and args.use_kernels != "never":
        import importlib

        from gpu_parity import AUTOTUNED_MODULES, restrict_autotune  # benchmarks/crsm is sys.path[0]

        mods = []
        for name in AUTOTUNED_MODULES:
            try:
                mods.append(importlib.import_module(f"mamba_ssm.ops.triton.{name}"))
            except Exception:  # noqa: BLE001, S110 - no mamba_ssm: nothing to restrict
                pass
        print(f"autotuning cut to one config in {len(restrict_autotune(mods))} kernels", flush=True)

    from statelab.generation import generate

    from crsm_planner.planner_testing import mode_switch_tokens, window_batches

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, kind = build_model(args)
    model.to(device).eval()
    planner = model.planner
    if args.ckpt:  # the benchmark's planner settings apply to a loaded planner too
        planner.params = planner.params.model_copy(update={"device": args.planner_device, "worker_duty": args.duty,
                                                           "cuda_graphs": not args.no_cuda_graphs,
                                                           "async_mode": args.async_mode})
    sims = planner.params.simulations
    if args.fit_steps and not args.ckpt:
        toks = mode_switch_tokens(20000)
        batches = window_batches(toks, 8, 32)
        planner.fit(model, lambda: batches().to(device), steps=args.fit_steps, lr=1e-3)
    prompts = torch.randint(97, 101, (args.batch, args.prompt_len))
    kw = dict(max_new_tokens=args.tokens, temperature=1.0, seed=0)
    # warm-up: kernels, allocator, the planner's worker thread
    generate(model, prompts, **{**kw, "max_new_tokens": 16}, use_planner=False)
    generate(model, prompts, **{**kw, "max_new_tokens": 16}, use_planner=True)

    rows = {"off": [], "on": []}
    steps = {"off": [], "on": []}
    plan_stats = []
    for r in range(args.repeats):
        order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
        for name in order:
            res = generate(model, prompts, **kw, use_planner=(name == "on"))
            rows[name].append(res.stats["tokens_per_s"])
            steps[name].extend(res.stats["step_times_s"][2:])
            if name == "on":
                plan_stats.append(res.stats)
    planner.shutdown()

    def mean(xs):
        return sum(xs) / len(xs)

    ratios = [on / off for on, off in zip(rows["on"], rows["off"])]  # one per repeat (a back-to-back pair)
    r_sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    tps_off, tps_on = statistics.median(rows["off"]), statistics.median(rows["on"])
    n_steps_on = mean([len(s["step_times_s"]) for s in plan_stats])
    hook_ms = 1e3 * mean([s.get("planner.hook_s", float("nan")) for s in plan_stats]) / n_steps_on
    w_issue = [s["planner.worker_issue_s"] for s in plan_stats if "planner.worker_issue_s" in s]
    w_plan = [s["planner.worker_plan_s"] for s in plan_stats if "planner.worker_plan_s" in s]
    new_tokens = args.batch * args.tokens
    req = mean([s["planner.requested"] for s in plan_stats])
    done = mean([s["planner.applied"] + s["planner.dropped_stale"] + s["planner.discarded_at_end"] for s in plan_stats])
    applied = mean([s["planner.applied"] for s in plan_stats])
    lags = [s["planner.mean_lag"] for s in plan_stats if s["planner.mean_lag"] == s["planner.mean_lag"]]
    alpha = mean([s["planner.mean_alpha"] for s in plan_stats])
    figures = {
        "tokens/s off": f"{tps_off:.1f}",
        "tokens/s on": f"{tps_on:.1f}",
        "on/off (median tokens/s)": f"{tps_on / tps_off:.3f}",
        "on/off per repeat: mean +- sd (min..max)": f"{mean(ratios):.3f} +- {r_sd:.3f} ({min(ratios):.3f}..{max(ratios):.3f})",
        "step p50 off/on (ms)": f"{1e3 * pct(steps['off'], 0.5):.2f} / {1e3 * pct(steps['on'], 0.5):.2f}",
        "step p99 off/on (ms) (stutter)": f"{1e3 * pct(steps['off'], 0.99):.2f} / {1e3 * pct(steps['on'], 0.99):.2f}",
        "step max off/on (ms)": f"{1e3 * max(steps['off']):.2f} / {1e3 * max(steps['on']):.2f}",
        "in the planner hook per step (ms)": f"{hook_ms:.3f}",
        "per plan: issuing / until done (ms)": (f"{1e3 * mean(w_issue):.2f} / {1e3 * mean(w_plan):.2f}"
                                                    if w_issue else "n/a"),
        "plans requested / completed / applied": f"{req:.1f} / {done:.1f} / {applied:.1f}",
        "mean lag (steps)": f"{mean(lags):.2f}" if lags else "n/a",
        "mean alpha applied": f"{alpha:.4f}",
        "simulations per emitted token": f"{done * sims / new_tokens:.2f}",
    }
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    cmd = "python " + " ".join(sys.argv)
    header = (f"### Planner generation ({kind} d_model={args.d_model} layers={args.layers}, batch {args.batch}, "
              f"{args.tokens} new tokens, {sims} simulations, plan every {planner.params.plan_every}, "
              f"planner device {planner.params.device}, CUDA graphs {planner.params.cuda_graphs}, "
              f"use_kernels {args.use_kernels}, async_mode {planner.params.async_mode}, "
              f"worker duty {planner.params.worker_duty})")
    lines = [header, "", f"device: {dev_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
             f"{args.repeats} repeats (off/on back to back, alternating order); `{cmd}`", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        old = path.read_text() if path.exists() else ""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(old + ("\n" if old and not old.endswith("\n\n") else "") + text)
        os.replace(tmp, path)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.1f} s)")
