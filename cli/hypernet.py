"""`knowledger hypernet add|list|use`: the workspace's MALMEN hyper-networks (agent.hypernets).

`knowledger train-malmen` (cli/malmen.py) makes one; `hypernet add` registers it with a workspace
and makes it the current one, which `apply --editor malmen` (and `auto` for large batches) uses.
"""
from __future__ import annotations

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import db_option, echo_json, json_option, main_errors, short_sha
from knowledger.cli.main import cli


@cli.group()
def hypernet():
    """MALMEN hyper-networks of the workspace: register one, list them, choose the current one.

    Example: knowledger hypernet add runs/malmen && knowledger apply --editor malmen
    """


def _what(view: dict) -> str:
    layers = ", ".join(str(x) for x in view["layers"] or []) or "?"
    return f"{short_sha(view['sha256'])} (layers {layers} of a {view['model_type'] or '?'})"


@hypernet.command("add")
@click.argument("folder", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--use/--no-use", default=True, show_default=True,
              help="Make it the workspace's current hyper-network (what `apply --editor malmen` uses).")
@db_option
@json_option
@main_errors
def add(folder, use, db, as_json):
    """Register a trained hyper-network (the --out folder of `knowledger train-malmen`).

    Checks that it loads and fits the workspace's base model, keeps a copy in the workspace
    (artifacts/<sha256>/) and records it in the ledger; adding the same network again changes
    nothing but, with --use, makes it current.

    Example: knowledger hypernet add runs/malmen --db ws
    """
    from knowledger.agent.hypernets import add as add_api

    with open_workspace(db) as ws:
        report = add_api(ws, folder, use=use)
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)
    if as_json:
        echo_json(report)
        return
    done = "Registered" if report["created"] else "Already registered:"
    where = f"copied to {report['path']}" if report["copied"] else f"kept at {report['path']}"
    click.echo(f"{done} MALMEN hyper-network {_what(report)}, {where}"
               + ("; it is the current one." if report["current"] else "."))


@hypernet.command("use")
@click.argument("sha", metavar="SHA")
@db_option
@json_option
@main_errors
def use_(sha, db, as_json):
    """Make a registered hyper-network (a prefix of its sha256) the current one.

    Example: knowledger hypernet use 3fa9c1d2
    """
    from knowledger.agent.hypernets import use as use_api

    with open_workspace(db) as ws:
        report = use_api(ws, sha)
    if as_json:
        echo_json(report)
        return
    click.echo(f"Current MALMEN hyper-network: {_what(report)} (was {short_sha(report['previous'])}).")


def _score(training: dict | None, key: str) -> str:
    v = ((training or {}).get("validation") or {}).get(key)
    return "-" if v is None else f"{v:.3f}"


@hypernet.command("list")
@db_option
@json_option
@main_errors
def list_(db, as_json):
    """List the registered hyper-networks; * marks the current one.

    Shows each one's sha256 (12 characters), kind, when it was added, its edited layers, the
    training step it was kept at with its held-out efficacy, paraphrase and neighbourhood scores,
    and where its files are.

    Example: knowledger hypernet list --json
    """
    from knowledger.agent.hypernets import list_hypernets

    with open_workspace(db) as ws:
        rows = list_hypernets(ws)
    if as_json:
        echo_json({"hypernets": rows})
        return
    if not rows:
        click.echo("No MALMEN hyper-networks registered (knowledger hypernet add DIR).")
        return
    click.echo(f"  {'sha256':<12}  {'kind':<15}  {'created':<25}  {'layers':<8}  {'step':>5}  "
               f"{'effic.':>6}  {'para.':>6}  {'neigh.':>6}  path")
    for r in rows:
        t = r["training"] or {}
        layers = ",".join(str(x) for x in r["layers"] or []) or "-"
        missing = "" if r["present"] else "  (missing)"
        click.echo(f"{'*' if r['current'] else ' '} {short_sha(r['sha256']):<12}  {r['kind']:<15}  "
                   f"{r['created_at']:<25}  {layers:<8}  {t.get('step') if t.get('step') is not None else '-':>5}  "
                   f"{_score(t, 'efficacy'):>6}  {_score(t, 'paraphrase'):>6}  {_score(t, 'neighborhood'):>6}  "
                   f"{r['path']}{missing}")
