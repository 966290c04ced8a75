"""Audit runs and their per-fact results; the past-edit memory (Σ k kᵀ per layer)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.models import AuditResult, AuditRun, AuditStatus, EditMemory, utcnow


@dataclass(frozen=True)
class AuditFact:
    """One fact's result in an audit, as record_audit_run stores it."""

    request_id: int
    metrics: dict
    drifted: bool


def record_audit_run(session: Session, *, started_at: datetime, head_seq: int | None, device: str | None,
                     status: AuditStatus | str, metrics: dict | None,
                     results: Iterable[AuditFact] = ()) -> AuditRun:
    """Insert one finished (completed or failed) audit run with its per-fact results."""
    run = AuditRun(started_at=started_at, finished_at=utcnow(), head_seq=head_seq, device=device,
                   status=AuditStatus(status), metrics_json=metrics)
    session.add(run)
    session.flush()
    session.add_all([AuditResult(audit_run_id=run.id, request_id=r.request_id, metrics_json=r.metrics,
                                 drifted=bool(r.drifted)) for r in results])
    session.flush()
    return run


def list_audit_runs(session: Session, *, status: AuditStatus | str | None = None,
                    limit: int | None = None) -> list[AuditRun]:
    """Audit runs, oldest first (the last `limit` ones when given)."""
    q = select(AuditRun).order_by(AuditRun.id.desc())
    if status is not None:
        q = q.where(AuditRun.status == AuditStatus(status))
    if limit:
        q = q.limit(limit)
    return list(reversed(list(session.scalars(q))))


def last_audit_run(session: Session, *, status: AuditStatus | str | None = AuditStatus.completed
                   ) -> AuditRun | None:
    runs = list_audit_runs(session, status=status, limit=1)
    return runs[0] if runs else None


def audit_results(session: Session, audit_run_id: int, *, drifted: bool | None = None) -> list[AuditResult]:
    """One audit's per-fact results, by fact id (only the drifted ones with drifted=True)."""
    q = select(AuditResult).where(AuditResult.audit_run_id == audit_run_id).order_by(AuditResult.request_id)
    if drifted is not None:
        q = q.where(AuditResult.drifted == drifted)
    return list(session.scalars(q))


@dataclass(frozen=True)
class StoredMemory:
    """One layer's M = Σ k kᵀ (d_in, d_in) float64, how many keys it sums, and the seq it reflects."""

    layer: int
    matrix: np.ndarray  # (d_in, d_in) float64
    n_keys: int
    as_of_seq: int


def load_memory(session: Session, base_model_id: int) -> list[StoredMemory]:
    """The stored memory of a base model's lineage, one entry per layer (checksums checked)."""
    rows = session.scalars(select(EditMemory).where(EditMemory.base_model_id == base_model_id)
                           .order_by(EditMemory.layer))
    return [StoredMemory(r.layer, blobs.decode_checked((r.matrix,), r.sha256, f"edit memory of layer {r.layer}")[0],
                         r.n_keys, r.as_of_seq) for r in rows]


def memory_as_of(session: Session, base_model_id: int) -> int | None:
    """The oldest `as_of_seq` of a lineage's stored memory rows (None: nothing stored); reads no matrix."""
    return session.scalar(select(func.min(EditMemory.as_of_seq)).where(EditMemory.base_model_id == base_model_id))


def save_memory(session: Session, base_model_id: int, layers: Iterable[StoredMemory]) -> None:
    """Insert or replace the memory of the given layers (one row per (base model, layer))."""
    for m in layers:
        data = blobs.encode(np.asarray(m.matrix, dtype=np.float64))
        row = session.scalar(select(EditMemory).where(EditMemory.base_model_id == base_model_id,
                                                      EditMemory.layer == m.layer))
        if row is None:
            row = EditMemory(base_model_id=base_model_id, layer=m.layer)
            session.add(row)
        row.matrix, row.sha256, row.n_keys, row.as_of_seq = data, blobs.sha256(data), int(m.n_keys), int(m.as_of_seq)
    session.flush()
