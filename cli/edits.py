"""`knowledger apply`, `undo`, `redo`, `replay`, `export` and `ask`: the ledger's edits on the live model.

A thin layer over knowledger.agent.operations and knowledger.agent.export. Notes (a rebuilt
snapshot, a changed setting) go to stderr, so `--json` output on stdout stays parseable.
"""
from __future__ import annotations

import click

from knowledger.agent.scheduler import EDITOR_CHOICES
from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import db_option, echo_json, json_option, main_errors, short_sha
from knowledger.cli.edit import parse_sets
from knowledger.cli.main import cli

wait_option = click.option("--wait", is_flag=True,
                           help="Wait for another apply/undo/redo/replay to finish instead of failing.")


def _quiet() -> None:
    """No progress bars from transformers while loading or saving the tiny-to-small models here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _notes(report: dict) -> None:
    for line in report.get("settings_changes", []) + report.get("notes", []):
        click.echo(f"note: {line}", err=True)


def _fact_list(ids: list) -> str:
    return " ".join(f"#{i}" for i in ids)


def _print_operations(ops: list[dict]) -> None:
    for op in ops:
        what = f"seq {op['seq']} {op['kind']} {op['status']}"
        if op["editor"]:
            what += f" ({op['editor']})"
        if op["kind"] == "undo":
            what += f" of seq {op['target_seq']}"
        parts = [f"{label} {_fact_list(op[key])}" for key, label in
                 (("applied", "applied"), ("reverted", "reverted"), ("requeued", "pending again"))
                 if op[key]]
        parts += [f"failed #{f['id']}" for f in op["failed"]]
        click.echo(f"{what}: {', '.join(parts) or 'no facts'}")
        for f in op["failed"]:
            click.echo(f"  #{f['id']}: {f['reason']}")
        if op["error"]:
            click.echo(f"  {op['error']}")


def _print_head(report: dict) -> None:
    click.echo(f"Live weights {short_sha(report['weights_sha256'])} at seq {report['head_seq']}.")


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
@wait_option
@db_option
@json_option
@main_errors
def apply(batch_size, editor, dry_run, corpus, stats_tokens, sets, preset, wait, db, as_json):
    """Apply the pending facts to the live model: resolve conflicts, batch, edit, check, record.

    Each batch is one ledger operation. A fact whose rewrite does not become the top-1
    continuation is marked failed and left out (the batch is recomputed once without it).

    Example: knowledger apply --corpus wiki.txt --stats-tokens 100000 --set layers=[3,4,5]
    """
    from knowledger.agent.operations import apply_pending

    _quiet()
    with open_workspace(db) as ws:
        report = apply_pending(ws, batch_size=batch_size, editor=editor, dry_run=dry_run, corpus=corpus,
                               stats_tokens=stats_tokens, overrides=parse_sets(sets), preset=preset,
                               wait=wait)
        _periodic_audit(ws, report)
    if as_json:
        _notes(report)
        echo_json(report)
        return
    _notes(report)
    plan = report["plan"]
    for s in plan["superseded"]:
        click.echo(f"#{s['fact']} superseded by #{s['superseded_by']} (same subject and prompt)")
    if dry_run:
        n = sum(len(b["facts"]) for b in plan["batches"])
        click.echo(f"Dry run: {n} facts in {len(plan['batches'])} batches; nothing changed.")
        for b in plan["batches"]:
            click.echo(f"batch {b['index']}: {b['editor']} ({b['reason']})")
            for f in b["facts"]:
                click.echo(f"  #{f['id']} {f['text']} → {f['target_new']}")
        return
    _print_operations(report["operations"])
    _print_head(report)
    if report.get("audit"):
        from knowledger.cli.audit import print_audit

        click.echo(f"Periodic audit (audit_every {report['audit']['due']['audit_every']}):")
        print_audit(report["audit"])


def _periodic_audit(ws, report: dict) -> None:
    """The audit `audit_every` asks for (agent.audit.audit_after_apply), in report["audit"]. Its
    outcome does not change apply's exit status; an error in it is a note, not a failure."""
    from knowledger.agent.audit import audit_after_apply
    from knowledger.ledger.errors import KnowledgerError

    try:
        result = audit_after_apply(ws, report)
    except (KnowledgerError, ValueError, RuntimeError) as e:
        report.setdefault("notes", []).append(f"the periodic audit failed: {e}")
        return
    if result is not None:
        report["audit"] = result


def _one_target(fact_id, seq) -> None:
    if (fact_id is None) == (seq is None):
        raise click.UsageError("give a fact ID or --op SEQ (not both)")


def _run_on_target(api, db, as_json, fact_id, seq, **kw) -> None:
    """undo/redo: one target, the API call under the workspace, then the report."""
    _one_target(fact_id, seq)
    _quiet()
    with open_workspace(db) as ws:
        report = api(ws, fact_id=fact_id, seq=seq, **kw)
    _notes(report)
    if as_json:
        echo_json(report)
        return
    _print_operations(report["operations"])
    _print_head(report)


def _target_options(f):
    f = click.option("--op", "seq", type=int, metavar="SEQ", help="An operation's seq instead of a fact id.")(f)
    return click.argument("fact_id", metavar="[ID]", type=int, required=False)(f)


@cli.command()
@_target_options
@click.option("--rebase", is_flag=True, help="Also recompute every later batch on top of the reverted weights.")
@wait_option
@db_option
@json_option
@main_errors
def undo(fact_id, seq, rebase, wait, db, as_json):
    """Undo a fact (its batch is reverted and the rest re-applied) or, with --op, an operation.

    Records an undo operation; the weights return bit for bit to what they would be without it.

    Example: knowledger undo 12   (or: knowledger undo --op 3 --rebase)
    """
    from knowledger.agent.heal import undo as undo_api  # operations.undo, heal-aware

    _run_on_target(undo_api, db, as_json, fact_id, seq, rebase=rebase, wait=wait)


@cli.command()
@_target_options
@wait_option
@db_option
@json_option
@main_errors
def redo(fact_id, seq, wait, db, as_json):
    """Re-apply a reverted fact or, with --op, an undone operation.

    An operation (or a fact that was alone in its batch) gets its recorded deltas back verbatim;
    one fact of a larger batch is recomputed alone.

    Example: knowledger redo 12
    """
    from knowledger.agent.heal import redo as redo_api  # operations.redo, refusing heals

    _run_on_target(redo_api, db, as_json, fact_id, seq, wait=wait)


@cli.command()
@click.option("--to", "to_seq", type=int, metavar="SEQ", help="Stop after this operation.")
@click.option("--recompute", is_flag=True, help="Re-run the editors on the applied facts (a new lineage).")
@click.option("--model", metavar="NAME_OR_PATH", help="With --recompute: carry the edits to this base model.")
@wait_option
@db_option
@json_option
@main_errors
@click.pass_context
def replay(ctx, to_seq, recompute, model, wait, db, as_json):
    """Rebuild the weights from the base model and the ledger, checking every recorded hash.

    Exits non-zero if any hash differs or a stored delta is corrupt. With --recompute, re-run the
    editors from the facts instead (optionally on another base model) and report each fact.

    Example: knowledger replay   (or: knowledger replay --recompute --model ./other-model)
    """
    from knowledger.agent import operations

    if model and not recompute:
        raise click.UsageError("--model goes with --recompute")
    if recompute and to_seq is not None:
        raise click.UsageError("--to cannot be combined with --recompute")
    _quiet()
    with open_workspace(db) as ws:
        if recompute:
            report = operations.replay_recompute(ws, model=model, wait=wait)
        else:
            report = operations.replay(ws, to_seq=to_seq)
    _notes(report)
    if as_json:
        echo_json(report)
    elif recompute:
        _print_operations(report["operations"])
        ok = sum(f["outcome"] == "applied" for f in report["facts"])
        click.echo(f"Replayed {ok} of {len(report['facts'])} facts on {report['model']}.")
        _print_head(report)
    else:
        for op in report["operations"]:
            mark = "ok" if op["ok"] else "MISMATCH"
            click.echo(f"seq {op['seq']:<4} {op['kind']:<7} {short_sha(op['computed'])}  {mark}")
        for m in report["mismatches"]:
            click.echo(f"mismatch: {m}", err=True)
        click.echo(f"{len(report['operations'])} operations replayed, {len(report['mismatches'])} "
                   f"mismatches; weights {short_sha(report['weights_sha256'])} at seq {report['head_seq']}.")
    if not recompute and report["mismatches"]:
        ctx.exit(1)


@cli.command()
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@db_option
@json_option
@main_errors
def export(out, db, as_json):
    """Write the live model as a Hugging Face folder with a model card of the active edits.

    Example: knowledger export ./edited-model
    """
    from knowledger.agent.export import export as export_api

    _quiet()
    with open_workspace(db) as ws:
        report = export_api(ws, out)
    _notes(report)
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
@main_errors
def ask(prompt, top_k, max_new_tokens, db, as_json):
    """Show the live model's most likely next tokens for a prompt and a greedy continuation.

    Example: knowledger ask "The Eiffel Tower is located in"
    """
    from knowledger.agent.export import ask as ask_api

    _quiet()
    with open_workspace(db) as ws:
        report = ask_api(ws, prompt, top_k=top_k, max_new_tokens=max_new_tokens)
    _notes(report)
    if as_json:
        echo_json(report)
        return
    click.echo(" ".join(f"{t['token']!r} {t['p']:.3f}" for t in report["top"]))
    click.echo(f"{prompt}{report['continuation']}")
