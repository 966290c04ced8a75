"""Facts (edit requests): storing them idempotently, their statuses and history."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from knowledger.ledger.errors import NotFound
from knowledger.ledger.facts import Fact
from knowledger.ledger.models import Request, RequestEvent, RequestStatus, utcnow


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


def superseded_facts(session: Session, request_id: int) -> list[int]:
    """Ids of the facts this one superseded."""
    return list(session.scalars(select(Request.id).where(Request.superseded_by_id == request_id)
                                .order_by(Request.id)))


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
