"""UltraEdit's lifelong normalisation statistics in the ledger (the ultraedit_stats table).

editors.lifelong_norm is the arithmetic (LifelongStats: per layer n, μ, M2 of z = [k ‖ g]; Chan's
merge and its exact inverse, float64); this module keeps it in step with the ledger, per lineage
(base_models row), as agent.memory does for the past-edit memory:
- an ultraedit apply / replay / heal / recomputed redo records its batch's moments ("batch" rows)
  and adds them; a redo with reused deltas re-adds the moments of the operation it redoes (copied
  to its own "batch" rows); an undo of an operation with moments subtracts them
  (LifelongStats.remove). Every such operation also records the state after it ("state" rows),
  in the SAME transaction (EditSession.commit); other operations leave the statistics alone.
- `load(session, base_model_id)`: the latest stored state, checked against the active history
  (its count per layer must equal the sum of the active operations' batch counts, one aggregate
  query), else rebuilt.
- `rebuild(session, base_model_id)`: from scratch, merging the active operations' batch moments
  in seq order: what replay checks the stored state against.

What undo does NOT redo: an ultraedit batch applied after the undone one was normalised with
statistics that included it, and its deltas stay as recorded. The statistics after the undo equal
those rebuilt from the surviving batches (tested), but the later deltas are not those a history
without the undone batch would have produced; `undo --rebase` recomputes the later batches.
"""
from __future__ import annotations

import torch

from knowledger.editors.lifelong_norm import BatchMoments, LifelongStats, Moments
from knowledger.ledger import repository as repo

TOLERANCE = 1e-9  # relative: a stored state and its rebuild agree to float64 rounding


def to_stored(layers: dict[int, Moments]) -> list[repo.StoredMoments]:
    return [repo.StoredMoments(l, m.n, m.mean.detach().cpu().double().numpy(), m.m2.detach().cpu().double().numpy())
            for l, m in sorted(layers.items())]


def from_stored(rows) -> dict[int, Moments]:
    return {r.layer: Moments(int(r.n), torch.from_numpy(r.mean.copy()).double(), torch.from_numpy(r.m2.copy()).double())
            for r in rows}


def batches(session, base_model_id: int) -> list[tuple[int, BatchMoments]]:
    """(seq, moments) of every active operation of the lineage that recorded a batch, in seq order."""
    out = []
    for op in repo.active_operations(session, base_model_id):
        rows = repo.operation_lifelong(session, op.id, repo.BATCH)
        if rows:
            out.append((op.seq, BatchMoments(from_stored(rows))))
    return out


def rebuild(session, base_model_id: int) -> LifelongStats:
    """The statistics from scratch: the surviving batches' moments merged in seq order."""
    return LifelongStats.rebuild(b for _, b in batches(session, base_model_id))


def load(session, base_model_id: int) -> tuple[LifelongStats, bool]:
    """(statistics, rebuilt): the latest stored state when its counts match the active batches',
    else the rebuild (a state a downgrade/upgrade lost, a ledger edited by hand). The counts come
    from one aggregate query, so a load reads one state, not every batch of the history."""
    want = repo.active_batch_counts(session, base_model_id)
    stored = repo.latest_lifelong_state(session, base_model_id)
    if stored is not None:
        state = LifelongStats(from_stored(stored[1]))
        if {l: m.n for l, m in state.layers.items() if m.n} == want:
            return state, False
    elif not want:
        return LifelongStats(), False
    return rebuild(session, base_model_id), True


def undone_batch(session, target_operation_id: int | None) -> BatchMoments | None:
    """The moments an undo of `target_operation_id` subtracts (None: it recorded none)."""
    if target_operation_id is None:
        return None
    rows = repo.operation_lifelong(session, target_operation_id, repo.BATCH)
    return BatchMoments(from_stored(rows)) if rows else None


def differences(a: LifelongStats, b: LifelongStats) -> list[str]:
    """Per layer, how `a` differs from `b` beyond float64 rounding (empty: they agree)."""
    out = []
    a_, b_ = ({l: m for l, m in x.layers.items() if m.n} for x in (a, b))  # an emptied layer = none
    for l in sorted(set(a_) | set(b_)):
        ma, mb = a_.get(l), b_.get(l)
        if ma is None or mb is None or ma.n != mb.n:
            out.append(f"layer {l}: {ma.n if ma else 0} rows stored, {mb.n if mb else 0} in the rebuild")
            continue
        for name in ("mean", "m2"):
            x, y = getattr(ma, name), getattr(mb, name)
            scale = max(float(y.abs().max()), 1.0)
            if float((x - y).abs().max()) > TOLERANCE * scale:
                out.append(f"layer {l}: stored {name} differs from the rebuild by {float((x - y).abs().max()):.3g}")
    return out
