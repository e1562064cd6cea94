"""What a user did wrong, as opposed to what went wrong in the code.

`salem` commands print an expected error as one line, `salem <command>: error: <message>`, and
exit with code 2; anything else keeps its traceback. "Expected" means: a `UserError` (bad input,
a refused output folder, a damaged or foreign checkpoint, a busy workdir, a diverged run) and,
by the convention of this code base, the `ValueError` / `KeyError` / file errors raised while
validating input. `SALEM_TRACEBACK=1` shows the traceback of expected errors too.

This module is imported by library code (readers, checkpoints, training), so it imports nothing
but `salem_jax.env` (which imports nothing of the project).
"""

from __future__ import annotations

from salem_jax import env

TRACEBACK_ENV = env.TRACEBACK


class UserError(ValueError):
    """Bad input or a refused operation; the message says what and how to fix it.

    A `ValueError` so that callers (and tests) that catch `ValueError` for bad input keep working."""


# The builtin errors that, raised while checking input, are the user's to fix.
EXPECTED = (UserError, ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, NotImplementedError)


def is_expected(err: BaseException) -> bool:
    """Whether `err` is reported in one line (see the module docstring)."""
    return isinstance(err, EXPECTED) and not env.show_tracebacks()


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes str() adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    msg = " ".join(str(msg).split())
    return msg or type(err).__name__
