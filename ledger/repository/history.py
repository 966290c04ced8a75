"""The active set and the head: which operations' deltas make up the live weights."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.errors import NotFound
from knowledger.ledger.models import (Operation, OperationKind, OperationRequest, OperationStatus,
                                      Request, RequestOutcome, RequestStatus, RequestVector)
from knowledger.ledger.repository.operations import FactVectors


# An operation of these kinds carries deltas; it is *active* while it is committed, belongs to the
# current base model and no committed undo targets it. The live weights are a pure function of the
# active set (see knowledger.agent.live); undo adds an undo row, it never edits the target.
DELTA_KINDS = (OperationKind.apply, OperationKind.redo, OperationKind.replay, OperationKind.heal,
               OperationKind.consolidate)


def get_operation_by_seq(session: Session, seq: int) -> Operation:
    row = session.scalars(select(Operation).where(Operation.seq == seq)).first()
    if row is None:
        raise NotFound(f"no operation with seq {seq}")
    return row


def lineage(session: Session, base_model_id: int, *, up_to_seq: int | None = None) -> list[Operation]:
    """The committed operations recorded against one base model, in seq order."""
    q = (select(Operation).where(Operation.base_model_id == base_model_id,
                                 Operation.status == OperationStatus.committed)
         .order_by(Operation.seq))
    if up_to_seq is not None:
        q = q.where(Operation.seq <= up_to_seq)
    return list(session.scalars(q))


def active_operations(session: Session, base_model_id: int, *,
                      up_to_seq: int | None = None) -> list[Operation]:
    """The delta-carrying operations in effect (after `up_to_seq`, if given), in seq order."""
    ops = lineage(session, base_model_id, up_to_seq=up_to_seq)
    undone = {op.target_operation_id for op in ops if op.kind == OperationKind.undo}
    return [op for op in ops if op.kind in DELTA_KINDS and op.id not in undone]


def weight_changes(session: Session, base_model_id: int, after_seq: int, up_to_seq: int) -> list[Operation]:
    """The committed operations of a lineage that changed the weights (they recorded a weights
    hash after), after_seq < seq <= up_to_seq, in seq order: what moved the live weights since."""
    q = (select(Operation).where(Operation.base_model_id == base_model_id,
                                 Operation.status == OperationStatus.committed,
                                 Operation.weights_sha256_after.is_not(None),
                                 Operation.seq > after_seq, Operation.seq <= up_to_seq)
         .order_by(Operation.seq))
    return list(session.scalars(q))


def is_undone(session: Session, operation: Operation) -> bool:
    q = select(func.count()).select_from(Operation).where(
        Operation.kind == OperationKind.undo, Operation.status == OperationStatus.committed,
        Operation.target_operation_id == operation.id)
    return bool(session.scalar(q))


def head_operation(session: Session, base_model_id: int) -> Operation | None:
    """The latest committed operation of a base model that recorded a weights hash."""
    q = (select(Operation).where(Operation.base_model_id == base_model_id,
                                 Operation.status == OperationStatus.committed,
                                 Operation.weights_sha256_after.is_not(None))
         .order_by(Operation.seq.desc()).limit(1))
    return session.scalars(q).first()


def running_operations(session: Session) -> list[Operation]:
    return list(session.scalars(select(Operation).where(Operation.status == OperationStatus.running)
                                .order_by(Operation.seq)))


def operation_facts(session: Session, operation_id: int) -> list[tuple[OperationRequest, Request]]:
    """The facts an operation handled, in batch order, with its link row (outcome, metrics)."""
    q = (select(OperationRequest, Request).join(Request, Request.id == OperationRequest.request_id)
         .where(OperationRequest.operation_id == operation_id).order_by(OperationRequest.position))
    return [(link, req) for link, req in session.execute(q).all()]


def operation_vectors(session: Session, operation_id: int) -> list[RequestVector]:
    return list(session.scalars(select(RequestVector).where(RequestVector.operation_id == operation_id)
                                .order_by(RequestVector.request_id, RequestVector.layer)))


def link_requests(session: Session, operation_id: int,
                  links: Sequence[tuple[int, RequestOutcome, dict | None]]) -> None:
    """Operation ↔ fact rows with a per-fact outcome and metrics, positions in the given order
    (record_operation links every fact with one outcome; this is for mixed ones)."""
    for pos, (request_id, outcome, metrics) in enumerate(links):
        session.add(OperationRequest(operation_id=operation_id, request_id=request_id, position=pos,
                                     outcome=outcome, metrics_json=metrics))
    session.flush()


def active_facts(session: Session, base_model_id: int) -> list[tuple[Operation, Request]]:
    """The applied facts whose edit is in the live weights, each once, with the first active
    operation that holds it (a healed fact is also held by a later `heal` operation)."""
    out, seen = [], set()
    for op in active_operations(session, base_model_id):
        for link, req in operation_facts(session, op.id):
            if link.outcome == RequestOutcome.applied and req.status == RequestStatus.applied \
                    and req.id not in seen:
                seen.add(req.id)
                out.append((op, req))
    return out


def load_vectors(row: RequestVector) -> FactVectors:
    """A stored key/value pair, after checking its sha256."""
    key, value = blobs.decode_checked((row.key, row.value), row.sha256,
                                      f"vectors of fact #{row.request_id} at layer {row.layer} of "
                                      f"operation {row.operation_id}")
    return FactVectors(request_id=row.request_id, layer=row.layer, key=key, value=value)


def active_fact_links(session: Session, base_model_id: int, *, up_to_seq: int | None = None
                      ) -> list[tuple[Operation, OperationRequest, Request]]:
    """Every (active operation, its link row, fact) where the operation applied a fact that is
    still applied, in operation seq then batch order; a healed fact appears once per holder."""
    ops = {op.id: op for op in active_operations(session, base_model_id, up_to_seq=up_to_seq)}
    ids, out = list(ops), []
    for i in range(0, len(ids), 500):  # bounded IN lists
        q = (select(OperationRequest, Request).join(Request, Request.id == OperationRequest.request_id)
             .where(OperationRequest.operation_id.in_(ids[i:i + 500]),
                    OperationRequest.outcome == RequestOutcome.applied,
                    Request.status == RequestStatus.applied))
        out += [(ops[link.operation_id], link, req) for link, req in session.execute(q).all()]
    return sorted(out, key=lambda t: (t[0].seq, t[1].position))


def count_operations_since(session: Session, base_model_id: int, after_seq: int,
                           kinds: Sequence[OperationKind] = (OperationKind.apply,)) -> int:
    """Committed operations of these kinds with seq > after_seq (periodic audits count them)."""
    q = select(func.count()).select_from(Operation).where(
        Operation.base_model_id == base_model_id, Operation.status == OperationStatus.committed,
        Operation.kind.in_(list(kinds)), Operation.seq > after_seq)
    return int(session.scalar(q) or 0)


def active_vectors(session: Session, base_model_id: int) -> list[FactVectors]:
    """The key/value vectors of every active operation of a lineage, in seq order."""
    return [load_vectors(v) for op in active_operations(session, base_model_id)
            for v in operation_vectors(session, op.id)]
