"""FLOPs saved by crystallized motifs, in a run where motifs form.

    python benchmarks/traces/motif_flops.py --device cpu                   # small, a few minutes
    python benchmarks/traces/motif_flops.py --device cuda --steps 2000 --full

Trains ``configs/traces.yaml`` with traces off (to isolate crystallization) and permissive
crystallization limits (``min_utility 0``, ``--max-entropy`` default 2.0 nats of the 2.08
possible with 8 experts, score threshold 0; the ``crystallization`` regularizer's weight
raised to 0.05 to sharpen routing: in short runs the router stays near uniform), then
runs the ``motifs`` probe: expert evaluations counted on validation windows with motif
serving on and off (FFN FLOPs, and the whole forward), and the validation loss both ways.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import tempfile

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.d_model=96", "model.backbone.n_layers=3", "model.backbone.n_heads=4", "train.batch_size=8",
         "train.seq_len=128", "train.eval_batches=4", "train.sample_tokens=0", "probes.0.seq_len=128", "probes.0.batches=2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-entropy", type=float, default=2.0)
    ap.add_argument("--full", action="store_true", help="the spec's model size (default: the small CPU model)")
    ap.add_argument("--time-budget", type=float, default=None, help="train.time_budget_s (from process start)")
    ap.add_argument("--out", help="write the markdown section to this file")
    a = ap.parse_args()
    from statelab.train import train

    s = a.steps
    overrides = [
        f"train.device={a.device}", "tracking.enabled=false", f"train.steps={s}", f"train.eval_interval={s}",
        f"train.checkpoint_interval={s}", "model.backbone.traces.enabled=false",
        "model.regularizers=[{kind: load-balance, weight: 0.01}, {kind: crystallization, weight: 0.05}, {kind: ewc, weight: 1.0}]",
        "probes=[{kind: motifs, batches: 4, batch_size: 8, seq_len: 256}]",
        "model.backbone.crystallization.log_interval=5", f"model.backbone.crystallization.prune_interval={max(1, s // 3)}",
        "model.backbone.crystallization.min_frequency=50", "model.backbone.crystallization.min_utility=0.0",
        f"model.backbone.crystallization.max_entropy={a.max_entropy}", "model.backbone.crystallization.threshold=0.0",
    ]
    if not a.full:
        overrides += SMALL
    if a.time_budget:
        overrides += [f"train.time_budget_s={a.time_budget}"]
    with tempfile.TemporaryDirectory() as tmp:
        res = train(str(ROOT / "configs" / "traces.yaml"), overrides=overrides, out_dir=tmp, progress=False)
    m = res.metrics
    bb = res.model.backbone
    rows = bb.motifs.listing()
    md = "\n".join([
        f"### FLOPs saved by motifs ({a.device}, {res.step} of {s} steps, {'full' if a.full else 'small'} model, top_k 2 of 8 experts)",
        "",
        "| motifs | FFN FLOP reduction | whole-forward FLOP reduction | val loss, motifs serving | val loss, serving off | trie nodes |",
        "|---|---|---|---|---|---|",
        f"| {m.get('probe/motifs/motifs', 0):.0f} | {100 * m.get('probe/motifs/ffn_flop_reduction', 0):.1f}% "
        f"| {100 * m.get('probe/motifs/flop_reduction', 0):.1f}% | {m.get('probe/motifs/val_loss', float('nan')):.4f} "
        f"| {m.get('probe/motifs/val_loss_no_motifs', float('nan')):.4f} | {m.get('probe/motifs/trie_nodes', 0):.0f} |",
        "",
        "Motifs (start layer, experts, frequency, utility in nats, entropy in nats): "
        + (", ".join(f"({r['start']}, {'-'.join(map(str, r['experts']))}, {r['frequency']:.0f}, {r['utility']:.3f}, {r['entropy']:.2f})"
                     for r in sorted(rows, key=lambda r: -r["score"])[:8]) or "none"),
        "",
        f"Reproduce: `python benchmarks/traces/motif_flops.py --device {a.device}"
        f"{f' --steps {s}' if s != 300 else ''}{' --full' if a.full else ''}"
        f"{f' --max-entropy {a.max_entropy}' if a.max_entropy != 2.0 else ''}"
        f"{f' --time-budget {a.time_budget:g}' if a.time_budget else ''}`",
        "",
    ])
    print(md)
    if a.out:
        from statelab.io import atomic_write_text

        atomic_write_text(a.out, md)


if __name__ == "__main__":
    main()
