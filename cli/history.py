"""`knowledger apply`, `undo`, `redo` and `replay`: the ledger's history of the live weights.

A thin layer over knowledger.agent (apply, undo, replay): one agent call per command, then the
typed result is formatted. Notes (a rebuilt snapshot, a changed setting) and progress go to
stderr, so `--json` output on stdout stays parseable.
"""
from __future__ import annotations

import click

from knowledger.agent.scheduler import EDITOR_CHOICES
from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import (clean, db_option, device_option, echo_json, json_option, notes,
                                   progress, seq_type, short_sha)
from knowledger.cli.direct import parse_sets
from knowledger.cli.format import print_audit, print_head, print_operations
from knowledger.cli.main import cli

wait_option = click.option("--wait", is_flag=True,
                           help="Wait for another apply/undo/redo/replay to finish instead of failing.")


@cli.command()
@click.option("--batch-size", type=click.IntRange(min=1), help="Facts per batch [default: the "
              "workspace setting batch_size, 16].")
@click.option("--editor", type=click.Choice(EDITOR_CHOICES), default="auto", show_default=True,
              help="auto: MALMEN for batches of malmen_min_batch facts (setting, default 0: never) once a "
                   "hyper-network is registered (knowledger hypernet add), else EMMET below auto_memit_min_batch facts, MEMIT from it on "
                   "(and the lifelong editor past the lifelong_* thresholds).")
@click.option("--dry-run", is_flag=True, help="Print the plan (batches, editors, facts); change nothing.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False),
              help="Text or JSONL corpus for the key statistics (stored as a workspace setting).")
@click.option("--stats-tokens", type=click.IntRange(min=1), help="Corpus tokens for the key statistics "
              "(stored as a workspace setting).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Hyperparameter override, stored as a workspace setting (repeatable).")
@click.option("--preset", help="Hyperparameter preset (stored) [default: the model family's].")
@device_option
@wait_option
@db_option
@json_option
@click.pass_context
def apply(ctx, batch_size, editor, dry_run, corpus, stats_tokens, sets, preset, device, wait, db, as_json):
    """Apply the pending facts to the live model: resolve conflicts, batch, edit, check, record.

    Each batch is one ledger operation. A fact whose rewrite does not become the top-1
    continuation is marked failed and left out (the batch is recomputed once without it).
    Exits 1 when facts were pending but none was applied.

    Example: knowledger apply --corpus wiki.txt --stats-tokens 100000 --set layers=[3,4,5]
    """
    from knowledger.agent.apply import apply_pending

    with open_workspace(db) as ws:
        result = apply_pending(ws, batch_size=batch_size, editor=editor, dry_run=dry_run, corpus=corpus,
                               stats_tokens=stats_tokens, overrides=parse_sets(sets), preset=preset,
                               wait=wait, progress=progress(), audit="due", device=device)
    notes(result.settings_changes + result.notes)
    if as_json:
        echo_json(result)
    else:
        _print_apply(result)
    if not dry_run and not result.applied_any:
        ctx.exit(1)


def _print_apply(result) -> None:
    plan = result.plan
    for s in plan["superseded"]:
        click.echo(f"#{s['fact']} superseded by #{s['superseded_by']} (same subject and prompt)")
    if result.dry_run:
        n = sum(len(b["facts"]) for b in plan["batches"])
        click.echo(f"Dry run: {n} facts in {len(plan['batches'])} batches; nothing changed.")
        for b in plan["batches"]:
            click.echo(f"batch {b['index']}: {b['editor']} ({b['reason']})")
            for f in b["facts"]:
                click.echo(f"  #{f['id']} {clean(f['text'])} → {clean(f['target_new'])}")
        return
    print_operations(result.operations)
    print_head(result)
    if result.audit is not None:
        click.echo(f"Periodic audit (audit_every {result.audit.due['audit_every']}):")
        print_audit(result.audit)


def _show_operations(result, as_json: bool) -> None:
    """undo/redo/consolidate: the notes, then the result as JSON or as operation lines + head."""
    notes(result.notes)
    if as_json:
        echo_json(result)
        return
    print_operations(result.operations)
    print_head(result)


def _run_on_target(api, db, as_json, fact_id, seq, **kw) -> None:
    """undo/redo: one target, the API call under the workspace, then the result."""
    if (fact_id is None) == (seq is None):
        raise click.UsageError("give a fact ID or --op SEQ (not both)")
    with open_workspace(db) as ws:
        result = api(ws, fact_id=fact_id, seq=seq, progress=progress(), **kw)
    _show_operations(result, as_json)


def _target_options(f):
    f = click.option("--op", "seq", type=seq_type(), metavar="SEQ",
                     help="An operation's seq instead of a fact id.")(f)
    return click.argument("fact_id", metavar="[ID]", type=seq_type(), required=False)(f)


@cli.command()
@_target_options
@click.option("--rebase", is_flag=True, help="Also recompute every later batch on top of the reverted weights.")
@wait_option
@db_option
@json_option
def undo(fact_id, seq, rebase, wait, db, as_json):
    """Undo a fact (its batch is reverted and the rest re-applied) or, with --op, an operation.

    Records an undo operation; the weights return bit for bit to what they would be without it.

    Example: knowledger undo 12   (or: knowledger undo --op 3 --rebase)
    """
    from knowledger.agent.undo import undo as undo_api

    _run_on_target(undo_api, db, as_json, fact_id, seq, rebase=rebase, wait=wait)


@cli.command()
@_target_options
@wait_option
@db_option
@json_option
def redo(fact_id, seq, wait, db, as_json):
    """Re-apply a reverted fact or, with --op, an undone operation.

    An operation (or a fact that was alone in its batch) gets its recorded deltas back verbatim;
    one fact of a larger batch is recomputed alone.

    Example: knowledger redo 12
    """
    from knowledger.agent.undo import redo as redo_api

    _run_on_target(redo_api, db, as_json, fact_id, seq, wait=wait)


@cli.command()
@click.option("--to", "to_seq", type=seq_type(), metavar="SEQ", help="Stop after this operation.")
@click.option("--recompute", is_flag=True, help="Re-run the editors on the applied facts (a new lineage).")
@click.option("--model", metavar="NAME_OR_PATH", help="With --recompute: carry the edits to this base model.")
@device_option
@wait_option
@db_option
@json_option
@click.pass_context
def replay(ctx, to_seq, recompute, model, device, wait, db, as_json):
    """Rebuild the weights from the base model and the ledger, checking every recorded hash.

    Exits non-zero if any hash differs or a stored delta is corrupt. With --recompute, re-run the
    editors from the facts instead (optionally on another base model) and report each fact.

    Example: knowledger replay   (or: knowledger replay --recompute --model ./other-model)
    """
    from knowledger.agent.replay import replay as replay_api, replay_recompute

    if model and not recompute:
        raise click.UsageError("--model goes with --recompute")
    if recompute and to_seq is not None:
        raise click.UsageError("--to cannot be combined with --recompute")
    with open_workspace(db) as ws:
        if recompute:
            result = replay_recompute(ws, model=model, wait=wait, progress=progress(), device=device)
        else:
            result = replay_api(ws, to_seq=to_seq, progress=progress())
    notes(result.notes)
    if as_json:
        echo_json(result)
    elif recompute:
        print_operations(result.operations)
        ok = sum(f.outcome == "applied" for f in result.facts)
        click.echo(f"Replayed {ok} of {len(result.facts)} facts on {result.model}.")
        print_head(result)
    else:
        for op in result.operations:
            mark = "ok" if op.ok else "MISMATCH"
            click.echo(f"seq {op.seq:<4} {op.kind:<7} {short_sha(op.computed)}  {mark}")
        for m in result.mismatches:
            click.echo(f"mismatch: {m}", err=True)
        click.echo(f"{len(result.operations)} operations replayed, {len(result.mismatches)} "
                   f"mismatches; weights {short_sha(result.weights_sha256)} at seq {result.head_seq}.")
    if not recompute and result.mismatches:
        ctx.exit(1)


@cli.command()
@wait_option
@db_option
@json_option
def consolidate(wait, db, as_json):
    """Re-solve every active fact jointly against the base weights, as ONE operation.

    A new lineage (nothing deleted): the facts' edits become this operation's deltas, solved
    together on the unedited model (MEMIT's layer loop near its equality limit). Refused, with
    nothing written, if a fact would stop being top-1. `undo --op SEQ` undoes it whole.

    Example: knowledger consolidate --json
    """
    from knowledger.agent.consolidate import consolidate_workspace

    with open_workspace(db) as ws:
        result = consolidate_workspace(ws, wait=wait, progress=progress())
    _show_operations(result, as_json)
