"""Attention kernels for the traces bias, forward + backward (CUDA; a diagnostic for step_time.py).

    python benchmarks/traces/attn_kernels.py                # B=16, H=8, T=1024, head_dim 64, bf16

Times ``out.backward()`` after one attention call: SDPA causal (flash, the traces-off path)
against FlexAttention with the relative-offset bias ``bias[h, i - j]`` as a score_mod
(compiled, block-sparse causal mask), with a non-grad bias (fixed alpha) and a bias that
needs a gradient (learnable alpha), for several kernel tile options.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

OPTIONS = {
    "inductor defaults": None,
    "transformer.py tiles": "module",
    "64x64, 3 stages": {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 3},
    "128x64 fwd, 3 stages": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3},
}


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    from traces_crystallize import transformer

    torch._dynamo.config.cache_size_limit = 64  # one compiled variant per (bias, tiles)
    B, H, T, hd = a.B, a.H, a.T, a.hd
    dev = "cuda"
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16)
    bias = (torch.rand(H, T + 129, device=dev) * 0.1)
    bias_grad = bias.clone().requires_grad_(True)
    n = T + 128
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T, device=dev)

    def flash():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    res = {"SDPA causal (flash)": timed(flash, a.reps)}
    for name, opts in OPTIONS.items():
        if opts == "module":
            opts = transformer._FLEX_KERNEL_OPTIONS
        for label, b in (("fixed bias", bias), ("learnable bias", bias_grad)):
            def score_mod(s, bb, h, i, j, b=b):
                return s + b[h, (i - j).clamp(0, n)]

            @torch.compile
            def f(q, k, v, score_mod=score_mod, opts=opts):
                return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)

            try:
                res[f"flex + bias, {label}, {name}"] = timed(lambda: f(q, k, v).backward(g), a.reps)
            except Exception as e:  # noqa: BLE001 - a tile choice that does not fit is a result too
                res[f"flex + bias, {label}, {name}"] = float("nan")
                print(f"{label}, {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    base = res["SDPA causal (flash)"]
    print(f"### Attention forward+backward, B={B} H={H} T={T} hd={hd} bf16 ({torch.cuda.get_device_name()})\n")
    print("| kernel | ms | / flash |\n|---|---|---|")
    for k_, t in res.items():
        print(f"| {k_} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
