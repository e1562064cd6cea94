"""The `salem` command: one subcommand per job, each defined in salem_jax/commands/NAME.py.

Every command module exposes `add_parser(subparsers)` and `run(args) -> int`. A command raises
on bad input (`salem_jax.errors.UserError`, or the ValueError / KeyError / file errors of input
checks) and `main` prints it as one line, `salem <command>: error: ...`, with exit code 2;
unexpected errors keep their traceback (see salem_jax/errors.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from salem_jax.errors import UserError, is_expected, one_line

__all__ = ["COMMANDS", "UserError", "build_parser", "main", "run_command"]

# (subcommand module, in the order `salem --help` lists them)
COMMANDS = ("dataset", "locate", "train_editor", "edit", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salem",
        description="salem-jax: find the salient layer of a language model's errors and edit it (SaLEM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"salem_jax.commands.{name}")
        before = set(sub.choices)
        module.add_parser(sub)
        for added in set(sub.choices) - before:
            sub.choices[added].set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return run_command(args.run, args)


def run_command(run, args) -> int:
    """`run(args)`, with an expected error printed as `salem <command>: error: <one line>` and
    exit code 2; other errors propagate with their traceback."""
    try:
        return int(run(args) or 0)
    except Exception as e:  # noqa: BLE001 - expected errors become one line, the rest re-raised
        if not is_expected(e):
            raise
        print(f"salem {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
