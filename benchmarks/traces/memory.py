"""Memory of the traces and of the crystallization structures for a 32-layer, 8-head model.

    python benchmarks/traces/memory.py            # CPU, a few seconds

Traces: the trace buffers of 32 layers x 8 heads at the default quota (2048 per head),
allocated (fixed size: int32 offset + float32 value per slot) and filled to the quota by
captures at T=4096 with theta=0 (the worst case). Crystallization: the path trie at its
default bound (20,000 nodes) filled from random routing paths over 32 MoE layers with 8
experts, plus the motif table at the default max_motifs (512). The prototype predicted
about 24 MB of traces and 5 MB of crystallization; the goal is traces <= 30 MB.
"""

from __future__ import annotations

import argparse

import torch

from traces_crystallize.paths import MotifTable, PathTrie
from traces_crystallize.plugin import CrystallizationParams, TracesParams
from traces_crystallize.traces import TraceStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", help="write the markdown section to this file")
    a = ap.parse_args()
    tp, cp = TracesParams(), CrystallizationParams()
    g = torch.Generator().manual_seed(0)
    stores = [TraceStore(a.heads, tp.quota_per_head, threshold=0.0) for _ in range(a.layers)]
    for s in stores:  # salience over 4096 offsets: every head fills its quota
        s.update(torch.rand(a.heads, 4096, generator=g) + 1e-3)
    traces_bytes = sum(s.nbytes() for s in stores)
    filled = sum(s.n_live for s in stores)
    trie = PathTrie(a.layers, cp.max_motif_len, cp.max_nodes)
    step = 0
    while len(trie) < cp.max_nodes:
        step += 1
        trie.insert(torch.randint(0, a.experts, (cp.max_log_tokens, a.layers), generator=g),
                    torch.rand(cp.max_log_tokens, a.layers, generator=g), step)
    trie_bytes = trie.nbytes()
    motif_bytes = MotifTable(a.layers, a.experts, cp.max_motifs).nbytes()
    mb = 1e6
    md = "\n".join([
        f"### Trace and crystallization memory, {a.layers} layers x {a.heads} heads, {a.experts} experts",
        "",
        "| structure | bytes | MB | prototype's prediction |",
        "|---|---|---|---|",
        f"| traces, quota {tp.quota_per_head}/head, {filled:,} entries (full) | {traces_bytes:,} | {traces_bytes / mb:.2f} | ~24 MB (goal <= 30 MB) |",
        f"| path trie at its bound ({len(trie):,} nodes, Python objects) | {trie_bytes:,} | {trie_bytes / mb:.2f} | |",
        f"| motif table (max_motifs {cp.max_motifs}) | {motif_bytes:,} | {motif_bytes / mb:.2f} | |",
        f"| crystallization total | {trie_bytes + motif_bytes:,} | {(trie_bytes + motif_bytes) / mb:.2f} | ~5 MB |",
        "",
        "Reproduce: `python benchmarks/traces/memory.py`",
        "",
    ])
    print(md)
    if a.out:
        from statelab.io import atomic_write_text

        atomic_write_text(a.out, md)


if __name__ == "__main__":
    main()
