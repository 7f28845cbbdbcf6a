"""Persistent attention traces: a sparse per-head memory of salient attention links.

Indexing
--------
A link is a (query position i, key position j) pair with j <= i. Traces are stored by
*relative offset* d = i - j, so one entry biases every link at that distance, wherever
the sequence starts (a position-agnostic bias, like ALiBi but sparse and remembered).
Per head the memory is COO: ``off[h, q]`` (int32 offsets, -1 = empty slot) and
``val[h, q]`` (float32 values) for ``q < quota_per_head``. Both are buffers, so they are
saved and loaded with the model (safetensors) and their footprint is fixed:
``n_heads * quota * 8`` bytes per layer.

Salience (the documented cheap estimator)
-----------------------------------------
The prototype's salience is ``S_ij = A_ij * |dL/dA_ij| * recurrence``. ``dL/dA_ij =
<g_i, v_j>`` with ``g_i = dL/dy_i``, so by Cauchy-Schwarz ``|dL/dA_ij| <= |g_i| |v_j|``. The
estimator drops the query-only factor ``|g_i|`` (no backward pass needed, so capture runs
in a forward-only pass and works with gradient checkpointing) and uses
``s_ij = A_ij * |v_j|``. Per head and offset it averages ``s`` over the queries of each
sequence, giving ``s[b, h, d]``; then

    S[h, d] = (mean_b s[b, h, d] / max_d mean_b s[b, h, d]) * r[h, d]

where ``r[h, d]`` (recurrence) is the fraction of the batch's sequences in which offset
``d`` is above that sequence's mean salience. ``S`` lies in [0, 1], so the threshold
``theta`` is scale-free. ``reference.exact_salience`` computes the same aggregate with the
true gradient; a test checks that the two rank offsets the same on a planted case.

Salience with the true gradient (``capture_traces(x, loss_fn)``)
-----------------------------------------------------------------
Given a loss on the capture pass's output, the capture keeps each layer's weights ``A`` in
the autograd graph, takes ``dL/dA`` with ``torch.autograd.grad`` (no parameter's ``.grad``
is touched) and uses ``s_ij = A_ij * |dL/dA_ij|``, aggregated by offset as above but with the
seed's ``log(1 + recurrence)``: ``S[h, d] = norm[h, d] * log(1 + n[h, d]) / log(1 + B)``
where ``n[h, d]`` counts the sequences in which offset ``d`` is above the sequence's mean
salience (so ``S`` stays in [0, 1]). See :func:`gradient_salience`.

Capture runs in a separate forward-only pass (no gradient) over the first ``capture_rows``
rows of the batch, before the step's ordinary (compiled) forward, so its explicit attention
weights cost ``O(rows * H * T^2)`` once per ``update_interval`` steps and never touch the
training graph (see ``TransformerBackbone.capture_traces``).

Update (every ``update_interval`` training steps after ``warmup_steps``)
------------------------------------------------------------------------
``M <- lambda M + (1 - lambda) S`` where ``S > theta``, else ``M <- gamma M``; then each
head keeps its ``quota`` largest entries (the smallest are evicted).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from traces_crystallize.reference import offsets_matrix


class TraceStore(nn.Module):
    """The trace memory of one attention layer, and its bias strength ``alpha`` (per head).

    Buffers: ``off`` (H, Q) int32, ``val`` (H, Q) float32, ``use`` (H,) the fraction of
    attention mass that fell on traced links at the last capture. Parameter: ``alpha``
    (H,) when ``learn_alpha``, else a buffer.
    """

    def __init__(
        self,
        n_heads: int,
        quota: int,
        *,
        alpha: float = 0.1,
        learn_alpha: bool = True,
        threshold: float = 0.05,
        retention: float = 0.95,
        decay: float = 0.98,
        alpha_warmup_steps: int = 500,
        warmup_steps: int = 1000,
        update_interval: int = 100,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads, self.quota = n_heads, quota
        self.threshold, self.retention, self.decay = threshold, retention, decay
        self.alpha_warmup_steps, self.warmup_steps, self.update_interval = alpha_warmup_steps, warmup_steps, update_interval
        self.normalize = normalize
        self.register_buffer("off", torch.full((n_heads, quota), -1, dtype=torch.int32))
        self.register_buffer("val", torch.zeros(n_heads, quota))
        self.register_buffer("use", torch.zeros(n_heads))
        a = torch.full((n_heads,), float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)
        # a list while a gradient capture collects this layer's (A, traced, past) for the backward, else None
        self.pending: list | None = None
        self.n_live = 0  # python mirror of (off >= 0).sum(), for reports (no device sync)
        # picks the zero-overhead path; a bool, so under torch.compile it flips (and recompiles) once,
        # not at every capture as a guard on the entry count would
        self.active = False
        self.register_load_state_dict_post_hook(lambda module, _: module.sync())

    def sync(self) -> None:
        self.n_live = int((self.off >= 0).sum())
        self.active = self.n_live > 0

    def nbytes(self) -> int:
        return self.off.numel() * self.off.element_size() + self.val.numel() * self.val.element_size()

    def is_capture_step(self, step: int) -> bool:
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.update_interval == 0

    def alpha_eff(self, step: Tensor | None) -> Tensor:
        """``alpha`` times the warmup ramp ``clamp((step - warmup_steps + 1) / alpha_warmup_steps, 0, 1)``, (H,)."""
        if step is None:
            return self.alpha
        ramp = ((step.float() - self.warmup_steps + 1) / max(1, self.alpha_warmup_steps)).clamp(0.0, 1.0)
        return self.alpha * ramp

    # -- dense views ------------------------------------------------------------------
    def dense(self, length: int) -> Tensor:
        """Trace values by offset, ``(H, length)``: ``out[h, d]`` (zero where no entry)."""
        out = torch.zeros(self.n_heads, length + 1, device=self.val.device, dtype=self.val.dtype)
        idx = self.off.long()
        idx = torch.where((idx >= 0) & (idx < length), idx, torch.full_like(idx, length))  # out-of-range -> spill slot
        out.scatter_add_(1, idx, self.val)
        return out[:, :length]

    def bias_matrix(self, length: int) -> Tensor:
        """``M`` as the bias reads it, ``(H, length)``: :meth:`dense`, divided per head by its largest
        entry when ``normalize`` (then ``alpha`` is the bias in logits at the head's strongest
        offset, whatever the scale the update rule has let ``M`` reach)."""
        M = self.dense(length)
        if self.normalize:
            M = M / self.val.amax(1, keepdim=True).clamp(min=1e-12)  # (H, length)
        return M

    def bias_vector(self, length: int, step: Tensor | None) -> Tensor:
        """``alpha_eff[h] * M[h, d]`` for offsets ``d < length`` (``M`` from :meth:`bias_matrix`), (H, length)."""
        return self.alpha_eff(step)[:, None].to(self.val.dtype) * self.bias_matrix(length)

    # -- capture ----------------------------------------------------------------------
    def capture(self, q: Tensor, k: Tensor, v: Tensor, past: int, alpha: Tensor | None = None) -> Tensor:
        """One capture from a layer's (rotated) ``q (B, H, T, hd)``, ``k, v (B, H, Tk, hd)``,
        where the queries sit at positions ``past .. past+T-1``, with bias strength ``alpha (H,)``
        (default: ``self.alpha``). Updates ``use`` and the memory; returns the attention
        weights ``A (B, H, T, Tk)`` of this forward (the bias before the update). During a
        gradient capture (``pending`` is a list) it only computes ``A`` in the autograd graph
        and queues it; :meth:`update_from_gradient` updates the memory after the backward."""
        Tk = k.shape[2]
        bias = traced = None
        if self.n_live:
            a = (self.alpha if alpha is None else alpha).detach().float()
            M = self.bias_matrix(Tk).detach()  # (H, Tk)
            bias, traced = a[:, None] * M, (M > 0).float()
        if self.pending is not None:
            A = attention_weights(q, k, bias, past)  # (B, H, T, Tk), differentiable
            self.pending.append((A, traced, past))
            return A
        with torch.no_grad():
            A, use, S = _salience(q, k, v, bias, traced, past)
            self.use.copy_(use)
            self.update(S)
        return A

    @torch.no_grad()
    def update_from_gradient(self, A: Tensor, traced: Tensor | None, past: int, grad: Tensor | None) -> None:
        """Update ``use`` and the memory from weights ``A (B, H, T, Tk)`` queued by :meth:`capture`
        and their loss gradient ``grad`` (same shape; None: the loss does not depend on them)."""
        A = A.detach()
        grad = torch.zeros_like(A) if grad is None else grad
        off = offsets_matrix(A.shape[2], A.shape[3], past, A.device)  # (T, Tk)
        if traced is not None:
            self.use.copy_((A * traced[:, off.clamp(min=0)]).sum(-1).mean(dim=(0, 2)))
        else:
            self.use.zero_()
        self.update(gradient_salience(A, grad, past))

    @torch.no_grad()
    def update(self, S: Tensor) -> None:
        """Apply the update rule with salience ``S (H, L)`` (by offset), then the quota."""
        L = max(S.shape[1], int(self.off.max()) + 1)
        M = self.dense(L)  # (H, L)
        S = torch.nn.functional.pad(S.to(M.dtype), (0, L - S.shape[1]))  # (H, L)
        hit = S > self.threshold
        M = torch.where(hit, self.retention * M + (1 - self.retention) * S, self.decay * M)
        k = min(self.quota, L)
        vals, idx = M.topk(k, dim=1)  # (H, k): the quota's largest entries survive
        keep = vals > 0
        self.off.fill_(-1)
        self.val.zero_()
        self.off[:, :k] = torch.where(keep, idx, torch.full_like(idx, -1)).to(torch.int32)
        self.val[:, :k] = torch.where(keep, vals, torch.zeros_like(vals))
        self.sync()


def salience(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, traced: Tensor | None,
             past: int) -> tuple[Tensor, Tensor, Tensor]:
    """The capture's computation, a pure function (compiled on CUDA): attention weights
    ``A (B, H, T, Tk)`` with the bias ``bias (H, Tk)`` by offset, the fraction ``use (H,)`` of
    attention mass on traced offsets (``traced (H, Tk)``, 1 where M > 0) and the salience by
    offset ``S (H, Tk)`` (see the module doc)."""
    _, H, T, hd = q.shape
    Tk = k.shape[2]
    off = offsets_matrix(T, Tk, past, q.device)  # (T, Tk), -1 above the diagonal
    A = attention_weights(q, k, bias, past)  # (B, H, T, Tk)
    if traced is not None:
        use = (A * traced[:, off.clamp(min=0)]).sum(-1).mean(dim=(0, 2))  # (H,); A is 0 above the diagonal
    else:
        use = torch.zeros(H, device=q.device)
    s = A * v.float().norm(dim=-1)[:, :, None, :]  # (B, H, T, Tk): A_ij * |v_j|
    return A, use, aggregate_by_offset(s, off, Tk, past=past)


def attention_weights(q: Tensor, k: Tensor, bias: Tensor | None, past: int) -> Tensor:
    """Causal softmax weights ``A (B, H, T, Tk)`` in float32 from ``q (B, H, T, hd)``,
    ``k (B, H, Tk, hd)`` and the bias ``bias (H, Tk)`` by offset (queries at ``past + i``)."""
    T, Tk, hd = q.shape[2], k.shape[2], q.shape[3]
    off = offsets_matrix(T, Tk, past, q.device)  # (T, Tk), -1 above the diagonal
    logits = (q.float() @ k.float().transpose(-2, -1)) / hd**0.5  # (B, H, T, Tk)
    if bias is not None:
        logits = logits + bias[:, off.clamp(min=0)]  # (H, T, Tk) broadcast over B
    return logits.masked_fill(off < 0, float("-inf")).softmax(-1)


def gradient_salience(A: Tensor, grad: Tensor, past: int) -> Tensor:
    """The seed's salience ``A_ij * |dL/dA_ij| * log(1 + recurrence)`` by offset, ``(H, Tk)``,
    from weights ``A`` and their loss gradient ``grad`` (both ``(B, H, T, Tk)``; see the module doc)."""
    off = offsets_matrix(A.shape[2], A.shape[3], past, A.device)
    return aggregate_by_offset(A * grad.abs(), off, A.shape[3], past=past, log_recurrence=True)


_compiled_salience = None  # None: not built yet; False: compiling failed, stay eager


def _salience(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, traced: Tensor | None,
              past: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`salience`, compiled on CUDA (one fused pass over the (B, H, T, Tk) weights instead
    of a dozen eager ones), eager elsewhere and if compiling fails."""
    global _compiled_salience
    if q.is_cuda and _compiled_salience is not False:
        try:
            if _compiled_salience is None:
                _compiled_salience = torch.compile(salience, dynamic=False)
            return _compiled_salience(q, k, v, bias, traced, past)
        except Exception as exc:  # noqa: BLE001 - a capture must not stop training; the eager path is exact
            warnings.warn(f"traces: compiling the capture failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "captures run eagerly from now on", RuntimeWarning, stacklevel=2)
            _compiled_salience = False
    return salience(q, k, v, bias, traced, past)


def diagonal_sums(s: Tensor) -> Tensor:
    """``out[..., d] = sum_i s[..., i, i - d]`` for a causal square ``s (..., T, T)`` (zero above
    the diagonal), ``(..., T)``, without atomics: the rows are flipped and padded to width 2T,
    so that, read back with row width 2T - 1, link (i, i - d) lands in column d (the
    Transformer-XL relative shift). The scatter in :func:`aggregate_by_offset` computes the
    same sums with T-way contention on every address, which dominated a capture on the GPU."""
    *lead, T, _ = s.shape
    n = s.numel() // (T * T)
    padded = torch.nn.functional.pad(s.reshape(n, T, T).flip(-1), (0, T))  # (n, T, 2T)
    flat = padded.reshape(n, 2 * T * T)[:, T - 1 : T - 1 + T * (2 * T - 1)]  # (n, T * (2T - 1))
    return flat.reshape(n, T, 2 * T - 1)[:, :, :T].sum(1).reshape(*lead, T)  # (..., T)


def aggregate_by_offset(s: Tensor, off: Tensor, Tk: int, shift: bool | None = None, past: int | None = None,
                        log_recurrence: bool = False) -> Tensor:
    """Salience by offset from per-link salience ``s (B, H, T, Tk)`` (see the module doc);
    ``log_recurrence`` weighs by ``log(1 + n) / log(1 + B)`` (``n`` sequences above their mean)
    instead of the fraction ``n / B``.
    For a whole sequence (no KV cache: ``past`` 0, or read from ``off`` when not given),
    ``shift`` picks :func:`diagonal_sums` over the scatter; by default on CUDA (where the
    capture is compiled and the scatter's atomics contend), not on CPU (where the eager
    scatter is about 3x faster at T=1024)."""
    B, H, T, _ = s.shape
    shift = s.is_cuda if shift is None else shift
    whole = past == 0 if past is not None else bool(off[-1, 0] == T - 1)
    if shift and T == Tk and whole:  # diagonal sums, no atomics
        tot = diagonal_sums(s * (off >= 0))  # (B, H, T); links above the diagonal never count
        cnt = torch.arange(T, 0, -1, device=s.device, dtype=s.dtype)  # T - d queries at offset d
        per_seq = tot / cnt
    else:
        valid = off >= 0  # (T, Tk)
        idx = torch.where(valid, off, torch.full_like(off, Tk)).reshape(1, 1, T * Tk).expand(B, H, T * Tk)
        tot = torch.zeros(B, H, Tk + 1, device=s.device, dtype=s.dtype)
        tot.scatter_add_(2, idx, s.reshape(B, H, T * Tk))  # (B, H, Tk+1)
        cnt = torch.zeros(Tk + 1, device=s.device, dtype=s.dtype)
        cnt.scatter_add_(0, idx[0, 0], valid.reshape(-1).to(s.dtype))
        cnt = cnt[:Tk]
        per_seq = (tot[:, :, :Tk] / cnt.clamp(min=1))  # (B, H, Tk): mean over the queries at that offset
    present = cnt > 0  # (Tk,)
    mean_b = per_seq.mean(0)  # (H, Tk)
    norm = mean_b / mean_b.amax(dim=1, keepdim=True).clamp(min=1e-12)
    row_mean = (per_seq * present).sum(-1, keepdim=True) / present.sum().clamp(min=1)  # (B, H, 1)
    above = (per_seq > row_mean).float()  # (B, H, Tk)
    recurrence = above.sum(0).log1p() / math.log1p(B) if log_recurrence else above.mean(0)  # (H, Tk)
    return norm * recurrence * present
