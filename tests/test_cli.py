import argparse
import subprocess
import sys

from salem_jax import cli


def test_salem_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "salem_jax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("dataset", "fetch-data", "locate", "train-editor", "edit", "finetune"):
        assert cmd in out.stdout


def _listed(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(a.dest, a.help) for a in sub._choices_actions]


def test_the_command_table_matches_the_command_modules():
    # `salem --help` lists the commands from cli.SUBCOMMANDS without importing their modules: the
    # table must say what the modules' own add_parser say (names, order, help)
    assert _listed(cli.build_parser(None)) == _listed(cli.build_parser("*"))
    for name, (module, _) in cli.SUBCOMMANDS.items():
        one = cli.build_parser(name)
        assert _listed(one) == _listed(cli.build_parser("*"))
        assert one._subparsers._group_actions[0].choices[name].get_default("run") is not None, name


def test_help_and_light_commands_do_not_import_jax():
    # JAX's import costs seconds: `salem --help` and the help of the commands whose flags need no
    # JAX object must answer without it (train-editor's flags take TrainConfig's defaults, so it may)
    code = (
        "import sys\n"
        "from salem_jax import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('JAX', 'jax' in sys.modules, file=sys.stderr)\n"
    )
    for argv in (["--help"], ["dataset", "--help"], ["--no-compile-cache", "edit", "--help"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert "JAX False" in out.stderr, (argv, out.stderr[-2000:])
        assert "usage: salem" in out.stdout, argv
