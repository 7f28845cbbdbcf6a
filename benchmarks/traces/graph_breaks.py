"""Graph breaks of step_time.py's models under torch.compile (a diagnostic; any device).

    python benchmarks/traces/graph_breaks.py --device cuda --variants off,auto,sdpa
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import make, populate, set_interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="off,auto,sdpa")
    ap.add_argument("--T", type=int, default=256)
    a = ap.parse_args()
    dev = torch.device(a.device)
    x = torch.randint(0, 256, (2, a.T), generator=torch.Generator().manual_seed(0)).to(dev)
    for name in a.variants.split(","):
        torch._dynamo.reset()
        model = make(name != "off", 128, 2, 4, a.T, 256, attention="auto" if name == "off" else name).to(dev)
        if name != "off":
            populate(model, x)
            set_interval(model, 1_000_000)
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ex = torch._dynamo.explain(model)(x)
        print(f"== {name}: {ex.graph_count} graphs, {ex.graph_break_count} breaks", flush=True)
        for r in ex.break_reasons:
            print("  break:", r.reason.splitlines()[0][:300])
            for f in r.user_stack[-3:]:
                print("     at", f.filename.split("/")[-1], f.lineno, f.name)


if __name__ == "__main__":
    main()
