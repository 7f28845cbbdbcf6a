"""``statelab probe CKPT --probe KIND [--param key=value ...]``: run one probe on a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, run directory (uses best/), or an mlflow run: runs:/RUN_ID[/PATH] or RUN_ID")
    parser.add_argument("--probe", required=True, help="probe kind (see `statelab plugins`)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="probe parameter (repeatable; values are YAML 1.2)")
    parser.add_argument("--out", default=None, help="artifact directory (default: <checkpoint>/probes/<kind>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--uri", default=None,
                        help="tracking store of the checkpoint's mlflow run: to download it (checkpoint given as a run) and to "
                        "log the result into it "
                        "(default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; never the one the checkpoint names)")
    parser.add_argument("--no-log", action="store_true", help="do not log into the checkpoint's mlflow run")


def parse_params(items) -> dict:
    from statelab.spec import SpecError, SpecIssue, parse_value

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SpecError([SpecIssue("--param", f"{item!r} is not key=value (e.g. --param batches=4)")])
        out[k] = parse_value(v, f"--param {k}")
    return out


def make_cli_probe(kind: str, params: dict, model):
    """The probe ``kind`` with ``params``, or a :class:`SpecError` naming the installed kinds
    or the parameter at fault."""
    from pydantic import ValidationError

    from statelab.build import make_probe
    from statelab.plugins import get_registry, unknown_kind_message
    from statelab.spec import SpecError, SpecIssue, _pydantic_issues, validation_context

    registry = get_registry()
    if ("probe", kind) not in registry:
        raise SpecError([SpecIssue("--probe", unknown_kind_message(registry, "probe", kind))])
    comp = registry.get("probe", kind)
    try:
        validated = comp.params.model_validate(params, context=validation_context(model.spec))
    except ValidationError as err:
        raise SpecError(_pydantic_issues(err, f"--param ({kind})")) from None
    return make_probe(kind, validated, model, registry)


def run(args) -> int:
    from statelab.commands.evaluate import load_with_data
    from statelab.interfaces import ProbeContext

    model, data, dev = load_with_data(args.checkpoint, args.device, args.uri)
    val, tok = data.val_tokens, data.tokenizer
    probe = make_cli_probe(args.probe, parse_params(args.param), model)
    out_dir = Path(args.out) if args.out else Path(model.checkpoint_path) / "probes" / args.probe
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = ProbeContext(val_tokens=val, tokenizer=tok, out_dir=out_dir, device=dev, seed=args.seed, extra={"data": data})
    res = probe.run(model, ctx)
    doc = {"probe": args.probe, "metrics": res.metrics, "verdict": res.verdict, "passed": res.passed,
           "artifacts": {k: str(v) for k, v in res.artifacts.items()}}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        head = f"probe {args.probe}: verdict {res.verdict or '-'}"
        if res.passed is not None:
            head += f" ({'passed' if res.passed else 'FAILED'})"
        print(head)
        for k, v in res.metrics.items():
            print(f"  {k}: {v:.6g}")
        for k, v in res.artifacts.items():
            print(f"  artifact {k}: {v}")
    if not args.no_log:
        _log(model, args.probe, res, args.uri)
    return 0


def _log(model, kind, res, uri) -> None:
    from statelab.tracking import checkpoint_run, log_probe_result

    opened = checkpoint_run(getattr(model, "checkpoint_meta", {}) or {}, uri, command="probe")
    if opened is None:
        return
    tracker, step = opened
    log_probe_result(tracker, kind, res, step)  # at the run's last step: the value the run now shows
    tracker.close()
    print(f"  logged to mlflow run {tracker.run_id} at step {step}", file=sys.stderr)
