"""Healing drifted facts, and undo / redo that know about heal operations.

A **heal** operation re-applies facts an audit found drifted (agent.audit) on the live weights:
`EditSession.edit_batch(kind=heal)`, batches of the `batch_size` setting, the editor apply's
`auto` would pick now (agent.scheduler.choose_editor), the workspace's hyperparameters (MALMEN:
its current hyper-network), checked with the apply criterion and committed like an apply. It is
a delta-carrying operation (ledger.repository.DELTA_KINDS): active until undone, replayed like any
other. It does not own its facts: the operation that applied a fact (its *original*) stays active
and keeps holding it, the fact stays `applied` (a "healed" event in its history), and a fact whose
heal fails stays `applied` and drifted (never `failed` or `pending`).

Undo with heal operations active (`undo`, which the CLI calls; without any active heal operation
it is exactly agent.operations.undo):
- `undo --op HEAL` removes the heal's delta only; its facts stay applied, held by their originals
  (the next audit will likely find them drifted again).
- undoing an original operation X (`undo --op X`, or `undo FACT` of one of its facts — the target
  is the fact's latest active *non-heal* holder) also undoes every active heal operation that holds
  one of X's facts, first, without reverting anything: those deltas were computed on top of X's. A
  heal that also restored facts of other operations loses that part; the next audit finds them.
  The rest is agent.operations.undo: X's facts become reverted, the rest of the batch of an undone
  fact is re-applied, `--rebase` undoes every later operation (later heals are just undone) and
  re-applies their facts.
- `redo` of a heal operation is refused (run `knowledger audit --heal`); redo of an original
  reuses its deltas, and the heals undone with it stay undone. `redo FACT` of a fact whose latest
  holder was a heal is redone from its original operation, as agent.operations.redo would from
  the original (deltas reused when the fact was alone in it, else recomputed alone).
"""
from __future__ import annotations

from dataclasses import replace

from knowledger.agent import operations as ops
from knowledger.agent.scheduler import MALMEN, choose_editor
from knowledger.agent.workspace import Workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import KnowledgerError
from knowledger.ledger.models import OperationKind, OperationStatus, RequestOutcome

HEAL = OperationKind.heal


def heal(es: ops.EditSession, report: dict) -> dict:
    """Undo the audit's orphan operations, re-apply its drifted facts as heal operations."""
    run_id = report["audit_run_id"]
    out = []
    for o in report["orphans"]:
        rec = es.undo_record(o["id"], o["seq"], [])
        rec.metrics["reason"] = f"orphan operation removed by audit #{run_id}"
        es.commit([rec])
        out.append(rec.summary())
    healed, failed = [], []
    ids = report["drifted_ids"]  # in the order of their original operations
    if ids:
        with es.ws.reading() as s:
            rows = repo.requests_by_ids(s, ids)
        hp = es.hparams()
        size = max(1, es.settings.batch_size)
        held = {f["id"]: f["held_by"] for f in report["drifted_facts"]}
        for i in range(0, len(rows), size):
            batch = rows[i:i + size]
            with es.ws.reading() as s:  # the editor apply's `auto` would pick now
                history = ops.workspace_history(s)
            method, _ = choose_editor(len(batch), "auto", es.settings.auto_memit_min_batch, history,
                                      es.settings)
            rec = es.edit_batch(batch, method, es.batch_hparams(method) if method == MALMEN else hp, kind=HEAL,
                                why=f"healed after drifting (audit #{run_id})")
            # A heal never changes what a fact is: its original edit is still active.
            rec.facts = [f if f.outcome == RequestOutcome.applied else
                         replace(f, status=None, reason=f"heal failed; still applied by its original "
                                                        f"operation: {f.reason}") for f in rec.facts]
            rec.metrics.update(audit_run_id=run_id, held_by={str(r.id): held.get(r.id) for r in batch})
            es.commit([rec])
            out.append(rec.summary())
            ok = rec.status == OperationStatus.committed
            done = [f.request_id for f in rec.facts if ok and f.outcome == RequestOutcome.applied]
            healed += done
            failed += [f.request_id for f in rec.facts if f.request_id not in done]
    return dict(operations=out, healed=healed, failed=failed)


# --- undo and redo around heal operations -------------------------------------------------------
def _active_heals(ws: Workspace) -> bool:
    with ws.reading() as s:
        base = repo.current_base_model(s)
        return base is not None and any(op.kind == HEAL for op in repo.active_operations(s, base.id))


def _original_holder(s, base_id: int, fact_id: int, active: list):
    """The latest active non-heal operation that applied the fact."""
    ids = {op.id for op in active if op.kind != HEAL}
    held = [op for op, link in repo.request_operations(s, fact_id)
            if link.outcome == RequestOutcome.applied and op.id in ids]
    return held[-1] if held else None


def undo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, rebase: bool = False,
         wait: bool = False, progress: bool = False) -> dict:
    """agent.operations.undo, with heal operations handled as the module docstring says."""
    if not _active_heals(ws):
        return ops.undo(ws, fact_id=fact_id, seq=seq, rebase=rebase, wait=wait, progress=progress)
    ops._one_of(fact_id, seq)
    with ops.session(ws, what="undo", wait=wait, progress=progress) as es:
        base_id = es.live.base_model_id
        with ws.reading() as s:
            active = repo.active_operations(s, base_id)
            heals = [op for op in active if op.kind == HEAL]
            target, fact = (None, None)
            if seq is not None and repo.get_operation_by_seq(s, seq).kind == HEAL:
                target, _ = ops._undo_target(s, base_id, None, seq)  # checks it can be undone
                drop, applied, later = [], [], []
            else:
                if fact_id is not None:
                    ops._undo_target(s, base_id, fact_id, None)  # the same refusals as undo
                    fact = repo.get_request(s, fact_id)
                    target = _original_holder(s, base_id, fact_id, active)
                    if target is None:
                        raise KnowledgerError(f"fact #{fact_id} is held only by heal operations: undo "
                                              f"them with knowledger undo --op SEQ")
                else:
                    target, _ = ops._undo_target(s, base_id, None, seq)
                applied = ops._applied(s, target.id)
                later = [(op, ops._applied(s, op.id)) for op in active
                         if op.seq > target.seq and op.kind != HEAL] if rebase else []
                facts = {r.id for r in applied} | {r.id for _, rs in later for r in rs}
                drop = [h for h in heals if (rebase and h.seq > target.seq)
                        or facts & {r.id for r in ops._applied(s, h.id)}]
        records = [es.undo_record(h.id, h.seq, []) for h in reversed(drop)]
        if target.kind == HEAL:
            records.append(es.undo_record(target.id, target.seq, []))
        else:
            records += es.undo_records(target, fact, applied, later)
        es.commit(records)
        return dict(operations=[r.summary() for r in records], notes=es.notes,
                    weights_sha256=es.live.state_hash, head_seq=es.head_seq)


def _last_original(s, base_id: int, fact_id: int):
    """(the latest operation of this base that applied the fact, the same skipping heals)."""
    held = [op for op, link in repo.request_operations(s, fact_id)
            if link.outcome == RequestOutcome.applied and op.kind in repo.DELTA_KINDS
            and op.status == OperationStatus.committed and op.base_model_id == base_id]
    originals = [op for op in held if op.kind != HEAL]
    return (held[-1] if held else None), (originals[-1] if originals else None)


def redo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, wait: bool = False,
         progress: bool = False) -> dict:
    """agent.operations.redo, refusing heal operations; a reverted fact whose latest holder is a
    heal is redone from its original operation (its deltas reused when it was alone in it)."""
    with ws.reading() as s:
        if seq is not None and repo.get_operation_by_seq(s, seq).kind == HEAL:
            raise KnowledgerError(f"operation seq {seq} is a heal: heals are not redone; "
                                  f"`knowledger audit --heal` heals what has drifted now")
        base = repo.current_base_model(s)
        latest = original = None
        if fact_id is not None and seq is None and base is not None:
            latest, original = _last_original(s, base.id, fact_id)
    if latest is None or latest.kind != HEAL or original is None:
        return ops.redo(ws, fact_id=fact_id, seq=seq, wait=wait, progress=progress)
    with ops.session(ws, what="redo", wait=wait, progress=progress) as es:
        with ws.reading() as s:
            req = repo.get_request(s, fact_id)
            if req.status.value != "reverted":
                raise ops.NothingToDo(f"fact #{fact_id} is {req.status.value}, not reverted: nothing to redo")
            op = repo.get_operation_by_seq(s, original.seq)
            others = [r for link, r in repo.operation_facts(s, op.id)
                      if link.outcome == RequestOutcome.applied and r.id != fact_id]
            if not others:
                factors = [repo.load_delta(d) for d in repo.operation_deltas(s, op.id)]
                vectors = [repo.load_vectors(v) for v in repo.operation_vectors(s, op.id)]
        if not others:
            rec = es.reuse_record(op, [req], factors, vectors)
        else:
            rec = es.edit_batch([req], op.editor, es.batch_hparams(op.editor, op), kind=OperationKind.redo,
                                target=(op.id, op.seq), why="redone (recomputed alone)")
        es.commit([rec])
        return dict(operations=[rec.summary()], notes=es.notes, weights_sha256=es.live.state_hash,
                    head_seq=es.head_seq)
