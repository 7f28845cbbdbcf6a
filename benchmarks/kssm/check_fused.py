"""The fused Triton recurrence against the reference PyTorch loop on this device: values and
gradients, both integrators (tests/test_fused.py does the same on tiny sizes under pytest).

    python benchmarks/kssm/check_fused.py --device cuda
"""

from __future__ import annotations

import argparse
import math

import torch

from kssm_oscillators.kssm import KuramotoLayer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8,16,128", help="B,T,N")
    args = ap.parse_args()
    B, T, N = (int(v) for v in args.shape.split(","))
    worst = 0.0
    for integrator in ("euler", "split"):
        for substeps, horizon in ((1, 4), (2, 0)):
            layer = KuramotoLayer(8, n_oscillators=N, group_levels=[1], substeps=substeps, grad_horizon=horizon,
                                  integrator=integrator).train()
            g = torch.Generator().manual_seed(substeps)
            ins = [(torch.rand(B, N, generator=g) * 2 - 1) * math.pi] + [torch.randn(B, T, N, generator=g) * 0.5
                                                                           for _ in range(4)]
            w = torch.randn(B, T, N, generator=g).to(args.device)
            res = {}
            for kernel in ("torch", "triton"):
                layer.kernel = kernel
                x = [t.to(args.device).requires_grad_() for t in ins]
                out = layer.integrate(*x)
                res[kernel] = (out.detach(), torch.autograd.grad((torch.sin(out) * w).sum(), x))
            d_out = (res["torch"][0] - res["triton"][0]).abs().max().item()
            d_grad = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                         for a, b in zip(res["triton"][1], res["torch"][1]))
            worst = max(worst, d_grad)
            print(f"{integrator:6s} substeps {substeps} horizon {horizon}: max |phase diff| {d_out:.2e}, "
                  f"max relative grad diff {d_grad:.2e}", flush=True)
    print("fused kernel check:", "OK" if worst < 1e-2 else "MISMATCH")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
