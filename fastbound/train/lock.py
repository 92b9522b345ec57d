"""One training run per ``--out`` directory: a lock file that names its owner.

``OUT/.lock`` is created atomically (``O_CREAT | O_EXCL``) and holds the owner's host name and
pid. A second run finds it and stops with a message naming that pid. A lock whose pid no
longer runs on this host (a run that was killed) is stale: it is removed and taken over.
"""

from __future__ import annotations

import os
import socket

FILENAME = ".lock"


class LockedError(RuntimeError):
    """Another live run holds the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner(path: str) -> tuple[str, int] | None:
    """(host, pid) written in a lock file, or None when it cannot be read (being written, or garbage)."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


class RunLock:
    """Holds ``directory``'s lock from `acquire` until `release`."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, FILENAME)
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is not None and owner[0] == socket.gethostname() and not _alive(owner[1]):
                    os.remove(self.path)  # stale: its run was killed
                    continue
                who = f"pid {owner[1]} on {owner[0]}" if owner else "an unknown process"
                raise LockedError(f"another training run ({who}) is using this directory (lock file {self.path}); "
                                  "wait for it to finish or choose another --out") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise LockedError(f"could not take the lock {self.path}; another run keeps replacing it")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
