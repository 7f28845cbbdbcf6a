"""The Tiny Shakespeare race, a thin wrapper over `statelab bench` (configs/bench/race.yaml).

    python benchmarks/race/race.py configs/race/transformer.yaml configs/race/mamba.yaml          # on the GPU
    python benchmarks/race/race.py --smoke configs/race/transformer.yaml configs/race/mamba.yaml  # CPU check

The specs become one suite (the first is the baseline) whose cells each train in a fresh
process (`isolate`), so a budget counts everything from that process' start (imports, data,
compilation, evaluations). Validation runs over the whole split every `train.eval_interval`
steps. Beside the suite's report, the table gives the best validation loss, the elapsed time at
which each threshold was first reached, training tokens/s and peak GPU memory. `--smoke` uses
the suite's cpu size (small model, 60 s budget) so the same command checks itself on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

THRESHOLDS = (1.60, 1.50, 1.47, 1.45)
SUITE = Path(__file__).resolve().parents[2] / "configs" / "bench" / "race.yaml"


def table(results: list[dict]) -> str:
    head = ["spec", "params", "steps", "best val", *[f"t<={t}" for t in THRESHOLDS], "tok/s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vals = r["val_history"]
        best = min((v["val_loss"] for v in vals), default=None)
        reached = [next((v["elapsed_s"] for v in vals if v["val_loss"] <= t), None) for t in THRESHOLDS]
        cells = [r["cell"]["spec_name"], f"{r['n_params'] / 1e6:.2f}M", str(r["steps"]),
                 f"{best:.4f}" if best is not None else "-", *[f"{x:.0f}s" if x is not None else "-" for x in reached],
                 f"{r['tokens_per_s']:,.0f}", f"{r['peak_gpu_mem_gib']:.2f}" if r.get("peak_gpu_mem_gib") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    from statelab.bench import load_results, run_suite

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+")
    p.add_argument("--budget", type=float, default=None, help="seconds per spec from process start (default 205; 60 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="small model and budget, for a CPU check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra spec override for every spec")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--out-dir", default=None, help="suite output root (default: a temporary directory)")
    args = p.parse_args()
    suite = yaml.safe_load(SUITE.read_text())
    suite["specs"] = {Path(s).stem: {"spec": str(Path(s).resolve())} for s in args.specs}
    suite["baseline"] = Path(args.specs[0]).stem
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    budget = args.budget or (60.0 if args.smoke else 205.0)
    suite["set"] = {**suite["set"], "train.time_budget_s": budget, **overrides}
    size = "cpu" if args.smoke else "gpu"
    suite["sizes"][size]["set"] = {**suite["sizes"][size]["set"], "train.time_budget_s": budget, **overrides}
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="race-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "race-suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    res = run_suite(path, out=out, size=size)
    results = load_results(res["out"])
    print(table(results))
    print(f"\nreport: {res['report']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
