"""Speed of crsd-memory's fast forms against their sequential references, and the cost of a
memory placed after one backbone layer.

    python benchmarks/crsd/memory_bench.py --device cpu
    python benchmarks/crsd/memory_bench.py --device cuda

Measures (forward passes, no gradient, median of --repeats after a warm-up):
  1. Hebbian: chunked parallel forward vs the token-by-token reference, T=2048, 4 heads of
     d=64 (d_model 256), batch --batch. Goal: >= 10x.
  2. Episodic: chunk-parallel forward vs the token-by-token reference, same T and d_key=64.
  3. Overhead: training tokens/s (forward + backward) of a backbone with `dual` after layer 0
     over the plain backbone (mamba if installed, else toy-rnn), and the same for `crsd`.
Figures are printed and written as a section of benchmarks/crsd/RESULTS.md (one section per
device, replaced on each run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import statelab
from statelab.plugins import get_registry

from crsd_memory.episodic import EpisodicRecall, episodic_chunked
from crsd_memory.hebbian import HebbianRecall, hebbian_chunked
from crsd_memory.reference import episodic_sequence, hebbian_sequence

RESULTS = Path(__file__).with_name("RESULTS.md")


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``fn()`` after one warm-up, in seconds (the minimum is the
    figure least disturbed by other processes on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_hebbian(B: int, T: int, device, repeats: int, chunk: int) -> dict:
    core = HebbianRecall(256, 256, n_heads=4, d_head=64, chunk_size=chunk).to(device)
    x = torch.randn(B, T, 256, device=device)
    H0 = core.init_state(B, device)["H"]
    with torch.no_grad():
        q, k, v = core._project(x)
        g, e = core.gamma(), core.eta()
        # the recurrence alone, on the same projected q, k, v
        fast = lambda: hebbian_chunked(q, k, v, H0, g, e, core.temperature, core.topk, core.chunk_size)  # noqa: E731
        ref = lambda: hebbian_sequence(q, k, v, H0, g, e, core.temperature, core.topk)  # noqa: E731
        t_fast = timeit(fast, device, repeats)
        t_ref = timeit(ref, device, max(1, repeats // 2))
        # the whole memory (projections included): chunked forward vs the same projections + reference loop
        t_module = timeit(lambda: core(x, {"H": H0}), device, repeats)
        t_module_ref = t_ref + (t_module - t_fast)
        r_fast, H_fast = fast()
        r_ref, H_ref = ref()
        err = max((r_fast - r_ref).abs().max().item(), (H_fast - H_ref).abs().max().item())
    return {"fast_s": t_fast, "ref_s": t_ref, "speedup": t_ref / t_fast, "max_abs_diff": err,
            "module_s": t_module, "module_ref_s": t_module_ref, "module_speedup": t_module_ref / t_module}


def bench_episodic(B: int, T: int, device, repeats: int, slots: int, chunk: int) -> dict:
    core = EpisodicRecall(256, 256, slots=slots, d_key=64, chunk_size=chunk).to(device)
    x = torch.randn(B, T, 256, device=device)
    s0 = core.init_state(B, device)
    with torch.no_grad():
        q, k, v, z = core._project(x)
        kw = dict(temperature=core.temperature, topk=core.topk, window=core.window, recency=core.recency)
        fast = lambda: episodic_chunked(q, k, v, z, dict(s0), chunk_size=core.chunk_size, **kw)  # noqa: E731
        ref = lambda: episodic_sequence(q, k, v, z, dict(s0), **kw)  # noqa: E731
        t_fast = timeit(fast, device, repeats)
        t_ref = timeit(ref, device, max(1, repeats // 2))
        t_module = timeit(lambda: core(x, s0), device, repeats)
        t_module_ref = t_ref + (t_module - t_fast)
        r_fast, s = fast()
        r_ref, s_ref = ref()
        err = (r_fast - r_ref).abs().max().item()
        same_slots = bool(torch.equal(s["slot_t"], s_ref["slot_t"]))
    return {"fast_s": t_fast, "ref_s": t_ref, "speedup": t_ref / t_fast, "max_abs_diff": err, "same_slots": same_slots,
            "module_s": t_module, "module_ref_s": t_module_ref, "module_speedup": t_module_ref / t_module}


def train_tokens_per_s(spec: dict, B: int, T: int, device, repeats: int) -> tuple[float, int]:
    model = statelab.build(spec).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tok = torch.randint(0, model.vocab_size, (B, T), device=device)

    def step():
        logits, _, _ = model(tok)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return B * T / timeit(step, device, repeats), model.num_parameters()


def bench_overhead(B: int, T: int, d_model: int, device, repeats: int) -> list[dict]:
    reg = get_registry()
    if ("backbone", "mamba") in reg:
        # pure PyTorch Mamba-2: mamba-ssm's Triton SSD kernels take minutes to compile and autotune in a
        # fresh process and ran no faster on the H100 (docs/benchmarks.md, crsm-planner)
        base = {"kind": "mamba", "n_layers": 2, "mixer": "mamba2", "d_state": 64, "headdim": 32,
                "use_kernels": "never"}
    else:
        base = {"kind": "toy-rnn", "n_layers": 2, "d_state": 64}
        os.environ.setdefault("STATELAB_PLUGIN_MODULES", "statelab.testing.toys")
    dual = {"kind": "dual", "after_layer": 0, "hebbian": {"n_heads": 4}, "episodic": {"slots": 32}}
    rows = []
    for label, backbone, mems in [
        (f"{base['kind']}", base, []),
        (f"{base['kind']} + dual after layer 0", base, [dual]),
        ("crsd (dual memory in every cell)", {"kind": "crsd", "n_layers": 2}, []),
        ("crsd without memory", {"kind": "crsd", "n_layers": 2, "memory": False}, []),
    ]:
        model = {"d_model": d_model, "vocab_size": 256, "backbone": backbone, "memories": mems}
        spec = {"name": "bench", "model": model,
                "tracking": {"enabled": False}}
        tps, n = train_tokens_per_s(spec, B, T, device, repeats)
        rows.append({"model": label, "tokens_per_s": tps, "params": n})
    base_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["relative"] = r["tokens_per_s"] / base_tps
    return rows


def write_section(path: Path, device_label: str, body: str) -> None:
    default = "# crsd-memory benchmarks\n\nWritten by `benchmarks/crsd/memory_bench.py`.\n"
    text = path.read_text() if path.exists() else default
    head = f"## {device_label}\n"
    parts = text.split("\n## ")
    kept = [parts[0]] + ["## " + p for p in parts[1:] if not ("## " + p).startswith(head)]
    new = "\n".join(p.rstrip("\n") + "\n" for p in kept) + "\n" + head + body
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the memory benchmarks")
    ap.add_argument("--T", type=int, default=2048, help="sequence length of the memory benchmarks")
    ap.add_argument("--slots", type=int, default=64, help="episodic slots")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None,
                    help="chunk length of the fast forms (default 64, the params default)")
    ap.add_argument("--overhead-batch", type=int, default=8)
    ap.add_argument("--overhead-T", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=128, help="d_model of the overhead benchmark")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only part 3 (training tokens/s with and without memories); skips the slow references")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown file to update (one section per device)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}")

    chunk = args.chunk or 64
    if args.overhead_only:
        rows = bench_overhead(args.overhead_batch, args.overhead_T, args.d_model, device, max(2, args.repeats))
        for r in rows:
            print(f"train {r['model']:<36} {r['tokens_per_s']:>10,.0f} tok/s  x{r['relative']:.2f}  "
                  f"({r['params']:,} params)")
        return 0
    chunk = args.chunk or 64
    h = bench_hebbian(args.batch, args.T, device, args.repeats, chunk)
    print(f"hebbian  T={args.T} B={args.batch} 4x64: chunked {h['fast_s']*1e3:.1f} ms, "
          f"reference {h['ref_s']*1e3:.1f} ms, "
          f"speedup {h['speedup']:.1f}x (max |diff| {h['max_abs_diff']:.1e}); with projections "
          f"{h['module_s']*1e3:.1f} vs {h['module_ref_s']*1e3:.1f} ms, {h['module_speedup']:.1f}x")
    e = bench_episodic(args.batch, args.T, device, args.repeats, args.slots, chunk)
    print(f"episodic T={args.T} B={args.batch} S={args.slots} d=64: fast {e['fast_s']*1e3:.1f} ms, "
          f"reference {e['ref_s']*1e3:.1f} ms, "
          f"speedup {e['speedup']:.1f}x (max |diff| {e['max_abs_diff']:.1e}, same slots: {e['same_slots']}); with "
          f"projections {e['module_s']*1e3:.1f} vs {e['module_ref_s']*1e3:.1f} ms, {e['module_speedup']:.1f}x")
    rows = bench_overhead(args.overhead_batch, args.overhead_T, args.d_model, device, max(2, args.repeats // 2))
    for r in rows:
        print(f"train {r['model']:<36} {r['tokens_per_s']:>10,.0f} tok/s  x{r['relative']:.2f}  "
              f"({r['params']:,} params)")

    cmd = f"python benchmarks/crsd/memory_bench.py --device {args.device}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    body = [f"`{cmd}` ({name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
            f"{os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the end of the run)\n",
            "Memory forward passes (no gradient), fastest of the repeats. *Recurrence*: the fast form and the "
            "token-by-token reference on the same projected q, k, v. *Whole memory*: projections included: "
            "the module's "
            "forward, against the reference time plus the same projections (module forward minus fast recurrence).\n",
            "| memory | T | batch | fast (ms) | reference (ms) | speedup | whole memory: fast / reference (ms) "
            "| speedup "
            "| max abs diff |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| hebbian, 4 heads x d=64, chunk {chunk} | {args.T} | {args.batch} | {h['fast_s']*1e3:.1f} | "
            f"{h['ref_s']*1e3:.1f} | "
            f"{h['speedup']:.1f}x | {h['module_s']*1e3:.1f} / {h['module_ref_s']*1e3:.1f} | {h['module_speedup']:.1f}x "
            f"| {h['max_abs_diff']:.1e} |",
            f"| episodic, {args.slots} slots, d_key=64, chunk {chunk} | {args.T} | {args.batch} | "
            f"{e['fast_s']*1e3:.1f} | "
            f"{e['ref_s']*1e3:.1f} | {e['speedup']:.1f}x | {e['module_s']*1e3:.1f} / {e['module_ref_s']*1e3:.1f} | "
            f"{e['module_speedup']:.1f}x | {e['max_abs_diff']:.1e} (slots identical: {e['same_slots']}) |",
            "",
            f"Training throughput (forward + backward + AdamW), d_model {args.d_model}, batch {args.overhead_batch} x "
            f"{args.overhead_T} tokens, vocabulary 256:\n",
            "| model | tokens/s | relative to the plain backbone | parameters |",
            "|---|---|---|---|"]
    body += [f"| {r['model']} | {r['tokens_per_s']:,.0f} | {r['relative']:.2f} | {r['params']:,} |" for r in rows]
    if not args.no_write:
        write_section(args.out, f"{device.type}: {name}", "\n".join(body) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
