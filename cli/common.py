"""Shared pieces of the CLI: the error wrapper, the --db and --json options, JSON output.

`main_errors` is the one place where domain errors become one-line click errors with a non-zero
exit: KnowledgerError and ValueError (bad input) as they are, database errors prefixed.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from knowledger.ledger.errors import KnowledgerError

db_option = click.option(
    "--db", metavar="URL|PATH", envvar="KNOWLEDGER_DB", show_envvar=True,
    help="Workspace: a directory, a .db file or a SQLAlchemy URL [default: ./.knowledger].")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def main_errors(func):
    """Run a command body, turning domain errors into click errors (exit 1, one line each)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (KnowledgerError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        except SQLAlchemyError as e:
            raise click.ClickException(f"database error: {getattr(e, 'orig', None) or e}") from e

    return wrapper


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def short_sha(sha: str | None) -> str:
    return sha[:12] if sha else "-"
