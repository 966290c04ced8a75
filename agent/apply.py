"""`apply`: plan the pending facts, edit them batch by batch, record each batch as one operation,
then (with audit="due") run the periodic audit the workspace's `audit_every` asks for.

The plan is made twice: once before loading any model (to fail fast) and again under the
workspace lock (the final pending set).
"""
from __future__ import annotations

from dataclasses import replace

from knowledger.agent import hypernets
from knowledger.agent.errors import KnowledgerError, NothingToDo
from knowledger.agent.records import ApplyResult
from knowledger.agent.scheduler import MALMEN, EditSettings, History, PendingFact, plan
from knowledger.agent.session import session
from knowledger.agent.workspace import Workspace
from knowledger.editors.progress import Progress, report
from knowledger.ledger import repository as repo
from knowledger.ledger.models import RequestStatus


def plan_pending(ws: Workspace, *, batch_size: int | None = None, editor: str = "auto",
                 corpus=None, stats_tokens: int | None = None, overrides: dict | None = None,
                 preset: str | None = None):
    """(plan, settings with the given values in, their changes, {id: PendingFact})."""
    with ws.reading() as s:
        settings = EditSettings.load(s)
        pending = [PendingFact(r.id, r.prompt, r.subject, r.target_new) for r in repo.pending_requests(s)]
        history = workspace_history(s)
    settings, changes = settings.updated(corpus=corpus, stats_tokens=stats_tokens,
                                         overrides=overrides, preset=preset)
    if not pending:
        raise NothingToDo("nothing pending to apply: submit facts first (knowledger submit)")
    p = plan(pending, batch_size=batch_size or settings.batch_size, editor=editor,
             memit_min_batch=settings.auto_memit_min_batch, history=history, settings=settings)
    if not settings.malmen_hypernet and any(b.editor == MALMEN for b in p.batches):
        raise KnowledgerError(hypernets.NONE_REGISTERED)
    return p, settings, changes, {f.id: f for f in pending}


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
        with ws.writing() as s:
            settings.save(s)
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
            es.commit([rec])
            ops.append(rec.summary())
            done += len(b.fact_ids)
            report(progress, "apply", done, n_facts)
        result = ApplyResult(dry_run=False, plan=p.as_dict(facts), settings_changes=changes,
                             operations=ops, notes=es.notes, weights_sha256=es.live.state_hash,
                             head_seq=es.head_seq)
    if audit == "due" and any(op.status == "committed" for op in ops):
        from knowledger.agent.audit import audit_if_due

        try:
            due = audit_if_due(ws, progress=progress, device=device)
        except (KnowledgerError, ValueError, RuntimeError) as e:
            return replace(result, notes=result.notes + [f"the periodic audit failed: {e}"])
        if due is not None:
            result = replace(result, audit=due)
    return result
