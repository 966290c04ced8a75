"""`apply`: plan the pending facts, edit them batch by batch, record each batch as one operation,
then (with audit="due") run the periodic audit the workspace's `audit_every` asks for.

The plan is made twice: once before loading any model (to fail fast) and again under the
workspace lock (the final pending set).

A resumed apply continues the plan it had (issue 15). The plan is recorded in the ledger (setting
`apply_plan`: per batch its index, editor, reason, fact ids and whether it is done) in the same
transaction that stores the apply's settings; each batch is marked done in the transaction that
commits its operation, and the last one clears the record. An apply that finds an unfinished
record (the previous one was killed, or stopped on an error) first continues its batches that are
not done, with their recorded editors, on their facts that are still pending, and says so in a
note; the pending facts the record does not name are planned after them as usual. Without this a
killed apply was re-planned from the weights it left (its norm growth, its active edits), which
may switch editors, so the same facts ended differently than without the kill.
"""
from __future__ import annotations

from dataclasses import replace

from knowledger.agent import hypernets
from knowledger.agent.errors import KnowledgerError, NothingToDo
from knowledger.agent.records import ApplyResult
from knowledger.agent.scheduler import (MALMEN, EditSettings, History, PendingFact, Plan, PlannedBatch,
                                        plan)
from knowledger.agent.session import session
from knowledger.agent.workspace import Workspace
from knowledger.editors.progress import Progress, report
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind, RequestStatus


def plan_pending(ws: Workspace, *, batch_size: int | None = None, editor: str = "auto",
                 corpus=None, stats_tokens: int | None = None, overrides: dict | None = None,
                 preset: str | None = None):
    """(plan, settings with the given values in, their changes, {id: PendingFact})."""
    with ws.reading() as s:
        settings = EditSettings.load(s)
        pending = [PendingFact(r.id, r.prompt, r.subject, r.target_new) for r in repo.pending_requests(s)]
        history = workspace_history(s)
        resumed = unfinished_batches(s, {f.id for f in pending})
    settings, changes = settings.updated(corpus=corpus, stats_tokens=stats_tokens,
                                         overrides=overrides, preset=preset)
    if not pending:
        raise NothingToDo("nothing pending to apply: submit facts first (knowledger submit)")
    held = {i for b in resumed for i in b.fact_ids}
    rest = [f for f in pending if f.id not in held]
    history = replace(history, active_edits=history.active_edits + len(held))
    p = plan(rest, batch_size=batch_size or settings.batch_size, editor=editor,
             memit_min_batch=settings.auto_memit_min_batch, history=history,
             settings=settings) if rest else Plan([], [])
    p = Plan([replace(b, index=i + 1) for i, b in enumerate(resumed + p.batches)], p.superseded)
    if not settings.malmen_hypernet and any(b.editor == MALMEN for b in p.batches):
        raise KnowledgerError(hypernets.NONE_REGISTERED)
    return p, settings, changes, {f.id: f for f in pending}


PLAN_KEY = "apply_plan"  # the plan of the apply in progress (see the module docstring)
RESUMED = "resumed from the plan of a stopped apply"


def unfinished_batches(s, pending: set[int]) -> list[PlannedBatch]:
    """The recorded plan's batches not done, on their facts still pending (editor and reason kept)."""
    out = []
    for b in (repo.get_setting(s, PLAN_KEY) or {}).get("batches", []):
        ids = tuple(i for i in b["fact_ids"] if i in pending)
        if not b["done"] and ids:
            reason = b["reason"] if b["reason"].startswith(RESUMED) else f"{RESUMED}: {b['reason']}"
            out.append(PlannedBatch(index=len(out) + 1, editor=b["editor"], fact_ids=ids, reason=reason))
    return out


def record_plan(s, p: Plan) -> None:
    repo.set_setting(s, PLAN_KEY, dict(batches=[dict(index=b.index, editor=b.editor, reason=b.reason,
                                                     fact_ids=list(b.fact_ids), done=False)
                                                for b in p.batches]))


def mark_done(s, index: int) -> None:
    """Batch `index` of the recorded plan is done; the record is cleared with the last one."""
    recorded = repo.get_setting(s, PLAN_KEY) or {}
    batches = [dict(b, done=b["done"] or b["index"] == index) for b in recorded.get("batches", [])]
    repo.set_setting(s, PLAN_KEY, None if all(b["done"] for b in batches) else dict(batches=batches))


def consolidation_due(ws: Workspace) -> int:
    """Facts applied since the last consolidation when `consolidate_every` says one is due, else 0."""
    with ws.reading() as s:
        every = EditSettings.load(s).consolidate_every
        base = repo.current_base_model(s)
        if not every or base is None:
            return 0
        n = len({req.id for op, _, req in repo.active_fact_links(s, base.id)
                 if op.kind != OperationKind.consolidate})
    return n if n >= every else 0


def workspace_history(s) -> History:
    """What the scheduler's `auto` policy reads: applied facts, and the norm growth the latest
    weight-changing operation recorded (agent.scheduler.History)."""
    base = repo.current_base_model(s)
    if base is None:
        return History()
    applied = repo.count_requests_by_status(s).get(RequestStatus.applied.value, 0)
    head = repo.head_operation(s, base.id)
    growth = ((head.metrics_json or {}).get("norm_growth") if head is not None else None) or 0.0
    return History(active_edits=int(applied), norm_growth=float(growth))


def apply_pending(ws: Workspace, *, batch_size: int | None = None, editor: str = "auto",
                  dry_run: bool = False, corpus=None, stats_tokens: int | None = None,
                  overrides: dict | None = None, preset: str | None = None, wait: bool = False,
                  progress: Progress | None = None, audit: str = "due",
                  device: str | None = None) -> ApplyResult:
    """Apply every pending fact; with dry_run only return the plan.

    corpus / stats_tokens / overrides / preset are stored in the workspace settings (and used by
    every later command) once the apply has checked them against the model: the whole override
    set goes through EditHParams before anything is saved, so a refused value is never kept.
    audit: "due" runs the periodic audit when `audit_every` says so (its outcome never changes
    the apply's; an error in it becomes a note), "never" skips it. device: for the audit.
    """
    if audit not in ("due", "never"):
        raise ValueError(f"audit must be 'due' or 'never', not {audit!r}")
    kw = dict(batch_size=batch_size, editor=editor, corpus=corpus, stats_tokens=stats_tokens,
              overrides=overrides, preset=preset)
    p, _, changes, facts = plan_pending(ws, **kw)  # fails fast, before loading any model
    if dry_run:
        return ApplyResult(dry_run=True, plan=p.as_dict(facts), settings_changes=changes,
                           operations=[], notes=[])
    with session(ws, what="apply", wait=wait, progress=progress) as es:
        p, settings, changes, facts = plan_pending(ws, **kw)  # under the lock: the final pending set
        es.settings = settings
        hp = es.hparams()  # checks the overrides even when every batch is MALMEN
        hps = {name: es.batch_hparams(name) if name == MALMEN else hp for name in {b.editor for b in p.batches}}
        es.editor(p.batches[0].editor, hps[p.batches[0].editor])  # checks layers, computes statistics
        if MALMEN in hps:  # the hyper-network's files and shape, before any batch is written
            es.editor(MALMEN, hps[MALMEN])
        n_resumed = sum(b.reason.startswith(RESUMED) for b in p.batches)
        if n_resumed:
            es.notes.append(f"continuing the plan of a stopped apply first: {n_resumed} batch(es) with "
                            f"their recorded editors, then the other pending facts")
        with ws.writing() as s:
            settings.save(s)
            record_plan(s, p)
            for old, new in p.superseded:
                repo.set_request_status(s, repo.get_request(s, old), RequestStatus.superseded,
                                        reason=f"superseded by #{new} (same subject and prompt)",
                                        superseded_by_id=new)
        ops = []
        n_facts, done = sum(len(b.fact_ids) for b in p.batches), 0
        report(progress, "apply", 0, n_facts)
        for b in p.batches:
            with ws.reading() as s:
                rows = repo.requests_by_ids(s, b.fact_ids)
            rec = es.edit_batch(rows, b.editor, hps[b.editor])
            es.commit([rec], also=lambda s, i=b.index: mark_done(s, i))
            ops.append(rec.summary())
            done += len(b.fact_ids)
            report(progress, "apply", done, n_facts)
        result = ApplyResult(dry_run=False, plan=p.as_dict(facts), settings_changes=changes,
                             operations=ops, notes=es.notes, weights_sha256=es.live.state_hash,
                             head_seq=es.head_seq)
    if any(op.status == "committed" for op in ops) and consolidation_due(ws):
        from knowledger.agent.consolidate import consolidate_workspace

        try:
            done = consolidate_workspace(ws, wait=wait, progress=progress)
            result = replace(result, consolidation=done, weights_sha256=done.weights_sha256,
                             head_seq=done.head_seq,
                             notes=result.notes + [f"consolidate_every: consolidated as operation seq "
                                                   f"{done.operations[0].seq}"])
        except KnowledgerError as e:
            result = replace(result, notes=result.notes + [f"the scheduled consolidation was refused: {e}"])
    if audit == "due" and any(op.status == "committed" for op in ops):
        from knowledger.agent.audit import audit_if_due

        try:
            due = audit_if_due(ws, progress=progress, device=device)
        except (KnowledgerError, ValueError, RuntimeError) as e:
            return replace(result, notes=result.notes + [f"the periodic audit failed: {e}"])
        if due is not None:
            result = replace(result, audit=due)
    return result
