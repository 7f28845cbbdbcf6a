"""Trace-store benchmark: top-k retrieval latency, coarse recall, ingest throughput, flat memory.

    python benchmarks/then/store_bench.py --device cpu --traces 1000000
    python benchmarks/then/store_bench.py --device cuda --traces 10000000

What it does (d = --dim, fixed --hot / --warm budgets, cold chunks of --chunk traces):
1. ingests --traces synthetic traces (keys: a mixture of --centers Gaussian clusters, the
   structure real trace keys have; values random) in batches of --batch, timing throughput
   and sampling the process RSS (and GPU memory) every --sample-every traces;
2. k = --k retrieval over every tier: exact (cold tier streamed from mmap in blocks) and
   coarse (k-means lists, --nprobe lists probed), one query at a time, p50/p99 latency, and
   recall@k of coarse against exact;
3. model ingest: tokens/s of a `then` memory (token traces, d_model = dim) writing into a store.
Prints a markdown section and writes it (plus a JSON) next to this script, in results/.
The store goes to --root (default: a temporary directory, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from then_memory.memory import ThenMemory
from then_memory.store import TraceStore


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MiB: VmRSS (all), RssAnon (heap: what the budgets bound), RssFile
    (mapped file pages: the cold tier read through mmap, which the OS reclaims under pressure)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--traces", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hot", type=int, default=65_536, help="hot budget (traces)")
    ap.add_argument("--warm", type=int, default=262_144, help="warm budget (traces)")
    ap.add_argument("--chunk", type=int, default=65_536, help="traces per cold chunk")
    ap.add_argument("--lists", type=int, default=1024, help="coarse lists (k-means centroids)")
    ap.add_argument("--nprobe", default="32", help="lists probed; a comma list (16,32,64) sweeps the trade-off")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--centers", type=int, default=4096, help="clusters of the synthetic keys")
    ap.add_argument("--queries", type=int, default=100, help="coarse queries timed")
    ap.add_argument("--exact-queries", type=int, default=20, help="exact queries timed (and recall reference)")
    ap.add_argument("--batch", type=int, default=8192, help="traces per append")
    ap.add_argument("--sample-every", type=int, default=250_000)
    ap.add_argument("--root", default=None, help="store directory (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="then-bench-"))
    if (root / "index.safetensors").exists():
        print(f"{root} already holds a store; give an empty --root", file=sys.stderr)
        return 2
    d = args.dim
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.centers, d, generator=g)

    def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, args.centers, (n,), generator=g)
        k = centers[idx] + 0.5 * torch.randn(n, d, generator=g)
        return k, torch.randn(n, d, generator=g)

    store = TraceStore(root, d, hot_budget=args.hot, warm_budget=args.warm, chunk_traces=args.chunk,
                       device=dev, coarse_lists=args.lists)
    budgets = store.memory_bytes()
    rss0 = rss_mb()
    samples = []
    gen_s = 0.0
    t_start = time.perf_counter()
    n = 0
    while n < args.traces:
        m = min(args.batch, args.traces - n)
        t0 = time.perf_counter()
        k, v = make_batch(m)
        gen_s += time.perf_counter() - t0
        store.append(k, v)
        n += m
        if n % args.sample_every < args.batch or n == args.traces:
            gpu = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
            samples.append({"traces": n, "rss_mb": round(rss_mb(), 1), "anon_mb": round(rss_mb("RssAnon"), 1),
                            "file_mb": round(rss_mb("RssFile"), 1), "gpu_mb": round(gpu, 1),
                            "hot": store.hot.n, "warm": store.warm.n, "cold": store.n_cold})
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ingest_s = time.perf_counter() - t_start - gen_s
    disk = store.memory_bytes()["cold_disk"]

    # queries drawn like the keys
    qs, _ = make_batch(max(args.queries, args.exact_queries))

    def timed(fn, q):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        r = fn(q)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return r, (time.perf_counter() - t0) * 1000

    store.search(qs[:1], args.k)  # warm-up (page cache, kernels)
    nprobes = [int(x) for x in str(args.nprobe).split(",")]
    store.search(qs[:1], args.k, coarse=True, nprobe=nprobes[0])
    exact_ms = []
    exact_ids = []
    for i in range(args.exact_queries):
        r, ms = timed(lambda q: store.search(q, args.k), qs[i : i + 1])
        exact_ms.append(ms)
        exact_ids.append(set(r.ids[0].tolist()))
    sweep = []  # per nprobe: latency over --queries, recall over the exact queries
    for npb in nprobes:
        ms_list, rec = [], []
        for i in range(args.queries):
            r, ms = timed(lambda q: store.search(q, args.k, coarse=True, nprobe=npb), qs[i : i + 1])
            ms_list.append(ms)
            if i < args.exact_queries:
                rec.append(len(exact_ids[i] & set(r.ids[0].tolist())) / args.k)
        sweep.append({"nprobe": npb, "p50_ms": pct(ms_list, 50), "p99_ms": pct(ms_list, 99),
                      "recall": statistics.mean(rec)})
        print(f"nprobe {npb}: p50 {sweep[-1]['p50_ms']:.2f} ms p99 {sweep[-1]['p99_ms']:.2f} ms "
              f"recall@{args.k} {sweep[-1]['recall']:.3f}", flush=True)
    main_row = sweep[0]

    # model ingest through a `then` memory writing token traces into a fresh store
    mem = ThenMemory(d, n_heads=4, chunk_size=16, window=32, ring_size=256, top_k=16).to(dev).eval()
    mroot = Path(tempfile.mkdtemp(prefix="then-bench-model-"))
    mem.attach_store(TraceStore(mroot, d, hot_budget=args.hot, warm_budget=args.warm, chunk_traces=args.chunk, device=dev))
    x = torch.randn(1, 512, d, device=dev)
    state = None
    n_tok = 0
    with torch.no_grad():
        mem(x, None)  # warm-up (writes to the store too; counted in n_tok below)
        mem.attach_store(TraceStore(Path(tempfile.mkdtemp(dir=mroot)), d, hot_budget=args.hot, warm_budget=args.warm,
                                    chunk_traces=args.chunk, device=dev))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 10.0:
            _, state, _ = mem(x, state)
            n_tok += x.shape[1]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        model_tok_s = n_tok / (time.perf_counter() - t0)
    shutil.rmtree(mroot, ignore_errors=True)

    res = {
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "traces": args.traces, "dim": d, "k": args.k, "hot_budget": args.hot, "warm_budget": args.warm,
        "chunk": args.chunk, "lists": args.lists, "nprobe": args.nprobe,
        "ingest_traces_per_s": args.traces / ingest_s, "ingest_s": ingest_s,
        "exact_p50_ms": pct(exact_ms, 50), "exact_p99_ms": pct(exact_ms, 99),
        "coarse_p50_ms": main_row["p50_ms"], "coarse_p99_ms": main_row["p99_ms"],
        "coarse_recall_at_k": main_row["recall"], "nprobe_sweep": sweep,
        "model_ingest_tokens_per_s": model_tok_s,
        "hot_mb": budgets["hot"] / 2**20, "warm_mb": budgets["warm"] / 2**20, "cold_disk_mb": disk / 2**20,
        "rss_start_mb": rss0, "rss_samples": samples,
    }
    rss = [s["rss_mb"] for s in samples]
    gpu = [s["gpu_mb"] for s in samples]
    lines = [
        f"### {args.traces:,} traces, d={d}, {res['device']}",
        "",
        f"command: `python {' '.join(sys.argv)}`"
        f" (hot {args.hot:,} / warm {args.warm:,} traces = {res['hot_mb']:.0f} / {res['warm_mb']:.0f} MiB, "
        f"chunks of {args.chunk:,}, {args.lists} lists)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| exact top-{args.k} p50 / p99 | {res['exact_p50_ms']:.1f} / {res['exact_p99_ms']:.1f} ms ({args.exact_queries} queries) |",
        *[f"| coarse top-{args.k}, nprobe {r['nprobe']}: p50 / p99, recall@{args.k} vs exact | {r['p50_ms']:.1f} / "
          f"{r['p99_ms']:.1f} ms ({args.queries} queries), recall {r['recall']:.3f} |" for r in sweep],
        f"| store ingest | {res['ingest_traces_per_s']:,.0f} traces/s ({ingest_s:.1f} s) |",
        f"| model ingest (then memory, token traces, T=512 segments) | {model_tok_s:,.0f} tokens/s |",
        f"| RSS while ingesting (min / max over {len(rss)} samples) | {min(rss):.0f} / {max(rss):.0f} MiB |",
        f"| of which heap (RssAnon) / mapped files (RssFile), min / max | "
        f"{min(s['anon_mb'] for s in samples):.0f} / {max(s['anon_mb'] for s in samples):.0f} MiB; "
        f"{min(s['file_mb'] for s in samples):.0f} / {max(s['file_mb'] for s in samples):.0f} MiB |",
        f"| GPU memory allocated (min / max) | {min(gpu):.0f} / {max(gpu):.0f} MiB |",
        f"| cold tier on disk | {res['cold_disk_mb']:.0f} MiB |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print("RSS samples:", json.dumps(samples))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{dev.type}-{args.traces}-{args.lists}"
    (out / f"store_{tag}.json").write_text(json.dumps(res, indent=1))
    (out / f"store_{tag}.md").write_text(text + "\n")
    store.close()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
