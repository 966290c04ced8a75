"""Artifacts (MALMEN hyper-networks, content-addressed) and workspace settings."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from knowledger.ledger.errors import NotFound
from knowledger.ledger.models import Artifact, Setting, utcnow


def register_artifact(session: Session, *, kind: str, sha256: str, path: str,
                      meta: dict | None = None) -> tuple[Artifact, bool]:
    """(the artifact with this sha256, whether this call created it).

    Content-addressed and append-only: registering a sha256 the ledger already holds changes
    nothing and returns the existing row, whatever `path` and `meta` say this time."""
    row = artifact_by_sha(session, sha256)
    if row is not None:
        return row, False
    row = Artifact(kind=kind, sha256=sha256, path=path, meta_json=meta, created_at=utcnow())
    session.add(row)
    session.flush()
    return row, True


def artifact_by_sha(session: Session, sha256: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(Artifact.sha256 == sha256)).first()


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    row = session.get(Artifact, artifact_id)
    if row is None:
        raise NotFound(f"no artifact #{artifact_id}")
    return row


def list_artifacts(session: Session, *, kind: str | None = None) -> list[Artifact]:
    """Artifacts, oldest first."""
    q = select(Artifact).order_by(Artifact.id)
    if kind is not None:
        q = q.where(Artifact.kind == kind)
    return list(session.scalars(q))


def artifact_shas(session: Session, artifact_ids: Iterable[int | None]) -> dict[int, str]:
    """{artifact id: sha256} for the given ids (None skipped): what listings show per operation."""
    ids = sorted({i for i in artifact_ids if i is not None})
    if not ids:
        return {}
    return {int(i): sha for i, sha in session.execute(select(Artifact.id, Artifact.sha256)
                                                       .where(Artifact.id.in_(ids))).all()}


def get_setting(session: Session, key: str, default: Any = None) -> Any:
    row = session.get(Setting, key)
    return default if row is None else row.value_json


def set_setting(session: Session, key: str, value: Any) -> None:
    row = session.get(Setting, key)
    if row is None:
        session.add(Setting(key=key, value_json=value))
    else:
        row.value_json = value
    session.flush()


def all_settings(session: Session) -> dict[str, Any]:
    return {s.key: s.value_json for s in session.scalars(select(Setting).order_by(Setting.key))}
