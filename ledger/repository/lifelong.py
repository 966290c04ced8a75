"""UltraEdit's lifelong statistics: the ultraedit_stats table (count, mean, M2 per edited layer).

Numpy only (the ledger imports no torch): agent.lifelong converts to and from
editors.lifelong_norm. Rows are append-only; each carries a sha256 over its mean, M2 and count,
checked on every read (a damaged row is an IntegrityError naming its operation and layer).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from knowledger.ledger import blobs
from knowledger.ledger.errors import IntegrityError
from knowledger.ledger.models import Operation, OperationKind, OperationStatus, UltraEditStats

BATCH, STATE = "batch", "state"  # an operation's own batch moments / the lineage's statistics after it


@dataclass(frozen=True)
class StoredMoments:
    """One layer's (n, μ (D,), M2 (D,)) float64."""

    layer: int
    n: int
    mean: np.ndarray  # (D,) float64
    m2: np.ndarray  # (D,) float64


def _sha(mean: bytes, m2: bytes, n: int) -> str:
    return blobs.sha256(mean, m2, str(int(n)).encode())


def save_lifelong(session: Session, operation_id: int, base_model_id: int, role: str,
                  moments: Iterable[StoredMoments]) -> None:
    """Append one row per layer for `operation_id` in `role` ("batch" or "state")."""
    if role not in (BATCH, STATE):
        raise ValueError(f"ultraedit_stats role must be {BATCH!r} or {STATE!r}, not {role!r}")
    for m in moments:
        mean = blobs.encode(np.asarray(m.mean, dtype=np.float64))
        m2 = blobs.encode(np.asarray(m.m2, dtype=np.float64))
        session.add(UltraEditStats(operation_id=operation_id, base_model_id=base_model_id, layer=int(m.layer),
                                   role=role, n=int(m.n), mean=mean, m2=m2, sha256=_sha(mean, m2, m.n)))
    session.flush()


def _load(row: UltraEditStats, seq: int | str) -> StoredMoments:
    what = f"ultraedit statistics ({row.role}) of operation seq {seq}, layer {row.layer}"
    actual = _sha(row.mean, row.m2, row.n)
    if actual != row.sha256:
        raise IntegrityError(f"{what}: checksum mismatch (stored {row.sha256[:12]}…, bytes hash to "
                             f"{actual[:12]}…)")
    return StoredMoments(row.layer, int(row.n), blobs.decode(row.mean), blobs.decode(row.m2))


def operation_lifelong(session: Session, operation_id: int, role: str = BATCH) -> list[StoredMoments]:
    """One operation's rows of `role`, by layer (empty for an operation that wrote none)."""
    q = (select(UltraEditStats, Operation.seq).join(Operation, Operation.id == UltraEditStats.operation_id)
         .where(UltraEditStats.operation_id == operation_id, UltraEditStats.role == role)
         .order_by(UltraEditStats.layer))
    return [_load(row, seq) for row, seq in session.execute(q).all()]


def latest_lifelong_state(session: Session, base_model_id: int) -> tuple[int, list[StoredMoments]] | None:
    """(seq, per-layer state) of the lineage's latest committed operation that wrote a state, or None."""
    q = (select(Operation.id, Operation.seq).join(UltraEditStats, UltraEditStats.operation_id == Operation.id)
         .where(UltraEditStats.base_model_id == base_model_id, UltraEditStats.role == STATE,
                Operation.status == OperationStatus.committed)
         .order_by(Operation.seq.desc()).limit(1))
    got = session.execute(q).first()
    if got is None:
        return None
    return int(got.seq), operation_lifelong(session, got.id, STATE)


def active_batch_counts(session: Session, base_model_id: int) -> dict[int, int]:
    """{layer: rows} summed over the batch moments of the lineage's active operations (committed,
    carrying deltas, not undone), by one aggregate query: no moment is read or decoded."""
    from knowledger.ledger.repository.history import DELTA_KINDS

    undone = (select(Operation.target_operation_id)
              .where(Operation.kind == OperationKind.undo, Operation.status == OperationStatus.committed,
                     Operation.target_operation_id.is_not(None)))
    q = (select(UltraEditStats.layer, func.sum(UltraEditStats.n))
         .join(Operation, Operation.id == UltraEditStats.operation_id)
         .where(UltraEditStats.base_model_id == base_model_id, UltraEditStats.role == BATCH,
                Operation.base_model_id == base_model_id, Operation.status == OperationStatus.committed,
                Operation.kind.in_(DELTA_KINDS), Operation.id.not_in(undone))
         .group_by(UltraEditStats.layer))
    return {int(layer): int(n) for layer, n in session.execute(q).all() if n}


def count_lifelong_rows(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(UltraEditStats)))
