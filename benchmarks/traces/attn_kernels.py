"""Attention kernels for the traces bias, forward + backward (CUDA; a diagnostic for step_time.py).

    python benchmarks/traces/attn_kernels.py                # B=16, H=8, T=1024, head_dim 64, bf16
    python benchmarks/traces/attn_kernels.py --json k.json  # also write the timings (step_time.py --tiles-from)

Times ``out.backward(g)`` after one attention call (median of ``--reps`` calls, each timed with
CUDA events), against the traces-off path (SDPA causal: cuDNN's fused kernel on an H100, as
our transformer and nanoGPT run it; flash forced for reference):

* FlexAttention with the relative-offset bias ``bias[h, i - j]`` as a score_mod (compiled,
  block-sparse causal mask), with a non-grad bias (fixed alpha, the default) for each tile
  choice in :data:`TILES`, and once with a bias that needs a gradient (learnable alpha);
* FlexAttention causal with no score_mod: what the bias itself costs inside FlexAttention;
* SDPA with the bias as a dense float mask ``(1, H, T, T)``, through the memory-efficient and
  the cuDNN backends. A float mask cannot be combined with ``is_causal``, so these kernels
  compute the masked upper triangle too;
* the transformer's biased path (``attention: auto``): SDPA with the float mask built from the
  bias vector, split into 1, 2, 4, 8 query blocks (``bias_chunks``) that skip most of the
  masked triangle (mask building included).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

# FlexAttention kernel options. Keys with a fwd_ / bwd_ prefix apply to one pass only; what is not
# given is Inductor's default for the GPU (on an H100 with head_dim 64: forward 128x128, 3 stages,
# 4 warps; backward 64/128/128/64, 3 stages, 8 warps).
TILES: dict[str, dict | None] = {
    "small (fwd 64x64 s2, bwd 32/64/64/32 s2)": {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2,
                                                "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    "inductor defaults": None,
    "fwd 128x64 s3, bwd default": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
    "fwd 128x64 s3, bwd 64x64 s3 w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
                                       "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                                       "bwd_num_stages": 3, "bwd_num_warps": 4},
    "fwd 128x64 s3 w8, bwd 64/128/128/64 s2 w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3,
                                                  "fwd_num_warps": 8, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128,
                                                  "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_stages": 2,
                                                  "bwd_num_warps": 8},
}


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, each between CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="write {kernel: ms} to this file")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention cases (their compiles take most of the time)")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.cache_size_limit = 64  # one compiled variant per (bias, tiles)
    B, H, T, hd = a.B, a.H, a.T, a.hd
    dev = "cuda"
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16)
    bias = torch.rand(H, T + 129, device=dev) * 0.1  # alpha * M by offset, as the transformer forms it
    bias_grad = bias.clone().requires_grad_(True)
    n = T + 128
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T, device=dev)
    off = torch.arange(T, device=dev)[:, None] - torch.arange(T, device=dev)[None, :]  # (T, T)
    dense = bias[:, off.clamp(min=0)].masked_fill(off < 0, float("-inf")).to(torch.bfloat16)[None]  # (1, H, T, T)

    res: dict[str, float] = {}

    def sdpa(backend, mask=None):
        def run():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).backward(g)
        return run

    from traces_crystallize.transformer import _biased_sdpa

    for chunks in (1, 2, 4, 8):  # the transformer's biased path: default backend choice, query blocks
        res[f"SDPA + bias mask in {chunks} query blocks (transformer path)"] = timed(
            lambda c=chunks: _biased_sdpa(q, k, v, bias[:, :T], 0, c, 0.0).backward(g), a.reps)
    for name, backend, mask in (("SDPA causal (default choice)", None, None),
                                ("SDPA causal, cuDNN", SDPBackend.CUDNN_ATTENTION, None),
                                ("SDPA causal, flash", SDPBackend.FLASH_ATTENTION, None),
                                ("SDPA + float bias mask, mem-efficient", SDPBackend.EFFICIENT_ATTENTION, dense),
                                ("SDPA + float bias mask, cuDNN", SDPBackend.CUDNN_ATTENTION, dense)):
        try:
            fn = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)) if backend is None \
                else sdpa(backend, mask)
            res[name] = timed(fn, a.reps)
        except Exception as e:  # noqa: BLE001 - a backend that refuses the inputs is a result too
            res[name] = float("nan")
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def flex_case(label: str, b, opts, with_bias: bool = True) -> None:
        def score_mod(s, bb, h, i, j, b=b):
            return s + b[h, (i - j).clamp(0, n)]

        @torch.compile
        def f(q, k, v):
            return flex_attention(q, k, v, score_mod=score_mod if with_bias else None, block_mask=block_mask,
                                  kernel_options=opts)

        try:
            res[label] = timed(lambda: f(q, k, v).backward(g), a.reps)
        except Exception as e:  # noqa: BLE001 - a tile choice that does not fit is a result too
            res[label] = float("nan")
            print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    first = next(iter(TILES))
    if not a.no_flex:
        flex_case(f"flex causal, no score_mod, {first}", None, TILES[first], with_bias=False)
        flex_case("flex causal, no score_mod, inductor defaults", None, None, with_bias=False)
        for name, opts in TILES.items():
            flex_case(f"flex + bias, fixed, {name}", bias, opts)
        flex_case(f"flex + bias, learnable, {first}", bias_grad, TILES[first])

    base = res["SDPA causal (default choice)"]
    print(f"### Attention forward+backward, B={B} H={H} T={T} hd={hd} bf16 ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})\n")
    print("| kernel | ms | / SDPA causal |\n|---|---|---|")
    for k_, t in res.items():
        print(f"| {k_} | {t:.3f} | {t / base:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
