"""``statelab compare --experiment NAME [--uri URI] [--output plot.png]`` or ``statelab compare --suite DIR``."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("--experiment", "-e", default="statelab", help="mlflow experiment name")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--output", "-o", default=None,
                        help="overlay plot of validation curves (default: compare-<experiment>.png)")
    parser.add_argument("--suite", default=None, metavar="DIR",
                        help="compare the specs of a `statelab bench` suite instead: its output directory "
                        "(<out>/<suite name>); prints its report's tables with intervals and baseline differences")


def run(args) -> int:
    from statelab.compare import collect, format_table, plot_curves

    if args.suite:
        from statelab.bench.report import suite_tables

        print(suite_tables(args.suite))
        return 0

    rows = collect(args.experiment, args.uri)
    if not rows:
        print(f"experiment {args.experiment!r} has no runs")
        return 0
    print(format_table(rows))
    out = plot_curves(rows, args.output or f"compare-{args.experiment}.png", title=args.experiment)
    print(f"\nvalidation curves: {out}")
    return 0
