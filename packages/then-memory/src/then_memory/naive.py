"""The slow, obviously-correct reference of :class:`then_memory.memory.ThenMemory`.

One position at a time with plain Python lists: every token's (k, v) is remembered; when a
chunk completes its traces are appended to a list with their time index; position ``p``
attends locally to the last ``W`` tokens and reads the top-k of the newest ``S`` traces
written before ``p``. Used by the tests to check the vectorised module on random inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from then_memory.memory import ThenMemory


def naive_forward(mem: ThenMemory, x: Tensor) -> tuple[Tensor, list[list[tuple[int, int]]]]:
    """Outputs ``(B, T, D)`` of ``mem`` on ``x`` from an empty state, and for every row the
    list of ``(position, trace time index)`` pairs that were read (for the causality test)."""
    B, T, D = x.shape
    H, dh, W, S, C = mem.n_heads, mem.dh, mem.window, mem.ring_size, mem.chunk_size
    scale = 1.0 / math.sqrt(dh)
    out = torch.zeros_like(x)
    reads: list[list[tuple[int, int]]] = []
    for b in range(B):
        toks: list[tuple[Tensor, Tensor]] = []  # (k, v) of every position so far
        traces: list[tuple[Tensor, Tensor, int, int]] = []  # (k, v, time index, source end position)
        row_reads = []
        for p in range(T):
            h = mem.norm(x[b, p])
            q, k, v = mem.qkv(h).split(D)
            toks.append((k, v))
            local = torch.zeros(H, dh)
            recall = torch.zeros(H, dh)
            for hd in range(H):
                sl = slice(hd * dh, (hd + 1) * dh)
                win = toks[max(0, p - W + 1) : p + 1]
                sc = torch.stack([q[sl] @ kk[sl] for kk, _ in win]) * scale
                a = sc.softmax(0)
                local[hd] = sum(a[i] * win[i][1][sl] for i in range(len(win)))
            readable = traces[-S:]  # all written traces are from positions < p
            if readable:
                tau = mem.recall_log_temp.exp().repeat_interleave(dh)  # (D,) per-head temperature
                full = torch.stack([(q * tau) @ tk for tk, _, _, _ in readable])
                top = full.topk(min(mem.top_k, len(readable))).indices.tolist()
                chosen = [readable[i] for i in top]
                if mem.supersede_cos is not None:  # drop a trace that a newer one with the same key direction replaces
                    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
                    chosen = [c for c in chosen
                              if not any(o[2] > c[2] and cos(c[0], o[0]) >= mem.supersede_cos for o in chosen)]
                row_reads += [(p, n) for _, _, n, _ in chosen]
                for hd in range(H):
                    sl = slice(hd * dh, (hd + 1) * dh)
                    sc = torch.stack([q[sl] @ tk[sl] for tk, _, _, _ in chosen]) * scale * mem.recall_log_temp[hd].exp()
                    a = sc.softmax(0)
                    recall[hd] = sum(a[i] * chosen[i][1][sl] for i in range(len(chosen)))
            g = torch.sigmoid(mem.gate(h))  # (H,)
            mixed = (1 - g)[:, None] * local + g[:, None] * recall
            out[b, p] = x[b, p] + mem.out(mixed.reshape(D))
            if (p + 1) % C == 0:  # chunk [p - C + 1, p] completes: write its traces
                chunk = toks[p - C + 1 : p + 1]
                if mem.trace_key == "previous":  # key of the token before (zeros before position 0)
                    keys = [toks[i - 1][0] if i > 0 else torch.zeros(D) for i in range(p - C + 1, p + 1)]
                else:
                    keys = [c[0] for c in chunk]
                if mem.trace_mode == "token":
                    for kk, vv in zip(keys, (c[1] for c in chunk)):
                        traces.append((kk, vv, len(traces), p))
                else:
                    kk = torch.stack(keys).mean(0)
                    vv = torch.stack([c[1] for c in chunk]).mean(0)
                    traces.append((kk, vv, len(traces), p))
        reads.append(row_reads)
    return out, reads


def trace_source_end(mem: ThenMemory, n: int) -> int:
    """Last position that contributed to trace ``n`` (written at that position's chunk end)."""
    C = mem.chunk_size
    chunk = n // C if mem.trace_mode == "token" else n
    return (chunk + 1) * C - 1
