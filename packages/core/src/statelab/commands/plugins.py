"""``statelab plugins [--json]``: who provides what, and what failed to load."""

from __future__ import annotations

import json


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of load failures")


def run(args) -> int:
    from statelab.plugins import get_registry

    reg = get_registry()
    rows = reg.listing()
    failures = [
        {"entry_point": f.entry_point, "distribution": f.distribution, "version": f.version, "error": f.error}
        for f in reg.failures
    ]
    if args.json:
        print(json.dumps({"components": rows, "commands": sorted(reg.commands), "failures": failures}, indent=2))
        return 0
    if rows:
        w = [max(len(r[k]) for r in rows + [{"slot": "slot", "name": "name", "distribution": "distribution", "version": "version"}])
             for k in ("slot", "name", "distribution", "version")]
        print(f"{'slot':<{w[0]}}  {'name':<{w[1]}}  {'distribution':<{w[2]}}  {'version':<{w[3]}}  description")
        for r in rows:
            print(f"{r['slot']:<{w[0]}}  {r['name']:<{w[1]}}  {r['distribution']:<{w[2]}}  {r['version']:<{w[3]}}  {r['description']}")
    else:
        print("no components installed (pip install a statelab plugin, e.g. crsm-planner)")
    if reg.commands:
        print("\ncommands: " + ", ".join(f"{c.name} ({c.distribution})" for c in reg.commands.values()))
    for f in reg.failures:
        print(f"\nfailed to load: {f}")
        if args.verbose and f.detail:
            print(f.detail)
    return 0
