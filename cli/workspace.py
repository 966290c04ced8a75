"""`knowledger init` and `knowledger status`: create a workspace, summarise one."""
from __future__ import annotations

import click

from knowledger.agent import workspace as ws_api
from knowledger.cli.common import db_option, echo_json, json_option, main_errors, short_sha
from knowledger.cli.main import cli


@cli.command()
@click.option("--model", metavar="NAME_OR_PATH", default=None,
              help="Base model to edit: a local Hugging Face folder, a .gguf file or a cached hub "
                   "name [default: SmolLM2-135M-Instruct].")
@db_option
@main_errors
def init(model, db):
    """Create a workspace: its directory, its ledger database and the base model's record.

    Running it again on an existing workspace changes nothing; naming a different model is refused.

    Example: knowledger init --model ./models/tiny-llama --db ./my-workspace
    """
    result = ws_api.init_workspace(db, model)
    with result.workspace as ws:
        bm = result.base_model
        if not result.created:
            click.echo(f"Workspace already exists at {ws.location.where} "
                       f"(base model {bm['name_or_path']}); nothing changed")
            return
        click.echo(f"Initialised workspace at {ws.location.home}")
        click.echo(f"  database:   {ws.location.display_url}")
        click.echo(f"  base model: {_model_line(bm)}")


@cli.command()
@db_option
@json_option
@main_errors
def status(db, as_json):
    """Summarise the workspace: database, schema revision, base model, facts and operations.

    Example: knowledger status --json
    """
    with ws_api.open_workspace(db) as ws:
        info = ws_api.workspace_status(ws)
    if as_json:
        echo_json(info)
        return
    schema = info["schema"]
    facts = info["facts"]
    counts = ", ".join(f"{k} {v}" for k, v in facts["by_status"].items() if v)
    click.echo(f"workspace:   {info['workspace']}")
    click.echo(f"database:    {info['database']}")
    click.echo(f"schema:      {schema['current']}" + (" (head)" if schema["current"] == schema["head"] else ""))
    click.echo(f"base model:  {_model_line(info['base_model']) if info['base_model'] else '-'}")
    click.echo(f"facts:       {facts['total']}" + (f" ({counts})" if counts else ""))
    click.echo(f"operations:  {info['operations']['total']}")


def _model_line(bm: dict) -> str:
    return f"{bm['name_or_path']} ({bm['architecture']}, weights {short_sha(bm['weights_sha256'])})"
