"""Undo and redo: the one copy, heal-aware.

Undo removes one operation from the active set by recording an `undo` operation that targets it;
undoing one fact of a batch also re-applies the rest of that batch as a new apply operation (the
editor and hparams recorded with the batch, recomputed on the current weights). With `rebase`,
every later active operation is undone too and its facts recomputed in order on top of the
reverted state. Redo of an operation (or of a fact that was alone in its batch) reuses the
recorded deltas verbatim; redo of one fact of a larger batch recomputes it alone.

Heal operations (agent.heal) re-apply drifted facts without owning them: the operation that
applied a fact (its *original*) keeps holding it. So:
- `undo --op HEAL` removes the heal's delta only; its facts stay applied, held by their originals.
- undoing an original X (`undo --op X`, or `undo FACT` of one of its facts — the target is the
  fact's latest active *non-heal* holder) first undoes every active heal that holds one of X's
  facts, without reverting anything: those deltas were computed on top of X's. With `--rebase`,
  later heals are just undone and the later originals' facts re-applied.
- `redo` of a heal is refused (`knowledger audit --heal` heals what has drifted now); `redo FACT`
  of a fact whose latest holder was a heal is redone from its original operation.
Without active heals all of this is plain undo/redo.

Undoing one fact of a `consolidate` operation undoes the consolidation and re-consolidates its
other facts (a new `consolidate` operation of the same lineage, solved on the base weights from
the targets the consolidation stored; agent.consolidate.reconsolidate_without): the result is
the consolidation of the remaining facts, exactly. Later operations stay on top as they are
(with `--rebase` their facts are recomputed on top, as for any undo).
"""
from __future__ import annotations

from knowledger.agent.errors import KnowledgerError, NothingToDo
from knowledger.agent.records import OperationsResult
from knowledger.agent.session import session
from knowledger.agent.workspace import Workspace
from knowledger.editors.progress import Progress
from knowledger.ledger import repository as repo
from knowledger.ledger.models import (OperationKind, OperationStatus, Request, RequestOutcome,
                                      RequestStatus)

HEAL = OperationKind.heal


def one_target(fact_id: int | None, seq: int | None) -> None:
    if (fact_id is None) == (seq is None):
        raise ValueError("give either a fact id or --op SEQ")


def check_delta_op(op, base_model_id: int, verb: str) -> None:
    """Refuse an operation that carries no delta, changed nothing, or is of another base model."""
    if op.kind not in repo.DELTA_KINDS:
        raise KnowledgerError(f"operation seq {op.seq} is an {op.kind.value} operation: only apply, "
                              f"redo, replay, heal and consolidate operations can be {verb}ne")
    if op.status != OperationStatus.committed:
        raise KnowledgerError(f"operation seq {op.seq} {op.status.value}: it changed no weights")
    if op.base_model_id != base_model_id:
        raise KnowledgerError(f"operation seq {op.seq} belongs to an earlier base model of this workspace")


def applied_facts(s, operation_id: int) -> list[Request]:
    """The facts an operation applied that are still applied, in batch order."""
    return [req for link, req in repo.operation_facts(s, operation_id)
            if link.outcome == RequestOutcome.applied and req.status == RequestStatus.applied]


def holders(s, base_model_id: int, fact_id: int) -> list:
    """Every committed delta operation of this base that applied the fact, oldest first."""
    return [op for op, link in repo.request_operations(s, fact_id)
            if link.outcome == RequestOutcome.applied and op.kind in repo.DELTA_KINDS
            and op.status == OperationStatus.committed and op.base_model_id == base_model_id]


def _undoable_fact(s, fact_id: int) -> Request:
    req = repo.get_request(s, fact_id)
    if req.status == RequestStatus.reverted:
        raise NothingToDo(f"fact #{fact_id} is already reverted")
    if req.status != RequestStatus.applied:
        raise NothingToDo(f"fact #{fact_id} is {req.status.value}, not applied: nothing to undo")
    return req


def _undoable_op(s, base_model_id: int, seq: int):
    op = repo.get_operation_by_seq(s, seq)
    check_delta_op(op, base_model_id, "undo")
    if repo.is_undone(s, op):
        raise NothingToDo(f"operation seq {seq} is already undone")
    return op


def undo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, rebase: bool = False,
         wait: bool = False, progress: Progress | None = None) -> OperationsResult:
    """Undo a fact (its batch is reverted, the rest re-applied) or an operation; see the docstring."""
    one_target(fact_id, seq)
    with session(ws, what="undo", wait=wait, progress=progress) as es:
        base_id = es.live.base_model_id
        with ws.reading() as s:
            active = repo.active_operations(s, base_id)
            heals = [op for op in active if op.kind == HEAL]
            fact, applied, later, drop = None, [], [], []
            if fact_id is not None:
                fact = _undoable_fact(s, fact_id)
                originals = {op.id for op in active if op.kind != HEAL}
                held = [op for op in holders(s, base_id, fact_id) if op.id in originals]
                if not held:
                    if any(op.id in {h.id for h in heals} for op in holders(s, base_id, fact_id)):
                        raise KnowledgerError(f"fact #{fact_id} is held only by heal operations: undo "
                                              f"them with knowledger undo --op SEQ")
                    raise KnowledgerError(f"fact #{fact_id} is applied but no active operation holds it "
                                          f"(run knowledger replay)")
                target = held[-1]
            else:
                target = _undoable_op(s, base_id, seq)
            if target.kind != HEAL:
                applied = applied_facts(s, target.id)
                later = [(op, applied_facts(s, op.id)) for op in active
                         if op.seq > target.seq and op.kind != HEAL] if rebase else []
                facts = {r.id for r in applied} | {r.id for _, rs in later for r in rs}
                drop = [h for h in heals if (rebase and h.seq > target.seq)
                        or facts & {r.id for r in applied_facts(s, h.id)}]
        reapply = None
        if fact is not None and target.kind == OperationKind.consolidate:  # the rest: re-consolidated
            from knowledger.agent.consolidate import reconsolidate_without
            reapply = reconsolidate_without(es, target, fact, applied)
        records = [es.undo_record(h.id, h.seq, []) for h in reversed(drop)]
        if target.kind == HEAL:
            records.append(es.undo_record(target.id, target.seq, []))
        else:
            records += es.undo_records(target, fact, applied, later, reapply)
        es.commit(records)
        return es.result(records)


def redo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, wait: bool = False,
         progress: Progress | None = None) -> OperationsResult:
    """Re-apply an undone operation or a reverted fact (see the module docstring)."""
    one_target(fact_id, seq)
    with session(ws, what="redo", wait=wait, progress=progress) as es:
        base_id = es.live.base_model_id
        with ws.reading() as s:
            if seq is not None:
                op = repo.get_operation_by_seq(s, seq)
                if op.kind == HEAL:
                    raise KnowledgerError(f"operation seq {seq} is a heal: heals are not redone; "
                                          f"`knowledger audit --heal` heals what has drifted now")
                check_delta_op(op, base_id, "redo")
                if not repo.is_undone(s, op):
                    raise NothingToDo(f"operation seq {seq} is not undone: nothing to redo")
                rows = [req for link, req in repo.operation_facts(s, op.id)
                        if link.outcome == RequestOutcome.applied]
                for req in rows:
                    if req.status != RequestStatus.reverted:
                        raise KnowledgerError(f"fact #{req.id} of operation seq {seq} is {req.status.value} "
                                              f"now; redo its reverted facts one by one (knowledger redo ID)")
                reuse = True
            else:
                req = repo.get_request(s, fact_id)
                if req.status != RequestStatus.reverted:
                    raise NothingToDo(f"fact #{fact_id} is {req.status.value}, not reverted: nothing to redo")
                held = holders(s, base_id, fact_id)
                originals = [o for o in held if o.kind != HEAL]
                op = originals[-1] if held and held[-1].kind == HEAL and originals else \
                    (held[-1] if held else None)
                if op is None:
                    raise KnowledgerError(f"fact #{fact_id} was applied on an earlier base model: "
                                          f"submit it again")
                rows = [req]
                others = [r for link, r in repo.operation_facts(s, op.id)
                          if link.outcome == RequestOutcome.applied and r.id != fact_id]
                reuse = not others
            if reuse:
                factors = [repo.load_delta(d) for d in repo.operation_deltas(s, op.id)]
                vectors = [repo.load_vectors(v) for v in repo.operation_vectors(s, op.id)]
                targets = [repo.load_target(t) for t in repo.operation_targets(s, op.id)]
        if reuse:
            rec = es.reuse_record(op, rows, factors, vectors, targets)
        else:
            rec = es.edit_batch(rows, op.editor, es.batch_hparams(op.editor, op), kind=OperationKind.redo,
                                target=(op.id, op.seq), why="redone (recomputed alone)")
        es.commit([rec])
        return es.result([rec])
