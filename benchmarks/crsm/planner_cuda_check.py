"""Checks of the planner's CUDA-only paths (run on a GPU machine; CPU CI cannot reach them).

    python benchmarks/crsm/planner_cuda_check.py [--device cuda]

1. The search captured as a CUDA graph gives the same plan as eager planning on CUDA
   and (up to float tolerance) as on the CPU.
2. Asynchronous generation on CUDA (worker stream, events, graph replay) applies plans
   and keeps the state finite; likewise with the search on a CPU shadow (device: cpu).
Prints one line per check and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--use-kernels", default="auto", choices=["auto", "never"],
                    help="mamba backbone: mamba-ssm kernels when installed (auto; their first autotuning takes "
                         "minutes) or pure PyTorch (never)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0

    import statelab
    from statelab.interfaces import PlanRequest

    from crsm_planner.planner import _GRAPHS
    from crsm_planner.planner_testing import mode_switch_tokens, window_batches

    spec = {"name": "cuda-check", "tokenizer": {"kind": "byte"}, "tracking": {"enabled": False},
            "model": {"d_model": 128, "backbone": {"kind": "mamba", "n_layers": 2, "use_kernels": args.use_kernels},
                      "planner": {"kind": "mcts", "simulations": 16, "plan_every": 2, "max_lag": 16, "gate_init": 3.0,
                                  "alpha_max": 0.5}}}
    model = statelab.build(spec).to(dev).eval()
    toks = mode_switch_tokens(20000)
    batches = window_batches(toks, 8, 32)
    metrics = model.planner.fit(model, lambda: batches().to(dev), steps=20, lr=3e-3)
    shown = ("dyn/one", "dyn/k_step_ratio", "value/corr")
    print("fit:", {k: round(v, 4) for k, v in metrics.items() if k.startswith(shown)})
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}")

    x = toks[:64].view(2, 32).to(dev)
    with torch.no_grad():
        logits, state, _ = model(x)
    req = PlanRequest({k: v.clone() for k, v in state.items()}, logits[:, -1].clone(), 31, 1)
    pl = model.planner
    eager = pl.plan(model, req)
    captured = pl.prepare(model, state, logits[:, -1])
    check("graph captured", captured)
    graphed = pl.plan(model, req)
    diff = max((eager.target[k] - graphed.target[k]).abs().max().item() for k in eager.target)
    check("graph == eager on CUDA", diff < 1e-4 and torch.allclose(eager.alpha, graphed.alpha, atol=1e-6),
          f"(max target diff {diff:.2e}, alpha {eager.alpha.tolist()} vs {graphed.alpha.tolist()})")
    cpu_model = copy.deepcopy(model).cpu()
    _GRAPHS.pop(cpu_model.planner, None)
    cpu_req = PlanRequest({k: v.cpu() for k, v in req.state.items()}, req.logits.cpu(), 31, 1)
    on_cpu = cpu_model.planner.plan(cpu_model, cpu_req)
    diff = max((eager.target[k].cpu() - on_cpu.target[k]).abs().max().item() for k in eager.target)
    check("CUDA == CPU plan", diff < 1e-3,
          f"(max target diff {diff:.2e}; differences in near-tied visits may flip a choice)")

    for device_mode, mode in (("auto", "stream"), ("auto", "thread"), ("cpu", "auto")):
        pl.params = pl.params.model_copy(update={"device": device_mode, "async_mode": mode})
        res = statelab.generate(model, x[:, :16], max_new_tokens=200, seed=0)
        st = res.stats
        finite = all(torch.isfinite(v).all().item() for v in res.state.values())
        check(f"async generation (planner device {device_mode}, async_mode {mode})",
              st["planner.applied"] >= 1 and finite,
              f"(requested {st['planner.requested']:.0f}, applied {st['planner.applied']:.0f}, "
              f"mean lag {st['planner.mean_lag']:.2f}, mean alpha {st['planner.mean_alpha']:.4f}, "
              f"{st['tokens_per_s']:.0f} tokens/s)")
    # stream mode applies exactly the plans the captured search makes: generation with the
    # launcher, replayed by hand from the same snapshots through planner.plan, gives the same state
    from crsm_planner.async_planner import PlanningHook

    pl.params = pl.params.model_copy(update={"device": "auto", "async_mode": "stream", "plan_every": 3})
    hook = PlanningHook(pl, model)
    snaps = []

    def spy(ctx):  # records the state and logits each launch snapshots (hooks run in order: spy first)
        if ctx.step % 3 == 0 and not ctx.finished:
            snaps.append((ctx.step, {k: v.clone() for k, v in ctx.state.items()}, ctx.logits.clone()))

    res = statelab.generate(model, x[:, :16], max_new_tokens=40, seed=0, hooks=[spy, hook], use_planner=False)
    check("stream mode used a graph launcher", hook.launcher is not None and res.stats["planner.applied"] >= 1,
          f"(applied {res.stats['planner.applied']:.0f}, skipped {res.stats['planner.skipped_busy']:.0f})")
    if snaps:
        step, st0, lg = snaps[0]
        torch.cuda.synchronize()  # the generation's last launch has finished
        via_plan = pl.plan(model, PlanRequest(st0, lg, step, 0))
        launcher = hook.launcher
        launcher.launch(st0, lg, step)
        torch.cuda.synchronize()
        via_launch = launcher.result(st0, step, 0)
        diff = max((via_plan.target[k] - via_launch.target[k]).abs().max().item() for k in via_plan.target)
        check("launcher plan == plan()", diff < 1e-5 and torch.allclose(via_plan.alpha, via_launch.alpha),
              f"(max target diff {diff:.2e})")
    pl.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
