"""``statelab bench SUITE.yaml [--out DIR] [--size NAME] [--parallel N] [--report-only]``."""

from __future__ import annotations

import sys
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("suite", help="suite file (configs/bench/*.yaml), or with --report-only its output directory")
    parser.add_argument("--out", default="bench", help="output root; the suite writes to <out>/<suite name> (default: bench)")
    parser.add_argument("--size", default=None, help="one of the suite's sizes (default: its first, e.g. cpu)")
    parser.add_argument("--parallel", type=int, default=None, help="cells trained at once (default: the suite's)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only cells whose id contains TEXT (repeatable; the report covers every finished cell)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished cells only")
    parser.add_argument("--progress", action="store_true", help="show each cell's training progress")


def run(args) -> int:
    from statelab.bench import run_suite, write_report
    from statelab.bench.suite import SuiteError, load_suite

    if args.report_only:
        target = Path(args.suite)
        if target.is_file():
            suite, _ = load_suite(target)
            target = Path(args.out) / suite.name
        if not (target / "suite.json").exists():
            raise SuiteError(f"{str(target)!r} is not a suite output directory (no suite.json); run the suite first")
        print(write_report(target))
        return 0
    only = (lambda c: any(t in c.id for t in args.only)) if args.only else None
    res = run_suite(args.suite, out=args.out, size=args.size, parallel=args.parallel, progress=args.progress,
                    only=only)
    print(f"{len(res['ran'])} cells run, {res['skipped']} already finished; report: {res['report']}", file=sys.stderr)
    print(Path(res["report"]).read_text())
    return 0
