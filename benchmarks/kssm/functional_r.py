"""Is R functional? Trained K-SSM variants judged by the `verdicts` tests, with a loss comparison.

    python benchmarks/kssm/functional_r.py --steps 400 --seeds 0,1,2 --out /tmp/kfr \
        --results benchmarks/kssm/FUNCTIONAL.md

Variants, each trained on Tiny Shakespeare (characters) with the same recipe and seeds:

* ``full``: the current readout (R, R cos psi, R sin psi of every group: small groups' phases
  reach the output);
* ``order``: readout ``order`` with ``readout_levels [1]``: only the whole population's R
  (harmonics 1..K) reaches the output; the readout MLP is widened so that the parameter
  count is closest to ``full``'s;
* ``order-groups``: readout ``order`` with ``readout_levels [1, 4]`` (population + 4 groups),
  matched the same way;
* ``mamba``: a Mamba (crsm-planner's ``mamba`` backbone, when installed) with ``d_model``
  chosen so its parameter count is closest to ``full``'s (loss comparison only).

For each trained K-SSM model and each layer, :func:`kssm_oscillators.verdicts.judge` gives
the three verdicts of ``kssm.R[..., 0, 0]`` (whole population, harmonic 1): on the path
(KL at its 10%/90% quantiles, interval over validation batches), functional (loss change
under mean / shuffle ablations, paired by batch against an untrained model of the same
spec) and varies (against random phases of N oscillators). Loss differences between
variants are paired by seed (:func:`statelab.stats.paired_difference`). Every run uses one
CPU thread (``train.threads``); runs go one after another.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import statelab
from statelab import stats
from statelab.callbacks import Callback
from statelab.train import train

from kssm_oscillators.verdicts import FUNCTIONAL, ON_PATH, judge

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- kssm-functional:begin -->", "<!-- kssm-functional:end -->"

KSSM = {"kind": "kssm", "n_layers": 2, "n_oscillators": 32, "n_harmonics": 4, "group_levels": [1, 4, 16],
        "readout_mult": 2}


def base_spec(steps: int, seed: int) -> dict:
    return {
        "name": "kssm-functional", "seed": seed, "tokenizer": {"kind": "char"}, "data": {"kind": "text"},
        "model": {"d_model": 64, "backbone": dict(KSSM), "regularizers": [{"kind": "bistability", "weight": 0.01}]},
        "train": {"steps": steps, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30,
                  "eval_interval": max(50, steps // 4), "eval_batches": 10, "checkpoint_interval": steps,
                  "sample_tokens": 0, "device": "cpu", "threads": 1},
        "tracking": {"enabled": False},
    }


def variant_spec(name: str, steps: int, seed: int, vocab: int) -> dict:
    doc = base_spec(steps, seed)
    doc["name"] = f"kssm-functional-{name}-s{seed}"
    bb = doc["model"]["backbone"]
    if name == "full":
        return doc
    if name in ("order", "order-groups"):
        # R alone is a few numbers per layer: the readout MLP is widened until the parameter
        # count is closest to full's (matched baseline)
        bb.update(readout="order", readout_levels=[1] if name == "order" else [1, 4])
        return _closest(doc, vocab, steps, seed, [("model.backbone.readout_mult", m) for m in range(2, 41)])
    if name == "mamba":
        doc["model"].update(regularizers=[])
        doc["model"]["backbone"] = {"kind": "mamba", "n_layers": KSSM["n_layers"], "mixer": "mamba1"}
        return _closest(doc, vocab, steps, seed, [("model.d_model", d) for d in range(16, 129, 4)])
    raise SystemExit(f"unknown variant {name!r}; choose from full, order, order-groups, mamba")


def _closest(doc: dict, vocab: int, steps: int, seed: int, choices: list[tuple[str, int]]) -> dict:
    """The candidate (``doc`` with one key set to each choice) whose parameter count is closest to ``full``'s."""
    target = statelab.build(base_spec(steps, seed), vocab_size=vocab).num_parameters()
    best = None
    for key, value in choices:
        cand = copy.deepcopy(doc)
        *parents, last = key.split(".")
        node = cand
        for k in parents:
            node = node[k]
        node[last] = value
        n = statelab.build(cand, vocab_size=vocab).num_parameters()
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cand)
    return best[1]


class Capture(Callback):
    """Keeps the run's validation tokens (for the verdicts) once training ends."""

    name, order = "capture-val", 99

    def on_train_end(self, trainer) -> None:
        self.val = trainer.data.val_tokens


def val_batches(val: torch.Tensor, n: int, B: int, T: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    val = val.reshape(-1).long()
    starts = torch.randint(0, len(val) - T - 1, (n * B,), generator=g)
    w = torch.stack([val[s : s + T + 1] for s in starts.tolist()])
    return [(c[:, :-1], c[:, 1:]) for c in w.split(B)]


def run_one(name: str, steps: int, seed: int, out: Path, vocab: int) -> dict:
    doc = variant_spec(name, steps, seed, vocab)
    cap = Capture()
    t0 = time.time()
    res = train(doc, out_dir=out, progress=False, callbacks=[cap])
    row = {"variant": name, "seed": seed, "steps": res.step, "best_val_loss": res.best_val_loss,
           "params": res.model.num_parameters(), "tok_per_s": res.tokens_per_s, "wall_s": time.time() - t0}
    if name != "mamba":
        torch.manual_seed(seed)
        model = res.model.cpu().eval()
        batches = val_batches(cap.val, 8, 8, 64, seed)
        row["sites"] = []
        for s in judge(model, batches, "kssm.R", (0, 0), seed=seed):
            row["sites"].append({
                "site": s.site, "on_path": s.on_path, "kl": s.kl.to_dict(), "functional": s.functional,
                "delta_loss": {m: iv.to_dict() for m, iv in s.delta_loss.items()},
                "null_delta_loss": {m: iv.to_dict() for m, iv in s.null_delta_loss.items()},
                "vs_null": {m: d.to_dict() for m, d in s.versus_null.items()},
                "varies": s.varies, "R_mean": s.varies_detail.get("R_mean"),
                "null_R_mean": s.varies_detail.get("null_R_mean"),
            })
    return row


def fmt_iv(d: dict, nd: int = 4) -> str:
    return stats.Interval(**d).format(nd)


def table(rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {v: {r["seed"]: r for r in rows if r["variant"] == v} for v in variants}
    out = ["| variant | params | best val loss (nats/char), mean [95% CI] over seeds | vs full (paired by seed) |",
           "|---|---|---|---|"]
    for v in variants:
        losses = {s: r["best_val_loss"] for s, r in by[v].items()}
        iv = stats.interval(list(losses.values()))
        vs = "-"
        if v != "full" and "full" in by:
            vs = stats.paired_difference(losses, {s: r["best_val_loss"] for s, r in by["full"].items()},
                                         higher_is_better=False).format(3)
        out.append(f"| {v} | {next(iter(by[v].values()))['params']:,} | {iv.format(3)} | {vs} |")
    out += ["", "Verdicts on `kssm.R[..., 0, 0]` (whole population, harmonic 1), per seed and layer. KL: at its "
            "10%/90% quantiles, mean [95% CI] over 8 validation batches (nats). Loss change under ablation, "
            "trained minus untrained model of the same spec, paired by batch.", "",
            "| variant | seed | layer | on the path (KL) | functional | mean: trained - untrained | "
            "shuffle-positions | shuffle-rows | varies (R mean vs random phases) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r.get("sites", []):
            vs = {m: stats.PairedDifference(stats.Interval(**d["diff"]), d["verdict"], d["higher_is_better"],
                                            tuple(d["keys"])).format(4) for m, d in s["vs_null"].items()}
            layer = s["site"].split(":")[0].rsplit(".", 1)[-1]
            out.append(f"| {r['variant']} | {r['seed']} | {layer} | {s['on_path']} ({fmt_iv(s['kl'], 5)}) | "
                       f"**{s['functional']}** | {vs.get('mean', '-')} | {vs.get('shuffle-positions', '-')} | "
                       f"{vs.get('shuffle-rows', '-')} | {s['varies']} ({s['R_mean']:.3f} vs {s['null_R_mean']:.3f}) |")
    counts = {}
    for r in rows:
        for s in r.get("sites", []):
            c = counts.setdefault(r["variant"], [0, 0, 0])
            c[0] += 1
            c[1] += s["on_path"] == ON_PATH
            c[2] += s["functional"] == FUNCTIONAL
    out += ["", "Summary (sites = layers x seeds): " + "; ".join(
        f"{v}: on the path {c[1]}/{c[0]}, functional {c[2]}/{c[0]}" for v, c in counts.items())]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="full,order,order-groups,mamba")
    ap.add_argument("--out", default="/tmp/kssm-functional")
    ap.add_argument("--results", default=None, help="markdown file to write the table into (between markers)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    if "mamba" in variants:
        try:
            statelab.get_registry().get("backbone", "mamba")
        except Exception:
            print("functional_r: crsm-planner (the mamba backbone) is not installed; skipping mamba", file=sys.stderr)
            variants.remove("mamba")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    vocab = len(set((ROOT / "packages/core/src/statelab/assets/tinyshakespeare.txt").read_text()))
    for seed in [int(s) for s in args.seeds.split(",")]:
        for v in variants:
            if (v, seed) in done:
                continue
            print(f"functional_r: {v} seed {seed}", file=sys.stderr, flush=True)
            rows.append(run_one(v, args.steps, seed, out / "runs", vocab))
            rows_path.write_text(json.dumps(rows, indent=1))
    md = table([r for r in rows if r["variant"] in variants])
    cmd = "python benchmarks/kssm/functional_r.py " + " ".join(sys.argv[1:])
    section = (f"{BEGIN}\n### CPU ({torch.get_num_threads()} thread), {time.strftime('%Y-%m-%d', time.gmtime())}, "
               f"{args.steps} steps\n\n`{cmd}`\n\n{md}\n{END}")
    print(section)
    if args.results:
        p = Path(args.results)
        text = p.read_text() if p.exists() else "# Is R functional? (benchmarks/kssm/functional_r.py)\n\n"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        p.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
