"""Crash and concurrency safety of the commands that change weights: the workspace lock and the
named fault-injection points that tests use to kill a process half-way.

The lock, held by apply, undo, redo and replay for their whole run (minutes) and taken before any
compute, so two of them never interleave; the second one waits (`wait=True`, the CLI's `--wait`)
or fails at once with `LockHeld`, one line naming the holder. What is locked depends on the ledger
(`lock_target`):
- PostgreSQL: a session-level advisory lock (`pg_advisory_lock` / `pg_try_advisory_lock`) on a
  dedicated connection of its own, held until release. Its key is derived from the ledger's
  identity (sha256 of the server-side current_database() and current_schema()), so every process
  on every machine that shares the ledger contends for the same lock, whatever host name it uses.
  The connection's application_name says who holds it ("knowledger apply, pid 123 on host"), and
  the refusal reads it back from pg_stat_activity. A process that dies loses its connection and
  the server drops the lock; nothing stale is left.
- SQLite (and any other database): an exclusive `fcntl.flock` on `<db name>.lock` beside the
  database file (for a URL ledger, in the workspace's home). The file is opened with
  editors.fileio.open_no_follow (O_NOFOLLOW | O_CREAT, never O_TRUNC): a symlink there is refused
  in one line (`UnsafeLock`) and its target is never touched; so is anything but a regular file
  with one link. The kernel drops a flock when its process dies.
Only these commands take the lock (readers like `ask` and `export` try it to refresh the
snapshot, and go on without it): `submit` writes short transactions and never waits on it.

Fault points: with KNOWLEDGER_FAULT=<point> (or <point>@<n>: the n-th time the point is reached)
the process SIGKILLs itself there, as a crash would, with no cleanup or exit handlers. The points
are listed in FAULT_POINTS; tests kill a real subprocess at each and check that the next command
finds the ledger and the live snapshot consistent.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from knowledger.agent.workspace import Location
from knowledger.editors.fileio import UnsafePath, open_no_follow
from knowledger.ledger.db import make_engine
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


class UnsafeLock(KnowledgerError):
    """The lock file is a symlink or not a plain file: refused, nothing opened through it."""


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


@dataclass(frozen=True)
class LockTarget:
    """What a workspace's lock locks: a lock file, or (PostgreSQL) an advisory lock via `url`."""

    file: Path | None = None
    url: str | None = None
    display: str = ""  # the URL with any password hidden

    def __str__(self) -> str:
        return str(self.file) if self.file is not None else f"(advisory lock on {self.display})"


def lock_target(loc: Location) -> LockTarget:
    """The lock of the workspace at `loc` (see the module docstring)."""
    if make_url(loc.url).get_backend_name() == "postgresql":
        return LockTarget(url=loc.url, display=loc.display_url)
    if loc.sqlite_file is not None:
        return LockTarget(file=loc.sqlite_file.parent / f"{loc.sqlite_file.stem}.lock")
    return LockTarget(file=loc.home / "ledger.lock")


def _holder_line(what: str) -> str:
    return f"{what}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}"


class _FileLock:
    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def acquire(self, wait: bool, what: str) -> str | None:
        """None when acquired, else the holder's description."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except UnsafePath:
            raise UnsafeLock(f"refusing the workspace lock {self.path}: it is a symlink (remove it; "
                             f"knowledger creates a plain file there)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise UnsafeLock(f"refusing the workspace lock {self.path}: not a plain file with one "
                                 f"link (remove it; knowledger creates a plain file there)")
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # ours: a regular, singly linked file, now locked by us
        os.pwrite(fd, (_holder_line(what) + "\n").encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class _AdvisoryLock:
    """pg_advisory_lock on a dedicated AUTOCOMMIT connection (no transaction stays open)."""

    def __init__(self, url: str, display: str):
        self.url, self.display = url, display
        self._engine = self._conn = None
        self.key: int | None = None

    def acquire(self, wait: bool, what: str) -> str | None:
        from sqlalchemy.pool import NullPool

        name = f"knowledger {_holder_line(what)}"[:63]  # PostgreSQL keeps 63 bytes of it
        engine = make_engine(self.url, poolclass=NullPool, connect_args={"application_name": name})
        try:
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            ident = conn.execute(text("SELECT current_database(), current_schema()")).one()
            digest = hashlib.sha256(f"knowledger-workspace-lock\n{ident[0]}\n{ident[1]}".encode()).digest()
            self.key = int.from_bytes(digest[:8], "big", signed=True)
            if wait:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            elif not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar():
                holder = self._holder(conn)
                conn.close()
                engine.dispose()
                return holder
        except SQLAlchemyError as e:
            engine.dispose()
            raise KnowledgerError(f"cannot take the workspace lock on {self.display}: "
                                  f"{getattr(e, 'orig', None) or e}") from e
        except BaseException:
            engine.dispose()
            raise
        self._engine, self._conn = engine, conn
        return None

    def _holder(self, conn) -> str:
        hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF  # pg_locks splits the key
        row = conn.execute(text(
            "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = CAST(:hi AS bigint)::oid AND l.objid = CAST(:lo AS bigint)::oid "
            "AND l.objsubid = 1 LIMIT 1"), {"hi": hi, "lo": lo}).first()
        if row is None:
            return "another process"
        name = (row[0] or "").removeprefix("knowledger ") or f"server pid {row[2]}"
        return f"{name} from {row[1]}" if row[1] else name

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.close()
            except SQLAlchemyError:
                pass  # a lost connection: the server has dropped the lock with it
            finally:
                self._engine.dispose()
                self._conn = self._engine = None


class WorkspaceLock:
    """The workspace lock; use as a context manager. `wait=False` fails fast with LockHeld.

    `target` is a LockTarget (`lock_target(location)`, what agent.live.lock_path returns), or a
    plain path for a lock file."""

    def __init__(self, target: LockTarget | Path | str, *, wait: bool = False, what: str = "apply"):
        self.target = target if isinstance(target, LockTarget) else LockTarget(file=Path(target))
        self.wait, self.what = wait, what
        self.path = self.target.file  # the lock file, None for an advisory lock
        self._impl: _FileLock | _AdvisoryLock | None = None

    def acquire(self) -> WorkspaceLock:
        t = self.target
        impl = _FileLock(t.file) if t.file is not None else _AdvisoryLock(t.url, t.display)
        holder = impl.acquire(self.wait, self.what)
        if holder is not None:
            raise LockHeld(f"another command holds the workspace lock {t} ({holder}); "
                           f"try again later or pass --wait")
        self._impl = impl
        return self

    def release(self) -> None:
        if self._impl is not None:
            self._impl.release()
            self._impl = None

    @property
    def held(self) -> bool:
        return self._impl is not None

    def __enter__(self) -> WorkspaceLock:
        return self if self.held else self.acquire()  # `with try_lock(...)` holds it once

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(target: LockTarget | Path, what: str) -> WorkspaceLock | None:
    """The lock if it is free now, else None (for readers that may refresh the snapshot).

    An unsafe lock file (a symlink) is refused (UnsafeLock), not skipped."""
    try:
        return WorkspaceLock(target, wait=False, what=what).acquire()
    except LockHeld:
        return None
