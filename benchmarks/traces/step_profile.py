"""Where the biased training step's time goes: the CUDA kernels of ``step_time.py``'s models.

    python benchmarks/traces/step_profile.py --variants off,auto,sdpa   # H100

Builds the models of ``step_time.py`` (8 layers, 8 heads, 512 wide, batch 16, T=1024, bf16,
compiled, traces populated), warms each up, then profiles ``--steps`` steps of each and prints
its kernels by total CUDA time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import Runner, make, populate
from traces_crystallize import transformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="off,auto,sdpa", help="off, or an attention setting (auto, sdpa, flex)")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--sort", default="self_cuda_time_total", help="profiler table order, e.g. self_cpu_time_total")
    a = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 32
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    x = torch.randint(0, 256, (16, a.T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    for name in a.variants.split(","):
        torch.manual_seed(0)
        model = make(name != "off", 512, 8, 8, a.T, 256, attention="auto" if name == "off" else name).to(dev)
        if name != "off":
            populate(model, x[:, :-1])
        r = Runner(model, x, True, True, capture=None if name == "off" else False, tiles=transformer._FLEX_KERNEL_OPTIONS)
        for _ in range(5):
            r.step(record=False)
        for _ in range(20):
            r.step(record=True)
        alone = sorted(r.times)[10]
        r.times.clear()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                r.step(record=True)
        print(f"\n== {name}: median step {alone * 1e3:.2f} ms over 20 unprofiled steps, "
              f"{sorted(r.times)[len(r.times) // 2] * 1e3:.2f} ms over {a.steps} profiled", flush=True)
        print(prof.key_averages().table(sort_by=a.sort, row_limit=a.rows, max_name_column_width=90), flush=True)


if __name__ == "__main__":
    main()
