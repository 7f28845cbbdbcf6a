"""``statelab validate SPEC``, ``statelab schema`` and ``statelab build SPEC``."""

from __future__ import annotations

import json


def configure_validate(parser) -> None:
    parser.add_argument("spec", help="YAML or JSON run spec")


def run_validate(args) -> int:
    from statelab.spec import check_data_fit, validate_spec

    resolved = validate_spec(args.spec)
    check_data_fit(resolved.spec)
    parts = [f"backbone {resolved.backbone.component.name}"]
    parts += [f"memory {m.component.name}@{m.spec.after_layer}" for m in resolved.memories]  # type: ignore[attr-defined]
    if resolved.planner:
        parts.append(f"planner {resolved.planner.component.name}")
    parts += [f"regularizer {r.component.name}" for r in resolved.regularizers]
    parts += [f"probe {p.component.name}" for p in resolved.probes]
    print(f"{args.spec}: valid ({', '.join(parts)})")
    print_warnings(resolved)
    return 0


def print_warnings(resolved) -> None:
    import sys

    for w in resolved.warnings:
        print(f"statelab: warning: {w}", file=sys.stderr)


def configure_schema(parser) -> None:
    parser.add_argument("--output", "-o", help="write to this file instead of stdout")
    parser.add_argument("--markdown", action="store_true", help="the human reference (docs/spec.md) instead of JSON schema")


def run_schema(args) -> int:
    from statelab.spec import json_schema, markdown_reference

    text = markdown_reference().rstrip() if args.markdown else json.dumps(json_schema(), indent=2)
    if args.output:
        from statelab.io import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    else:
        print(text)
    return 0


def configure_build(parser) -> None:
    parser.add_argument("spec", help="YAML or JSON run spec")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size when the spec leaves it to the corpus")


def run_build(args) -> int:
    from statelab.build import build, describe, resolve_vocab_size
    from statelab.spec import SpecError, validate_spec

    resolved = validate_spec(args.spec)
    vocab = args.vocab_size
    try:
        resolve_vocab_size(resolved.spec, vocab)
    except SpecError:
        from statelab.data import corpus_vocab_size

        vocab = corpus_vocab_size(resolved.spec)
    print(describe(build(resolved, vocab_size=vocab)))
    return 0
