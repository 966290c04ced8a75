"""Shared test helpers: a workspace initialised without loading a model, row counts."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from knowledger.agent.workspace import init_workspace, open_workspace
from knowledger.ledger.models import Request, RequestEvent

FINGERPRINT = dict(name_or_path="tiny-test-model", architecture="llama", weights_sha256="ab" * 32,
                   config={"model_type": "llama", "hidden_size": 32})


def make_workspace(path: Path | str) -> Path | str:
    init_workspace(path, fingerprint=FINGERPRINT).workspace.close()
    return path


def count_facts(db) -> int:
    with open_workspace(db) as ws, ws.reading() as s:
        return int(s.scalar(select(func.count()).select_from(Request)))


def count_events(db) -> int:
    with open_workspace(db) as ws, ws.reading() as s:
        return int(s.scalar(select(func.count()).select_from(RequestEvent)))
