"""The `knowledger` command: a thin click layer over knowledger.agent.

Each noun lives in its own module and registers its commands on `cli` below. Domain errors
(knowledger.ledger.errors.KnowledgerError and ValueError from input checks) become one-line
click errors with a non-zero exit in one place: `main_errors`.
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="knowledger")
def cli():
    """knowledger: lifelong knowledge editing with a persistent edit ledger.

    Example: knowledger init && knowledger submit --prompt "{} is located in" --subject "The Eiffel Tower" --target Rome
    """
    from knowledger.agent.provenance import show_phase_lines

    show_phase_lines()  # plain progress lines for the one-time statistics, terminal or not


def _register():
    # Imported for their side effect of adding commands to `cli`; one module per noun.
    import importlib

    for mod in ("workspace", "facts", "db", "edit", "bench", "edits", "audit", "config", "malmen", "hypernet"):
        try:
            importlib.import_module(f"knowledger.cli.{mod}")
        except ModuleNotFoundError as e:  # a module not written yet
            if e.name != f"knowledger.cli.{mod}":
                raise


_register()
