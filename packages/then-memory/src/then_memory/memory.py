"""Memory ``then``: hybrid attention over a local window and top-k traces from a trace store.

Config (:class:`then_memory.plugin.ThenParams`)::

    n_heads     4       heads of both attentions; head width dh = D / n_heads
    chunk_size  16      a chunk of C tokens completes -> its traces are written
    trace_mode  token   token: every token of the chunk is a trace; pooled: one mean trace per chunk
    window      32      local causal attention over the last W tokens (W >= C)
    ring_size   256     traces kept in the state (the in-graph hot tier, newest S)
    top_k       16      traces each position reads
    trace_key   previous  previous: a token's trace key is the key of the token *before* it (its
                        context), its value is the token's own value, so a query finds "what
                        followed this context" (an induction-style lookup); self: key and value
                        of the same token

Per position ``p`` with normed input ``h = LN(x_p)`` and ``q, k, v = W_qkv h``::

    local  = softmax-attention of q over k, v of positions (p - W, p]
    recall = softmax-attention of q over the top-k traces among the traces *available* at p;
             the logits of head h are multiplied by a learned temperature tau_h (init
             ``recall_temperature``), and the top-k are those with the largest
             sum_h tau_h q_h . k_h (an inner product with the query scaled per head, so a
             store ranks the same way)
             with ``supersede_cos`` set, a chosen trace whose key has cosine >= it with a
             *newer* chosen trace is dropped before the softmax: the newer one replaces it
             (an updated fact is read, not a blend of the old and the new value)
    g      = sigmoid(W_g h)                      (B, T, H), published as ``memory.gate``
    y_p    = x_p + W_o [(1 - g) local + g recall]   (recall published as ``memory.recall``)

With ``trace_key: previous`` the trace of the token at ``p`` is ``(k_{p-1}, v_p)``: the query
at the question's "The pass key is" matches the key of the same context at the key line,
whose value carries the digit that followed it (position 0's predecessor has a zero key).

Why the read path is learnable from the first step: the key projection starts as a copy
of the query projection (``tie_qk_init``), so q . k is largest between hidden states of
the same context, and the trace of the token that followed the query's context ranks
first among all traces before any training; with the sharper trace softmax (tau = 4) its
value dominates the read-out, and training only has to map values to the next token and
sharpen the match. Without these the gate closes before the match is found (tested on
passkey documents: chance level after 1,200 steps; with them, solved in 250).

A trace written from chunk ``[cC, (c+1)C)`` becomes available at position ``(c+1)C``: no
position ever reads a trace written from itself or a later position. Traces carry a time
index ``n`` (0, 1, 2, ... in write order), which is also their address in a
:class:`~then_memory.store.TraceStore`.

State (flat, batch-first)::

    pos      (B,)         tokens seen
    count    (B,)         traces written
    cache_k  (B, W, D)    keys/values of the last W tokens (local window, unfinished chunk)
    cache_v  (B, W, D)
    ring_k   (B, S, D)    the newest S traces, slot n % S
    ring_v   (B, S, D)
    ring_n   (B, S)       time index of each slot, -1 = empty

Without a store the readable traces at position ``p`` are the newest ``S`` available ones
(exactly what a ring of size S holds when stepping token by token), so ``forward`` on a
sequence equals ``step`` per token. With stores attached (:meth:`ThenMemory.attach_stores`,
one per batch row, inference) the candidates of row ``b`` are the top-k of *every* trace in
its store written before the call, plus those written during it, and its new traces are
appended to its store (so one forward serves several users, each from their own store).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Memory, State
from statelab.internals import publish

if TYPE_CHECKING:  # pragma: no cover
    from then_memory.plugin import ThenParams
    from then_memory.store import TraceStore


class ThenMemory(Memory):
    external = True

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        chunk_size: int = 16,
        trace_mode: str = "token",
        window: int = 32,
        ring_size: int = 256,
        top_k: int = 16,
        gate_bias: float = 0.0,
        trace_key: str = "previous",
        recall_temperature: float = 4.0,
        tie_qk_init: bool = True,
        supersede_cos: float | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"then: d_model ({d_model}) must be divisible by n_heads ({n_heads}); change n_heads")
        if window < chunk_size:
            raise ValueError(f"then: window ({window}) must be >= chunk_size ({chunk_size})")
        if trace_mode not in ("token", "pooled"):
            raise ValueError(f"then: trace_mode must be 'token' or 'pooled', not {trace_mode!r}")
        if trace_key not in ("previous", "self"):
            raise ValueError(f"then: trace_key must be 'previous' or 'self', not {trace_key!r}")
        self.trace_key = trace_key
        if supersede_cos is not None and not -1.0 <= supersede_cos <= 1.0:
            raise ValueError(f"then: supersede_cos must be in [-1, 1] or None, got {supersede_cos}")
        self.supersede_cos = supersede_cos
        self.d_model, self.n_heads, self.dh = d_model, n_heads, d_model // n_heads
        self.chunk_size, self.trace_mode, self.window = chunk_size, trace_mode, window
        self.ring_size, self.top_k = ring_size, top_k
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gate = nn.Linear(d_model, n_heads)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        if tie_qk_init:  # a query first finds the traces written in its own context (see the module doc)
            with torch.no_grad():
                self.qkv.weight[d_model : 2 * d_model] = self.qkv.weight[:d_model]
        if recall_temperature <= 0:
            raise ValueError(f"then: recall_temperature must be > 0, got {recall_temperature}")
        self.recall_log_temp = nn.Parameter(torch.full((n_heads,), math.log(recall_temperature)))
        self.out = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.out.weight, std=0.02)
        # set by ingest_tokens when nothing downstream reads this memory's output (see there)
        self.write_only = False
        self.stores: "list[TraceStore] | None" = None  # one store per batch row (inference)
        self.store_coarse, self.store_nprobe = False, 32

    # -- store backend ---------------------------------------------------------------
    def attach_store(self, store: "TraceStore | None", *, coarse: bool = False, nprobe: int = 32) -> None:
        """Read and write traces through ``store`` (batch size 1); ``None`` detaches.
        ``coarse``: read through the store's coarse lists (``nprobe`` probed) instead of exactly."""
        self.attach_stores(None if store is None else [store], coarse=coarse, nprobe=nprobe)

    def attach_stores(self, stores: "list[TraceStore] | None", *, coarse: bool = False, nprobe: int = 32) -> None:
        """One store per batch row (row b reads and writes ``stores[b]`` only: a batch of
        different users in one forward); ``None`` detaches."""
        for st in stores or []:
            if st.dim != self.d_model:
                raise ValueError(f"then: the store holds traces of width {st.dim}, this memory writes {self.d_model}")
        self.stores = list(stores) if stores is not None else None
        self.store_coarse, self.store_nprobe = coarse, nprobe

    # -- state -----------------------------------------------------------------------
    def init_state(self, batch_size, device=None, dtype=None) -> State:
        B, W, S, D = batch_size, self.window, self.ring_size, self.d_model
        z = lambda *s: torch.zeros(*s, device=device, dtype=torch.float32)  # noqa: E731
        return {
            "pos": torch.zeros(B, dtype=torch.int64, device=device),
            "count": torch.zeros(B, dtype=torch.int64, device=device),
            "cache_k": z(B, W, D),
            "cache_v": z(B, W, D),
            "ring_k": z(B, S, D),
            "ring_v": z(B, S, D),
            "ring_n": torch.full((B, S), -1, dtype=torch.int64, device=device),
        }

    # -- the write side: which traces does this call complete? -------------------------
    def _new_traces(self, ek: Tensor, ev: Tensor, ep: Tensor, pos0: Tensor, T: int):
        """Traces completed by this call. ``ek, ev`` (B, L, D) are the window cache plus the
        new tokens, ``ep`` (B, L) their absolute positions. Returns keys, values (B, N, D),
        validity (B, N) and availability position (B, N) (first position allowed to read)."""
        C = self.chunk_size
        c = torch.div(ep, C, rounding_mode="floor")  # (B, L) chunk of each position
        c0 = torch.div(pos0, C, rounding_mode="floor")  # (B,) first chunk that can complete now
        n_done = torch.div(pos0 + T, C, rounding_mode="floor") - c0  # (B,) chunks completed in this call
        r = c - c0[:, None]  # (B, L) chunk index relative to c0
        done = (ep >= 0) & (r >= 0) & (r < n_done[:, None])  # (B, L) token belongs to a completed chunk
        if self.trace_mode == "token":
            return ek, ev, done, (c + 1) * C
        R = T // C + 1  # most chunks one call can complete
        onehot = (r[:, :, None] == torch.arange(R, device=ep.device)) & done[:, :, None]  # (B, L, R)
        w = onehot.to(ek.dtype)
        cnt = w.sum(1)  # (B, R): C for completed chunks, 0 otherwise
        nk = torch.einsum("blr,bld->brd", w, ek) / cnt.clamp(min=1)[:, :, None]  # (B, R, D)
        nv = torch.einsum("blr,bld->brd", w, ev) / cnt.clamp(min=1)[:, :, None]  # (B, R, D)
        avail = (c0[:, None] + torch.arange(R, device=ep.device) + 1) * C  # (B, R)
        return nk, nv, cnt > 0, avail

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        B, T, D = x.shape
        W = self.window
        if state is None or not state:
            state = self.init_state(B, x.device)
        pos0, count0 = state["pos"], state["count"]
        dev = x.device

        h = self.norm(x)
        q, k, v = self.qkv(h).split(D, dim=-1)  # (B, T, D) each
        ek = torch.cat([state["cache_k"].to(k.dtype), k], 1)  # (B, L, D), L = W + T
        ev = torch.cat([state["cache_v"].to(v.dtype), v], 1)  # (B, L, D)
        ep = pos0[:, None] + torch.arange(-W, T, device=dev)  # (B, L) absolute positions
        qp = pos0[:, None] + torch.arange(T, device=dev)  # (B, T)

        # traces completed during this call, with their time indices; with trace_key=previous the
        # key of position p is the cached/new key of p - 1 (ek[:, 0] never belongs to a chunk
        # completed now, since W >= C, so its missing predecessor is never used)
        tk = torch.cat([ek.new_zeros(B, 1, D), ek[:, :-1]], 1) if self.trace_key == "previous" else ek  # (B, L, D)
        nk, nv, nvalid, navail = self._new_traces(tk, ev, ep, pos0, T)  # (B, N, D), (B, N), (B, N)
        nseq = count0[:, None] + nvalid.long().cumsum(1) - 1  # (B, N) time index of each new trace
        if self.write_only:  # ingest only: the traces and the state, no reads, the output is the input
            return x, self._next_state(state, nk, nv, nvalid, nseq, ek, ev, T), {}
        y, aux = self._read(x, h, q, ek, ev, ep, qp, state, nk, nv, nvalid, navail, nseq)
        return y, self._next_state(state, nk, nv, nvalid, nseq, ek, ev, T), aux

    def _read(self, x, h, q, ek, ev, ep, qp, state, nk, nv, nvalid, navail, nseq) -> tuple[Tensor, Aux]:
        """Local attention and the trace read-out, merged by the gate: ``y`` (B, T, D)."""
        B, T, D = x.shape
        H, dh, W, S = self.n_heads, self.dh, self.window, self.ring_size
        count0 = state["count"]
        scale = 1.0 / math.sqrt(dh)
        qh = q.view(B, T, H, dh)  # (B, T, H, dh)

        # local attention over (p - W, p]
        rel = qp[:, :, None] - ep[:, None, :]  # (B, T, L)
        ok_loc = (rel >= 0) & (rel < W) & (ep[:, None, :] >= 0)  # (B, T, L)
        att = torch.einsum("bthd,blhd->bhtl", qh, ek.view(B, -1, H, dh)) * scale  # (B, H, T, L)
        att = att.masked_fill(~ok_loc[:, None], float("-inf")).softmax(-1)
        local = torch.einsum("bhtl,blhd->bthd", att, ev.view(B, -1, H, dh))  # (B, T, H, dh)
        can = nvalid[:, None, :] & (navail[:, None, :] <= qp[:, :, None])  # (B, T, N) available at p

        if self.stores is None:
            # the newest S available traces: ring slots and new traces
            n_avail = count0[:, None] + can.long().sum(-1)  # (B, T) traces available at p
            lo = (n_avail - S)[:, :, None]  # (B, T, 1) oldest readable time index
            rn = state["ring_n"]
            ok_old = (rn[:, None, :] >= 0) & (rn[:, None, :] >= lo)  # (B, T, S)
            ok_new = can & (nseq[:, None, :] >= lo)  # (B, T, N)
            rk = state["ring_k"].to(q.dtype).view(B, S, H, dh)
            s_old = torch.einsum("bthd,bshd->bhts", qh, rk)  # (B, H, T, S)
            v_all = torch.cat([state["ring_v"].to(nv.dtype), nv], 1)  # (B, M, D), M = S + N
            k_all = torch.cat([state["ring_k"].to(nk.dtype), nk], 1)  # (B, M, D)
            t_all = torch.cat([rn, nseq], 1)  # (B, M) time index of each candidate
        else:
            ok_old, s_old, k_old, v_old, t_old = self._store_candidates(q, count0)  # per query (B, T, K0, ...)
            ok_new = can
            v_all = None
        s_new = torch.einsum("bthd,bnhd->bhtn", qh, nk.view(B, -1, H, dh))  # (B, H, T, N)
        s = torch.cat([s_old, s_new], -1) * scale  # (B, H, T, M)
        ok = torch.cat([ok_old, ok_new], -1)  # (B, T, M)

        # top-k by the temperature-weighted inner product sum_h tau_h q_h . k_h (the logits the
        # softmax uses, so selection ranks what the read-out has learned to prefer), then per-head softmax
        K = min(self.top_k, s.shape[-1])
        s = s * self.recall_log_temp.exp().to(s.dtype)[None, :, None, None]  # learned sharpness per head
        sel = s.sum(1).masked_fill(~ok, float("-inf"))  # (B, T, M)
        idx = sel.topk(K, dim=-1).indices  # (B, T, K)
        okk = ok.gather(-1, idx)  # (B, T, K)
        sk = s.gather(-1, idx[:, None].expand(B, H, T, K))  # (B, H, T, K)
        sk = sk.masked_fill(~okk[:, None], torch.finfo(sk.dtype).min)
        wts = sk.softmax(-1) * okk[:, None].to(sk.dtype)  # (B, H, T, K); all zero when nothing to read
        if v_all is not None:
            vk = self._gather_rows(v_all, idx)  # (B, T, K, D)
        else:  # chosen among the store's candidates (index < K0) or this call's new traces
            vk = self._gather_candidates(v_old, nv, idx)  # (B, T, K, D)
        if self.supersede_cos is not None:
            if v_all is not None:
                kc, tc = self._gather_rows(k_all, idx), t_all.gather(1, idx.reshape(B, T * K)).view(B, T, K)
            else:
                kc = self._gather_candidates(k_old, nk, idx)  # (B, T, K, D)
                tc = self._gather_candidates(t_old[..., None], nseq[..., None], idx)[..., 0]  # (B, T, K)
            gone = self._superseded(kc, tc, okk)  # (B, T, K)
            okk = okk & ~gone
            sk = sk.masked_fill(gone[:, None], torch.finfo(sk.dtype).min)
            wts = sk.softmax(-1) * okk[:, None].to(sk.dtype)
        vk = vk.view(B, T, K, H, dh)  # (B, T, K, H, dh)
        recall = torch.einsum("bhtk,btkhd->bthd", wts, vk)  # (B, T, H, dh)

        aux: Aux = {}
        recall = publish(aux, "memory.recall", recall.reshape(B, T, D)).view(B, T, H, dh)
        g = publish(aux, "memory.gate", torch.sigmoid(self.gate(h)))  # (B, T, H)
        mixed = (1 - g)[..., None] * local + g[..., None] * recall  # (B, T, H, dh)
        y = x + self.out(mixed.reshape(B, T, D))  # (B, T, D)
        return y, aux

    @staticmethod
    def _gather_rows(rows: Tensor, idx: Tensor) -> Tensor:
        """``rows`` (B, M, D) at ``idx`` (B, T, K) -> (B, T, K, D), through a flat (B, T*K) index
        (the backward pass then scatters into (B, M, D), never into a (B, T, M, D) expansion)."""
        B, T, K = idx.shape
        D = rows.shape[-1]
        return rows.gather(1, idx.reshape(B, T * K, 1).expand(B, T * K, D)).view(B, T, K, D)

    @staticmethod
    def _gather_candidates(old: Tensor, new: Tensor, idx: Tensor) -> Tensor:
        """Rows of the chosen candidates when index < K0 names a per-query store candidate
        ``old`` (B, T, K0, D) and K0 + n names this call's new trace ``new`` (B, N, D)."""
        B, T, K = idx.shape
        K0, D = old.shape[2], old.shape[-1]
        o = old.gather(2, idx.clamp(max=K0 - 1)[..., None].expand(B, T, K, D))  # (B, T, K, D)
        i_new = (idx - K0).clamp(min=0).reshape(B, T * K, 1).expand(B, T * K, D)  # (B, T*K, D)
        n = new.gather(1, i_new).view(B, T, K, D)  # (B, T, K, D)
        return torch.where((idx < K0)[..., None], o, n)

    def _superseded(self, keys: Tensor, times: Tensor, ok: Tensor) -> Tensor:
        """Chosen traces (B, T, K) that a newer chosen trace replaces: its key points the same
        way (cosine >= ``supersede_cos``), so it was written in the same context, later (an
        updated fact). Keys (B, T, K, D), time indices (B, T, K), validity (B, T, K)."""
        kn = torch.nn.functional.normalize(keys.detach().float(), dim=-1)
        cos = kn @ kn.transpose(-1, -2)  # (B, T, K, K): [i, j] = cos(key_i, key_j)
        newer = times[..., None, :] > times[..., :, None]  # (B, T, K, K): j is newer than i
        return ((cos >= self.supersede_cos) & newer & ok[..., None, :]).any(-1)

    def _next_state(self, state, nk, nv, nvalid, nseq, ek, ev, T) -> State:
        """Window cache, ring (slot n % S, newest S only) and counters after this call; with
        a store attached the new traces are appended to it."""
        W, S = self.window, self.ring_size
        pos0, count0 = state["pos"], state["count"]
        n_new = nvalid.long().sum(1)  # (B,)
        count1 = count0 + n_new
        keep = nvalid & (nseq >= (count1 - S)[:, None])  # (B, N)
        slot = torch.where(keep, nseq % S, torch.full_like(nseq, S))  # (B, N); S = discard slot
        ring_k = self._scatter(state["ring_k"], slot, nk.float())
        ring_v = self._scatter(state["ring_v"], slot, nv.float())
        ring_n = torch.cat([state["ring_n"], state["ring_n"][:, :1]], 1).scatter(1, slot, nseq)[:, :S]
        new_state: State = {
            "pos": pos0 + T,
            "count": count1,
            "cache_k": ek[:, -W:].float(),
            "cache_v": ev[:, -W:].float(),
            "ring_k": ring_k,
            "ring_v": ring_v,
            "ring_n": ring_n,
        }
        if self.stores is not None:
            self._store_write(nk, nv, nvalid, nseq)
        return new_state

    @staticmethod
    def _scatter(ring: Tensor, slot: Tensor, new: Tensor) -> Tensor:
        B, S, D = ring.shape
        padded = torch.cat([ring, ring.new_zeros(B, 1, D)], 1)  # (B, S + 1, D); slot S absorbs discards
        return padded.scatter(1, slot[:, :, None].expand(B, slot.shape[1], D), new.to(ring.dtype))[:, :S]

    # -- store-backed reads and writes (inference, batch size 1) -----------------------
    def _store_candidates(self, q: Tensor, count0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Each row's top-k traces from its own store: validity (B, T, K0), per-head scores
        (B, H, T, K0), keys and values (B, T, K0, D), time indices (B, T, K0)."""
        B, T, D = q.shape
        H, dh = self.n_heads, self.dh
        if B != len(self.stores):
            raise ValueError(f"then: {len(self.stores)} trace stores are attached (one per batch row), the batch has {B} rows")
        tau = self.recall_log_temp.exp().to(q.dtype).repeat_interleave(dh)  # (D,): each head's dims by its tau
        res = []
        for b, store in enumerate(self.stores):
            limit = int(count0[b])
            if limit > len(store):
                raise ValueError(
                    f"then: the state says {limit} traces were written but the attached store holds {len(store)}; "
                    "the state and the store belong to different users or the store lost data"
                )
            # ranks by sum_h tau_h q_h . k_h, as the ring does
            res.append(store.search((q[b] * tau).detach(), self.top_k, limit=limit, coarse=self.store_coarse,
                                    nprobe=self.store_nprobe))
        kk = torch.stack([r.keys for r in res]).to(q.device, q.dtype)  # (B, T, K0, D)
        vv = torch.stack([r.values for r in res]).to(q.device, q.dtype)  # (B, T, K0, D)
        ids = torch.stack([r.ids for r in res]).to(q.device)  # (B, T, K0)
        s = torch.einsum("bthd,btkhd->bhtk", q.view(B, T, H, dh), kk.view(B, T, -1, H, dh))  # (B, H, T, K0)
        return ids >= 0, s, kk, vv, ids

    def _store_write(self, nk: Tensor, nv: Tensor, nvalid: Tensor, nseq: Tensor) -> None:
        for b, store in enumerate(self.stores):
            rows = nvalid[b]
            seq = nseq[b][rows]
            fresh = seq >= len(store)  # traces already in the store (a replayed snapshot) are not rewritten
            if not bool(fresh.any()):
                continue
            first = int(seq[fresh][0])
            if first != len(store):
                raise ValueError(f"then: the next trace has time index {first} but the store holds {len(store)} traces")
            store.append(nk[b][rows][fresh].detach(), nv[b][rows][fresh].detach())


def build_then(params: "ThenParams", ctx) -> ThenMemory:
    return ThenMemory(
        ctx.d_model,
        n_heads=params.n_heads,
        chunk_size=params.chunk_size,
        trace_mode=params.trace_mode,
        window=params.window,
        ring_size=params.ring_size,
        top_k=params.top_k,
        gate_bias=params.gate_bias,
        trace_key=params.trace_key,
        recall_temperature=params.recall_temperature,
        tie_qk_init=params.tie_qk_init,
        supersede_cos=params.supersede_cos,
    )
