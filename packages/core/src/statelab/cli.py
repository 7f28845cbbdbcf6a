"""The ``statelab`` command line.

Each sub-command lives in ``statelab.commands.<module>`` with ``configure(parser)`` and
``run(args) -> int``, imported only when used, so ``statelab plugins`` stays fast. Plugins
add commands through the ``statelab_commands`` hook (see :class:`statelab.plugins.Command`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: name -> (help, module under statelab.commands)
CORE_COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("list installed components and plugin load failures", "plugins"),
    "validate": ("validate a run spec against the installed plugins", "spec"),
    "schema": ("print the JSON schema of the run spec", "spec"),
    "build": ("assemble a spec, print the module tree and parameter count", "spec"),
    "train": ("train a spec (also under torchrun for data-parallel runs)", "train"),
    "eval": ("evaluate a checkpoint on its validation data", "evaluate"),
    "probe": ("run a probe on a checkpoint", "probe"),
    "generate": ("generate text from a checkpoint", "generate"),
    "compare": ("compare the runs of an mlflow experiment", "compare"),
    "tokenizer": ("train or inspect tokenizers", "tokenizer"),
    "planner": ("fit a checkpoint's planner (`statelab planner fit CKPT`)", "planner"),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="statelab", description="stateful sequence models assembled from plugins")
    from statelab.__about__ import __version__

    parser.add_argument("--version", action="version", version=f"statelab-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners: dict[str, object] = {}
    for name, (help_text, module_name) in CORE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"statelab.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"statelab.commands.{module_name}":
                raise
            runners[name] = None
            continue
        getattr(module, f"configure_{name}", getattr(module, "configure", lambda _p: None))(p)
        runners[name] = getattr(module, f"run_{name}", getattr(module, "run", None))
    if len(sys.argv) > 1 and sys.argv[1] not in CORE_COMMANDS and not sys.argv[1].startswith("-"):
        from statelab.plugins import get_registry

        for cmd in get_registry().commands.values():
            p = sub.add_parser(cmd.name, help=f"{cmd.help} [{cmd.distribution}]", description=cmd.help)
            cmd._load(cmd.configure)(p)
            runners[cmd.name] = cmd._load(cmd.run)
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser, runners = _parser()
    args = parser.parse_args(sys.argv[1:])
    if not args.command:
        parser.print_help()
        return 0
    runner = runners.get(args.command)
    if runner is None:
        print(f"statelab {args.command}: not available in this installation", file=sys.stderr)
        return 2
    from statelab.spec import SpecError

    try:
        return int(runner(args) or 0)  # type: ignore[operator]
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
