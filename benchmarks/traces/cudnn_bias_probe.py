"""Probe: cuDNN's fused attention with the traces bias and the causal mask in one kernel (CUDA).

    python benchmarks/traces/cudnn_bias_probe.py            # B=16, H=8, T=1024, head_dim 64, bf16

SDPA refuses a float mask together with ``is_causal``, so the transformer's biased path passes
the causal mask as ``-inf`` entries of the float mask and cuDNN computes the whole square. The
op SDPA dispatches to, ``aten._scaled_dot_product_cudnn_attention``, takes a bias *and*
``is_causal``. This script checks that op against an fp32 reference (output and the gradients
of q, k, v) and times forward + backward against SDPA causal and the mask path, eager and
compiled, with a profile of the kernels each path launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_kernels import timed  # noqa: E402


def toeplitz(bias: torch.Tensor, T: int) -> torch.Tensor:
    """``bias (H, T)`` by offset -> ``(H, T, T)`` with ``[h, i, j] = bias[h, i - j]`` below the diagonal, 0 above."""
    i = torch.arange(T, device=bias.device)
    off = i[:, None] - i[None, :]  # (T, T)
    return bias[:, off.clamp(min=0)] * (off >= 0)  # (H, T, T)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    B, H, T, hd = a.B, a.H, a.T, a.hd
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, hd, device=dev, dtype=dt)
    bias_vec = 0.1 * torch.randn(H, T, device=dev)  # alpha * M by offset; sparse in practice, dense here
    tb = toeplitz(bias_vec, T).to(dt)  # (H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = tb.masked_fill(~causal, float("-inf"))  # the current path's float mask (H, T, T)

    def cudnn_causal_bias(q, k, v, bias):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, True, False)[0]

    # fp32 reference
    def ref():
        s = (q.float() @ k.float().transpose(-1, -2)) / hd**0.5 + tb.float()[None]
        s = s.masked_fill(~causal, float("-inf"))
        return torch.softmax(s, -1) @ v.float()

    def grads(fn):
        for t in (q, k, v):
            t.grad = None
        o = fn()
        o.backward(g.to(o.dtype))
        return o.detach().float(), [t.grad.float().clone() for t in (q, k, v)]

    o_ref, g_ref = grads(ref)
    variants = {
        "sdpa causal (traces off)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa + float mask (1,H,T,T) (current)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None]),
        "cudnn op, causal + bias expanded (B,H,T,T) stride 0": lambda: cudnn_causal_bias(q, k, v, tb[None].expand(B, H, T, T)),
        "cudnn op, causal + bias (1,H,T,T)": lambda: cudnn_causal_bias(q, k, v, tb[None]),
        "cudnn op, causal + bias materialised (B,H,T,T)": lambda: cudnn_causal_bias(q, k, v, tb[None].expand(B, H, T, T).contiguous()),
        "cudnn op, causal + mask-with-inf (1,H,T,T)": lambda: cudnn_causal_bias(q, k, v, mask[None]),
    }
    base = None
    for name, fn in variants.items():
        try:
            o, gs = grads(fn)
            if "off" not in name:
                err = [(o - o_ref).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(gs, g_ref)]
                errs = " ".join(f"{e:.3g}" for e in err)
            else:
                errs = "-"
            ms = timed(lambda: fn().backward(g), a.reps)
            base = base or ms
            print(f"{name:55s} fwd+bwd {ms:7.3f} ms  x{ms / base:5.2f}   max err out,dq,dk,dv vs fp32: {errs}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:55s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)

    # references' own bf16 error scale
    o, gs = grads(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None]))
    print("bf16 scale (current path vs fp32):", " ".join(f"{x:.3g}" for x in
          [(o - o_ref).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(gs, g_ref)]))

    # compiled: the op inside torch.compile, bias built from the vector inside the graph
    def layer_new(q, k, v, bias_vec):
        return cudnn_causal_bias(q, k, v, toeplitz(bias_vec, T).to(q.dtype)[None].expand(B, H, T, T))

    def layer_cur(q, k, v, bias_vec):
        i = torch.arange(T, device=q.device)
        off = i[:, None] - i[None, :]
        m = bias_vec[:, off.clamp(min=0)].masked_fill(off < 0, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m[None])

    for name, f in [("compiled current (mask built in graph)", layer_cur), ("compiled cudnn causal+bias (built in graph)", layer_new)]:
        try:
            cf = torch.compile(f)
            o, gs = grads(lambda: cf(q, k, v, bias_vec))
            err = [(o - o_ref).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(gs, g_ref)]
            ms = timed(lambda: cf(q, k, v, bias_vec).backward(g), a.reps)
            print(f"{name:55s} fwd+bwd {ms:7.3f} ms  x{ms / base:5.2f}   err {' '.join(f'{e:.3g}' for e in err)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:55s} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)

    # which kernels each eager path launches
    from torch.profiler import ProfilerActivity, profile
    for name in ["sdpa + float mask (1,H,T,T) (current)", "cudnn op, causal + bias expanded (B,H,T,T) stride 0"]:
        fn = variants[name]
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn().backward(g)
                torch.cuda.synchronize()
            print(f"\n== kernels: {name} (5 calls)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
        except Exception as e:  # noqa: BLE001
            print(f"profile {name} FAILED: {e}")


if __name__ == "__main__":
    main()
