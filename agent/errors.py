"""The errors the agent raises, in one place the CLI can import them from.

Domain errors are `KnowledgerError`s (knowledger.ledger.errors) with a one-line message that says
what is wrong and what to do; the CLI's error funnel (cli/common.py) shows them as `Error: ...`.
"""
from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError as DatabaseError

from knowledger.ledger.errors import (IntegrityError, InvalidFacts, KnowledgerError, NotFound,
                                      SchemaOutdated, WorkspaceExists, WorkspaceNotFound)

__all__ = ["DatabaseError", "IntegrityError", "InvalidFacts", "KnowledgerError", "NO_BASE_MODEL", "NotFound",
           "NothingToDo", "SchemaOutdated", "UnsupportedModel", "WorkspaceExists",
           "WorkspaceNotFound"]

NO_BASE_MODEL = "the workspace has no base model: run `knowledger init`"


class NothingToDo(KnowledgerError):
    """Nothing pending to apply, nothing to undo or redo."""


class UnsupportedModel(KnowledgerError):
    """A model whose architecture the editors have no ModelSpec for."""
