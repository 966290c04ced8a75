"""The errors knowledger reports to its users.

Everything a user can cause (a bad fact, a missing workspace, an outdated database) raises a
`KnowledgerError` subclass whose message is one line that says what is wrong and what to do. The CLI
turns these into one-line errors with a non-zero exit in one place (knowledger.cli.common).
"""
from __future__ import annotations


class KnowledgerError(Exception):
    """Base class: the message is shown to the user as is."""


class WorkspaceNotFound(KnowledgerError):
    """No knowledger database where the workspace was looked for."""


class WorkspaceExists(KnowledgerError):
    """`init` on a workspace that already exists with different settings."""


class SchemaOutdated(KnowledgerError):
    """The database is not at the schema revision this knowledger expects."""


class NotFound(KnowledgerError):
    """A fact, operation or other ledger row that does not exist."""


class InvalidFacts(KnowledgerError):
    """Fact input that failed validation; `problems` holds one "where: what" line per problem."""

    def __init__(self, problems: list[str], summary: str | None = None):
        self.problems = list(problems)
        lines = self.problems[:20]
        if len(self.problems) > 20:
            lines.append(f"... and {len(self.problems) - 20} more")
        if summary:
            lines.append(summary)
        super().__init__("\n".join(lines))


class IntegrityError(KnowledgerError):
    """Stored bytes that no longer match their recorded checksum."""
