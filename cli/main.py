"""The `knowledger` command: a thin click layer over knowledger.agent.

Each noun lives in its own module and registers its commands on `cli` below. Every failure goes
through one funnel (cli/common.py: `report_error`): one `Error: ...` line, exit 1 (2 for a usage
error), a JSON object under --json, the traceback with -v.
"""
from __future__ import annotations

import importlib
import sys

import click

from knowledger.cli.common import Output, report_error, silence_third_party
from knowledger.cli.progress import show_phase_lines

MODULES = ("workspace", "facts", "db", "direct", "bench", "history", "reading", "audit", "config",
           "malmen", "hypernet")


class Knowledger(click.Group):
    """The group, with the error funnel around every command."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        words = args[:args.index("--")] if "--" in args else args
        as_json = "--json" in words
        verbose = sum(w == "-v" or w == "--verbose" for w in words) + sum(
            w.count("v") for w in words if w.startswith("-v") and set(w[1:]) == {"v"} and len(w) > 2)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            rv = e.exit_code
        except click.exceptions.Abort:
            click.echo("Error: aborted", err=True)
            rv = 130
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            rv = 130
        except Exception as e:  # noqa: BLE001 (the one funnel: every failure becomes one line)
            rv = report_error(e, as_json=as_json, verbose=verbose)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Knowledger, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="knowledger")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no notes on stderr (errors still show).")
@click.option("-v", "--verbose", count=True, help="Show third-party warnings and bars, and tracebacks on errors.")
@click.pass_context
def cli(ctx, quiet, verbose):
    """knowledger: lifelong knowledge editing with a persistent edit ledger.

    Example: knowledger init && knowledger submit --prompt "{} is located in" --subject "The Eiffel Tower" --target Rome
    """
    ctx.obj = Output(quiet=quiet, verbose=verbose)
    silence_third_party(verbose)
    show_phase_lines(not quiet)  # plain lines for the one-time statistics phases, terminal or not


def _register():
    # Imported for their side effect of adding commands to `cli`; one module per noun.
    for mod in MODULES:
        importlib.import_module(f"knowledger.cli.{mod}")


_register()
