"""The phase recurrence of a K-SSM layer as one Triton kernel per pass (forward and backward).

The reference is :meth:`kssm_oscillators.kssm.KuramotoLayer.integrate` (a Python loop of
``T x substeps`` mean-field Euler steps, each a handful of small PyTorch ops): on a GPU that
loop is launch-bound. Here one program per batch row keeps its N phases in registers and
runs every token and substep in a loop, so a layer's recurrence is one launch forward and
one backward. ``tests/test_fused.py`` checks values and gradients against the reference.

Forward, per substep (all (N,) for one batch row; ``coup = K_i u_t``)::

    c, s = cos theta, sin theta;  mc, ms = mean(c), mean(s)
    v = rate + (f_im + coup ms) c - (f_re + coup mc) s
    theta <- theta + dt v

and ``theta`` is wrapped to [-pi, pi) after each token. Backward walks the tokens in
reverse, recomputing the substep inputs of each token from the stored phases (exact: the
stored phases are the values the next token started from), with ``gv = dt g``::

    g_rate += gv;  g_fim += gv c;  g_fre -= gv s;  g_coup += gv (ms c - mc s)
    g <- g + gv (-(f_im + coup ms) s - (f_re + coup mc) c) + (A c - Bm s) / N
    A = sum(gv coup c),  Bm = -sum(gv coup s)        (the mean field's share)

``integrator: split`` (:func:`kssm_oscillators.kssm.split_substep`) is fused the same way:
rotation, then ``theta += 2 atan((g - 1) y / ((1 + g) |H| + (1 - g) x))`` with ``H`` the total
field, ``x + i y = |H| e^{i (theta - arg H)}`` and ``g = exp(-|H| dt)``; its backward is the
chain rule through that expression (``_split_parts`` holds the shared intermediates).

``horizon`` reproduces the reference's truncated backprop: the gradient reaching the
phases that token ``t`` starts from is dropped when ``t % horizon == 0`` and ``t > 0``.

Only float32 on CUDA (or anywhere under ``TRITON_INTERPRET=1``); the layer falls back to the
reference otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the reference loop
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

HAVE_TRITON = triton is not None


if HAVE_TRITON:

    @triton.jit
    def _substep(th, r, k, fr, fi, m, N, dt):
        c = tl.cos(th)
        s = tl.sin(th)
        mc = tl.sum(tl.where(m, c, 0.0), 0) / N
        ms = tl.sum(tl.where(m, s, 0.0), 0) / N
        return th + dt * (r + (fi + k * ms) * c - (fr + k * mc) * s)

    @triton.jit
    def _atan(z):
        """float32 arctan (Cephes' atanf: range reduction, then a degree-9 odd polynomial; ~1e-7)."""
        a = tl.abs(z)
        big = a > 2.414213562373095  # tan(3 pi / 8)
        mid = a > 0.4142135623730950  # tan(pi / 8)
        w = tl.where(big, -1.0 / tl.maximum(a, 1e-30), tl.where(mid, (a - 1.0) / (a + 1.0), a))
        y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
        w2 = w * w
        p = (((8.05374449538e-2 * w2 - 1.38776856032e-1) * w2 + 1.99777106478e-1) * w2 - 3.33329491539e-1) * w2 * w + w
        r = y0 + p
        return tl.where(z < 0, -r, r)

    @triton.jit
    def _split_parts(th, r, k, fr, fi, m, N, dt):
        """The split substep's intermediates (see kssm.split_substep)."""
        th1 = th + dt * r
        c = tl.where(m, tl.cos(th1), 0.0)
        s = tl.where(m, tl.sin(th1), 0.0)
        mc = tl.sum(c, 0) / N
        ms = tl.sum(s, 0) / N
        hr = fr + k * mc
        hi = fi + k * ms
        y = s * hr - c * hi
        x = c * hr + s * hi
        h = tl.sqrt(hr * hr + hi * hi + 1e-12)
        q = dt * h
        g = tl.exp(-tl.minimum(q, 30.0))
        U = (g - 1.0) * y
        V = (1.0 + g) * h + (1.0 - g) * x
        return th1, c, s, mc, ms, hr, hi, y, x, h, q, g, U, V

    @triton.jit
    def _step(th, r, k, fr, fi, m, N, dt, SPLIT: tl.constexpr):
        if SPLIT:
            th1, c, s, mc, ms, hr, hi, y, x, h, q, g, U, V = _split_parts(th, r, k, fr, fi, m, N, dt)
            return th1 + 2.0 * _atan(U / V)
        else:
            return _substep(th, r, k, fr, fi, m, N, dt)

    @triton.jit
    def _fwd_kernel(theta0, rate, coup, fre, fim, out, T, N, dt, S: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, BLOCK)
        m = o < N
        th = tl.load(theta0 + b * N + o, mask=m, other=0.0)
        base = b * T * N
        for t in range(T):
            p = base + t * N + o
            r = tl.load(rate + p, mask=m, other=0.0)
            k = tl.load(coup + p, mask=m, other=0.0)
            fr = tl.load(fre + p, mask=m, other=0.0)
            fi = tl.load(fim + p, mask=m, other=0.0)
            for _ in tl.static_range(S):
                th = _step(th, r, k, fr, fi, m, N, dt, SPLIT)
            x = th + 3.141592653589793
            th = x - 6.283185307179586 * tl.floor(x / 6.283185307179586) - 3.141592653589793
            tl.store(out + p, th, mask=m)

    @triton.jit
    def _bwd_kernel(theta0, out, rate, coup, fre, fim, gout, g_theta0, g_rate, g_coup, g_fre, g_fim,
                    T, N, dt, horizon, S: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, BLOCK)
        m = o < N
        base = b * T * N
        g = tl.zeros([BLOCK], dtype=tl.float32)
        for tt in range(T):
            t = T - 1 - tt
            p = base + t * N + o
            g += tl.load(gout + p, mask=m, other=0.0)
            if t > 0:
                th_in = tl.load(out + p - N, mask=m, other=0.0)
            else:
                th_in = tl.load(theta0 + b * N + o, mask=m, other=0.0)
            r = tl.load(rate + p, mask=m, other=0.0)
            k = tl.load(coup + p, mask=m, other=0.0)
            fr = tl.load(fre + p, mask=m, other=0.0)
            fi = tl.load(fim + p, mask=m, other=0.0)
            gr = tl.zeros([BLOCK], dtype=tl.float32)
            gk = tl.zeros([BLOCK], dtype=tl.float32)
            gfr = tl.zeros([BLOCK], dtype=tl.float32)
            gfi = tl.zeros([BLOCK], dtype=tl.float32)
            for jj in tl.static_range(S):
                th = th_in  # the input of substep j = S - 1 - jj, recomputed from the token's input
                for _ in tl.static_range(S - 1 - jj):
                    th = _step(th, r, k, fr, fi, m, N, dt, SPLIT)
                if SPLIT:
                    th1, c, s, mc, ms, hr, hi, y, x, h, q, gk_, U, V = _split_parts(th, r, k, fr, fi, m, N, dt)
                    den = U * U + V * V
                    gU = 2.0 * g * V / den
                    gV = -2.0 * g * U / den
                    g_keep = gU * y + gV * (h - x)
                    gy = gU * (gk_ - 1.0)
                    gx = gV * (1.0 - gk_)
                    gh = gV * (1.0 + gk_) + tl.where(q < 30.0, -dt * gk_ * g_keep, 0.0)
                    ghr = gh * hr / h + gy * s + gx * c
                    ghi = gh * hi / h - gy * c + gx * s
                    ghr = tl.where(m, ghr, 0.0)
                    ghi = tl.where(m, ghi, 0.0)
                    gc = -gy * hi + gx * hr + tl.sum(ghr * k, 0) / N
                    gs = gy * hr + gx * hi + tl.sum(ghi * k, 0) / N
                    gfr += ghr
                    gfi += ghi
                    gk += ghr * mc + ghi * ms
                    g = g + gs * c - gc * s  # the gradient at th1 = th + dt r
                    gr += dt * g
                else:
                    c = tl.where(m, tl.cos(th), 0.0)
                    s = tl.where(m, tl.sin(th), 0.0)
                    mc = tl.sum(c, 0) / N
                    ms = tl.sum(s, 0) / N
                    gv = dt * g
                    gr += gv
                    gfi += gv * c
                    gfr -= gv * s
                    gk += gv * (ms * c - mc * s)
                    A = tl.sum(gv * k * c, 0)
                    Bm = -tl.sum(gv * k * s, 0)
                    g = g + gv * (-(fi + k * ms) * s - (fr + k * mc) * c) + (A * c - Bm * s) / N
            tl.store(g_rate + p, gr, mask=m)
            tl.store(g_coup + p, gk, mask=m)
            tl.store(g_fre + p, gfr, mask=m)
            tl.store(g_fim + p, gfi, mask=m)
            cut = (t % horizon == 0) & (t > 0)
            g = tl.where(cut, 0.0, g)
        tl.store(g_theta0 + b * N + o, g, mask=m)


def _launch_cfg(N: int) -> tuple[int, int]:
    block = max(16, 1 << (N - 1).bit_length())
    return block, max(1, min(8, block // 128))


class FusedKuramoto(torch.autograd.Function):
    """``(theta0 (B, N), rate, coupling, f_re, f_im (B, T, N)) -> phases after each token (B, T, N)``."""

    @staticmethod
    def forward(ctx, theta0, rate, coupling, f_re, f_im, dt: float, substeps: int, horizon: int, split: bool):
        theta0, rate, coupling, f_re, f_im = (t.contiguous() for t in (theta0, rate, coupling, f_re, f_im))
        B, T, N = rate.shape
        out = torch.empty_like(rate)  # (B, T, N)
        block, warps = _launch_cfg(N)
        _fwd_kernel[(B,)](theta0, rate, coupling, f_re, f_im, out, T, N, dt, S=substeps, SPLIT=split, BLOCK=block,
                          num_warps=warps)
        ctx.save_for_backward(theta0, out, rate, coupling, f_re, f_im)
        ctx.cfg = (dt, substeps, horizon if horizon > 0 else T + 1, split)  # T + 1: never cuts
        return out

    @staticmethod
    def backward(ctx, gout):
        theta0, out, rate, coupling, f_re, f_im = ctx.saved_tensors
        dt, substeps, horizon, split = ctx.cfg
        B, T, N = rate.shape
        g_theta0 = torch.empty_like(theta0)
        g_rate, g_coup, g_fre, g_fim = (torch.empty_like(rate) for _ in range(4))  # (B, T, N) each
        block, warps = _launch_cfg(N)
        _bwd_kernel[(B,)](theta0, out, rate, coupling, f_re, f_im, gout.contiguous(), g_theta0, g_rate, g_coup,
                          g_fre, g_fim, T, N, dt, horizon, S=substeps, SPLIT=split, BLOCK=block, num_warps=warps)
        return g_theta0, g_rate, g_coup, g_fre, g_fim, None, None, None, None


def fused_integrate(theta0: Tensor, rate: Tensor, coupling: Tensor, f_re: Tensor, f_im: Tensor,
                    dt: float, substeps: int, horizon: int = 0, integrator: str = "euler") -> Tensor:
    """The layer's phase recurrence in one kernel (float32). ``horizon`` 0 = full backprop."""
    if not HAVE_TRITON:
        raise RuntimeError("kernel 'triton' needs the triton package (it ships with CUDA builds of torch); "
                           "use kernel: torch (or auto) on this install")
    if rate.dtype != torch.float32:
        raise TypeError(f"the fused Kuramoto kernel runs in float32, got {rate.dtype}; use kernel: torch for {rate.dtype}")
    B, T, N = rate.shape
    coupling = coupling.expand(B, T, N)
    return FusedKuramoto.apply(theta0, rate, coupling, f_re, f_im, float(dt), int(substeps), int(horizon),
                               integrator == "split")


def can_fuse(x: Tensor) -> bool:
    """Whether ``kernel: auto`` takes the fused path for this input."""
    return HAVE_TRITON and x.is_cuda


__all__ = ["HAVE_TRITON", "FusedKuramoto", "can_fuse", "fused_integrate"]
