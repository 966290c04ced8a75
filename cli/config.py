"""`knowledger config`: show and set the workspace settings a user sets by hand (agent.config)."""
from __future__ import annotations

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import db_option, echo_json, json_option, main_errors
from knowledger.cli.main import cli


@cli.group()
def config():
    """Workspace settings: audit thresholds, the periodic audit, batching.

    Example: knowledger config set audit_every 5
    """


@config.command("show")
@db_option
@json_option
@main_errors
def show(db, as_json):
    """List the settings with their values and defaults (* marks a value set in this workspace).

    Example: knowledger config show --json
    """
    from knowledger.agent.config import show as show_api

    with open_workspace(db) as ws:
        rows = show_api(ws)
    if as_json:
        echo_json({"settings": rows})
        return
    for r in rows:
        mark = "*" if r["set"] else " "
        if r["settable"]:
            click.echo(f"{mark} {r['key']:<22} {r['value']!s:<10} (default {r['default']}) {r['help']}")
        elif r["set"]:
            click.echo(f"{mark} {r['key']:<22} {r['value']!s:<10} ({r['help']})")


@config.command("set")
@click.argument("key")
@click.argument("value")
@db_option
@json_option
@main_errors
def set_(key, value, db, as_json):
    """Set one setting (checked before it is stored); `config show` lists them.

    Example: knowledger config set audit_margin_drop 1.5
    """
    from knowledger.agent.config import set_value

    with open_workspace(db) as ws:
        result = set_value(ws, key, value)
    if as_json:
        echo_json(result)
        return
    click.echo(f"{result['key']} = {result['new']} (was {result['old']})")
