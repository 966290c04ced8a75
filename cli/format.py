"""Printers of agent results as text: shared by the commands, importing no command module."""
from __future__ import annotations

import click

from knowledger.cli.common import clean, notes, short_sha


def fact_list(ids: list) -> str:
    return " ".join(f"#{i}" for i in ids)


def print_operations(ops) -> None:
    """agent.records.OperationSummary rows, one line each (and a line per failed fact)."""
    for op in ops:
        what = f"seq {op.seq} {op.kind} {op.status}"
        if op.editor:
            what += f" ({op.editor})"
        if op.kind == "undo":
            what += f" of seq {op.target_seq}"
        parts = [f"{label} {fact_list(ids)}" for ids, label in
                 ((op.applied, "applied"), (op.reverted, "reverted"), (op.requeued, "pending again"))
                 if ids]
        parts += [f"failed #{f.id}" for f in op.failed]
        click.echo(f"{what}: {', '.join(parts) or 'no facts'}")
        for f in op.failed:
            click.echo(f"  #{f.id}: {clean(f.reason)}")
        if op.error:
            click.echo(f"  {op.error}")


def print_head(result) -> None:
    click.echo(f"Live weights {short_sha(result.weights_sha256)} at seq {result.head_seq}.")


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_run(run: dict) -> None:
    """One audit run (agent.audit.audit_live's report)."""
    click.echo(f"Audit #{run['audit_run_id']} of seq {run['head_seq']} on {run['device']}: "
               f"{run['facts']} active facts, {run['drifted']} drifted"
               + (f", {run['overridden']} overridden" if run["overridden"] else "")
               + f" ({run['seconds']:.1f} s).")
    for f in run["drifted_facts"]:
        click.echo(f"  #{f['id']} {clean(f['text'])} → {clean(f['target_new'])}: P(new) {_fmt(f['p_new'])}"
                   + (f" vs P(true) {_fmt(f['p_true'])}" if f["p_true"] is not None else "")
                   + f", rank {f['rank']}")
        for why in f["reasons"]:
            click.echo(f"    {why}")
    for f in run["overridden_facts"]:
        click.echo(f"  #{f['id']} {clean(f['text'])} → {clean(f['target_new'])}: overridden by #{f['overridden_by']}")
    h = run["health"]
    parts = []
    if h.get("perplexity") is not None:
        parts.append(f"perplexity {h['perplexity']:.4g} (base {h['base_perplexity']:.4g}, "
                     f"×{h['ppl_ratio']:.3f})")
    if h.get("layers"):
        parts.append("||ΔW||/||W|| " + ", ".join(f"layer {k} {v['delta_rel']:.3f}"
                                                for k, v in h["layers"].items()))
    if parts:
        click.echo("Health: " + "; ".join(parts) + ".")
    for d in run["danger"]:
        click.echo(f"  danger: {d}")


def print_audit(result) -> None:
    """agent.audit.AuditResult as text."""
    notes(result.notes)
    _print = print_run
    _print(result.runs[0])
    if result.heal:
        print_operations(result.heal.operations)
        for run in result.runs[1:]:
            _print(run)
    click.echo(f"Live weights {short_sha(result.weights_sha256)} at seq {result.head_seq}: "
               + ("healthy." if result.healthy else
                  "drift or danger found" + ("." if result.heal else
                                             " (knowledger audit --heal re-applies drifted facts).")))


def audit_exit_code(result) -> int:
    """`audit`'s cron status: 0 healthy, 1 drift or danger found (errors exit 2)."""
    return 0 if result is not None and result.healthy else 1
