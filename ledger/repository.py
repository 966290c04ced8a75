"""Queries and inserts on the ledger, one small function each; callers own the session/transaction.

Nothing here deletes a row: facts and operations change by status updates and new rows
(`set_request_status` appends to a fact's history in the same transaction).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.errors import NotFound
from knowledger.ledger.facts import Fact
from knowledger.ledger.models import (Artifact, AuditResult, AuditRun, AuditStatus, BaseModel, Counter, Delta,
                                      EditMemory, Operation,
                                      OperationKind, OperationRequest, OperationStatus, Request,
                                      RequestEvent, RequestOutcome, RequestStatus, RequestVector,
                                      Setting, utcnow)


# --- base models ---------------------------------------------------------------------------------
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


# --- facts (edit requests) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Added:
    """What became of the i-th fact given to `add_requests`: stored as `request_id`, or not stored
    because it duplicates the pending fact `duplicate_of` (stored earlier, or earlier in the batch)."""

    index: int
    request_id: int | None = None
    duplicate_of: int | None = None


def pending_duplicate(session: Session, fingerprint: str) -> int | None:
    """The id of a pending fact with this fingerprint, if any."""
    return session.scalars(select(Request.id).where(Request.fingerprint == fingerprint,
                                                    Request.status == RequestStatus.pending)
                           .order_by(Request.id).limit(1)).first()


def add_requests(session: Session, facts: Sequence[Fact], *, source: str | None = None) -> list[Added]:
    """Store facts as pending edit requests, skipping duplicates of pending facts.

    `source` is used for facts that carry none. Each stored fact gets a "pending" history event.
    Safe under concurrency on any database: the unique index on pending fingerprints refuses a
    second pending copy, so each insert runs in a savepoint and a refused one (another writer
    stored the same fact since the check) becomes a duplicate of the row that won.
    """
    out: list[Added] = []
    for i, fact in enumerate(facts):
        fp = fact.fingerprint
        dup = pending_duplicate(session, fp)
        if dup is not None:
            out.append(Added(i, duplicate_of=dup))
            continue
        row = Request(prompt=fact.prompt, subject=fact.subject, target_new=fact.target_new,
                      target_true=fact.target_true, paraphrase_prompts=list(fact.paraphrases),
                      neighborhood=[{"prompt": p, "target": t} for p, t in fact.neighborhood],
                      source=fact.source or source, case_id=fact.case_id, fingerprint=fp,
                      status=RequestStatus.pending, submitted_at=utcnow())
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except DBIntegrityError:
            dup = pending_duplicate(session, fp)  # committed by the other writer: visible now
            if dup is None:
                raise
            out.append(Added(i, duplicate_of=dup))
            continue
        session.add(RequestEvent(request_id=row.id, at=row.submitted_at, status=RequestStatus.pending,
                                 reason=f"submitted ({row.source})" if row.source else "submitted"))
        out.append(Added(i, request_id=row.id))
    session.flush()
    return out


def get_request(session: Session, request_id: int) -> Request:
    row = session.get(Request, request_id)
    if row is None:
        raise NotFound(f"no fact #{request_id}")
    return row


def list_requests(session: Session, *, status: RequestStatus | str | None = None,
                  limit: int | None = None) -> list[Request]:
    """Facts, newest first."""
    q = select(Request).order_by(Request.id.desc())
    if status is not None:
        q = q.where(Request.status == RequestStatus(status))
    if limit:
        q = q.limit(limit)
    return list(session.scalars(q))


def count_requests_by_status(session: Session) -> dict[str, int]:
    """{status: count} over every status, zeros included, in the enum's order."""
    counts = dict(session.execute(select(Request.status, func.count()).group_by(Request.status)).all())
    return {s.value: int(counts.get(s, 0)) for s in RequestStatus}


def set_request_status(session: Session, request: Request, status: RequestStatus, *,
                       reason: str | None = None, operation_id: int | None = None,
                       superseded_by_id: int | None = None) -> RequestEvent:
    """Change a fact's status and append the change to its history."""
    request.status = status
    request.status_reason = reason
    if superseded_by_id is not None:
        request.superseded_by_id = superseded_by_id
    event = RequestEvent(request_id=request.id, status=status, reason=reason,
                         operation_id=operation_id)
    session.add(event)
    session.flush()
    return event


def request_history(session: Session, request_id: int) -> list[RequestEvent]:
    return list(session.scalars(select(RequestEvent).where(RequestEvent.request_id == request_id)
                                .order_by(RequestEvent.id)))


def request_operations(session: Session, request_id: int) -> list[tuple[Operation, OperationRequest]]:
    """The operations that handled a fact, in sequence order, with its outcome in each."""
    q = (select(Operation, OperationRequest).join(OperationRequest)
         .where(OperationRequest.request_id == request_id).order_by(Operation.seq))
    return [(op, link) for op, link in session.execute(q).all()]


def superseded_facts(session: Session, request_id: int) -> list[int]:
    """Ids of the facts this one superseded."""
    return list(session.scalars(select(Request.id).where(Request.superseded_by_id == request_id)
                                .order_by(Request.id)))


# --- operations ----------------------------------------------------------------------------------
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
                     status: OperationStatus = OperationStatus.committed,
                     outcome: RequestOutcome = RequestOutcome.applied,
                     started_at: datetime | None = None, **fields: Any) -> Operation:
    """Insert one operation with its facts (in batch order), factored deltas and vectors.

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


# --- artifacts (MALMEN hyper-networks) -----------------------------------------------------------
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


# --- settings ------------------------------------------------------------------------------------
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


# --- the active set and the head (what the live weights are made of) ----------------------------
# An operation of these kinds carries deltas; it is *active* while it is committed, belongs to the
# current base model and no committed undo targets it. The live weights are a pure function of the
# active set (see knowledger.agent.live); undo adds an undo row, it never edits the target.
DELTA_KINDS = (OperationKind.apply, OperationKind.redo, OperationKind.replay, OperationKind.heal)


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


def requests_by_ids(session: Session, ids: Sequence[int]) -> list[Request]:
    """Facts in the order of `ids`; NotFound names the first missing one."""
    rows = {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(list(ids))))}
    for i in ids:
        if i not in rows:
            raise NotFound(f"no fact #{i}")
    return [rows[i] for i in ids]


def pending_requests(session: Session) -> list[Request]:
    """Pending facts, oldest first (the order they are applied in)."""
    return list(session.scalars(select(Request).where(Request.status == RequestStatus.pending)
                                .order_by(Request.id)))


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


# --- audits ----------------------------------------------------------------------------------------
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


def count_operations_since(session: Session, base_model_id: int, after_seq: int,
                           kinds: Sequence[OperationKind] = (OperationKind.apply,)) -> int:
    """Committed operations of these kinds with seq > after_seq (periodic audits count them)."""
    q = select(func.count()).select_from(Operation).where(
        Operation.base_model_id == base_model_id, Operation.status == OperationStatus.committed,
        Operation.kind.in_(list(kinds)), Operation.seq > after_seq)
    return int(session.scalar(q) or 0)


# --- the past-edit memory ----------------------------------------------------------------------
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


def active_vectors(session: Session, base_model_id: int) -> list[FactVectors]:
    """The key/value vectors of every active operation of a lineage, in seq order."""
    return [load_vectors(v) for op in active_operations(session, base_model_id)
            for v in operation_vectors(session, op.id)]
