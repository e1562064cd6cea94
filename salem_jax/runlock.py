"""One run per workdir: a lock file that says who holds it.

`salem train-editor` and the experiments take `<workdir>/.salem.lock` for the whole run. It is
created atomically (`O_CREAT | O_EXCL`) and holds the owner's pid, host, start time and command.
A second run on the same workdir refuses with a message naming the owner. A lock whose owner is
gone - a pid that no longer runs, on this host - is stale (the run was killed): it is taken over
with a one-line note. A lock from another host cannot be checked and is never taken over.

    with RunLock(workdir, command="train-editor"):
        ...  # the run
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from salem_jax.errors import UserError

LOCK_NAME = ".salem.lock"


class WorkdirBusy(UserError):
    """Another live run holds the workdir's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The owner recorded in a lock file ({} if unreadable), None if there is no lock."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def is_stale(info: dict, host: str | None = None) -> bool:
    """Whether a lock's owner is certainly gone: on this host and its pid no longer runs. An
    empty or damaged lock (a kill while it was written) is stale too."""
    if not info:
        return True
    host = host or socket.gethostname()
    pid = info.get("pid")
    return info.get("host") == host and isinstance(pid, int) and not _alive(pid)


class RunLock:
    """The lock of one workdir (a context manager; `acquire` / `release` for explicit use)."""

    def __init__(self, workdir: str | os.PathLike, command: str = "", log=None, *, enabled: bool = True):
        """enabled=False makes a lock that does nothing (the other processes of a pod, whose
        first process holds the lock of the shared workdir)."""
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.command = command
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.info: dict | None = None

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = read_lock(self.path)
                if other is None:
                    continue  # released in between: try again
                if not is_stale(other):
                    raise WorkdirBusy(
                        f"{self.workdir} is in use by another run (pid {other.get('pid')} on {other.get('host')}, "
                        f"started {other.get('started')}: {other.get('command') or '?'}); wait for it to end or use "
                        f"another workdir (if that run is gone, delete {self.path})"
                    ) from None
                # stale: replace it; only one of several racing takers wins the O_EXCL create after the unlink
                self.log(f"note: taking over the lock of a run that is gone (pid {other.get('pid')} on "
                         f"{other.get('host')}, started {other.get('started')}) in {self.path}")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.info = me
            return self
        raise WorkdirBusy(f"could not take the lock {self.path} (other runs are starting on {self.workdir})")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.info is None:
            return
        if read_lock(self.path) == self.info:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.info = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
