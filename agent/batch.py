"""Building one operation's record in memory: an edited batch, a redo with recorded deltas, an undo.

Success criterion of an edit (checked on the batch's own facts after applying it): target_new is
the greedy continuation of the rewrite prompt, every token top-1 under teacher forcing
(editors.evaluate `rewrite_acc` == 1, i.e. CounterFact's efficacy_acc). A batch is evaluated
before and after. Facts that fail are marked `failed` and left out: the batch is recomputed once
without them. If that retry still has failures, nothing is applied: the operation is recorded as
failed, the failing facts as failed, and the facts that did succeed go back to `pending` (the next
apply tries them again). A batch in which every fact fails is a failed operation.

Every function here takes the command's `EditSession` (agent.session), leaves its live model at
the result and keeps its past-edit memory in step; `EditSession.commit` writes the records.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from knowledger.agent import anchors, recipes
from knowledger.agent import lifelong as alife
from knowledger.agent.jsonutil import json_safe
from knowledger.agent.live import ActiveDelta, delta_from_factors, factors_from_delta, stored_delta
from knowledger.agent.records import FactOutcome, OpRecord, clean_outcome, edit_requests
from knowledger.editors.editor import LIFELONG
from knowledger.editors.methods import lifelong_stats_names
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.ledger import repository as repo
from knowledger.ledger.models import (OperationKind, OperationStatus, Request, RequestOutcome,
                                      RequestStatus, utcnow)

if TYPE_CHECKING:
    from knowledger.agent.session import EditSession

CRITERION = "rewrite_acc"  # target_new top-1 (every token) on the rewrite prompt
CRITERION_TEXT = "target_new is not the top-1 continuation of the rewrite prompt after the edit"


def _norm_growth(es: EditSession) -> float:
    return max(es.live.norm_growth().values(), default=0.0)


def edit_batch(es: EditSession, rows: list[Request], method: str, hp, *,
               kind: OperationKind = OperationKind.apply, target: tuple[int, int] | None = None,
               why: str = "applied") -> OpRecord:
    """Compute one batch on the live weights, check it, retry once without failures.

    `hp`: what recipes.batch_hparams gives for `method` (EditHParams, or a HypernetRef for MALMEN);
    with NAS on and no anchor given, the workspace's anchor is filled in (agent.anchors).
    Leaves the live model at the result (or unchanged for a failed operation).
    """
    t0 = time.perf_counter()
    hp = anchors.resolve(es, method, hp)
    live, reqs = es.live, edit_requests(rows)
    start, h_before = list(live.active), live.state_hash
    before = fact_metrics(live.model, live.tokenizer, reqs)
    editor = es.editor(method, hp)
    normalised = method in lifelong_stats_names()  # UltraEdit: the lineage's statistics (agent.lifelong)
    if normalised:
        editor.state = es.lifelong()
    eval_s = time.perf_counter() - t0
    failed: dict[int, tuple[str, dict]] = {}
    todo, attempts, result, after = list(reqs), 0, None, []
    while todo:
        attempts += 1
        result = editor.compute(todo, memory=es.memory() if method in LIFELONG else None)
        deltas = [stored_delta(d) for d in result.deltas]
        live.set_active(start + [ActiveDelta(es.next_seq, -1, d) for d in deltas])
        t = time.perf_counter()
        after = fact_metrics(live.model, live.tokenizer, todo)
        eval_s += time.perf_counter() - t
        bad = [(r, m) for r, m in zip(todo, after) if m.get(CRITERION, 0.0) < 1.0]
        for r, m in bad:
            failed[r.id] = (f"{CRITERION_TEXT} (P(target_new) {m.get('rewrite_p_new', 0):.3f}, "
                            f"attempt {attempts})", m)
        for i, why in (result.diagnostics.get("refused") or {}).items():  # NAS: editors.nas
            failed[todo[i].id] = (why, after[i])
            bad += [] if any(r.id == todo[i].id for r, _ in bad) else [(todo[i], after[i])]
        if not bad:
            break
        live.set_active(start)
        if attempts == 2 or len(bad) == len(todo):
            result = None
            break
        todo = [r for r in todo if r.id not in failed]
    m_before = dict(zip((r.id for r in reqs), before))
    m_after = dict(zip((r.id for r in todo), after)) if result is not None else {}
    recipe = recipes.recipe_of(method, hp, editor)
    rec = OpRecord(seq=es.take_seq(), kind=kind, base_model_id=live.base_model_id,
                   editor=method, before=h_before, started_at=utcnow(),
                   target_operation_id=target[0] if target else None,
                   distribution=recipe.distribution, hparams=recipe.hparams,
                   artifact_id=recipe.artifact_id)
    for r in reqs:
        if r.id in failed:
            reason, m = failed[r.id]
            fo = FactOutcome(r.id, RequestOutcome.failed, RequestStatus.failed, reason,
                             dict(before=m_before[r.id], after=m))
        elif result is not None:
            i = [x.id for x in todo].index(r.id)
            stats = result.value_stats[i] if i < len(result.value_stats) else None
            fo = FactOutcome(r.id, RequestOutcome.applied, RequestStatus.applied,
                             f"{why} (operation seq {rec.seq})",
                             dict(before=m_before[r.id], after=m_after[r.id], v_star=stats))
        else:
            fo = FactOutcome(r.id, RequestOutcome.skipped, RequestStatus.pending,
                             f"batch not applied (operation seq {rec.seq} failed): pending again",
                             dict(before=m_before[r.id]))
        rec.facts.append(clean_outcome(fo))
    if result is None:
        rec.status, rec.error = OperationStatus.failed, (
            "every fact of the batch failed" if not todo or len(failed) == len(reqs)
            else "the retry without the failed facts still had failures; nothing applied")
    else:
        rec.after = live.state_hash
        rec.deltas = [factors_from_delta(d) for d in result.deltas]
        if normalised:  # the moments of the batch as finally applied (the retry's, if it retried)
            rec.lifelong_batch = alife.to_stored(editor.last_step.batch.layers)
        for layer, K in result.keys.items():  # (d_in, n), (d_out, n): one column per fact
            V = result.values[layer]
            for j, r in enumerate(todo):
                rec.vectors.append(repo.FactVectors(r.id, layer, K[:, j].float().numpy(),
                                                    V[:, j].float().numpy()))
        if getattr(result, "targets", None) is not None:  # (n, d): z at layer L, what consolidation re-solves from
            rec.targets = [repo.TargetVector(r.id, result.target_layer, result.target_site,
                                             result.targets[j].float().cpu().numpy()) for j, r in enumerate(todo)]
    es.track(rec)
    timings = dict(result.timings) if result is not None else {}
    timings.update(eval_s=eval_s, attempts=attempts, total_s=time.perf_counter() - t0)
    rec.timings = json_safe(timings)
    rec.metrics = json_safe(dict(
        criterion=CRITERION, target_seq=target[1] if target else None,
        before=aggregate(before), after=aggregate(after) if result is not None else None,
        failed=sorted(failed), norm_growth=_norm_growth(es),
        stats=recipes.stats_record(method, hp, es.settings.stats_corpus),
        diagnostics={k: v for k, v in (result.diagnostics if result else {}).items()}))
    return rec


def reuse_record(es: EditSession, op, rows: list[Request], factors: list[repo.DeltaFactors],
                 vectors: list[repo.FactVectors], targets: list[repo.TargetVector] = ()) -> OpRecord:
    """Redo with an undone operation's recorded deltas, verbatim (metrics recorded, not checked)."""
    t0, live = time.perf_counter(), es.live
    before = live.state_hash
    with es.ws.reading() as s:  # UltraEdit: the redone batch's moments come back with its deltas
        moments = repo.operation_lifelong(s, op.id, repo.BATCH)
    seq = es.take_seq()
    live.set_active(live.active + [ActiveDelta(seq, -1, delta_from_factors(f)) for f in factors])
    after = fact_metrics(live.model, live.tokenizer, edit_requests(rows))
    ids = {r.id for r in rows}
    rec = OpRecord(
        seq=seq, kind=OperationKind.redo, base_model_id=live.base_model_id,
        target_operation_id=op.id, editor=op.editor, distribution=op.distribution,
        hparams=op.hparams_json, artifact_id=op.artifact_id, deltas=factors, before=before,
        after=live.state_hash, lifelong_batch=moments,
        vectors=[v for v in vectors if v.request_id in ids],
        targets=[t for t in targets if t.request_id in ids],
        facts=[clean_outcome(FactOutcome(r.id, RequestOutcome.applied, RequestStatus.applied,
                                         f"redone with the deltas of operation seq {op.seq}",
                                         dict(after=m))) for r, m in zip(rows, after)],
        timings=dict(total_s=time.perf_counter() - t0),
        metrics=json_safe(dict(criterion=CRITERION, target_seq=op.seq, reused_deltas=True,
                               after=aggregate(after), norm_growth=_norm_growth(es))))
    es.track(rec)
    return rec


def undo_record(es: EditSession, target_id: int, target_seq: int, reverted: list[int]) -> OpRecord:
    """Remove an operation's deltas from the live weights; its facts become reverted."""
    before = es.live.state_hash
    after = es.live.set_active([a for a in es.live.active if a.operation_id != target_id])
    facts = [FactOutcome(rid, RequestOutcome.reverted, RequestStatus.reverted,
                         f"undone (operation seq {target_seq})") for rid in reverted]
    rec = OpRecord(seq=es.take_seq(), kind=OperationKind.undo, base_model_id=es.live.base_model_id,
                   target_operation_id=target_id, facts=facts, before=before, after=after,
                   metrics=dict(target_seq=target_seq, norm_growth=_norm_growth(es)))
    es.track(rec)
    return rec


def undo_records(es: EditSession, target, fact: Request | None, applied: list[Request],
                 later: list[tuple], reapply=None) -> list[OpRecord]:
    """Undo `target` (its `applied` facts become reverted) and, with `later` = [(operation,
    its applied facts)] for a rebase, every later operation first; then re-apply the rest of
    the batch of an undone `fact` (`reapply(rest)` when given: a consolidation's rest is
    re-consolidated, agent.consolidate; else recomputed with the batch's editor), and the later
    operations' facts in order."""
    records = [undo_record(es, op.id, op.seq, [r.id for r in rs]) for op, rs in reversed(later)]
    records.append(undo_record(es, target.id, target.seq, [r.id for r in applied]))
    rest = [r for r in applied if fact is not None and r.id != fact.id]
    if rest:
        records.append(reapply(rest) if reapply is not None else
                       edit_batch(es, rest, target.editor, es.batch_hparams(target.editor, target),
                                  why=f"re-applied after undoing fact #{fact.id}"))
    for op, rs in later:
        if rs:
            records.append(edit_batch(es, rs, op.editor, es.batch_hparams(op.editor, op),
                                      why=f"rebased after undoing seq {target.seq}"))
    return records
