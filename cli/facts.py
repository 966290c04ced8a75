"""`knowledger submit`, `log` and `show`: put facts into the ledger and look at them."""
from __future__ import annotations

from pathlib import Path

import click

from knowledger.agent import facts as facts_api
from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import clean, db_option, echo_json, json_option, seq_type, short_sha
from knowledger.cli.main import cli


@cli.command()
@click.option("--prompt", help='Template with "{}" for the subject, or containing the subject verbatim.')
@click.option("--subject", help="The entity the fact is about.")
@click.option("--target", help="The new answer (target_new).")
@click.option("--target-true", help="The current answer, if known.")
@click.option("--paraphrase", "paraphrases", multiple=True, metavar="PROMPT",
              help="A rephrased full prompt that should also give the new answer (repeatable).")
@click.option("--neighbor", "neighbors", multiple=True, metavar="PROMPT=ANSWER",
              help="An unrelated prompt whose answer must not change (repeatable).")
@click.option("--source", help='Where the fact comes from [default: "cli", or the file name].')
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Submit every fact of a .jsonl, .csv or .json file (one transaction).")
@click.option("--skip-invalid", is_flag=True,
              help="With --file: store the valid rows and report the invalid ones.")
@db_option
@json_option
def submit(prompt, subject, target, target_true, paraphrases, neighbors, source, file, skip_invalid,
           db, as_json):
    """Submit facts to the ledger as pending edit requests.

    One fact by options, or many with --file. A fact that duplicates a pending fact is reported and
    not stored again. With an invalid row, nothing of the file is stored (see --skip-invalid).

    Example: knowledger submit --prompt "{} is located in" --subject "The Eiffel Tower" --target Rome --target-true Paris
    """
    one = (prompt, subject, target, target_true, paraphrases, neighbors)
    if file is not None:
        if any(one):
            raise click.UsageError("use either --file or --prompt/--subject/--target, not both")
    else:
        for name, value in (("--prompt", prompt), ("--subject", subject), ("--target", target)):
            if value is None:
                raise click.UsageError(f"missing option {name} (or submit a --file)")
        if skip_invalid:
            raise click.UsageError("--skip-invalid goes with --file")
        fact = facts_api.fact_from_options(prompt, subject, target, target_true, paraphrases,
                                           neighbors, source=source)
    with open_workspace(db) as ws:
        if file is not None:
            report = facts_api.submit_file(ws, file, skip_invalid=skip_invalid, source=source)
        else:
            report = facts_api.submit_fact(ws, fact, source="cli")
    if as_json:
        echo_json(report.as_dict())
    elif file is None:
        if report.stored:
            click.echo(f"Stored fact #{report.stored[0][1]}: {clean(fact.text)} → {clean(fact.target_new)}")
        else:
            click.echo(f"Not stored: duplicate of pending fact #{report.duplicates[0][1]}")
    else:
        for where, dup in report.duplicates:
            click.echo(f"{where}: duplicate of pending fact #{dup}, not stored", err=True)
        for problem in report.invalid:
            click.echo(f"{clean(problem)} (skipped)", err=True)
        total = len(report.stored) + len(report.duplicates) + len(report.invalid)
        extra = [f"{n} {what}" for n, what in ((len(report.duplicates), "duplicate"),
                                                (len(report.invalid), "invalid")) if n]
        click.echo(f"Stored {len(report.stored)} of {total} facts from {file.name}"
                   + (f" ({', '.join(extra)})" if extra else ""))


@cli.command()
@click.option("--operations", "what", flag_value="operations", help="List operations instead of facts.")
@click.option("--facts", "what", flag_value="facts", default=True, help="List facts (the default).")
@click.option("--status", type=click.Choice(sorted(set(facts_api.FACT_STATUSES + facts_api.OPERATION_STATUSES))),
              help="Only rows with this status.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="At most this many rows, newest first (0: all).")
@db_option
@json_option
def log(what, status, limit, db, as_json):
    """List facts (or, with --operations, operations), newest first.

    Example: knowledger log --status pending --limit 5
    """
    statuses = facts_api.OPERATION_STATUSES if what == "operations" else facts_api.FACT_STATUSES
    if status is not None and status not in statuses:
        raise click.UsageError(f"{what} have no status {status!r} (one of: {', '.join(statuses)})")
    with open_workspace(db) as ws:
        if what == "operations":
            rows = facts_api.list_operations(ws, status=status, limit=limit or None)
        else:
            rows = facts_api.list_facts(ws, status=status, limit=limit or None)
    if as_json:
        echo_json({what: rows})
    elif not rows:
        click.echo(f"No {what}" + (f" with status {status}." if status else "."))
    elif what == "operations":
        for op in rows:
            hypernet = f"  hypernet {short_sha(op['hypernet_sha256'])}" if op["hypernet_sha256"] else ""
            click.echo(f"seq {op['seq']:<4} {op['kind']:<7} {op['status']:<10} {op['editor'] or '-':<8} "
                       f"{op['facts']} facts  {op['started_at']}{hypernet}")
    else:
        for f in rows:
            was = f" (was {clean(f['target_true'])})" if f["target_true"] else ""
            click.echo(f"#{f['id']:<4} {f['status']:<10} {clean(f['text'])} → {clean(f['target_new'])}{was}")


@cli.command()
@click.argument("fact_id", metavar="ID", type=seq_type())
@db_option
@json_option
def show(fact_id, db, as_json):
    """Show one fact: every field, its status history and the operations that handled it.

    Example: knowledger show 12
    """
    with open_workspace(db) as ws:
        f = facts_api.show_fact(ws, fact_id)
    if as_json:
        echo_json(f)
        return
    click.echo(f"Fact #{f['id']} ({f['status']})")
    fields = [("rewrite", f"{f['text']} → {f['target_new']}"), ("prompt", f["prompt"]),
              ("subject", f["subject"]), ("target_new", f["target_new"]),
              ("target_true", f["target_true"] or "-"), ("source", f["source"] or "-"),
              ("case_id", f["case_id"]), ("submitted", f["submitted_at"]),
              ("reason", f["status_reason"]),
              ("superseded by", f"#{f['superseded_by']}" if f["superseded_by"] else None),
              ("supersedes", ", ".join(f"#{i}" for i in f["supersedes"]) or None),
              ("fingerprint", short_sha(f["fingerprint"]))]
    for name, value in fields:
        if value is not None:
            click.echo(f"  {name + ':':<15}{clean(value)}")
    click.echo("Paraphrases:" + ("" if f["paraphrases"] else " -"))
    for p in f["paraphrases"]:
        click.echo(f"  - {clean(p)}")
    click.echo("Neighbourhood:" + ("" if f["neighborhood"] else " -"))
    for n in f["neighborhood"]:
        click.echo(f"  - {clean(n['prompt'])} → {clean(n['target'])}")
    click.echo("History:")
    for e in f["history"]:
        op = f" (operation {e['operation_id']})" if e["operation_id"] else ""
        click.echo(f"  {e['at']}  {e['status']:<10} {clean(e['reason'] or '')}{op}".rstrip())
    click.echo("Operations:" + ("" if f["operations"] else " -"))
    for op in f["operations"]:
        hypernet = f"  ({op['editor']}, hypernet {short_sha(op['hypernet_sha256'])})" if op["hypernet_sha256"] else ""
        click.echo(f"  seq {op['seq']:<4} {op['kind']:<7} {op['status']:<10} {op['outcome']}{hypernet}")
