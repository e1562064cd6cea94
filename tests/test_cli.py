import subprocess
import sys


def test_salem_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "salem_jax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("dataset", "fetch-data", "locate", "train-editor", "edit"):
        assert cmd in out.stdout
