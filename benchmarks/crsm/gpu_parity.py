"""Parity of the `mamba` backbone's three paths on a GPU: mamba-ssm kernels, our pure
PyTorch scans, and the sequential reference.

For each mixer (mamba1, mamba2 with 1 and 2 groups) it compares, in fp32:

* forward from the zero state (outputs and final states),
* forward from a non-zero initial state (chunked prefill; for mamba1 this exercises the
  linearity correction around ``selective_scan_fn``),
* decode steps after that (``selective_state_update``),
* parameter gradients of a loss on the outputs and the final state.

A check passes when ``max|a - b| <= tol * max(1, max|b|)`` (tolerance scaled to the size
of the values compared); gradients pass when ``max|a - b| <= 10 tol * max|b|`` over all
parameters (the parameter with the largest difference is shown). Measured beforehand: mamba1 about 1e-6; mamba2 about 1e-3 with
Triton's default TF32 matmuls and about 6e-6 with ``TRITON_F32_DEFAULT=ieee``. The
tolerance follows the mode (``--tol`` overrides). Exit status 1 when a check fails.

Order: the Mamba-2 cases first (the Triton SSD kernels are the ones not verified before),
then Mamba-1; one shape per case. Autotuning is cut (``--autotune first``, the default):
before the first call every ``triton.autotune``-wrapped kernel in mamba-ssm's SSD and decode
modules keeps one config, the cheapest by block sizes x stages (the one mamba-ssm itself
picks in its deterministic mode), because compiling and benchmarking all ~10 configs of ~20
kernels took over 330 s on the first run. The config changes tiling only, not the maths.
Each stage prints its time; the JSON is rewritten after every case, so a run cut short
still leaves its finished cases.

    TRITON_F32_DEFAULT=ieee python benchmarks/crsm/gpu_parity.py
    python benchmarks/crsm/gpu_parity.py            # TF32 default
    python benchmarks/crsm/gpu_parity.py --device cpu   # torch vs naive only (no kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, max abs diff / max(1, max|b|), max|b|)."""
    d = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    return d, d / max(1.0, scale), scale


AUTOTUNED_MODULES = ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined",
                     "selective_state_update", "layernorm_gated")


def restrict_autotune(modules: list) -> list[str]:
    """Leave every autotuned kernel in ``modules`` with one config (the cheapest by the product
    of its ``BLOCK_SIZE_*`` values times ``num_stages``). An autotuner may sit under other
    decorators (``triton.heuristics``), so each module attribute is followed through ``.fn``.
    Returns ``"module.kernel: n -> 1"`` lines."""
    def cost(cfg) -> int:
        c = 1
        for k, v in getattr(cfg, "kwargs", {}).items():
            if k.startswith("BLOCK_SIZE_"):
                c *= int(v)
        return c * (getattr(cfg, "num_stages", 1) or 1)

    changed = []
    for mod in modules:
        for attr, obj in vars(mod).items():
            seen = 0
            while obj is not None and seen < 8:
                if type(obj).__name__ == "Autotuner" and isinstance(getattr(obj, "configs", None), list):
                    n = len(obj.configs)
                    if n > 1:
                        obj.configs = [min(obj.configs, key=cost)]
                        changed.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{attr}: {n} -> 1")
                    break
                obj, seen = getattr(obj, "fn", None), seen + 1
    return changed


def run_case(name: str, params, args, impls: list[str], results: list[dict], tol: float) -> bool:
    from crsm_planner import kernels
    from crsm_planner.backbone import MambaBackbone

    needed = kernels.MAMBA1_OPS if params.mixer == "mamba1" else kernels.MAMBA2_OPS
    if "kernels" in impls and not kernels.available(needed):
        print(f"{name}: mamba_ssm lacks {needed} here (Mamba-1 needs the compiled selective_scan_cuda): "
              "kernels not compared for this mixer")
        impls = [i for i in impls if i != "kernels"]
    dev = args.device
    torch.manual_seed(0)
    bb = MambaBackbone(args.d_model, params).to(dev)
    x = torch.randn(args.batch, args.seq, args.d_model, device=dev)
    # a realistic non-zero state: run a prefix, then perturb it
    with torch.no_grad():
        _, s_init, _ = bb.set_impl("torch")(torch.randn(args.batch, 40, args.d_model, device=dev))
        s_init = {k: v + 0.1 * torch.randn_like(v) for k, v in s_init.items()}
    out: dict[str, dict[str, object]] = {}
    timings: dict[str, float] = {}

    def stage(label: str, t0: float) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        timings[label] = round(t1 - t0, 3)
        print(f"  [{name}] {label}: {t1 - t0:.1f} s", flush=True)
        return t1

    for impl in impls:
        bb.set_impl(impl)
        r: dict[str, object] = {}
        t = time.perf_counter()
        with torch.no_grad():
            r["y_zero"], r["s_zero"], _ = bb(x, None)
            t = stage(f"{impl} forward from zero", t)
            r["y_init"], r["s_init"], _ = bb(x, s_init)
            t = stage(f"{impl} forward from a state", t)
            s = r["s_init"]
            steps = []
            for i in range(args.decode):
                y_t, s, _ = bb.step(x[:, i], s)
                steps.append(y_t)
            r["y_step"], r["s_step"] = torch.stack(steps, 1), s
            t = stage(f"{impl} {args.decode} decode steps", t)
        if impl != "naive" or args.seq <= 128:
            bb.zero_grad(set_to_none=True)
            y, s_fin, _ = bb(x, s_init)
            loss = y.pow(2).mean() + sum(v.pow(2).mean() for k, v in s_fin.items() if k.endswith(".ssm"))
            loss.backward()
            r["grads"] = {n: p.grad.detach().clone() for n, p in bb.named_parameters() if p.grad is not None}
            t = stage(f"{impl} forward+backward", t)
        out[impl] = r
    results.append({"case": name, "timings_s": timings})
    ok = True
    ref_impl = impls[0]
    for impl in impls[1:]:
        for key in ("y_zero", "s_zero", "y_init", "s_init", "y_step", "s_step", "grads"):
            a, b = out[impl].get(key), out[ref_impl].get(key)
            if a is None or b is None:
                continue
            limit = tol
            if key == "grads":  # gradients are small: scale by the largest gradient entry, 10x looser
                gscale = max(b[k].abs().max().item() for k in b)
                d, _, _, where = max((diff(a[k], b[k]) + (k,) for k in b), key=lambda t: t[0])
                rel, scale, limit = d / max(gscale, 1e-30), gscale, 10 * tol
            elif isinstance(a, dict):
                d, rel, scale, where = max((diff(a[k], b[k]) + (k,) for k in b), key=lambda t: t[1])
            else:
                (d, rel, scale), where = diff(a, b), ""
            passed = rel <= limit
            ok &= passed
            results.append({"case": name, "compare": f"{impl} vs {ref_impl}", "what": key, "max_abs": d,
                            "scaled": rel, "max_ref": scale, "worst_entry": where, "tol": limit, "pass": passed})
            print(f"{name:18s} {impl:7s} vs {ref_impl:5s} {key:7s} max|diff| {d:9.2e}  scaled {rel:9.2e}  "
                  f"(max|ref| {scale:8.2e}) {'ok' if passed else 'FAIL'} {where}", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=300, help="not a multiple of the chunk size on purpose")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--cases", default="mamba2,mamba2-2groups,mamba1", help="comma-separated, run in this order")
    ap.add_argument("--autotune", default="first", choices=["first", "full"],
                    help="first: one config per autotuned mamba-ssm kernel (fast to compile); full: mamba-ssm's lists")
    ap.add_argument("--json", default="benchmarks/crsm/results/gpu_parity_{mode}.json")
    args = ap.parse_args()

    from crsm_planner import kernels
    from crsm_planner.mamba_params import MambaParams

    ieee = os.environ.get("TRITON_F32_DEFAULT", "") == "ieee"
    mode = "ieee" if ieee else "tf32"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the torch-vs-naive checks only")
    torch.backends.cuda.matmul.allow_tf32 = False  # our own paths in true fp32
    torch.backends.cudnn.allow_tf32 = False
    have_kernels = args.device == "cuda" and kernels.available()
    if args.device == "cuda" and not have_kernels:
        print("mamba_ssm does not import here: comparing torch vs naive only (pip install mamba-ssm causal-conv1d "
              "--no-build-isolation to check the kernels)")
    if have_kernels and args.autotune == "first":
        import importlib

        mods = []
        for m in AUTOTUNED_MODULES:
            try:
                mods.append(importlib.import_module(f"mamba_ssm.ops.triton.{m}"))
            except Exception as e:  # noqa: BLE001
                print(f"(mamba_ssm.ops.triton.{m} does not import: {type(e).__name__})")
        changed = restrict_autotune(mods)
        print(f"autotuning cut to one config in {len(changed)} kernels: {', '.join(changed)}")
    impls = (["kernels"] if have_kernels else []) + ["torch", "naive"]
    impls = ["torch"] + [i for i in impls if i != "torch"]  # reference for the table: our torch path
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"triton fp32 mode {mode}, paths {impls}\n")
    all_cases = {
        "mamba2": MambaParams(n_layers=args.layers, mixer="mamba2", d_state=64, headdim=64, chunk_size=64),
        "mamba2-2groups": MambaParams(n_layers=args.layers, mixer="mamba2", d_state=64, headdim=64, ngroups=2,
                                      chunk_size=64),
        "mamba1": MambaParams(n_layers=args.layers, mixer="mamba1", d_state=16),
    }
    names = args.cases.split(",")
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {list(all_cases)}")
    path = Path(args.json.format(mode=mode if have_kernels else f"{args.device}-nokernels"))
    path.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    ok = True
    done = []
    t_start = time.perf_counter()
    for name in names:
        p = all_cases[name]
        tol = args.tol or (1e-4 if (p.mixer == "mamba1" or ieee) else 5e-3)
        print(f"--- {name} (tol {tol:g}; {time.perf_counter() - t_start:.0f} s in)", flush=True)
        ok &= run_case(name, p, args, impls, results, tol)
        done.append(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mode": mode, "kernels": have_kernels, "autotune": args.autotune,
                                   "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                   "cases_done": done, "all_pass": bool(ok), "results": results}, indent=2))
        os.replace(tmp, path)
    print(f"\n{'ALL OK' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t_start:.0f} s; wrote {path}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
