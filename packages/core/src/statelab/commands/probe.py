"""``statelab probe CKPT --probe KIND [--param key=value ...]``: run one probe on a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory (uses best/)")
    parser.add_argument("--probe", required=True, help="probe kind (see `statelab plugins`)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="probe parameter (repeatable; values are YAML)")
    parser.add_argument("--out", default=None, help="artifact directory (default: <checkpoint>/probes/<kind>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-log", action="store_true", help="do not log into the checkpoint's mlflow run")


def parse_params(items) -> dict:
    import yaml

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"statelab: --param {item!r} is not key=value")
        out[k] = yaml.safe_load(v)
    return out


def run(args) -> int:
    from statelab.build import make_probe
    from statelab.interfaces import ProbeContext

    from statelab.commands.evaluate import load_with_data

    model, data, dev = load_with_data(args.checkpoint, args.device)
    val, tok = data.val_tokens, data.tokenizer
    probe = make_probe(args.probe, parse_params(args.param), model)
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
        _log(model, args.probe, res)
    return 0


def _log(model, kind, res) -> None:
    meta = getattr(model, "checkpoint_meta", {}) or {}
    run_id, uri = meta.get("statelab.mlflow_run_id"), meta.get("statelab.mlflow_uri")
    if not run_id:
        return
    try:
        from statelab.tracking import Tracker, client, log_probe_result

        t = Tracker(client(uri), run_id, uri)
        log_probe_result(t, kind, res, 0)
        t.close()
        print(f"  logged to mlflow run {run_id}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001
        print(f"statelab probe: could not log to mlflow run {run_id} ({exc})", file=sys.stderr)
