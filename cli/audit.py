"""`knowledger audit` and `knowledger report`: drift audits of the applied edits and their report.

A thin layer over knowledger.agent.audit and knowledger.agent.report. `audit` exits with a
cron-friendly status: 0 healthy, 1 drift or danger found, 2 an error (one line on stderr).
"""
from __future__ import annotations

import functools
import re
import sys

import click

from knowledger.agent.workspace import open_workspace
from knowledger.cli.common import db_option, echo_json, json_option, main_errors, short_sha
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


def exit_two_on_error(func):
    """Every error exits 2 with one line (1 means drift, for cron); Ctrl-C is not an error."""
    wrapped = main_errors(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return wrapped(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException as e:
            e.exit_code = 2
            raise
        except (KeyboardInterrupt, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 (a cron job needs 2, not a traceback and 1)
            raise click.ClickException(f"{type(e).__name__}: {e}") from e
    return wrapper


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _print_run(run: dict) -> None:
    click.echo(f"Audit #{run['audit_run_id']} of seq {run['head_seq']} on {run['device']}: "
               f"{run['facts']} active facts, {run['drifted']} drifted"
               + (f", {run['overridden']} overridden" if run["overridden"] else "")
               + f" ({run['seconds']:.1f} s).")
    for f in run["drifted_facts"]:
        click.echo(f"  #{f['id']} {f['text']} → {f['target_new']}: P(new) {_fmt(f['p_new'])}"
                   + (f" vs P(true) {_fmt(f['p_true'])}" if f["p_true"] is not None else "")
                   + f", rank {f['rank']}")
        for why in f["reasons"]:
            click.echo(f"    {why}")
    for f in run["overridden_facts"]:
        click.echo(f"  #{f['id']} {f['text']} → {f['target_new']}: overridden by #{f['overridden_by']}")
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


def print_audit(report: dict) -> None:
    for line in report.get("notes", []):
        click.echo(f"note: {line}", err=True)
    runs = report["runs"]
    _print_run(runs[0])
    if report.get("heal"):
        from knowledger.cli.edits import _print_operations

        _print_operations(report["heal"]["operations"])
        for run in runs[1:]:
            _print_run(run)
    click.echo(f"Live weights {short_sha(report['weights_sha256'])} at seq {report['head_seq']}: "
               + ("healthy." if report["healthy"] else
                  "drift or danger found" + ("." if report.get("heal") else
                                             " (knowledger audit --heal re-applies drifted facts).")))


@cli.command()
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to evaluate: auto is CUDA when available (the model goes back after).")
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
@exit_two_on_error
@click.pass_context
def audit(ctx, device, heal_drift, batch_size, watch, interval, max_audits, wait, db, as_json):
    """Re-check every applied edit and the model's health; record the audit in the ledger.

    Per fact: is target_new still the top-1 answer, and how far did its margin over the old answer
    fall since it was applied. Health: held-out perplexity vs the base model, per edited layer
    ||W - W_base|| / ||W_base||. Thresholds: `knowledger config`. Exit status: 0 healthy, 1 drift
    or danger found, 2 error.

    Example: knowledger audit --heal   (or, in a terminal: knowledger audit --watch --interval 10m)
    """
    from knowledger.agent import audit as api

    _quiet()
    if not watch and max_audits is not None:
        raise click.UsageError("--max-audits goes with --watch")
    with open_workspace(db) as ws:
        if not watch:
            report = api.audit(ws, device=device, heal_drift=heal_drift, batch_size=batch_size, wait=wait)
            if as_json:
                echo_json(report)
            else:
                print_audit(report)
            ctx.exit(api.exit_code(report))

        def on_report(report):
            echo_json(report) if as_json else print_audit(report)
            sys.stdout.flush()

        def on_error(e):
            click.echo(f"Error: {e}", err=True)

        try:
            code = api.watch(ws, interval_s=interval, on_report=on_report, on_error=on_error,
                             device=device, heal_drift=heal_drift, batch_size=batch_size,
                             max_audits=max_audits)
        except KeyboardInterrupt:
            click.echo("Stopped watching.", err=True)
            code = 0
        ctx.exit(code)


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False), metavar="DIR",
              help="Where to write index.html [default: <workspace>/report].")
@db_option
@json_option
@main_errors
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
