"""The `transformer` backbone: a pre-norm decoder with rotary positions, SDPA attention,
an MLP or mixture-of-experts feed-forward, persistent attention traces and motifs.

Config: :class:`traces_crystallize.plugin.TransformerParams` (n_layers, n_heads, mlp_ratio,
dropout, bias, rotary_base, max_seq_len, ffn, n_experts, top_k, traces, crystallization).

State (per layer, for ``step`` and chunked ``forward``): the KV cache ``k``, ``v`` of shape
``(B, n_heads, T_cache, head_dim)`` (rotary already applied to ``k``) and ``pos (B,)``, the
number of tokens consumed. A ``forward`` with a non-empty cache continues the sequence.

Attention paths (per layer, per call):
* traces disabled or empty: ``F.scaled_dot_product_attention(is_causal=True)`` (flash
  kernels on GPU), exactly nanoGPT's path; with a cache, SDPA without a mask (one query)
  or with a boolean causal mask offset by the cache length;
* traces active: the bias ``alpha * M[h, i - j]`` is added to the scores. By default
  (``attention: auto|sdpa``) through SDPA with a float mask built from it, in ``bias_chunks``
  query blocks that skip most of the masked upper triangle (cuDNN's fused kernel on an H100);
  with ``attention: flex`` through FlexAttention with a ``score_mod`` that indexes a
  precomputed ``alpha * M`` vector of shape ``(H, Tk + 129)`` (traced into the caller's
  torch.compile graph; FlexAttention has no dropout, so attention dropout is skipped there;
  1.6x slower than the cuDNN path on an H100 with its best tiles). ``alpha`` (warmup ramp included) is a
  tensor computed from the ``train_step`` buffer, so its schedule never recompiles.

How the periodic updates run: on training-time hooks, never from inside the forward. The
backbone contributes a callback (:class:`traces_crystallize.schedule.BackboneSchedule`) that
the trainer calls before the first micro-batch of every optimizer step; it calls
:meth:`TransformerBackbone.begin_step` with the optimizer step's number, which sets the step
counter (buffer ``train_step``: the alpha warm-up and the capture schedule count optimizer
steps, whatever ``train.grad_accum``), and on a capture step runs a forward-only pass
(``no_grad``) over the batch's first ``traces.capture_rows`` rows in which each attention
computes its explicit attention weights and updates its trace memory; the step's own
forward then runs as usual. Every ``crystallization.log_interval`` steps the MoE layers log
the first micro-batch's routing paths into the trie. Utility measurement and
crystallization need the loss, so the ``crystallization`` regularizer's callback drives them
after the optimizer step (see :mod:`traces_crystallize.crystallize`). A loop of its own
calls ``begin_step`` itself; forwards alone never update anything.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Layer, State
from statelab.internals import publish
from traces_crystallize.moe import MoE
from traces_crystallize.paths import MotifTable, PathTrie
from traces_crystallize.plugin import TransformerParams
from traces_crystallize.reference import offsets_matrix
from traces_crystallize.traces import TraceStore

_compiled_flex = None
_block_masks: dict = {}


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, past: int) -> Tensor:
    """Causal FlexAttention with ``score + bias[h, (past + i) - j]``; ``bias (H, >= Tk + 128)``.

    Under the caller's ``torch.compile`` it is traced into that graph (block mask included),
    so the biased layer stays one fused graph; in eager mode it runs a separately compiled
    ``flex_attention`` (eager FlexAttention is a slow dense reference) with a cached mask.
    ``bias`` is ``alpha * M``, computed outside the score_mod (a product of two captured
    tensors inside it does not compile); without ``learn_alpha`` it needs no gradient, so
    the backward kernel skips the bias scatter.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, Tk = q.shape[2], k.shape[2]
    n = bias.shape[1] - 1

    def score_mod(score, b, h, qi, kj):
        return score + bias[h, (qi + past - kj).clamp(0, n)]

    def causal(b, h, qi, kj):
        return qi + past >= kj

    opts = _FLEX_KERNEL_OPTIONS if q.is_cuda else None
    if torch.compiler.is_compiling():
        block_mask = create_block_mask(causal, None, None, T, Tk, device=q.device)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    key = (T, Tk, past, str(q.device))
    block_mask = _block_masks.get(key)
    if block_mask is None:
        if len(_block_masks) > 64:
            _block_masks.clear()
        block_mask = _block_masks[key] = create_block_mask(causal, None, None, T, Tk, device=q.device)
    return _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)


# Inductor's default tiles for the biased kernel asked for more shared memory than an H100
# block has (245,760 > 232,448 bytes); these fit. None = Inductor's defaults.
_FLEX_KERNEL_OPTIONS: dict | None = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2,
                                     "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


_CUDNN_CAUSAL_BIAS: dict[int, bool] = {}  # CUDA device index -> the fused causal + bias kernel may be used


def cudnn_causal_bias_ok(q: Tensor, bias: Tensor, past: int, p_drop: float) -> bool:
    """Whether :func:`_cudnn_causal_bias` serves this call: CUDA on sm90 or later with cuDNN 9
    and its SDPA backend enabled, half-precision q/k/v with ``head_dim`` a multiple of 8 up to
    128, a full causal square (no KV cache), no dropout and a bias that needs no gradient
    (the fused op returns none for it: a learnable alpha takes the float-mask path)."""
    if not q.is_cuda or past or p_drop or bias.requires_grad:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 128:
        return False
    return _cudnn_causal_bias_available(q.device.index or 0)


@torch.compiler.assume_constant_result
def _cudnn_causal_bias_available(index: int) -> bool:
    # a constant to torch.compile: these queries are Python calls Dynamo cannot trace, and each one
    # would break the graph in every layer (12 graphs instead of 1 for a 2-layer model on an H100)
    ok = _CUDNN_CAUSAL_BIAS.get(index)
    if ok is None:
        ok = _CUDNN_CAUSAL_BIAS[index] = bool(
            torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
            and torch.cuda.get_device_capability(index) >= (9, 0)
        )
    return ok and torch.backends.cuda.cudnn_sdp_enabled()


def _cudnn_causal_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Causal attention with ``score + bias[h, i - j]`` in one cuDNN kernel that skips the masked
    upper triangle; ``q, k, v (B, H, T, hd)``, ``bias (H, T)`` with no gradient.

    SDPA refuses a float mask together with ``is_causal``, but the op it dispatches to on an
    H100, ``aten._scaled_dot_product_cudnn_attention``, takes both (with autograd for q, k, v).
    Against the float mask over the whole square this saves 25% of the forward and 29% of the
    backward kernel time at T=1024 (benchmarks/traces/cudnn_bias_probe.py), and the bias needs
    no ``-inf`` entries. Its rows are padded to a multiple of 16 elements: cuDNN wants 16-byte
    aligned strides, and the view of the first ``T`` columns keeps the padded row stride.
    """
    mask = causal_bias_matrix(bias, q.shape[2], q.dtype)  # (1, H, T, T)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, True, 0.0, True, False)[0]  # (B, H, T, hd)


def causal_bias_matrix(bias: Tensor, T: int, dtype: torch.dtype) -> Tensor:
    """``bias (H, >= T)`` by offset -> ``(1, H, T, T)`` with ``[0, h, i, j] = bias[h, i - j]`` for
    ``j <= i`` (above the diagonal: ``bias[h, 0]``, for a kernel that applies the causal mask
    itself), in ``dtype``, each row padded to a multiple of 16 elements (a strided view)."""
    Tp = -(-T // 16) * 16
    off = offsets_matrix(T, Tp, 0, bias.device).clamp(min=0)  # (T, Tp)
    return bias[:, off].to(dtype)[None, :, :, :T]  # (1, H, T, T), row stride Tp


def _biased_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, past: int, chunks: int, p_drop: float,
                 fused: bool = True) -> Tensor:
    """Causal attention with ``score + bias[h, (past + i) - j]``; ``q (B, H, T, hd)``,
    ``k, v (B, H, Tk, hd)``, ``bias (H, Tk)``.

    With ``fused`` and where :func:`cudnn_causal_bias_ok` allows, one cuDNN kernel applies the
    bias and the causal mask together (:func:`_cudnn_causal_bias`). Otherwise SDPA runs with a
    float mask (cuDNN's fused kernel on an H100, a math or memory-efficient kernel elsewhere).
    A float mask cannot be combined with ``is_causal``, so a single call would also compute the
    masked upper triangle. The queries are therefore split into ``chunks`` row blocks, and block
    ``c`` attends only to the keys its last query can see: ``(1 + 1/chunks) / 2`` of the square's
    work instead of all of it (0.625 with 4 chunks), for ``chunks`` kernel calls and one cat.
    """
    if fused and cudnn_causal_bias_ok(q, bias, past, p_drop):
        return _cudnn_causal_bias(q, k, v, bias)
    T, Tk = q.shape[2], k.shape[2]
    outs = []
    for c in range(chunks):
        r0, r1 = c * T // chunks, (c + 1) * T // chunks
        if r1 == r0:
            continue
        kend = min(Tk, past + r1)  # keys up to the block's last query
        off = offsets_matrix(r1 - r0, kend, past + r0, q.device)  # (rows, kend), -1 above the diagonal
        mask = bias[:, off.clamp(min=0)].masked_fill(off < 0, float("-inf")).to(q.dtype)  # (H, rows, kend)
        outs.append(F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend],
                                                   attn_mask=mask[None], dropout_p=p_drop))  # (B, H, rows, hd)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (B, H, T, hd)


def _rope_tables(length: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    # precomputed buffers, read by the compiled graph: computing the angles inside it made Inductor evaluate
    # pow, cos and sin for every element of q and k, forward and backward (+42% GPU time per step on the H100)
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (hd/2,)
    ang = torch.arange(length, device=device).float()[:, None] * inv[None, :]  # (length, hd/2)
    return ang.cos(), ang.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves of ``x (..., hd)`` by angles ``cos, sin`` broadcastable to ``(..., hd/2)``:
    ``(T, hd/2)`` for ``x (B, H, T, hd)``, ``(T, 1, hd/2)`` for ``x (B, T, H, hd)``."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RunContext:
    """Per-forward bookkeeping shared by the layers of one backbone (not a module)."""

    def __init__(self, backbone: "TransformerBackbone") -> None:
        self._backbone = [backbone]  # a list, so nn.Module does not register the backbone twice
        self.step = 0  # python mirror of backbone.train_step
        self.capture = False
        self.log_now = False
        self.match: Tensor | None = None
        self.paths: list[Tensor] = []
        self.entropy: list[Tensor] = []
        self.reroute_layer: int | None = None  # utility control: re-route this MoE layer only
        self.served: Tensor | None = None  # motif id per token served somewhere in this forward (recording)
        self.record = False

    @property
    def backbone(self) -> "TransformerBackbone":
        return self._backbone[0]

    @torch.compiler.disable
    def begin(self, training: bool) -> None:
        """Per-forward start with crystallization on (a graph break under torch.compile):
        clear the motif matches and logged paths; in training, restore frozen experts exactly."""
        self.match, self.paths, self.entropy, self.served = None, [], [], None
        self.capture = False
        if training:
            for moe in self.backbone.moe_layers():
                if moe.n_frozen:
                    moe.restore_frozen()

    @torch.compiler.disable
    def log_paths(self) -> None:
        bb = self.backbone
        paths = torch.stack(self.paths, 1)  # (N, L)
        ent = torch.stack(self.entropy, 1)  # (N, L)
        cap = bb.params.crystallization.max_log_tokens
        if paths.shape[0] > cap:
            sel = torch.randperm(paths.shape[0], device=paths.device)[:cap]
            paths, ent = paths[sel], ent[sel]
        bb.trie.insert(paths, ent, self.step)
        self.paths, self.entropy = [], []


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class CausalSelfAttention(nn.Module):
    def __init__(self, p: TransformerParams, d_model: int) -> None:
        super().__init__()
        if d_model % p.n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={p.n_heads}; pick n_heads dividing d_model")
        self.n_heads, self.head_dim = p.n_heads, d_model // p.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions; change d_model or n_heads")
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=p.bias)  # fused q, k, v
        self.c_proj = nn.Linear(d_model, d_model, bias=p.bias)
        self.dropout = p.dropout
        self.resid_dropout = nn.Dropout(p.dropout)
        self.rotary_base = p.rotary_base
        self.attention = p.traces.attention
        self.bias_chunks = p.traces.bias_chunks
        cos, sin = _rope_tables(p.max_seq_len, self.head_dim, p.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        t = p.traces
        self.traces: TraceStore | None = None
        if t.enabled:
            self.traces = TraceStore(
                p.n_heads, t.quota_per_head, alpha=t.alpha, learn_alpha=t.learn_alpha, threshold=t.threshold,
                retention=t.retention, decay=t.decay, alpha_warmup_steps=t.alpha_warmup_steps,
                warmup_steps=t.warmup_steps, update_interval=t.update_interval, normalize=t.normalize,
            )

    def _rope(self, past: int, T: int) -> tuple[Tensor, Tensor]:
        if past + T > self.cos.shape[0]:  # beyond max_seq_len: grow the tables (generation past the context)
            cos, sin = _rope_tables(2 * (past + T), self.head_dim, self.rotary_base, self.cos.device)
            self.cos, self.sin = cos, sin
        return self.cos[past : past + T], self.sin[past : past + T]

    def forward(self, x: Tensor, state: State | None, step: Tensor | None, capture: bool) -> tuple[Tensor, Tensor, Tensor, Aux]:
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        q, k, v = self.c_attn(x).view(B, T, 3, H, hd).unbind(2)  # (B, T, H, hd) each
        past = state["k"].shape[2] if state else 0
        cos, sin = self._rope(past, T)
        # rotate in the (B, T, H, hd) layout the projection wrote, so q and k reach the attention
        # kernel with the same strides as v (as nanoGPT's views do) and the backward's
        # gradient for the fused projection is written without a transposing copy
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, hd/2)
        q = apply_rotary(q, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if past:
            k = torch.cat([state["k"].to(k.dtype), k], 2)  # (B, H, past + T, hd)
            v = torch.cat([state["v"].to(v.dtype), v], 2)
        Tk = past + T
        aux: Aux = {}
        tr = self.traces
        p_drop = self.dropout if self.training else 0.0
        if tr is not None and capture:  # the forward-only capture pass: explicit weights, no dropout
            alpha = publish(aux, "traces.alpha", tr.alpha_eff(step))
            A = tr.capture(q, k, v, past, alpha)  # (B, H, T, Tk)
            y = (A @ v.float()).to(q.dtype)  # (B, H, T, hd)
        elif tr is None or not tr.active:
            if tr is not None:
                publish(aux, "traces.alpha", tr.alpha_eff(step))
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
            else:
                mask = offsets_matrix(T, Tk, past, x.device) >= 0  # (T, Tk)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            alpha = publish(aux, "traces.alpha", tr.alpha_eff(step))  # (H,)
            # FlexAttention has no CPU backward: "flex" off CUDA is used only without gradient
            flex_ok = x.is_cuda or not (torch.is_grad_enabled() and q.requires_grad)
            use_flex = T > 1 and flex_ok and self.attention == "flex"
            if use_flex:
                bias = alpha[:, None] * tr.bias_matrix(Tk + 129)  # (H, Tk + 129): room for padded blocks
                y = _flex_attention(q, k, v, bias.to(torch.float32), past)
            else:
                bias = alpha[:, None] * tr.bias_matrix(Tk)  # (H, Tk)
                y = _biased_sdpa(q, k, v, bias, past, self.bias_chunks, p_drop, fused=self.attention == "auto")
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y)), k, v, aux


class Block(Layer):
    """One pre-norm decoder layer: ``x + attn(ln(x))``, then ``x + ffn(ln(x))``."""

    def __init__(self, p: TransformerParams, d_model: int, index: int, ctx: RunContext) -> None:
        super().__init__()
        self.d_model, self.index = d_model, index
        self.n_heads, self.head_dim = p.n_heads, d_model // p.n_heads
        self.ln_1 = nn.LayerNorm(d_model, bias=p.bias)
        self.attn = CausalSelfAttention(p, d_model)
        self.ln_2 = nn.LayerNorm(d_model, bias=p.bias)
        hidden = int(p.mlp_ratio * d_model)
        self.moe = p.ffn == "moe"
        if self.moe:
            self.ffn: nn.Module = MoE(d_model, hidden, p.n_experts, p.top_k, p.n_layers)
            self.ffn_dropout = nn.Dropout(p.dropout)
        else:
            self.ffn = MLP(d_model, hidden, p.bias, p.dropout)
        self.last = index == p.n_layers - 1
        self._ctx = ctx
        # no traces, no crystallization: the layer never reads the shared context (under torch.compile every
        # attribute read is a guard checked at each call, and the context shared by all layers adds aliasing guards)
        self._plain = not (p.traces.enabled or p.crystallization.enabled)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype or torch.float32
        kv = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": kv, "v": kv.clone(), "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        if self._plain and not self.moe:  # nanoGPT's layer
            return self._forward(x, state, None, False)
        ctx = self._ctx
        bb = ctx.backbone
        if self.index == 0 and bb.params.crystallization.enabled:  # traces alone never leave the compiled graph
            ctx.begin(self.training)
        step = bb.train_step if bb.ticking else None
        if ctx.capture or ctx.log_now or ctx.record:
            return self._forward_eager(x, state, step, ctx.capture)  # rare bookkeeping steps run outside torch.compile
        return self._forward(x, state, step, ctx.capture)

    @torch.compiler.disable
    def _forward_eager(self, x: Tensor, state: State | None, step: Tensor | None, capture: bool) -> tuple[Tensor, State, Aux]:
        return self._forward(x, state, step, capture)

    def _forward(self, x: Tensor, state: State | None, step: Tensor | None, capture: bool) -> tuple[Tensor, State, Aux]:
        B, T, _ = x.shape
        a, k, v, aux = self.attn(self.ln_1(x), state, step, capture)
        x = x + a
        h = self.ln_2(x)
        x = x + (self._moe(h, aux) if self.moe else self.ffn(h))
        pos = state["pos"] + T if state else torch.full((B,), T, dtype=torch.long, device=x.device)
        # the KV cache carries no gradient (a stop-gradient, as Transformer-XL's memory and as the runner
        # detaches carried state anyway): k and v as differentiable outputs made every backward build and
        # copy zero gradients for them (2 per layer) and cost host time in the compiled wrapper
        return x, {"k": k.detach(), "v": v.detach(), "pos": pos}, aux

    def _moe(self, h: Tensor, aux: Aux) -> Tensor:
        B, T, D = h.shape
        ctx, moe = self._ctx, self.ffn
        motifs = ctx.backbone.motifs
        hf = h.reshape(B * T, D)  # (N, D)
        probs = publish(aux, "router.probs", moe.probs(hf).view(B, T, -1))  # (B, T, E)
        probs = probs.reshape(B * T, -1)  # (N, E)
        serve = motifs.serving(ctx.match, self.index) if motifs is not None and motifs.n_active else None
        reroute = ctx.reroute_layer == self.index  # utility control: served tokens are re-routed too
        y, idx = moe.dispatch(hf, probs, None if reroute else serve, reroute=reroute)
        publish(aux, "router.experts", idx.view(B, T, -1))
        top1 = idx[:, 0]  # (N,): the expert used first (the served one for motif tokens)
        if motifs is not None and motifs.n_active:
            ctx.match = motifs.triggered(ctx.match, serve, self.index, top1)
            if ctx.record:  # motif id per token (the last motif it triggered)
                m = ctx.match
                ctx.served = m if ctx.served is None else torch.where(m >= 0, m, ctx.served)
        if ctx.log_now or ctx.record:
            ctx.paths.append(top1.detach())
            ctx.entropy.append(-(probs * probs.clamp(min=1e-9).log()).sum(-1).detach())  # (N,)
            if self.last and ctx.log_now:
                ctx.log_paths()
        return self.ffn_dropout(y.view(B, T, D))


class TransformerBackbone(Backbone):
    """Stack of :class:`Block`; ``final_norm`` is a LayerNorm."""

    def __init__(self, p: TransformerParams, d_model: int) -> None:
        super().__init__(d_model)
        self.params = p
        self._ctx = RunContext(self)
        self.layers = nn.ModuleList([Block(p, d_model, i, self._ctx) for i in range(p.n_layers)])
        self.final_norm = nn.LayerNorm(d_model, bias=p.bias)
        self.ticking = p.traces.enabled or p.crystallization.enabled  # has a per-step schedule (begin_step)
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        cr = p.crystallization
        if cr.enabled and p.ffn != "moe":
            raise ValueError("crystallization needs a mixture-of-experts feed-forward: set ffn: moe (or disable crystallization)")
        for moe in self.moe_layers():
            moe.hard_freeze = cr.freeze
        self.motifs: MotifTable | None = MotifTable(p.n_layers, p.n_experts, cr.max_motifs) if cr.enabled else None
        self.trie: PathTrie | None = PathTrie(p.n_layers, cr.max_motif_len, cr.max_nodes) if cr.enabled else None
        self._init_weights(p)
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module._ctx, "step", int(module.train_step)))
        from traces_crystallize.schedule import BackboneSchedule

        self._schedule = BackboneSchedule(self)

    def training_callbacks(self) -> list:
        """The callback that runs the step schedule and saves the path trie (statelab.callbacks)."""
        return [self._schedule] if self.ticking else []

    def is_capture_step(self, step: int) -> bool:
        return any(t is not None and t.is_capture_step(step) for t in self.trace_stores())

    @torch.no_grad()
    def begin_step(self, step: int, x: Tensor | None = None) -> None:
        """Start optimizer step ``step`` (1, 2, ...): set the step counter; on a capture step
        (:meth:`is_capture_step`) run the capture pass on the layer-0 input ``x (B, T, D)``;
        log routing paths in the forwards until :meth:`end_logging` on a log step."""
        self.train_step.fill_(step)
        self._ctx.step = step
        if x is not None and self.is_capture_step(step):
            self.capture_traces(x)
        cr = self.params.crystallization
        self._ctx.log_now = cr.enabled and step % cr.log_interval == 0

    def end_logging(self) -> None:
        """Stop logging routing paths (after the first micro-batch of a log step)."""
        self._ctx.log_now = False

    def _init_weights(self, p: TransformerParams) -> None:
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = 0.02 / math.sqrt(2 * p.n_layers) if name.endswith("c_proj") else 0.02
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def capture_traces(self, x: Tensor, loss_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        """The capture pass: run the layers on the first ``capture_rows`` rows of the layer-0
        input ``x (B, T, D)``, each attention computing its explicit weights and updating its
        trace memory. Called by :meth:`begin_step` on a capture step, before the ordinary
        forward (which then runs unchanged, compiled or not); there forward-only, with the
        cheap salience ``A * |v|``. With ``loss_fn`` (the last layer's output ``(rows, T, D)``
        -> a scalar loss) the salience is the seed's ``A * |dL/dA| * log(1 + recurrence)``:
        one backward to the attention weights only, no parameter's ``.grad`` touched."""
        ctx = self._ctx
        h = x[: self.params.traces.capture_rows].detach()  # (rows, T, D)
        stores = [t for t in self.trace_stores() if t is not None]
        saved = ctx.log_now, ctx.record
        ctx.capture, ctx.log_now, ctx.record, ctx.match = True, False, False, None
        try:
            for t in stores:
                t.pending = [] if loss_fn is not None else None
            step = self.train_step if self.ticking else None
            with torch.enable_grad() if loss_fn is not None else torch.no_grad():
                for block in self.layers:
                    h = block._forward(h, None, step, True)[0]
                if loss_fn is not None:
                    queued = [(t, item) for t in stores for item in t.pending]
                    grads = torch.autograd.grad(loss_fn(h), [A for _, (A, _, _) in queued], allow_unused=True)
                    for (t, (A, traced, past)), g in zip(queued, grads):
                        t.update_from_gradient(A, traced, past, g)
        finally:
            for t in stores:
                t.pending = None
            ctx.capture, (ctx.log_now, ctx.record), ctx.match, ctx.paths, ctx.entropy = False, saved, None, [], []

    # -- reporting ----------------------------------------------------------------------
    def trace_stores(self) -> list[TraceStore | None]:
        return [b.attn.traces for b in self.layers]

    def trace_nbytes(self) -> list[int]:
        return [t.nbytes() if t is not None else 0 for t in self.trace_stores()]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if b.moe]


def build(params: TransformerParams, ctx) -> TransformerBackbone:
    return TransformerBackbone(params, ctx.d_model)
