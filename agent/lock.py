"""Crash and concurrency safety of the commands that change weights: the workspace lock and the
named fault-injection points that tests use to kill a process half-way.

The lock: an exclusive `fcntl.flock` on `<workspace home>/<db name>.lock`, held by apply, undo,
redo and replay for their whole run (minutes), so two of them never interleave; the second one
waits (`wait=True`, the CLI's `--wait`) or fails at once with `LockHeld`, naming the holder. The
kernel drops a flock when its process dies, so a killed apply never leaves a stale lock. Only
these commands take it: `submit` writes short SQLite transactions (WAL) and never waits on it.

Fault points: with KNOWLEDGER_FAULT=<point> (or <point>@<n>: the n-th time the point is reached)
the process SIGKILLs itself there, as a crash would, with no cleanup or exit handlers. The points
are listed in FAULT_POINTS; tests kill a real subprocess at each and check that the next command
finds the ledger and the live snapshot consistent.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from knowledger.ledger.errors import KnowledgerError

FAULT_ENV = "KNOWLEDGER_FAULT"
FAULT_POINTS = (
    "after-compute",  # deltas computed and checked, nothing written
    "after-ledger-commit-before-snapshot",  # the operation is committed, the snapshot is stale
    "mid-snapshot-write",  # half of the new snapshot's bytes are in its temporary file
    "after-snapshot",  # the snapshot is renamed into place; the command has not reported yet
)
_hits: dict[str, int] = {}


class LockHeld(KnowledgerError):
    """Another process holds the workspace lock."""


def fault_point(name: str) -> None:
    """SIGKILL this process here if KNOWLEDGER_FAULT names this point (see the module docstring)."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == (int(nth) if nth else 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class WorkspaceLock:
    """An exclusive lock on a file; use as a context manager. `wait=False` fails fast."""

    def __init__(self, path: Path, *, wait: bool = False, what: str = "apply"):
        self.path, self.wait, self.what = Path(path), wait, what
        self._fd: int | None = None

    def acquire(self) -> WorkspaceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"another command holds the workspace lock {self.path} ({holder}); "
                           f"try again later or pass --wait") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.what}, pid {os.getpid()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(path: Path, what: str) -> WorkspaceLock | None:
    """The lock if it is free now, else None (for readers that may refresh the snapshot)."""
    try:
        return WorkspaceLock(path, wait=False, what=what).acquire()
    except LockHeld:
        return None
