"""`knowledger db ...`: the ledger database's schema revision (Alembic migrations)."""
from __future__ import annotations

import click

from knowledger.agent import workspace as ws_api
from knowledger.cli.common import db_option, echo_json, json_option, main_errors
from knowledger.cli.main import cli


@cli.group()
def db():
    """Manage the workspace database's schema (migrations).

    Example: knowledger db upgrade
    """


@db.command()
@click.argument("revision", default="head")
@db_option
@main_errors
def upgrade(revision, db):
    """Migrate the workspace database to REVISION (default: the newest, "head").

    The only command that changes a database at an older schema revision; the others refuse it.
    (`db current` only reports the revision.)

    Example: knowledger db upgrade --db ./my-workspace
    """
    info = ws_api.upgrade_workspace(db, revision)
    if info["before"] == info["after"]:
        click.echo(f"The workspace database is already at revision {info['after']}")
    else:
        click.echo(f"Upgraded the workspace database from revision {info['before']} to {info['after']}")


@db.command()
@db_option
@json_option
@main_errors
def current(db, as_json):
    """Show the database's schema revision and the one this knowledger needs.

    Example: knowledger db current --json
    """
    info = ws_api.schema_revision(db)
    if as_json:
        echo_json(info)
    elif info["up_to_date"]:
        click.echo(f"{info['current']} (head)")
    else:
        click.echo(f"{info['current']} (head is {info['head']}: run `knowledger db upgrade`)")
