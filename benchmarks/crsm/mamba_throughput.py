"""Train-step throughput of the `mamba` backbone against HuggingFace's slow path.

One train step = forward + backward of the bare backbone (4 blocks, no embedding/head) on
random embeddings ``(B, T, d_model)`` with loss ``mean(y^2)``. Compared, for each mixer:

* ``ours``     our pure-PyTorch path (chunked SSD scan / chunked selective-scan Function);
* ``hf``       ``transformers`` MambaModel / Mamba2Model with custom kernels disabled
               (their "slow" torch path; on CUDA the fast path is switched off explicitly);
* ``kernels``  (CUDA, when ``import mamba_ssm`` works) our backbone on mamba-ssm's kernels;
* ``ours-compile`` / ``hf-compile``  the same two PyTorch paths under ``torch.compile``
               (Inductor; what ``train.compile: true`` does in the trainer). Still no hand-written
               kernels, but Inductor generates fused ones, so the goal row (ours >= 3x HF) is
               stated against HF's *eager* slow path and the compiled HF figure is shown next to it.
               Before timing, each compiled path is checked against its eager module on the same
               weights and input (output and every gradient; the result is printed and stored).

Same sizes and hyper-parameters for all (d_state 16 for mamba1; d_state 64, headdim 64,
chunk 64 for mamba2). Prints a markdown table and writes JSON.

    python benchmarks/crsm/mamba_throughput.py --device cpu --iters 2
    python benchmarks/crsm/mamba_throughput.py --device cuda --iters 20
    python benchmarks/crsm/mamba_throughput.py --device cuda --mixers mamba2 --paths ours,ours-compile,hf,hf-compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def build_ours(mixer: str, d_model: int, n_layers: int, impl: str, device: str):
    from crsm_planner.backbone import MambaBackbone
    from crsm_planner.mamba_params import MambaParams

    sizes = {"d_state": 16} if mixer == "mamba1" else {"d_state": 64, "headdim": 64, "chunk_size": 64}
    p = MambaParams(n_layers=n_layers, mixer=mixer, **sizes, use_kernels="never" if impl == "torch" else "auto")
    return MambaBackbone(d_model, p).set_impl(impl).to(device)


KERNEL_NAMES = ("mamba_inner_fn", "selective_scan_fn", "selective_state_update", "causal_conv1d_fn",
                "causal_conv1d_update", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined")


def import_hf_torch_only(mixer: str):
    """transformers' modeling module for ``mixer``, imported so that every kernel hook in it
    resolves to transformers' own PyTorch code.

    transformers 5.x binds each hooked function (``mamba_inner_fn``, ``selective_scan_fn``,
    ``mamba_chunk_scan_combined``, the causal-conv ops, ...) once, when the modeling module
    is imported: to the function of the same name in ``mamba_ssm`` / ``causal_conv1d`` if that
    package imports, else to the torch body under the decorator (4.x imported the kernels
    as module names and read them, or ``is_fast_path_available``, at call time). Either way
    the module has to be (re)imported
    with those packages hidden and the hub kernels off, and the binding is then checked:
    a hook that still points at an outside kernel raises instead of timing the wrong thing.
    ``mamba_ssm`` is put back afterwards for our own kernel path in the same process.
    """
    import importlib
    import inspect
    import sys

    os.environ.setdefault("USE_HUB_KERNELS", "0")
    name = {"mamba1": "transformers.models.mamba.modeling_mamba",
            "mamba2": "transformers.models.mamba2.modeling_mamba2"}[mixer]
    hidden = ("mamba_ssm", "causal_conv1d", "mambapy")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in hidden}
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules.update({k: None for k in hidden})  # None in sys.modules: "import k" raises ImportError
        sys.modules.pop(name, None)
        mod = importlib.import_module(name)
    finally:
        for k in hidden:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    hooks = 0
    for attr, fn in vars(mod).items():
        torch_fn = getattr(fn, "__wrapped__", None)
        if inspect.isfunction(fn) and torch_fn is not None and fn.__closure__ is not None:
            bound = inspect.getclosurevars(fn).nonlocals  # transformers 5.x hook: `implementation` is what runs
            if "implementation" in bound:
                hooks += 1
                if bound["implementation"] is not torch_fn:
                    raise RuntimeError(f"{name}.{attr} is bound to {bound['implementation']!r}, not transformers' "
                                       "PyTorch path: this transformers version selects kernels differently")
        elif attr in KERNEL_NAMES and fn is None:  # transformers 4.x: kernels imported as module names, None here
            hooks += 1
    for flag in ("is_fast_path_available", "is_mambapy_available"):  # 4.x: also module flags read at call time
        if hasattr(mod, flag):
            setattr(mod, flag, False if flag == "is_fast_path_available" else (lambda: False))
    if hooks == 0:
        raise RuntimeError(f"found no kernel switch in {name}: check how this transformers version picks kernels")
    print(f"transformers {mixer}: {hooks} kernel hooks on transformers' PyTorch code", flush=True)
    return mod


def build_hf(mixer: str, d_model: int, n_layers: int, device: str):
    from transformers.utils import logging

    logging.set_verbosity_error()
    mod = import_hf_torch_only(mixer)
    if mixer == "mamba1":
        from transformers import MambaConfig

        cfg = MambaConfig(vocab_size=16, hidden_size=d_model, state_size=16, num_hidden_layers=n_layers, expand=2,
                          conv_kernel=4, use_cache=False, use_mambapy=False)
        return mod.MambaModel(cfg).to(device)
    from transformers import Mamba2Config

    cfg = Mamba2Config(vocab_size=16, hidden_size=d_model, state_size=64, num_hidden_layers=n_layers, expand=2,
                       head_dim=64, num_heads=2 * d_model // 64, n_groups=1, chunk_size=64, conv_kernel=4,
                       use_cache=False)
    return mod.Mamba2Model(cfg).to(device)


def check_compiled(eager, compiled, params, x) -> dict:
    """Largest differences between the compiled and the eager path on one train step: output
    (absolute, and relative to the largest output entry) and gradients (relative to the largest
    gradient entry of each parameter, max over parameters). The check's loss weights the output
    with fixed random signs: the timed loss ``mean(y^2)`` of an RMS-normed output is nearly
    constant, so its gradients below the final norm are rounding-level residues (1e-8 of the
    norm's own) and no test of anything."""
    w = None

    def step(run):
        nonlocal w
        for p in params:
            p.grad = None
        y = run(x)
        if w is None:
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
        (y.float() * w).mean().backward()
        return y.detach().float(), [None if p.grad is None else p.grad.detach().clone() for p in params]

    y_e, g_e = step(eager)
    t = time.perf_counter()
    y_c, g_c = step(compiled)  # the first call compiles forward and backward
    if x.is_cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    y_abs = (y_c - y_e).abs().max().item()
    g_rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(g_c, g_e) if a is not None and b is not None)
    return {"first_call_s": first, "y_max_abs_diff": y_abs, "y_max_rel_diff": y_abs / y_e.abs().max().item(),
            "grad_max_rel_diff": g_rel}


def time_train_step(run, params, x, iters: int, warmup: int, device: str) -> float:
    """Seconds per forward+backward (median over iters)."""
    def once():
        for p in params:
            p.grad = None
        y = run(x)
        y.float().pow(2).mean().backward()

    for _ in range(warmup):
        once()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--hf-iters", type=int, default=None, help="iterations for the (slow) HF path; default --iters")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hf-warmup", type=int, default=None, help="warm-up steps for the HF path; default --warmup")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--mixers", default="mamba1,mamba2")
    ap.add_argument("--paths", default="ours,hf,kernels",
                    help="subset of ours,hf,kernels,ours-compile,hf-compile")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the *-compile paths")
    ap.add_argument("--check-tol", type=float, default=1e-3,
                    help="largest relative difference of a compiled path against eager (output, gradients)")
    ap.add_argument("--autotune", default="full", choices=["full", "first"],
                    help="kernels path: mamba-ssm's autotuning (full) or one config per Triton kernel (first, "
                         "as in gpu_parity.py: far less compile time, kernel timings then pessimistic)")
    ap.add_argument("--json", default="benchmarks/crsm/results/mamba_throughput_{device}.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    B, T, D = args.batch, args.seq, args.d_model
    x = torch.randn(B, T, D, device=device)
    paths = args.paths.split(",")
    if "hf" in paths or "hf-compile" in paths:
        os.environ.setdefault("USE_HUB_KERNELS", "0")  # before transformers imports: no kernels from the Hub
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: the HF comparison is skipped (pip install transformers)")
            paths = [q for q in paths if q not in ("hf", "hf-compile")]
    if "kernels" in paths:
        from crsm_planner import kernels

        if device != "cuda" or not kernels.available():
            paths.remove("kernels")
        elif args.autotune == "first":
            import importlib

            from gpu_parity import AUTOTUNED_MODULES, restrict_autotune  # benchmarks/crsm is sys.path[0]

            mods = []
            for name in AUTOTUNED_MODULES:
                try:
                    mods.append(importlib.import_module(f"mamba_ssm.ops.triton.{name}"))
                except Exception:  # noqa: BLE001
                    pass
            print(f"autotuning cut to one config in {len(restrict_autotune(mods))} kernels", flush=True)
    rows = []
    for mixer in args.mixers.split(","):
        res = {}
        for path in paths:
            if path == "kernels":
                from crsm_planner import kernels

                if not kernels.available(kernels.MAMBA1_OPS if mixer == "mamba1" else kernels.MAMBA2_OPS):
                    print(f"{mixer}: mamba_ssm lacks this mixer's kernels here; skipped")
                    continue
            torch.manual_seed(0)
            extra = {}
            if path.startswith("hf"):
                m = build_hf(mixer, D, args.layers, device).train()
                run = lambda inp, m=m: m(inputs_embeds=inp).last_hidden_state  # noqa: E731
                iters = args.hf_iters or args.iters
                warmup = args.warmup if args.hf_warmup is None else args.hf_warmup
            else:
                m = build_ours(mixer, D, args.layers, "kernels" if path == "kernels" else "torch", device).train()
                run = lambda inp, m=m: m(inp)[0]  # noqa: E731
                iters, warmup = args.iters, args.warmup
            if path.endswith("-compile"):
                cm = torch.compile(m, mode=None if args.compile_mode == "default" else args.compile_mode)
                eager = run
                run = ((lambda inp, cm=cm: cm(inputs_embeds=inp).last_hidden_state) if path.startswith("hf")
                       else (lambda inp, cm=cm: cm(inp)[0]))
                try:
                    extra = check_compiled(eager, run, list(m.parameters()), x)
                except Exception as e:  # noqa: BLE001 - a path that does not compile is reported, not fatal
                    print(f"{mixer:7s} {path}: torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append({"mixer": mixer, "path": path, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    continue
                extra["check_ok"] = max(extra["y_max_rel_diff"], extra["grad_max_rel_diff"]) <= args.check_tol
                extra["compile_mode"] = args.compile_mode
                print(f"{mixer:7s} {path}: first call (compile) {extra['first_call_s']:.1f} s; against eager: "
                      f"output {extra['y_max_abs_diff']:.2e} abs ({extra['y_max_rel_diff']:.2e} rel), gradients "
                      f"{extra['grad_max_rel_diff']:.2e} rel -> {'ok' if extra['check_ok'] else 'MISMATCH'}",
                      flush=True)
            s = time_train_step(run, list(m.parameters()), x, iters, warmup, device)
            res[path] = s
            rows.append({"mixer": mixer, "path": path, "s_per_step": s, "tokens_per_s": B * T / s, "iters": iters,
                         **extra})
            print(f"{mixer:7s} {path:12s} {s * 1000:9.1f} ms/step {B * T / s:10.0f} tok/s", flush=True)
            del m
        if "hf" in res and "ours" in res:
            rows.append({"mixer": mixer, "speedup_ours_vs_hf": res["hf"] / res["ours"]})
        if "hf" in res and "ours-compile" in res:
            rows.append({"mixer": mixer, "speedup_ours_compile_vs_hf": res["hf"] / res["ours-compile"]})
        if "hf-compile" in res and "ours-compile" in res:
            rows.append({"mixer": mixer, "speedup_ours_compile_vs_hf_compile": res["hf-compile"] / res["ours-compile"]})
        if "kernels" in res and "ours" in res:
            rows.append({"mixer": mixer, "speedup_kernels_vs_ours": res["ours"] / res["kernels"]})

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n### Mamba train-step throughput ({device}: {dev_name})\n")
    print(f"B={B}, T={T}, d_model={D}, {args.layers} layers, forward+backward, torch {torch.__version__}\n")
    print("| mixer | path | ms / step | tokens / s | speed-up |")
    print("|---|---|---:|---:|---:|")
    def ratio(mixer, key):
        return next((q[key] for q in rows if q.get("mixer") == mixer and key in q), None)

    for r in rows:
        if "path" not in r or "error" in r:
            continue
        sp = ""
        if r["path"] == "ours":
            hf = ratio(r["mixer"], "speedup_ours_vs_hf")
            sp = f"{hf:.1f}x vs hf" if hf else ""
        if r["path"] == "ours-compile":
            a, b = ratio(r["mixer"], "speedup_ours_compile_vs_hf"), ratio(r["mixer"], "speedup_ours_compile_vs_hf_compile")
            sp = ", ".join(([f"{a:.1f}x vs hf"] if a else []) + ([f"{b:.1f}x vs hf-compile"] if b else []))
        if r["path"] == "kernels":
            kr = ratio(r["mixer"], "speedup_kernels_vs_ours")
            sp = f"{kr:.1f}x vs ours" if kr else ""
        print(f"| {r['mixer']} | {r['path']} | {r['s_per_step'] * 1000:.1f} | {r['tokens_per_s']:.0f} | {sp} |")
    out = Path(args.json.format(device=device))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "device_name": dev_name, "autotune": args.autotune, "compile_mode": args.compile_mode, "batch": B, "seq": T, "d_model": D, "layers": args.layers,
               "torch": torch.__version__, "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
