"""``statelab data inspect SPEC [--set KEY=VALUE] [--json] [--strict] [--max-tokens N]``."""

from __future__ import annotations

import json


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    p = sub.add_parser(
        "inspect", help="token histogram and data-corruption checks of the data a spec trains on",
        description="Token histogram, unknown/pad/unused-id rates, flooding of one id, duplicated windows, "
        "non-UTF-8 or control bytes and train/validation overlap of the data SPEC trains on, each with a "
        "warning threshold (statelab.data.inspect). Exit status 1 with --strict when a check warns.")
    p.add_argument("spec", help="YAML or JSON run spec")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set data.path=corpus.txt (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any check warns")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens read per split (default 2,000,000)")
    parser.set_defaults(_data_parser=parser)


def run(args) -> int:
    if getattr(args, "data_command", None) != "inspect":
        args._data_parser.print_help()
        return 2
    from statelab.data.inspect import MAX_TOKENS, inspect_spec
    from statelab.spec import apply_overrides, load_document, parse_spec

    spec = parse_spec(apply_overrides(load_document(args.spec), args.overrides), source=args.spec)
    report = inspect_spec(spec, max_tokens=args.max_tokens or MAX_TOKENS)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if args.strict and report.warnings else 0
