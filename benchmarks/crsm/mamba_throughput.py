"""Train-step throughput of the `mamba` backbone against HuggingFace's slow path.

One train step = forward + backward of the bare backbone (4 blocks, no embedding/head) on
random embeddings ``(B, T, d_model)`` with loss ``mean(y^2)``. Compared, for each mixer:

* ``ours``     our pure-PyTorch path (chunked SSD scan / chunked selective-scan Function);
* ``hf``       ``transformers`` MambaModel / Mamba2Model with custom kernels disabled
               (their "slow" torch path; on CUDA the fast path is switched off explicitly);
* ``kernels``  (CUDA, when ``import mamba_ssm`` works) our backbone on mamba-ssm's kernels.

Same sizes and hyper-parameters for all (d_state 16 for mamba1; d_state 64, headdim 64,
chunk 64 for mamba2). Prints a markdown table and writes JSON.

    python benchmarks/crsm/mamba_throughput.py --device cpu --iters 2
    python benchmarks/crsm/mamba_throughput.py --device cuda --iters 20
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

    p = MambaParams(n_layers=n_layers, mixer=mixer, d_state=16 if mixer == "mamba1" else 64, headdim=64, chunk_size=64,
                    use_kernels="never" if impl == "torch" else "auto")
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
    ap.add_argument("--paths", default="ours,hf,kernels", help="subset of ours,hf,kernels")
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
    if "hf" in paths:
        os.environ.setdefault("USE_HUB_KERNELS", "0")  # before transformers imports: no kernels from the Hub
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: the HF comparison is skipped (pip install transformers)")
            paths.remove("hf")
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
            if path == "hf":
                m = build_hf(mixer, D, args.layers, device).train()
                run = lambda inp, m=m: m(inputs_embeds=inp).last_hidden_state
                iters = args.hf_iters or args.iters
                warmup = args.warmup if args.hf_warmup is None else args.hf_warmup
            else:
                m = build_ours(mixer, D, args.layers, "torch" if path == "ours" else "kernels", device).train()
                run = lambda inp, m=m: m(inp)[0]
                iters, warmup = args.iters, args.warmup
            s = time_train_step(run, list(m.parameters()), x, iters, warmup, device)
            res[path] = s
            rows.append({"mixer": mixer, "path": path, "s_per_step": s, "tokens_per_s": B * T / s, "iters": iters})
            print(f"{mixer:7s} {path:8s} {s * 1000:9.1f} ms/step {B * T / s:10.0f} tok/s", flush=True)
            del m
        if "hf" in res and "ours" in res:
            rows.append({"mixer": mixer, "speedup_ours_vs_hf": res["hf"] / res["ours"]})
        if "kernels" in res and "ours" in res:
            rows.append({"mixer": mixer, "speedup_kernels_vs_ours": res["ours"] / res["kernels"]})

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n### Mamba train-step throughput ({device}: {dev_name})\n")
    print(f"B={B}, T={T}, d_model={D}, {args.layers} layers, forward+backward, torch {torch.__version__}\n")
    print("| mixer | path | ms / step | tokens / s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "path" not in r:
            continue
        sp = ""
        if r["path"] == "ours":
            hf = next((q["speedup_ours_vs_hf"] for q in rows if q.get("mixer") == r["mixer"] and "speedup_ours_vs_hf" in q), None)
            sp = f"{hf:.1f}x vs hf" if hf else ""
        if r["path"] == "kernels":
            kr = next((q["speedup_kernels_vs_ours"] for q in rows if q.get("mixer") == r["mixer"] and "speedup_kernels_vs_ours" in q), None)
            sp = f"{kr:.1f}x vs ours" if kr else ""
        print(f"| {r['mixer']} | {r['path']} | {r['s_per_step'] * 1000:.1f} | {r['tokens_per_s']:.0f} | {sp} |")
    out = Path(args.json.format(device=device))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "device_name": dev_name, "autotune": args.autotune, "batch": B, "seq": T, "d_model": D, "layers": args.layers,
               "torch": torch.__version__, "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
