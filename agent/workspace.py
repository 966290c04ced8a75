"""The workspace: where the ledger database and the workspace's files live, and opening it safely.

Found by, in order: the `db` argument (`--db`), the environment variable KNOWLEDGER_DB, then
`./.knowledger/`. The value is a SQLAlchemy URL (anything with "://") or a filesystem path:
- a directory (or a path without a .db/.sqlite/.sqlite3 suffix): the workspace directory, with
  the database in `<dir>/ledger.db`;
- a .db/.sqlite/.sqlite3 file: that SQLite database, with the files in its directory;
- a sqlite:/// URL: likewise, files beside the database file;
- any other URL (PostgreSQL: a ledger several machines may share): files in $KNOWLEDGER_HOME,
  else in a folder of this machine's cache named by the ledger,
  `$KNOWLEDGER_CACHE/ledgers/<16 hex of sha256(URL without password)>/` (KNOWLEDGER_CACHE defaults
  to ~/.cache/knowledger), never relative to the working directory. Those files (the live
  snapshot, report) are derived from the ledger; another machine rebuilds its own.

Every command except `knowledger db upgrade` opens the workspace with `open_workspace`, which
refuses a database that is missing, foreign, or not at the schema revision this knowledger expects
(one line saying to run `knowledger init` or `knowledger db upgrade`); it never migrates silently.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from knowledger.agent.jsonutil import iso
from knowledger.ledger import repository as repo, schema
from knowledger.ledger.db import make_engine, read_session, write_session
from knowledger.agent.errors import UnsupportedModel
from knowledger.ledger.errors import (KnowledgerError, SchemaOutdated, WorkspaceExists,
                                      WorkspaceNotFound)

ENV_DB = "KNOWLEDGER_DB"
ENV_HOME = "KNOWLEDGER_HOME"
DEFAULT_DIR = ".knowledger"
DB_FILE = "ledger.db"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_FALLBACK_DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Location:
    """Where a workspace is: its database URL, its files directory and, for SQLite, the file."""

    url: str
    home: Path
    sqlite_file: Path | None = None

    @property
    def display_url(self) -> str:
        """The URL with any password hidden."""
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def where(self) -> str:
        return str(self.sqlite_file.parent if self.sqlite_file else self.display_url)


@dataclass
class Workspace:
    """An open workspace: use as a context manager, or call close()."""

    location: Location
    engine: Engine = field(repr=False)

    def reading(self):
        """A session for reading (rolled back at the end)."""
        return read_session(self.engine)

    def writing(self):
        """One write transaction, committed at the end of the block."""
        return write_session(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class InitResult:
    workspace: Workspace
    created: bool  # False: it existed already
    base_model: dict


def locate(db: str | os.PathLike | None = None) -> Location:
    """Resolve `db` / $KNOWLEDGER_DB / ./.knowledger to a Location (see the module docstring)."""
    value = str(db) if db else os.environ.get(ENV_DB) or DEFAULT_DIR
    if "://" in value:
        try:
            url = make_url(value)
        except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
            raise KnowledgerError(f"not a valid database URL: {value!r}") from e
        database = url.database or ""
        if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") \
                and not database.startswith("file:"):
            file = Path(database).expanduser().resolve()
            return Location(url.set(database=str(file)).render_as_string(hide_password=False),
                            home=file.parent, sqlite_file=file)
        return Location(value, home=_url_home(url))
    path = Path(value).expanduser().resolve()
    if path.is_file() or (not path.is_dir() and path.suffix.lower() in SQLITE_SUFFIXES):
        file, home = path, path.parent
    else:
        file, home = path / DB_FILE, path
    return Location(URL.create("sqlite", database=str(file)).render_as_string(), home=home,
                    sqlite_file=file)


def _url_home(url: URL) -> Path:
    """The files folder of a database-URL ledger: $KNOWLEDGER_HOME, else a per-ledger cache folder."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser().resolve()
    ident = URL.create(url.get_backend_name(), username=url.username or None, host=url.host, port=url.port,
                       database=url.database, query=url.query).render_as_string(hide_password=False)
    cache = Path(os.environ.get("KNOWLEDGER_CACHE") or "~/.cache/knowledger").expanduser().resolve()
    return cache / "ledgers" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def _connect(loc: Location) -> Engine:
    return make_engine(loc.url)


def _revision(engine: Engine, loc: Location) -> tuple[str | None, bool]:
    """(schema revision, whether the database has any table at all)."""
    try:
        current = schema.current_revision(engine)
        has_tables = bool(inspect(engine).get_table_names()) if current is None else True
    except SQLAlchemyError as e:
        raise KnowledgerError(f"cannot read the workspace database {loc.display_url}: "
                              f"{getattr(e, 'orig', None) or e}") from e
    return current, has_tables


def _require_database(loc: Location, engine: Engine) -> str:
    """The revision of an existing knowledger database, or WorkspaceNotFound."""
    current, has_tables = _revision(engine, loc)
    if current is None:
        if has_tables:
            raise WorkspaceNotFound(f"{loc.display_url} is not a knowledger database "
                                    f"(no schema revision)")
        raise WorkspaceNotFound(f"no knowledger workspace at {loc.where}: run `knowledger init`")
    return current


def _outdated(current: str, head: str) -> SchemaOutdated:
    from knowledger.ledger import migrate  # Alembic: only when the schema is not at head

    if migrate.known_revision(current):
        return SchemaOutdated(f"the workspace database is at schema revision {current}, this "
                              f"knowledger needs {head}: run `knowledger db upgrade`")
    return SchemaOutdated(f"the workspace database is at schema revision {current}, unknown to this "
                          f"knowledger (head {head}); it was written by a newer knowledger")


def open_workspace(db: str | os.PathLike | Location | None = None) -> Workspace:
    """Open an existing workspace whose database is at the head revision; never migrates."""
    loc = db if isinstance(db, Location) else locate(db)
    if loc.sqlite_file is not None and not loc.sqlite_file.exists():
        raise WorkspaceNotFound(f"no knowledger workspace at {loc.where}: run `knowledger init`")
    engine = _connect(loc)
    try:
        current, head = _require_database(loc, engine), schema.HEAD_REVISION
        if current != head:
            raise _outdated(current, head)
    except BaseException:
        engine.dispose()
        raise
    return Workspace(loc, engine)


def default_model() -> str:
    try:
        from knowledger.editors.models import DEFAULT_MODEL
    except ImportError:
        return _FALLBACK_DEFAULT_MODEL
    return DEFAULT_MODEL


def normalise_model(name_or_path: str | None) -> str:
    """The name to record: the default model's name, an absolute path for a local path, or as is."""
    if name_or_path is None or name_or_path.strip().lower() in ("default", _FALLBACK_DEFAULT_MODEL.lower()):
        return default_model()
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _fingerprint(name_or_path: str) -> dict:
    from knowledger.editors.models import model_fingerprint  # torch: imported only here

    try:
        return model_fingerprint(name_or_path)
    except OSError as e:  # a missing model or file: the loaders' messages say which
        raise KnowledgerError(str(e)) from e


def supported_architectures() -> tuple[str, ...]:
    """The model families the editors can edit (editors.model_spec.SPECS, by config.model_type)."""
    from knowledger.editors.model_spec import SPECS

    return tuple(sorted(SPECS))


def check_supported(architecture: str, name: str = "the model") -> None:
    """Refuse, in one line, a model whose family the editors have no ModelSpec for."""
    known = supported_architectures()
    if architecture not in known:
        raise UnsupportedModel(f"{name} is a {architecture!r} model, which knowledger cannot edit "
                               f"(it edits: {', '.join(known)})")


def init_workspace(db: str | os.PathLike | None = None, model: str | None = None, *,
                   fingerprint: dict | None = None) -> InitResult:
    """Create a workspace (directory, database at head, base model), or return the existing one.

    Re-running on an existing workspace changes nothing; naming a different model is refused.
    `fingerprint` (name_or_path, architecture, weights_sha256, config) skips loading the model.
    """
    loc = locate(db)
    if loc.sqlite_file is None or loc.sqlite_file.exists():
        engine = _connect(loc)
        try:
            current, has_tables = _revision(engine, loc)
        finally:
            engine.dispose()
        if current is not None or has_tables:
            ws = open_workspace(loc)
            with ws.reading() as s:
                bm = repo.current_base_model(s)
                if bm is not None:
                    if model is not None and normalise_model(model) != bm.name_or_path:
                        ws.close()
                        raise WorkspaceExists(
                            f"the workspace at {loc.where} already edits {bm.name_or_path}; refusing "
                            f"to switch it to {model} (use another --db for another model)")
                    return InitResult(ws, created=False, base_model=base_model_view(bm))
            ws.close()
    name = normalise_model(model)
    fp = fingerprint or _fingerprint(name)  # before anything is created: a bad model leaves nothing
    check_supported(fp["architecture"], name)
    loc.home.mkdir(parents=True, exist_ok=True)
    engine = _connect(loc)
    try:
        from knowledger.ledger import migrate

        migrate.upgrade(engine)
        with write_session(engine) as s:
            bm = repo.add_base_model(s, name_or_path=fp.get("name_or_path") or name,
                                     architecture=fp["architecture"],
                                     weights_sha256=fp["weights_sha256"], config=fp.get("config") or {})
            view = base_model_view(bm)
    except BaseException:
        engine.dispose()
        raise
    return InitResult(Workspace(loc, engine), created=True, base_model=view)


def schema_revision(db: str | os.PathLike | None = None) -> dict:
    """The database's schema revision and this knowledger's head, without requiring head."""
    loc = locate(db)
    if loc.sqlite_file is not None and not loc.sqlite_file.exists():
        raise WorkspaceNotFound(f"no knowledger workspace at {loc.where}: run `knowledger init`")
    with _disposing(_connect(loc)) as engine:
        current = _require_database(loc, engine)
    head = schema.HEAD_REVISION
    return dict(database=loc.display_url, current=current, head=head, up_to_date=current == head)


def upgrade_workspace(db: str | os.PathLike | None = None, revision: str = "head") -> dict:
    """Migrate an existing workspace database to `revision` (default: head)."""
    loc = locate(db)
    if loc.sqlite_file is not None and not loc.sqlite_file.exists():
        raise WorkspaceNotFound(f"no knowledger workspace at {loc.where}: run `knowledger init`")
    with _disposing(_connect(loc)) as engine:
        from knowledger.ledger import migrate

        before = _require_database(loc, engine)
        if not migrate.known_revision(before):
            raise _outdated(before, migrate.head_revision())
        try:
            migrate.upgrade(engine, revision)
        except SQLAlchemyError as e:
            raise KnowledgerError(f"upgrade failed, nothing changed: {getattr(e, 'orig', None) or e}") from e
        after = schema.current_revision(engine)
    return dict(database=loc.display_url, before=before, after=after)


@contextmanager
def _disposing(engine: Engine) -> Iterator[Engine]:
    try:
        yield engine
    finally:
        engine.dispose()


def base_model_view(bm) -> dict:
    return dict(id=bm.id, name_or_path=bm.name_or_path, architecture=bm.architecture,
                weights_sha256=bm.weights_sha256, registered_at=iso(bm.registered_at))


def workspace_status(ws: Workspace) -> dict:
    """A JSON-ready summary: where, schema, base model, facts per status, operations."""
    with ws.reading() as s:
        bm = repo.current_base_model(s)
        by_status = repo.count_requests_by_status(s)
        n_ops = repo.count_operations(s)
        current = schema.current_revision(ws.engine)
    return dict(workspace=str(ws.location.home), database=ws.location.display_url,
                schema=dict(current=current, head=schema.HEAD_REVISION),
                base_model=base_model_view(bm) if bm else None,
                facts=dict(total=sum(by_status.values()), by_status=by_status),
                operations=dict(total=n_ops))

