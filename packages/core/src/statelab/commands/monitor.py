"""``statelab monitor RUN [--once] [--interval S] [--preset NAME] [--watch KEY,...]``: a live view of a run's health."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("run", help="run directory (runs/<name>) or its metrics.jsonl")
    parser.add_argument("--once", action="store_true", help="print the view and the alerts once and exit (scripts, tests)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes of the live view")
    parser.add_argument("--preset", default="auto",
                        help="watched internals: auto (from the run's spec.yaml: kssm for a kssm backbone), kssm or none")
    parser.add_argument("--watch", action="append", default=[], metavar="KEY[,label=L][,pinned=K][,null=K]",
                        help="also watch a metric (exact name or suffix), with optional clamp-fraction and null-level "
                        "metrics; repeatable")
    parser.add_argument("--stale-after", type=float, default=300.0, help="seconds without metrics before 'stale'")
    parser.add_argument("--val-degradation", type=float, default=0.25,
                        help="alert when validation perplexity is this fraction above its best (0.25 = +25%%)")


def _preset(name: str, run: str) -> str:
    if name != "auto":
        return name
    from pathlib import Path

    import yaml

    p = Path(run)
    spec = (p.parent if p.is_file() else p) / "spec.yaml"
    try:
        kind = (yaml.safe_load(spec.read_text()) or {}).get("model", {}).get("backbone", {}).get("kind")
    except (OSError, yaml.YAMLError, AttributeError):
        kind = None
    return "kssm" if kind == "kssm" else "none"


def run(args) -> int:
    import sys
    import time

    from statelab.monitor import PRESETS, MonitorConfig, MonitorError, alerts, load_run, parse_watch, render

    preset = _preset(args.preset, args.run)
    if preset not in PRESETS:
        raise MonitorError(f"--preset {preset!r}: choose auto, {', '.join(PRESETS)}")
    cfg = MonitorConfig(watches=PRESETS[preset] + tuple(parse_watch(w) for w in args.watch),
                        stale_after_s=args.stale_after, val_degradation=args.val_degradation)
    if args.once:
        view = load_run(args.run)
        print(render(view, cfg, alerts(view, cfg)))
        return 0
    try:
        while True:
            view = load_run(args.run)
            text = render(view, cfg)
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # home + clear: redraw in place
            print(text + f"\n  (refresh every {args.interval:g}s; Ctrl-C to quit)", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
