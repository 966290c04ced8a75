"""Base models and operations: recording one (database-numbered seq) with its deltas and vectors."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.models import (BaseModel, Counter, Delta, FactTarget, Operation,
                                      OperationKind, OperationRequest, OperationStatus,
                                      RequestOutcome, RequestVector, utcnow)


def add_base_model(session: Session, *, name_or_path: str, architecture: str, weights_sha256: str,
                   config: dict) -> BaseModel:
    row = BaseModel(name_or_path=name_or_path, architecture=architecture,
                    weights_sha256=weights_sha256, config_json=config)
    session.add(row)
    session.flush()
    return row


def current_base_model(session: Session) -> BaseModel | None:
    """The most recently registered base model (a workspace has one today)."""
    return session.scalars(select(BaseModel).order_by(BaseModel.id.desc()).limit(1)).first()


def request_operations(session: Session, request_id: int) -> list[tuple[Operation, OperationRequest]]:
    """The operations that handled a fact, in sequence order, with its outcome in each."""
    q = (select(Operation, OperationRequest).join(OperationRequest)
         .where(OperationRequest.request_id == request_id).order_by(Operation.seq))
    return [(op, link) for op, link in session.execute(q).all()]


@dataclass(frozen=True)
class DeltaFactors:
    """ΔW = left @ rightᵀ for one parameter, as numpy arrays: left (d_out, r), right (d_in, r)."""

    layer: int
    param: str
    left: np.ndarray  # (d_out, r)
    right: np.ndarray  # (d_in, r)


@dataclass(frozen=True)
class FactVectors:
    """One fact's key k (d_in,) and value v* (d_out,) at one layer."""

    request_id: int
    layer: int
    key: np.ndarray  # (d_in,)
    value: np.ndarray  # (d_out,)


@dataclass(frozen=True)
class TargetVector:
    """One fact's residual target z (d,) at layer L (`site` "block" or "mlp"; models.FactTarget)."""

    request_id: int
    layer: int
    site: str
    value: np.ndarray  # (d,)


def knowledger_version() -> str:
    try:
        return metadata.version("knowledger")
    except metadata.PackageNotFoundError:
        return "unknown"


OPERATION_SEQ = "operation_seq"  # the counters row that numbers operations


def next_seq(session: Session) -> int:
    """The sequence number the next operation will get (a peek: see take_seq)."""
    value = session.scalar(select(Counter.value).where(Counter.name == OPERATION_SEQ))
    if value is None:  # no counter row yet: numbering starts after the highest stored seq
        value = session.scalar(select(func.coalesce(func.max(Operation.seq), 0)))
    return int(value or 0) + 1


def take_seq(session: Session) -> int:
    """The next operation sequence number, from the database: the `operation_seq` counter row is
    incremented in this transaction and stays locked until it ends, so concurrent transactions
    never get the same number; a rolled-back one gives its number back."""
    stmt = (update(Counter.__table__).where(Counter.name == OPERATION_SEQ)
            .values(value=Counter.value + 1).returning(Counter.value))
    value = session.execute(stmt).scalar()
    if value is None:  # no counter row (a database that skipped 0005's seed): create it
        value = next_seq(session)
        session.add(Counter(name=OPERATION_SEQ, value=value))
        session.flush()
    return int(value)


def record_operation(session: Session, *, kind: OperationKind, base_model_id: int,
                     request_ids: Sequence[int] = (), deltas: Iterable[DeltaFactors] = (),
                     vectors: Iterable[FactVectors] = (),
                     targets: Iterable[TargetVector] = (),
                     status: OperationStatus = OperationStatus.committed,
                     outcome: RequestOutcome = RequestOutcome.applied,
                     started_at: datetime | None = None, **fields: Any) -> Operation:
    """Insert one operation with its facts (in batch order), factored deltas, vectors and targets.

    `fields` are further Operation columns (editor, distribution, hparams_json, layers_json,
    target_operation_id, timings_json, metrics_json, error, weights_sha256_before/after).
    The caller changes fact statuses (set_request_status) in the same transaction.
    """
    op = Operation(seq=take_seq(session), kind=kind, status=status, base_model_id=base_model_id,
                   started_at=started_at or utcnow(), knowledger_version=knowledger_version(),
                   finished_at=None if status == OperationStatus.running else utcnow(), **fields)
    session.add(op)
    session.flush()
    for pos, rid in enumerate(request_ids):
        session.add(OperationRequest(operation_id=op.id, request_id=rid, position=pos, outcome=outcome))
    for d in deltas:
        left, right = blobs.encode(d.left), blobs.encode(d.right)
        session.add(Delta(operation_id=op.id, layer=d.layer, param=d.param, left=left, right=right,
                          dtype=str(d.left.dtype), shape_json=[int(d.left.shape[0]), int(d.right.shape[0])],
                          rank=int(d.left.shape[1]), frobenius_norm=blobs.frobenius_norm(d.left, d.right),
                          sha256=blobs.sha256(left, right)))
    for v in vectors:
        key, value = blobs.encode(v.key), blobs.encode(v.value)
        session.add(RequestVector(operation_id=op.id, request_id=v.request_id, layer=v.layer,
                                  key=key, value=value, sha256=blobs.sha256(key, value)))
    for t in targets:
        value = blobs.encode(np.asarray(t.value, dtype=np.float32))
        session.add(FactTarget(operation_id=op.id, request_id=t.request_id, layer=t.layer, site=t.site,
                               value=value, sha256=blobs.sha256(value)))
    session.flush()
    return op


def load_delta(delta: Delta) -> DeltaFactors:
    """A stored delta's factors, after checking their sha256."""
    left, right = blobs.decode_checked((delta.left, delta.right), delta.sha256,
                                       f"delta {delta.param} of operation {delta.operation_id}")
    return DeltaFactors(layer=delta.layer, param=delta.param, left=left, right=right)


def operation_deltas(session: Session, operation_id: int) -> list[Delta]:
    return list(session.scalars(select(Delta).where(Delta.operation_id == operation_id)
                                .order_by(Delta.layer, Delta.param)))


def list_operations(session: Session, *, status: OperationStatus | str | None = None,
                    limit: int | None = None) -> list[Operation]:
    """Operations, newest (highest seq) first."""
    q = select(Operation).order_by(Operation.seq.desc())
    if status is not None:
        q = q.where(Operation.status == OperationStatus(status))
    if limit:
        q = q.limit(limit)
    return list(session.scalars(q))


def count_operations(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Operation)) or 0)


def operation_request_counts(session: Session, operation_ids: Sequence[int]) -> dict[int, int]:
    if not operation_ids:
        return {}
    q = (select(OperationRequest.operation_id, func.count()).group_by(OperationRequest.operation_id)
         .where(OperationRequest.operation_id.in_(operation_ids)))
    return {int(k): int(v) for k, v in session.execute(q).all()}
