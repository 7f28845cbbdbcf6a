"""K-SSM evaluation: configs/kssm.yaml against a plain Mamba of the same parameter count and
the bistability ablation, trained the same way; writes a markdown table.

    python benchmarks/kssm/evaluate.py --device cuda                       # the full runs
    python benchmarks/kssm/evaluate.py --device cpu --set train.steps=200  # a short CPU version

Variants (``--variants``, default ``kssm,mamba,ablation``):

* ``kssm``: the config as written (bistability regularizer, u clamped), with its probes;
* ``mamba``: backbone ``mamba`` (mamba1 mixer, same n_layers) with ``d_model`` chosen so
  the whole model's parameter count is closest to K-SSM's; no regularizer, no probes;
* ``ablation``: K-SSM with the regularizer weight 0 and u unclamped, with the probes;
* ``noreg``: K-SSM with the regularizer weight 0, u still clamped;
* ``unclamped``: K-SSM with the regularizer, u unclamped;
* ``KIND+KEY=VALUE+...`` (``--variant``, repeatable): one of the above with more overrides,
  e.g. ``kssm+model.backbone.substeps=2`` (pilots of design choices).

``--parallel`` starts every variant at once (one process each, e.g. on one GPU: the
tokens/s are then not timing figures).

Each variant trains in its own process (``train.time_budget_s`` counts from process start),
through ``statelab.train.train``; the table goes to ``--results`` between markers, with the
exact command that produced it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- kssm-eval:begin -->", "<!-- kssm-eval:end -->"


def _worker(spec_path: str, out_json: str, out_dir: str, threads: int | None) -> None:
    import torch
    from statelab.train import train

    if threads:
        torch.set_num_threads(threads)

    res = train(spec_path, out_dir=out_dir, progress=False)
    doc = {"status": res.status, "step": res.step, "best_val_loss": res.best_val_loss, "tokens_per_s": res.tokens_per_s,
           "metrics": {k: float(v) for k, v in res.metrics.items()}, "run_dir": str(res.run_dir),
           "params": res.model.num_parameters() if res.model is not None else None,
           "val_history": [(h["step"], h.get("val/loss")) for h in res.history.get("val", [])]}
    Path(out_json).write_text(json.dumps(doc, indent=1))


def _count(doc: dict, vocab: int) -> int:
    import statelab

    return statelab.build(doc, vocab_size=vocab).num_parameters()


def derive(base: dict, variant: str, vocab: int) -> dict:
    if "+" in variant:  # "kssm+model.backbone.substeps=2+train.lr=4e-3": a variant with overrides
        import re

        from statelab.train import apply_overrides

        kind, *sets = variant.split("+")
        doc = derive(apply_overrides(base, sets), kind, vocab)
        doc["name"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base.get('name', 'kssm')}-{variant}").strip("-")[:120]
        return doc
    doc = copy.deepcopy(base)
    doc["name"] = f"{base.get('name', 'kssm')}-{variant}"
    if variant == "kssm":
        return doc
    if variant in ("ablation", "noreg", "unclamped"):
        if variant != "unclamped":
            for r in doc["model"].get("regularizers", []):
                if r["kind"] == "bistability":
                    r["weight"] = 0.0
        if variant != "noreg":
            doc["model"]["backbone"]["clamp_u"] = False
        return doc
    if variant == "mamba":
        target = _count(base, vocab)
        n_layers = base["model"]["backbone"].get("n_layers", 4)
        best = None
        for d in range(16, 1025, 8):
            cand = copy.deepcopy(doc)
            cand["model"]["d_model"] = d
            cand["model"]["backbone"] = {"kind": "mamba", "n_layers": n_layers, "mixer": "mamba1"}
            cand["model"]["regularizers"] = []
            cand["probes"] = []
            n = _count(cand, vocab)
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, cand)
            if n > target:
                break
        return best[1]
    raise SystemExit(f"unknown variant {variant!r}; choose from kssm, mamba, ablation, noreg, unclamped")


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "mamba"), None)
    # the last evaluation step every run reached (runs cut by train.time_budget_s stop early)
    ends = [r["val_history"][-1][0] for r in rows if r.get("val_history")]
    common = min(ends) if ends else None

    def at_common(r):
        return next((v for st, v in r.get("val_history", []) if st == common), None)

    head = ("| variant | params | steps | " + (f"val loss at step {common} | vs mamba | " if common else "") +
            "best val loss (nats/char) | vs mamba | train tok/s | u (min / 5% / 50% / 95% / max) | "
            "causality of kssm.R (std; intervention p, KL; entropy r, p) | zones visited | R mean |\n|" + "---|" * (12 if common else 10))
    lines = [head]
    for r in rows:
        m = r.get("metrics", {})
        if "probe/r-zones/u_min" in m:  # on validation windows after training
            u = " / ".join(f"{m[f'probe/r-zones/u_{k}']:.3g}" for k in ("min", "p05", "median", "p95", "max"))
        else:  # the last logged training step
            ul = [m.get(f"reg/0.bistability.u_{k}") for k in ("min", "max")]
            u = f"{ul[0]:.3g}..{ul[1]:.3g}" if None not in ul else "-"
        delta = (f"{r['best_val_loss'] - base['best_val_loss']:+.3f}"
                 if base and r.get("best_val_loss") is not None and base.get("best_val_loss") is not None else "-")
        caus = "-"
        if "probe/causality/intervention_p" in m:
            verdict = r.get("verdicts", {}).get("causality", "?")
            passed = [k for k in ("variance", "intervention", "correlation") if m.get(f"probe/causality/{k}_passed")]
            caus = (f"{verdict}, {len(passed)}/3 pass (std={m['probe/causality/std']:.3g}; "
                    f"p={m['probe/causality/intervention_p']:.2g}, KL={m['probe/causality/intervention_kl']:.2g}; "
                    f"r={m['probe/causality/entropy_r']:+.3f}, p={m['probe/causality/entropy_p']:.2g})")
        zones = _fmt(m.get("probe/r-zones/zones_visited"), 0)
        at = ""
        if common:
            v, vb = at_common(r), (at_common(base) if base else None)
            at = f"{_fmt(v)} | {f'{v - vb:+.3f}' if v is not None and vb is not None else '-'} | "
        lines.append(
            f"| {r['variant']} | {r.get('params', '-'):,} | {r.get('step', '-')} | {at}{_fmt(r.get('best_val_loss'))} | {delta} | "
            f"{_fmt(r.get('tokens_per_s'), 0)} | {u} | {caus} | {zones} | {_fmt(m.get('probe/r-zones/R_mean'))} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "kssm.yaml"))
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--variants", default="kssm,mamba,ablation")
    ap.add_argument("--variant", dest="more", action="append", default=[], metavar="KIND+KEY=VALUE+...",
                    help="an extra variant with overrides, e.g. 'kssm+model.backbone.substeps=2' (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to the config before the variants are derived (e.g. train.steps=200)")
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "kssm-eval"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "kssm" / "RESULTS.md"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of each training process")
    ap.add_argument("--parallel", action="store_true", help="train every variant at the same time (one process each)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.out_dir, args.threads)
        return 0

    from statelab.data import corpus_vocab_size
    from statelab.spec import parse_spec
    from statelab.train import apply_overrides

    base = yaml.safe_load(Path(args.config).read_text())
    base = apply_overrides(base, [f"train.device={args.device}", "tracking.enabled=false", *args.overrides])
    vocab = corpus_vocab_size(parse_spec(base))
    out = Path(args.out_dir)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = []
    for variant in [v for v in args.variants.split(",") if v] + args.more:
        doc = derive(base, variant.strip(), vocab)
        spec_path = out / "specs" / f"{doc['name']}.yaml"
        spec_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        res_path = out / f"{doc['name']}.json"
        t0 = time.time()
        print(f"[{variant}] training {spec_path} ...", flush=True)
        threads = ["--threads", str(args.threads)] if args.threads else []
        cmd = [sys.executable, __file__, "--out-dir", str(out), *threads, "--worker", str(spec_path), str(res_path)]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        if args.parallel:
            log = open(out / f"{doc['name']}.log", "w")
            jobs.append((variant, res_path, t0, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        else:
            subprocess.run(cmd, check=True, env=env)
            jobs.append((variant, res_path, t0, None))
    for variant, res_path, t0, proc in jobs:
        if proc is not None and proc.wait() != 0:
            print(f"[{variant}] FAILED (exit {proc.returncode}); see {res_path.with_suffix('.log')}", flush=True)
            continue
        row = json.loads(res_path.read_text())
        row["variant"] = variant.strip()
        probes = Path(row["run_dir"]) / "probes" / "results.json"
        if probes.exists():
            row["verdicts"] = {k: v.get("verdict") for k, v in json.loads(probes.read_text()).items()}
        print(f"[{variant}] best val loss {row['best_val_loss']}, {row['tokens_per_s']:.0f} tok/s, "
              f"{time.time() - t0:.0f} s", flush=True)
        rows.append(row)

    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    cmd = "python benchmarks/kssm/evaluate.py " + " ".join(sys.argv[1:])
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores visible)"
    section = "\n".join([
        BEGIN, f"### Evaluation on {where}", "", f"`{cmd}`", "", table(rows), "",
        "Validation loss is mean cross-entropy per character on the last 10% of Tiny Shakespeare "
        "(`train.eval_batches` windows). `u` is read over the r-zones probe's validation windows (every layer) after training.", END,
    ])
    print(section)
    res_file = Path(args.results)
    text = res_file.read_text() if res_file.exists() else "# K-SSM results\n\n"
    key = f"### Evaluation on {where}"
    text = _replace_section(text, section, key)
    res_file.write_text(text)
    return 0


def _replace_section(text: str, section: str, key: str) -> str:
    """Replace the marked section with the same heading (device) or append a new one."""
    start = 0
    while True:
        i = text.find(BEGIN, start)
        if i < 0:
            return text.rstrip("\n") + "\n\n" + section + "\n"
        j = text.find(END, i)
        if key in text[i:j]:
            return text[:i] + section + text[j + len(END):]
        start = j + len(END)


if __name__ == "__main__":
    raise SystemExit(main())
