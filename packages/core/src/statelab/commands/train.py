"""``statelab train SPEC [--resume] [--out DIR] [--set key=value ...]`` (also under torchrun).

Exit status: 0 when the run finished (training, planner fit, probes); 3 when a signal or
``train.time_budget_s`` stopped it first (a checkpoint is saved: continue with ``--resume``);
2 for a user error."""

from __future__ import annotations



def configure(parser) -> None:
    parser.add_argument("spec", help="YAML or JSON run spec")
    parser.add_argument("--resume", action="store_true", help="continue the run from <out>/<name>/last exactly")
    parser.add_argument("--out", default=None, help="directory of runs (default: the spec's train.out_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.steps=100 or --set probes.0.kind=passkey "
                        "(repeatable; values are YAML 1.2: quote text that would read as a number)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def run(args) -> int:
    from statelab.commands.spec import print_warnings
    from statelab.spec import SpecError, apply_overrides, check_data_fit, load_document, validate_spec
    from statelab.train import exit_status, train

    # --set values are read here with YAML 1.2 rules (`name=no` stays text, `steps=1e3` is a number)
    doc = apply_overrides(load_document(args.spec), args.overrides)
    try:
        resolved = validate_spec(doc, source=args.spec)
    except SpecError as exc:
        raise quoting_hints(exc, args.overrides) from None
    check_data_fit(resolved.spec)
    if _is_main():
        print_warnings(resolved)
    res = train(doc, resume=args.resume, out_dir=args.out, progress=False if args.quiet else None)
    if not _is_main():
        return exit_status(res)
    best = f"{res.best_val_loss:.4f}" if res.best_val_loss is not None else "-"
    bpc = res.metrics.get("best/val_bpc")
    print(f"{res.status} at step {res.step}: best val loss {best}"
          + (f", best bpc {bpc:.4f}" if bpc is not None else "")
          + f", {res.tokens_per_s:,.0f} tok/s; run dir {res.run_dir}"
          + (f"; mlflow run {res.mlflow_run_id}" if res.mlflow_run_id else ""))
    return exit_status(res)


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def quoting_hints(err, overrides):
    """``err`` with a quoting hint on each issue at a ``--set`` key whose value YAML read as a
    number, boolean or null while the field wanted text (``--set name=123``)."""
    from statelab.spec import SpecError, SpecIssue, parse_value

    raw = {}
    for item in overrides:
        key, _, value = item.partition("=")
        raw[key] = value
    issues = []
    for issue in err.issues:
        value = raw.get(issue.path)
        if value is not None and not isinstance(parse_value(value, issue.path), (str, dict, list)):
            issue = SpecIssue(issue.path, f"{issue.message} (--set {issue.path}={value} was read as "
                              f"{type(parse_value(value, issue.path)).__name__}; for text quote it: "
                              f"--set {issue.path}='\"{value}\"')")
        issues.append(issue)
    return SpecError(issues, err.source)
