"""`knowledger export` and `knowledger ask`: reading the live model (agent.export)."""
from __future__ import annotations

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import clean, db_option, echo_json, json_option, notes, short_sha
from knowledger.cli.main import cli


@cli.command()
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--adapter", is_flag=True,
              help='Write the active edits as a PEFT LoRA adapter instead of the whole model (needs "knowledger[peft]").')
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="The weights' dtype; auto: the dtype the base checkpoint is stored in.")
@db_option
@json_option
def export(out, adapter, dtype, db, as_json):
    """Write the live model as a Hugging Face folder with a model card (base model, editors and
    hyperparameters, the active edits, the last audit), or with --adapter a PEFT LoRA adapter.

    Example: knowledger export ./edited-model
    """
    from knowledger.agent.export import export as export_api

    with open_workspace(db) as ws:
        result = export_api(ws, out, adapter=adapter, dtype=dtype)
    notes(result.notes)
    if as_json:
        echo_json(result)
        return
    what = (f"the active edits as a LoRA adapter of {len(result.adapter)} module(s)"
            if result.kind == "adapter" else "the live model")
    click.echo(f"Exported {what} (seq {result.head_seq}, weights {short_sha(result.weights_sha256)}, "
               f"{len(result.facts)} active edits, {result.dtype}) to {result.path}")


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
