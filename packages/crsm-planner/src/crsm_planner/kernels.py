"""mamba-ssm's CUDA/Triton kernels behind the same contracts as the pure-PyTorch scans.

Used only for CUDA tensors and only when ``import mamba_ssm`` works (``use_kernels`` =
"auto" or "always"). mamba-ssm is CUDA-only and optional: nothing here is imported at
module level, so the package works without it. Our own causal convolution
(:mod:`crsm_planner.conv`) replaces causal-conv1d on every path.

* Mamba-2 forward: the Triton SSD scan ``mamba_chunk_scan_combined`` takes
  ``initial_states`` and returns the final states, so chunked prefill is direct.
* Decode (both mixers): the Triton ``selective_state_update``. It updates the state in
  place, so it runs on a clone: callers keep their snapshots.
* Mamba-1 forward: the CUDA ``selective_scan_fn`` always starts from ``h = 0``. The
  recurrence is linear in the state, so with ``S_t = sum_{s<=t} dt_s`` (per channel)::

      h_t = exp(A S_t) * h0 + h0_free_t         (h0_free: the zero-initialised scan)
      y_t = y0_free_t + sum_n C_t[n] exp(A[:, n] S_t) h0[:, n]

  :func:`mamba1_scan` adds that second term to the kernel's output (the kernel is called
  without the gate, which is applied afterwards by the mixer) and forms the final state
  the same way. The kernel's returned last state carries no gradient (a documented
  limitation of ``selective_scan_fn``), so its gradient is computed by differentiating
  ``sum_t exp(A (S_T - S_t)) dt_t u_t B_t`` (:class:`_LastState`), only when a loss
  depends on the final state.
  These terms cost ``O(B T d_inner d_state)`` memory, about as much as one naive scan, and
  are skipped entirely when the incoming state is the zero state (``h0 is None``).

Each op is used when it imports: the Triton ops (SSD scan, decode step) need no compiled
extension, the Mamba-1 scan needs mamba-ssm's ``selective_scan_cuda`` (recent releases
build it only with ``MAMBA_KEEP_CUDA_BUILD=TRUE``); a missing op falls back to PyTorch
under ``use_kernels="auto"`` and is an error under ``"always"``.

Parity with the pure-PyTorch paths is checked on a GPU by benchmarks/crsm/gpu_parity.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor


MAMBA1_OPS = ("selective_scan_fn", "selective_state_update")
MAMBA2_OPS = ("mamba_chunk_scan_combined", "selective_state_update")


@functools.lru_cache(maxsize=1)
def _ops() -> dict[str, Any] | None:
    """The mamba-ssm ops that import here, or None. The Triton ops (SSD scan, decode step)
    work without the compiled ``selective_scan_cuda`` extension, which recent mamba-ssm
    builds only on request; the Mamba-1 scan is listed only when that extension loaded."""
    ops: dict[str, Any] = {}
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        ops["selective_state_update"] = selective_state_update
    except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA/Triton install)
        return None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        ops["mamba_chunk_scan_combined"] = mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001
        pass
    try:
        from mamba_ssm.ops import selective_scan_interface as ssi

        if getattr(ssi, "selective_scan_cuda", True) is not None:
            ops["selective_scan_fn"] = ssi.selective_scan_fn
    except Exception:  # noqa: BLE001
        pass
    return ops


def available(names: tuple[str, ...] = ()) -> bool:
    """True when mamba-ssm imports and has every op in ``names``."""
    ops = _ops()
    return ops is not None and all(n in ops for n in names)


def require(names: tuple[str, ...] = ()) -> None:
    """Raise a clear error when kernels are demanded (``use_kernels="always"``) but missing."""
    ops = _ops()
    if ops is None:
        raise RuntimeError(
            "use_kernels='always' but mamba_ssm cannot be imported (it needs CUDA: `pip install mamba-ssm "
            "--no-build-isolation` on a GPU machine); set use_kernels to 'auto' or 'never' to use the "
            "pure-PyTorch path")
    missing = [n for n in names if n not in ops]
    if missing:
        hint = (" (selective_scan_fn needs mamba-ssm's compiled extension: reinstall with "
                "MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation)"
                if "selective_scan_fn" in missing else "")
        raise RuntimeError(f"mamba_ssm imports but lacks {missing}{hint}; set use_kernels to 'auto' or 'never'")


def wanted(use_kernels: str, x: Tensor, names: tuple[str, ...]) -> bool:
    """Whether a call on ``x`` should use the kernels ``names``."""
    return use_kernels != "never" and x.is_cuda and available(names)


def _op(name: str):
    require((name,))
    return _ops()[name]  # type: ignore[index]


def _last_state(u: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Zero-initialised final state ``sum_t exp(A (S_T - S_t)) dt_t u_t B_t``, ``(Bt, Di, N)``."""
    S = torch.cumsum(dt, dim=1)  # (Bt, T, Di)
    decay_to_end = torch.exp((S[:, -1:] - S).unsqueeze(-1) * A)  # (Bt, T, Di, N)
    return torch.einsum("btdn,btd,btn->bdn", decay_to_end, dt * u, B)


class _LastState(torch.autograd.Function):
    """Passes the kernel's final state through; its backward differentiates :func:`_last_state`
    (run only when a loss actually depends on the final state, e.g. truncated BPTT)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, last):
        ctx.save_for_backward(u, dt, A, B)
        return last.clone()

    @staticmethod
    def backward(ctx, g):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            h = _last_state(*inputs)
        return (*torch.autograd.grad(h, inputs, g), None)


def mamba1_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`crsm_planner.mamba1.selective_scan`; ``h0 = None`` is the zero state."""
    scan = _op("selective_scan_fn")
    Bt, T, Di = u.shape
    y0, last = scan(
        u.transpose(1, 2).contiguous(),  # (Bt, Di, T)
        dt.transpose(1, 2).contiguous(),  # (Bt, Di, T)
        A.contiguous(),
        B.transpose(1, 2).contiguous(),  # (Bt, N, T)
        C.transpose(1, 2).contiguous(),  # (Bt, N, T)
        D, None, None, False, True)
    y = y0.transpose(1, 2)  # (Bt, T, Di)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B)):
        last = _LastState.apply(u, dt, A, B, last)
    if h0 is None:
        return y, last
    S = torch.cumsum(dt, dim=1)  # (Bt, T, Di)
    decay = torch.exp(S.unsqueeze(-1) * A)  # (Bt, T, Di, N): prod_{s<=t} exp(dt_s A)
    y = y + torch.einsum("btdn,bdn,btn->btd", decay, h0, C)
    return y, decay[:, -1] * h0 + last


def mamba1_step(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                h: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`crsm_planner.mamba1.selective_step`."""
    update = _op("selective_state_update")
    state = h.float().clone()  # the kernel writes the state in place
    # mamba-ssm 2.3.2's selective_state_update dereferences dt_bias unconditionally (its
    # stride is read even when None): pass an explicit zero bias; dt is already final.
    zero_bias = torch.zeros(u.shape[-1], device=u.device, dtype=torch.float32)
    y = update(state, u.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), D=D,
               z=None, dt_bias=zero_bias, dt_softplus=False)
    return y, state


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
                chunk_size: int) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`crsm_planner.mamba2.ssd_scan`; ``dt`` is after softplus."""
    scan = _op("mamba_chunk_scan_combined")
    y, h = scan(x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), chunk_size, D=D,
                z=None, dt_bias=None, initial_states=None if h0 is None else h0.contiguous(), dt_softplus=False,
                return_final_states=True)
    return y, h.float()


def mamba2_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                h: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`crsm_planner.mamba2.ssd_step`: ``x (Bt, H, P)``, ``dt (Bt, H)``."""
    update = _op("selective_state_update")
    Bt, H, P = x.shape
    N = h.shape[-1]
    state = h.float().clone()  # the kernel writes the state in place
    y = update(state, x.contiguous(), dt.unsqueeze(-1).expand(Bt, H, P), A[:, None, None].expand(H, P, N),
               B.contiguous(), C.contiguous(), D=None if D is None else D[:, None].expand(H, P),
               z=None, dt_bias=torch.zeros(H, 1, device=x.device, dtype=torch.float32).expand(H, P),  # see mamba1_step
               dt_softplus=False)
    return y, state
