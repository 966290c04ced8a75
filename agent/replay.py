"""Replay: rebuild the weights from the base model and the ledger's deltas and check every recorded
hash (`replay`), or re-run the editors on the applied facts as a new lineage (`replay_recompute`).

MALMEN batches keep the hyper-network their operation recorded (agent.recipes). UltraEdit's
lifelong statistics: `replay` rebuilds them from the active operations' batch moments in seq order
and reports a mismatch when the stored state differs (agent.lifelong); `replay_recompute` starts
the new lineage from empty statistics and re-accumulates them batch by batch, in order.
"""
from __future__ import annotations

import json

from knowledger.agent import lifelong as alife
from knowledger.agent import memory as amem
from knowledger.agent.errors import NO_BASE_MODEL, IntegrityError, KnowledgerError
from knowledger.agent.live import (ActiveDelta, LiveModel, delta_from_factors, expected_state, load_base,
                                   lock_path, snapshot_path, state_hash)
from knowledger.agent.loaded import open_model
from knowledger.agent.lock import try_lock
from knowledger.agent.records import RecomputeResult, ReplayedFact, ReplayResult, ReplayStep
from knowledger.agent.session import session
from knowledger.agent.undo import applied_facts
from knowledger.agent.workspace import Workspace, normalise_model
from knowledger.editors.progress import Progress, track
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind


def replay(ws: Workspace, *, to_seq: int | None = None, progress: Progress | None = None) -> ReplayResult:
    """Rebuild the weights from the base model and the ledger's deltas, checking every recorded
    weights hash (before and after each operation) on the way; `mismatches` lists what differs.

    Without `to_seq`, and when everything matches, the snapshot is refreshed (if no other command
    holds the workspace lock). The live model is never changed by `to_seq`.
    """
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError(NO_BASE_MODEL)
        if to_seq is not None:
            repo.get_operation_by_seq(s, to_seq)  # NotFound for an unknown seq
        steps = []
        for op in repo.lineage(s, base.id, up_to_seq=to_seq):
            deltas, problem = [], None
            if op.kind in repo.DELTA_KINDS:
                try:
                    deltas = [ActiveDelta(op.seq, op.id, delta_from_factors(repo.load_delta(d)))
                              for d in repo.operation_deltas(s, op.id)]
                except IntegrityError as e:
                    problem = str(e)
            steps.append((op.seq, op.id, op.kind, op.target_operation_id, op.weights_sha256_before,
                          op.weights_sha256_after, deltas, problem))
        want, head_seq = expected_state(s, base)
        base_id, name, base_sha = base.id, base.name_or_path, base.weights_sha256
        lifelong_problems = [] if to_seq is not None else _check_lifelong(s, base_id)
    live = LiveModel(load_base(name, base_sha), base_id, base_sha)
    active, state = [], state_hash(base_sha, {})
    rows, mismatches = [], []
    for seq, op_id, kind, target, before, after, deltas, problem in track(steps, progress, "replay"):
        if problem:
            mismatches.append(f"operation seq {seq}: {problem}")
        if before is not None and before != state:
            mismatches.append(f"operation seq {seq} ({kind.value}): recorded weights before "
                              f"{before[:12]}…, replay has {state[:12]}…")
        if kind in repo.DELTA_KINDS:
            active += deltas
        elif kind == OperationKind.undo:
            active = [a for a in active if a.operation_id != target]
        state = live.hash_of(active)
        ok = after is None or after == state
        if not ok:
            mismatches.append(f"operation seq {seq} ({kind.value}): recorded weights {after[:12]}…, "
                              f"replay gives {state[:12]}…")
        rows.append(ReplayStep(seq=seq, kind=kind.value, recorded=after, computed=state,
                               ok=ok and not problem))
    mismatches += lifelong_problems
    refreshed = False
    if to_seq is None and not mismatches and state == want:
        lock = try_lock(lock_path(ws.location), "replay")
        if lock is not None:
            try:
                live.set_active(active)
                live.write_snapshot(snapshot_path(ws.location), head_seq)
                refreshed = True
                with ws.writing() as s:  # the past-edit memory, rebuilt from the surviving keys
                    amem.save(s, base_id, amem.rebuild(s, base_id), head_seq, force=True)
            finally:
                lock.release()
    return ReplayResult(base_model=name, to_seq=to_seq, operations=rows, mismatches=mismatches,
                        weights_sha256=state, head_seq=head_seq if to_seq is None else to_seq,
                        snapshot_refreshed=refreshed, memory_rebuilt=refreshed)


def _check_lifelong(s, base_id: int) -> list[str]:
    """UltraEdit's stored statistics against their rebuild from the surviving batches, in order."""
    try:
        stored = repo.latest_lifelong_state(s, base_id)
        rebuilt = alife.rebuild(s, base_id)
    except IntegrityError as e:
        return [str(e)]
    if stored is None:
        return [] if not rebuilt.layers else ["ultraedit statistics: none stored, but active operations "
                                              "recorded batch moments"]
    seq, rows = stored
    return [f"ultraedit statistics after operation seq {seq}, {d}"
            for d in alife.differences(alife.LifelongStats(alife.from_stored(rows)), rebuilt)]


def replay_recompute(ws: Workspace, *, model: str | None = None, wait: bool = False,
                     progress: Progress | None = None, device: str | None = None) -> RecomputeResult:
    """Re-run the editors on the applied facts, batch by batch in their original order, on a fresh
    copy of the base model (or on `model`), and record the result as a new lineage.

    The new lineage is a new base_models row (even for the same model: a replay starts from clean
    weights) with one `replay` operation per replayed batch, each targeting the operation it
    replays; the old operations stay in the ledger but are no longer active. Batches keep their
    editor; hyperparameters are the recorded ones on the same weights, else the new model's preset
    with the workspace overrides; MALMEN batches keep their hyper-network (a model of another
    shape refuses it with a clear error). Facts that fail on the new lineage become `failed`.
    """
    with session(ws, what="replay", wait=wait, load_live=False, progress=progress) as es:
        with ws.reading() as s:
            base = repo.current_base_model(s)
            if base is None:
                raise KnowledgerError(NO_BASE_MODEL)
            batches = [(op, applied_facts(s, op.id)) for op in repo.active_operations(s, base.id)
                       if op.kind != OperationKind.heal]  # a heal re-applies facts its origin holds
            old_name, old_sha = base.name_or_path, base.weights_sha256
        name = normalise_model(model) if model else old_name
        try:
            lm = open_model(name, device=device)
        except OSError as e:
            raise KnowledgerError(f"cannot load model {name}: {e}") from e
        same = lm.weights_sha256 == old_sha
        es.start_lineage(LiveModel(lm, None, lm.weights_sha256))
        new_base = dict(name_or_path=name, architecture=str(lm.model.config.model_type),
                        weights_sha256=lm.weights_sha256,
                        config=json.loads(lm.model.config.to_json_string(use_diff=False)))
        todo = [(op, facts) for op, facts in batches if facts]
        records = [es.edit_batch(facts, op.editor, es.batch_hparams(op.editor, op, same_weights=same),
                                 kind=OperationKind.replay, target=(op.id, op.seq), why=f"replayed on {name}")
                   for op, facts in track(todo, progress, "replay")]
        es.commit(records, new_base=new_base)
        facts = [ReplayedFact(id=f.request_id, outcome=f.outcome.value, seq=r.seq,
                              replays_seq=r.metrics.get("target_seq"),
                              p_new=((f.metrics or {}).get("after") or {}).get("rewrite_p_new"),
                              reason=f.reason)
                 for r in records for f in r.facts]
        return RecomputeResult(model=name, same_weights=same, base_model_id=es.live.base_model_id,
                               operations=[r.summary() for r in records], facts=facts, notes=es.notes,
                               weights_sha256=es.live.state_hash, head_seq=es.head_seq)
