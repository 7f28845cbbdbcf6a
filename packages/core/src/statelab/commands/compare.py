"""``statelab compare --experiment NAME [--uri URI] [--output plot.png]``."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("--experiment", "-e", default="statelab", help="mlflow experiment name")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--output", "-o", default=None,
                        help="overlay plot of validation curves (default: compare-<experiment>.png)")


def run(args) -> int:
    from statelab.compare import collect, format_table, plot_curves

    rows = collect(args.experiment, args.uri)
    if not rows:
        print(f"experiment {args.experiment!r} has no runs")
        return 0
    print(format_table(rows))
    out = plot_curves(rows, args.output or f"compare-{args.experiment}.png", title=args.experiment)
    print(f"\nvalidation curves: {out}")
    return 0
