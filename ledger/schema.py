"""The ledger's schema revision, read without Alembic: what every command checks when it opens a
workspace. Importing Alembic costs ~0.3-0.5 s of each command's start; it is needed only to
migrate (ledger.migrate), so opening a workspace at the head revision never imports it."""
from __future__ import annotations

from sqlalchemy import Engine, inspect, text

from knowledger.ledger.errors import KnowledgerError

HEAD_REVISION = "0007"  # the newest revision in knowledger/migrations/versions; tests check it is
#                         ScriptDirectory's head (tests/ledger/test_migrations.py)
VERSION_TABLE = "alembic_version"  # Alembic's default version table


def current_revision(engine: Engine) -> str | None:
    """The database's revision (Alembic's version table); None for a database Alembic never
    touched, or one migrated down to base."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise KnowledgerError(f"the workspace database has several schema heads ({', '.join(sorted(rows))}); "
                              f"knowledger's migrations have one")
    return rows[0] if rows else None
