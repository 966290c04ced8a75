"""No-op marker: a second revision so that upgrades and downgrades between revisions are tested.

It changes nothing. Tests downgrade a filled database to 0001 and upgrade it back to check that
rows survive, and open a database left at 0001 to check that knowledger asks for `db upgrade`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
