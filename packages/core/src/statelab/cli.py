"""The ``statelab`` command line.

Each sub-command lives in ``statelab.commands.<module>`` with ``configure(parser)`` and
``run(args) -> int``, imported only when used, so ``statelab plugins`` stays fast. Plugins
add commands through the ``statelab_commands`` hook (see :class:`statelab.plugins.Command`).

Errors: a user error (:func:`statelab.errors.is_user_error`) prints one line-led message
and exits 2; ``--debug`` or ``STATELAB_DEBUG=1`` shows its traceback. Anything else is a
bug and keeps its traceback.
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
    "bench": ("train, score and report a benchmark suite (configs/bench/*.yaml)", "bench"),
    "tokenizer": ("train or inspect tokenizers", "tokenizer"),
    "data": ("inspect the data a spec trains on (`statelab data inspect SPEC`)", "data"),
    "planner": ("fit a checkpoint's planner (`statelab planner fit CKPT`)", "planner"),
    "monitor": ("live view of a run's health from its metrics file, with alerts", "monitor"),
}

DEBUG_ENV = "STATELAB_DEBUG"


def _version() -> str:
    from statelab.__about__ import __version__  # statelab/__init__ is lazy: no torch here

    return f"statelab-core {__version__}"


def _wants_plugins(argv: list[str]) -> bool:
    """Plugin commands are loaded for a plugin command and for the top-level help; a core
    command and ``--version`` skip the registry (and torch)."""
    if not argv or argv[0] in ("-h", "--help"):
        return True
    return argv[0] not in CORE_COMMANDS and not argv[0].startswith("-")


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="statelab", description="stateful sequence models assembled from plugins")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of errors (also: {DEBUG_ENV}=1)")
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
    if _wants_plugins(argv):
        from statelab.plugins import get_registry

        for cmd in get_registry().commands.values():
            if cmd.name in runners:
                continue
            p = sub.add_parser(cmd.name, help=f"{cmd.help} [{cmd.distribution}]", description=cmd.help)
            cmd._load(cmd.configure)(p)
            runners[cmd.name] = cmd._load(cmd.run)
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    try:
        parser, runners = _parser(argv)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 0
        runner = runners.get(args.command)
        if runner is None:
            print(f"statelab {args.command}: not available in this installation", file=sys.stderr)
            return 2
        return int(runner(args) or 0)  # type: ignore[operator]
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        from statelab.errors import is_user_error

        if debug or not is_user_error(exc):
            raise
        where = f"statelab {argv[0]}" if argv and not argv[0].startswith("-") else "statelab"
        print(f"{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
