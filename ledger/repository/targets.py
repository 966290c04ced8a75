"""Per-fact residual targets z (what consolidation re-solves from) and NAS anchors (per base weights)."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.models import (FactTarget, NasAnchor, OperationRequest, Request, RequestOutcome,
                                      RequestStatus, utcnow)
from knowledger.ledger.repository.history import active_operations
from knowledger.ledger.repository.operations import TargetVector


def load_target(row: FactTarget) -> TargetVector:
    """A stored target, after checking its sha256."""
    [value] = blobs.decode_checked((row.value,), row.sha256, f"target of fact #{row.request_id} at layer "
                                   f"{row.layer} of operation {row.operation_id}")
    return TargetVector(request_id=row.request_id, layer=row.layer, site=row.site, value=value)


def operation_targets(session: Session, operation_id: int) -> list[FactTarget]:
    return list(session.scalars(select(FactTarget).where(FactTarget.operation_id == operation_id)
                                .order_by(FactTarget.request_id)))


def active_targets(session: Session, base_model_id: int,
                   request_ids: Sequence[int] | None = None) -> dict[int, TargetVector]:
    """The stored target of every applied fact of a lineage's active operations (checksums
    checked): per fact, the one of its newest active holder that stored one (a fact applied
    before 0007 has none and is missing from the result)."""
    want = None if request_ids is None else set(request_ids)
    out: dict[int, TargetVector] = {}
    for op in active_operations(session, base_model_id):  # seq order: newer holders overwrite
        q = (select(FactTarget).join(OperationRequest, (OperationRequest.operation_id == FactTarget.operation_id)
                                     & (OperationRequest.request_id == FactTarget.request_id))
             .join(Request, Request.id == FactTarget.request_id)
             .where(FactTarget.operation_id == op.id, OperationRequest.outcome == RequestOutcome.applied,
                    Request.status == RequestStatus.applied))
        for row in session.scalars(q):
            if want is None or row.request_id in want:
                out[row.request_id] = load_target(row)
    return out


def add_anchor(session: Session, *, weights_sha256: str, base_model_id: int | None, layer: int, site: str,
               norm: float, n_pilot: int, n_used: int, cutoff: float, rule: str, pilot_norms: list[float],
               pilot_sha256: str, hparams: dict) -> NasAnchor:
    row = NasAnchor(weights_sha256=weights_sha256, base_model_id=base_model_id, layer=layer, site=site,
                    norm=norm, n_pilot=n_pilot, n_used=n_used, cutoff=cutoff, rule=rule,
                    pilot_norms_json=list(pilot_norms), pilot_sha256=pilot_sha256, hparams_json=hparams,
                    measured_at=utcnow())
    session.add(row)
    session.flush()
    return row


def find_anchor(session: Session, weights_sha256: str, layer: int, site: str) -> NasAnchor | None:
    """The newest anchor measured on these base weights for layer L's targets at `site`."""
    q = (select(NasAnchor).where(NasAnchor.weights_sha256 == weights_sha256, NasAnchor.layer == layer,
                                 NasAnchor.site == site).order_by(NasAnchor.id.desc()).limit(1))
    return session.scalars(q).first()


def list_anchors(session: Session, weights_sha256: str | None = None) -> list[NasAnchor]:
    q = select(NasAnchor).order_by(NasAnchor.id)
    if weights_sha256 is not None:
        q = q.where(NasAnchor.weights_sha256 == weights_sha256)
    return list(session.scalars(q))
