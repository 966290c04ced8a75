"""Engines and sessions for the ledger; SQLite gets the settings a shared, concurrent file needs.

Any SQLAlchemy URL works. For SQLite, on every new connection:
- `PRAGMA foreign_keys=ON` (SQLite leaves foreign keys unchecked otherwise);
- `PRAGMA journal_mode=WAL` for file databases: readers never block the writer, nor it them;
- `PRAGMA synchronous=NORMAL` (safe with WAL: a crash may lose the last commits, never corrupt);
- a busy timeout (30 s by default): a writer waits for another writer instead of failing.
The driver's own transaction handling is switched off and SQLAlchemy emits BEGIN itself: `BEGIN`
for reading sessions, `BEGIN IMMEDIATE` for writing ones, so a write transaction takes the write
lock up front and never fails half-way with "database is locked" when it upgrades from reading.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from knowledger.ledger.errors import KnowledgerError

BUSY_TIMEOUT_S = 30.0
_WRITE = "knowledger_write"  # execution option marking a writing connection


# backend -> (the driver SQLAlchemy should use when the URL names none, the extra that installs it)
_DRIVERS = {"postgresql": ("psycopg", "postgres")}


class DriverMissing(KnowledgerError):
    """The database URL needs a driver that is not installed."""


def _with_driver(u: URL) -> URL:
    """`postgresql://` means psycopg 3 (the `postgres` extra), not SQLAlchemy's default psycopg2."""
    if u.get_backend_name() in _DRIVERS and "+" not in u.drivername:
        return u.set(drivername=f"{u.get_backend_name()}+{_DRIVERS[u.get_backend_name()][0]}")
    return u


def make_engine(url: str | URL, *, busy_timeout_s: float = BUSY_TIMEOUT_S, echo: bool = False,
                **engine_kwargs) -> Engine:
    """An engine for `url`; for SQLite with the pragmas and BEGIN handling described above.

    A URL whose driver is not installed raises DriverMissing naming the package (and, for
    PostgreSQL, the `knowledger[postgres]` extra). `engine_kwargs` go to create_engine for
    databases other than SQLite (the PostgreSQL lock's own connection uses them)."""
    u = _with_driver(make_url(url))
    if u.get_backend_name() != "sqlite":
        try:
            return create_engine(u, echo=echo, **{"pool_pre_ping": True, **engine_kwargs})
        except ImportError as e:  # the dialect imports its driver here
            backend, driver = u.get_backend_name(), u.get_driver_name()
            ours, extra = _DRIVERS.get(backend, (None, None))
            hint = f"install the Python package {getattr(e, 'name', None) or driver!r}"
            if extra:
                hint = (f'pip install "knowledger[{extra}]"' if driver == ours else
                        f'{hint}, or use {backend}+{ours}:// after pip install "knowledger[{extra}]"')
            raise DriverMissing(f"the database URL needs the {u.get_driver_name()} driver for {backend}, "
                                f"which is not installed: {hint}") from None
    engine = create_engine(u, echo=echo, connect_args={"timeout": busy_timeout_s})
    in_memory = u.database in (None, "", ":memory:") or "mode=memory" in str(u)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver must not BEGIN on its own; we do it below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def writer(engine: Engine) -> Engine:
    """The same engine (same pool), marked so its transactions take the write lock at BEGIN."""
    return engine.execution_options(**{_WRITE: True})


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading; rolled back at the end."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    with Session(writer(engine), expire_on_commit=False) as session, session.begin():
        yield session
