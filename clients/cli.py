"""The `localist` console script.

Each part of the product contributes its own subcommands through an ``add_commands(subparsers)``
function, imported lazily so that a client-only install (no torch, no vLLM) still gets a working
CLI and a clear message for the commands it lacks.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, and the extra that makes them importable.
COMMAND_MODULES = (
    ("localist.server.cli", "localist[cpu] or localist[cuda]"),
    ("localist.model.cli", "localist[cpu] or localist[cuda]"),
    ("localist.clients.commands", None),
    ("localist.clients.rule_commands", None),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localist",
        description="Localist inference server: serve models with a per-request locality dial, "
        "chat with them, and pull audit reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, extra in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (exc.name == module_name or module_name.startswith(exc.name + ".")):
                if extra is None:
                    raise
                missing = exc.name
                sub.add_parser(
                    module_name.rsplit(".", 1)[-1] + "-unavailable",
                    help=f"(commands of {module_name} need {extra}: missing {missing})",
                )
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags a subcommand does not define pass through only to one that takes them (``serve`` hands
    # vLLM's engine flags to vLLM's own parser); anywhere else they are an error, as usual.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_unknown_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.unknown_flags = rest
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
