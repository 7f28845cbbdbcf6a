"""Evaluation of traces and crystallization: Tiny Shakespeare on/off, motif FLOPs, copy task.

    python benchmarks/traces/evaluate.py --device cuda                     # full (GPU)
    python benchmarks/traces/evaluate.py --device cpu --steps 300 --small  # short CPU version

1. ``configs/traces.yaml`` (MoE transformer, traces and crystallization on) against the same
   spec with both off, each trained by ``statelab.train`` in its own process: best
   validation loss, training tokens/s, peak memory (GPU: max allocated; CPU: peak RSS), and
   the trace / trie bytes.
2. FLOPs saved by motifs in the "on" run (the ``motifs`` probe: expert evaluations counted
   with motifs serving vs the same model with serving off, on validation windows).
3. Copy task (``x SEP x``, loss and accuracy on the second half): a small transformer with and
   without traces, same seed and steps; accuracy on held-out sequences.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "configs" / "traces.yaml"
SMALL = ["model.d_model=96", "model.backbone.n_layers=3", "model.backbone.n_heads=4", "train.batch_size=8",
         "train.seq_len=128", "train.eval_batches=4", "train.sample_tokens=0", "probes.0.seq_len=128",
         "probes.0.batches=2"]


def child(args) -> None:
    import torch

    from statelab.train import train

    overrides = json.loads(args.overrides)
    res = train(str(SPEC), overrides=overrides, out_dir=args.out_dir, progress=False)
    bb = res.model.backbone
    out = {
        "best_val_loss": res.best_val_loss,
        "tokens_per_s": res.tokens_per_s,
        "steps": res.step,
        "peak_mem_mb": (torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available() and "cuda" in args.device
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
        "trace_bytes": sum(bb.trace_nbytes()),
        "trace_entries": sum(t.n_live for t in bb.trace_stores() if t is not None),
        "trie_bytes": bb.trie.nbytes() if bb.trie is not None else 0,
        "metrics": {k: v for k, v in res.metrics.items() if k.startswith(("probe/", "reg/"))},
    }
    Path(args.json).write_text(json.dumps(out))


def start_spec(name: str, overrides: list[str], device: str, tmp: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", "--json", str(out), "--out-dir", str(tmp / name), "--device", device,
           "--overrides", json.dumps(overrides)]
    return subprocess.Popen(cmd, cwd=ROOT), out


def finish_spec(proc: subprocess.Popen, out: Path) -> dict:
    if proc.wait() != 0:
        raise RuntimeError(f"training run {out.stem} failed (exit {proc.returncode}); see its output above")
    return json.loads(out.read_text())


def run_spec(name: str, overrides: list[str], device: str, tmp: Path) -> dict:
    return finish_spec(*start_spec(name, overrides, device, tmp))


def copy_task(traces: bool, device: str, steps: int, L: int, vocab: int, seed: int) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    import statelab

    T = 2 * L + 1
    tr = {"enabled": traces, "warmup_steps": 20, "update_interval": 5, "alpha_warmup_steps": 20, "alpha": 0.5}
    spec = {"name": "copy", "seed": seed, "tokenizer": {"kind": "byte"},
            "model": {"d_model": 64, "vocab_size": vocab,
                      "backbone": {"kind": "transformer", "n_layers": 2, "n_heads": 4, "max_seq_len": T, "traces": tr}},
            "tracking": {"enabled": False}}
    model = statelab.build(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        x = torch.randint(2, vocab, (n, L), generator=g)
        seq = torch.cat([x, torch.ones(n, 1, dtype=torch.long), x], 1).to(device)  # (n, 2L+1); 1 = SEP
        return seq

    held_out = torch.Generator().manual_seed(seed + 1)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            x = torch.randint(2, vocab, (512, L), generator=held_out)
            s = torch.cat([x, torch.ones(512, 1, dtype=torch.long), x], 1).to(device)
            pred = model(s[:, :-1])[0][:, L:].argmax(-1)
            acc = (pred == s[:, L + 1 :]).float().mean().item()
        model.train()
        return acc

    model.train()
    t0 = time.perf_counter()
    curve = {}
    for step in range(1, steps + 1):
        s = batch(32)
        logits = model(s[:, :-1])[0][:, L:]  # predictions for the copied half
        loss = F.cross_entropy(logits.flatten(0, 1), s[:, L + 1 :].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 4) == 0 or step == steps:
            curve[step] = accuracy()
    took = time.perf_counter() - t0
    entries = sum(t.n_live for t in model.backbone.trace_stores() if t is not None)
    return {"acc": curve[steps], "curve": curve, "final_loss": float(loss.detach()), "seconds": took, "entries": entries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the Shakespeare runs (default: the spec's)")
    ap.add_argument("--small", action="store_true", help="a smaller model and batch (CPU)")
    ap.add_argument("--copy-steps", type=int, default=400)
    ap.add_argument("--copy-len", type=int, default=16)
    ap.add_argument("--skip-shakespeare", action="store_true")
    ap.add_argument("--parallel", action="store_true", help="run the on/off trainings and the copy task at the same time")
    ap.add_argument("--seed", type=int, default=0, help="copy task seed")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds per Shakespeare run (train.time_budget_s, from its process start); the table "
                         "shows the steps each run reached")
    ap.add_argument("--out", help="write the markdown section to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    lines = []
    copy_res = None
    if not a.skip_shakespeare:
        common = [f"train.device={a.device}", "tracking.enabled=false"]
        if a.steps:
            s = a.steps
            common += [f"train.steps={s}", f"train.eval_interval={max(1, s // 2)}", f"train.checkpoint_interval={s}",
                       f"model.backbone.traces.warmup_steps={s // 5}", f"model.backbone.traces.alpha_warmup_steps={s // 5}",
                       f"model.backbone.traces.update_interval={max(1, s // 20)}",
                       f"model.backbone.crystallization.prune_interval={max(1, s // 4)}",
                       "model.backbone.crystallization.log_interval=5"]
        if a.small:
            common += SMALL
        if a.time_budget:
            common += [f"train.time_budget_s={a.time_budget}"]
        off = ["model.backbone.traces.enabled=false", "model.backbone.crystallization.enabled=false",
               "model.regularizers=[{kind: load-balance, weight: 0.01}]", "probes=[]"]
        with tempfile.TemporaryDirectory() as tmp:
            if a.parallel:  # both runs and the copy task share the device: tokens/s are indicative only
                jobs = [start_spec("on", common, a.device, Path(tmp)), start_spec("off", common + off, a.device, Path(tmp))]
                copy_res = {tr: copy_task(tr, a.device, a.copy_steps, a.copy_len, 32, a.seed) for tr in (False, True)}
                r_on, r_off = (finish_spec(*j) for j in jobs)
            else:
                r_on = run_spec("on", common, a.device, Path(tmp))
                r_off = run_spec("off", common + off, a.device, Path(tmp))
        m = r_on["metrics"]
        lines += [
            f"### Tiny Shakespeare: MoE transformer with traces + crystallization vs without ({a.device})",
            "",
            f"`configs/traces.yaml`{' (--small: ' + ', '.join(SMALL[:5]) + ')' if a.small else ''}"
            f"{f', {a.steps} steps' if a.steps else ''}.",
            "",
            *(["The two runs and the copy task ran at the same time on one device (`--parallel`): the tokens/s "
               "are indicative only.", ""] if a.parallel else []),
            "| run | steps | best val loss | train tokens/s | peak memory | trace bytes (entries) | trie bytes |",
            "|---|---|---|---|---|---|---|",
            f"| traces + crystallization on | {r_on['steps']} | {r_on['best_val_loss']:.4f} | {r_on['tokens_per_s']:,.0f} "
            f"| {r_on['peak_mem_mb']:.0f} MB | {r_on['trace_bytes']:,} ({r_on['trace_entries']:,}) | {r_on['trie_bytes']:,} |",
            f"| both off | {r_off['steps']} | {r_off['best_val_loss']:.4f} | {r_off['tokens_per_s']:,.0f} "
            f"| {r_off['peak_mem_mb']:.0f} MB | 0 | 0 |",
            "",
            "Motifs in the \"on\" run (the `motifs` probe, on validation windows):",
            "",
            "| motifs | FFN FLOP reduction | whole-forward FLOP reduction | val loss (probe) | val loss, motifs off |",
            "|---|---|---|---|---|",
            f"| {m.get('probe/motifs/motifs', 0):.0f} | {100 * m.get('probe/motifs/ffn_flop_reduction', 0):.1f}% "
            f"| {100 * m.get('probe/motifs/flop_reduction', 0):.1f}% | {m.get('probe/motifs/val_loss', float('nan')):.4f} "
            f"| {m.get('probe/motifs/val_loss_no_motifs', float('nan')):.4f} |",
            "",
        ]
    res = copy_res if copy_res is not None else {tr: copy_task(tr, a.device, a.copy_steps, a.copy_len, 32, a.seed) for tr in (False, True)}
    lines += [
        f"### Copy task (x SEP x, length {a.copy_len}, vocabulary 32; 2 layers, 4 heads, 64 wide; {a.copy_steps} steps, batch 32, lr 1e-3; traces from step 20, captured every 5 steps, alpha 0.5 (fixed, ramped over 20 steps))",
        "",
        "| traces | accuracy on the copied half (512 held-out) at steps " + ", ".join(map(str, res[False]["curve"])) +
        " | final train loss | trace entries | train time |",
        "|---|---|---|---|---|",
        *[f"| {'on' if tr else 'off'} | {' / '.join(f'{v:.3f}' for v in r['curve'].values())} | {r['final_loss']:.3f} "
          f"| {r['entries']} | {r['seconds']:.0f} s |" for tr, r in res.items()],
        "",
        f"Reproduce: `python benchmarks/traces/evaluate.py --device {a.device}"
        f"{f' --steps {a.steps}' if a.steps else ''}{' --small' if a.small else ''}"
        f"{f' --copy-steps {a.copy_steps}' if a.copy_steps != 400 else ''}{f' --copy-len {a.copy_len}' if a.copy_len != 16 else ''}{' --skip-shakespeare' if a.skip_shakespeare else ''}{' --parallel' if a.parallel else ''}"
        f"{f' --time-budget {a.time_budget:g}' if a.time_budget else ''}`",
        "",
    ]
    md = "\n".join(lines)
    print(md)
    if a.out:
        from statelab.io import atomic_write_text

        atomic_write_text(a.out, md)


if __name__ == "__main__":
    main()
