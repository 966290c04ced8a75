"""`knowledger audit` and `knowledger report`: drift audits of the applied edits and their report.

A thin layer over knowledger.agent.audit and knowledger.agent.report. `audit` exits with a
cron-friendly status: 0 healthy, 1 drift or danger found, 2 an error (one line on stderr).
"""
from __future__ import annotations

import re
import sys

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import db_option, device_option, echo_json, json_option, progress, report_error
from knowledger.cli.format import audit_exit_code, print_audit
from knowledger.cli.main import cli

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Interval(click.ParamType):
    """A duration: 90, 30s, 10m, 1.5h, 1d."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", str(value).lower())
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a positive duration such as 30s, 10m or 1h", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2)]


class AuditFailed(click.ClickException):
    """An audit error: one line, exit 2 (1 means drift, for cron)."""

    exit_code = 2


@cli.command()
@device_option
@click.option("--heal", "heal_drift", is_flag=True,
              help="Re-apply drifted facts as heal operations (undoable), then audit again.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Prompts per forward pass [default: setting audit_batch_size; 64 CPU, 256 CUDA].")
@click.option("--watch", is_flag=True, help="Keep running: audit when the ledger head moves or every --interval.")
@click.option("--interval", type=Interval(), default="10m", show_default=True,
              help="With --watch: audit at least this often (30s, 10m, 1h).")
@click.option("--max-audits", type=click.IntRange(min=1), hidden=True, help="With --watch: stop after N audits.")
@click.option("--wait", is_flag=True, help="With --heal: wait for another command holding the workspace lock.")
@db_option
@json_option
@click.pass_context
def audit(ctx, device, heal_drift, batch_size, watch, interval, max_audits, wait, db, as_json):
    """Re-check every applied edit and the model's health; record the audit in the ledger.

    Per fact: is target_new still the top-1 answer, and how far did its margin over the old answer
    fall since it was applied. Health: held-out perplexity vs the base model, per edited layer
    ||W - W_base|| / ||W_base||. Thresholds: `knowledger config`. Exit status: 0 healthy, 1 drift
    or danger found, 2 error.

    Example: knowledger audit --heal   (or, in a terminal: knowledger audit --watch --interval 10m)
    """
    from knowledger.agent.audit import audit as audit_api
    from knowledger.agent.watch import watch as watch_api

    if not watch and max_audits is not None:
        raise click.UsageError("--max-audits goes with --watch")
    try:
        with open_workspace(db) as ws:
            if not watch:
                result = audit_api(ws, device=device, heal_drift=heal_drift, batch_size=batch_size,
                                   wait=wait, progress=progress())
                echo_json(result) if as_json else print_audit(result)
                ctx.exit(audit_exit_code(result))

            def on_report(result):
                echo_json(result) if as_json else print_audit(result)
                sys.stdout.flush()

            def on_error(e):
                report_error(e, as_json=as_json, verbose=0)

            try:
                last = watch_api(ws, interval_s=interval, on_report=on_report, on_error=on_error,
                                 device=device, heal_drift=heal_drift, batch_size=batch_size,
                                 max_audits=max_audits, progress=progress())
            except KeyboardInterrupt:
                click.echo("Stopped watching.", err=True)
                ctx.exit(0)
            ctx.exit(2 if last is None else audit_exit_code(last))
    except (click.exceptions.Exit, click.UsageError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 (a cron job needs 2, not 1: the funnel's line, then 2)
        from knowledger.cli.common import describe

        raise AuditFailed(describe(e)[0]) from e


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False), metavar="DIR",
              help="Where to write index.html [default: <workspace>/report].")
@db_option
@json_option
def report(out, db, as_json):
    """Write an HTML page (PNG charts embedded) of the edits and audits over the operations.

    Charts, with the seq of the audited head on the x axis: fact success rates, drifted facts,
    held-out perplexity against the base model, and per edited layer the weight change.

    Example: knowledger report --out ./audit-report && xdg-open ./audit-report/index.html
    """
    from knowledger.agent.report import write_report

    with open_workspace(db) as ws:
        result = write_report(ws, out)
    if as_json:
        echo_json(result)
        return
    click.echo(f"Wrote {result['path']} ({result['audits']} audits, {result['operations']} operations, "
               f"{len(result['charts'])} charts).")
