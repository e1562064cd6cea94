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

from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.errors import UserError, is_expected, one_line

__all__ = ["COMMANDS", "SUBCOMMANDS", "UserError", "build_parser", "main", "run_command"]

# (subcommand module, in the order `salem --help` lists them)
COMMANDS = ("dataset", "locate", "train_editor", "edit", "finetune")

# Every subcommand: (its module, its one-line help). `salem --help` lists the commands from this
# table without importing any command module, and `salem <command> ...` imports only that
# command's module: `train_editor` needs the editor's configuration (and with it JAX, ~2 s to
# import) for its flags' defaults. tests/test_cli.py checks the table against the modules' own
# `add_parser` (same names, same help).
SUBCOMMANDS = {
    "dataset": ("dataset", "score a data file with a model and write its fail/adapt/pass edit set"),
    "fetch-data": ("dataset", "download the full public ROME/MEMIT data files into a local cache (needs a network)"),
    "locate": ("locate", "score every layer (SaLEM saliency, LGA, causal tracing or a fine-tuning sweep) and choose the layer to edit"),
    "train-editor": ("train_editor", "train a MEND editor for the salient (or named) layers on an edit set"),
    "edit": ("edit", "apply edit requests with a trained editor and save the edited model"),
    "finetune": ("finetune", "fine-tune a classifier (BERT family) on classification records"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The `salem` parser. command: the subcommand whose module is imported and whose flags are
    built in full ("*": every command's, None: none - `salem --help`); the others are listed by
    name and help only (SUBCOMMANDS), so parsing them would accept no flags."""
    parser = argparse.ArgumentParser(
        prog="salem",
        description="salem-jax: find the salient layer of a language model's errors and edit it (SaLEM).",
    )
    add_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    full = COMMANDS if command == "*" else (() if command is None else (SUBCOMMANDS[command][0],))
    for name in COMMANDS:
        if name in full:
            module = importlib.import_module(f"salem_jax.commands.{name}")
            before = set(sub.choices)
            module.add_parser(sub)
            for added in set(sub.choices) - before:
                sub.choices[added].set_defaults(run=module.run)
        else:
            for cli_name, (mod, help_) in SUBCOMMANDS.items():
                if mod == name:
                    sub.add_parser(cli_name, help=help_)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    enable_compile_cache(enabled=not args.no_compile_cache)
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
