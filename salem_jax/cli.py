"""The `salem` command: one subcommand per job, each defined in salem_jax/commands/NAME.py.

Every command module exposes `add_parser(subparsers)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
