"""`knowledger export` and `knowledger ask`: reading the live model (agent.export)."""
from __future__ import annotations

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import clean, db_option, echo_json, json_option, notes, short_sha
from knowledger.cli.main import cli


@cli.command()
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@db_option
@json_option
def export(out, db, as_json):
    """Write the live model as a Hugging Face folder with a model card of the active edits.

    Example: knowledger export ./edited-model
    """
    from knowledger.agent.export import export as export_api

    with open_workspace(db) as ws:
        report = export_api(ws, out)
    notes(report["notes"])
    if as_json:
        echo_json(report)
        return
    click.echo(f"Exported the live model (seq {report['head_seq']}, weights "
               f"{short_sha(report['weights_sha256'])}, {len(report['facts'])} active edits) to {report['path']}")


@cli.command()
@click.argument("prompt")
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(0, 500), default=20, show_default=True)
@db_option
@json_option
def ask(prompt, top_k, max_new_tokens, db, as_json):
    """Show the live model's most likely next tokens for a prompt and a greedy continuation.

    Example: knowledger ask "The Eiffel Tower is located in"
    """
    from knowledger.agent.export import ask as ask_api

    with open_workspace(db) as ws:
        report = ask_api(ws, prompt, top_k=top_k, max_new_tokens=max_new_tokens)
    notes(report["notes"])
    if as_json:
        echo_json(report)
        return
    click.echo(" ".join(f"{t['token']!r} {t['p']:.3f}" for t in report["top"]))
    click.echo(clean(f"{prompt}{report['continuation']}"))
