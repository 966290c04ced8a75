"""Healing drifted facts: heal operations (what undo and redo do with them is agent.undo's).

A **heal** operation re-applies facts an audit found drifted (agent.audit) on the live weights:
`EditSession.edit_batch(kind=heal)`, batches of the `batch_size` setting, the editor apply's
`auto` would pick now (agent.scheduler.choose_editor), the workspace's hyperparameters (MALMEN:
its current hyper-network), checked with the apply criterion and committed like an apply. It is
a delta-carrying operation (ledger.repository.DELTA_KINDS): active until undone, replayed like any
other. It does not own its facts: the operation that applied a fact (its *original*) stays active
and keeps holding it, the fact stays `applied` (a "healed" event in its history), and a fact whose
heal fails stays `applied` and drifted (never `failed` or `pending`).

What undo and redo do with heal operations is agent.undo's business (one copy, heal-aware).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from knowledger.agent.apply import workspace_history
from knowledger.agent.records import OperationSummary
from knowledger.agent.scheduler import MALMEN, choose_editor
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind, OperationStatus, RequestOutcome

if TYPE_CHECKING:
    from knowledger.agent.session import EditSession

HEAL = OperationKind.heal


@dataclass(frozen=True)
class HealResult:
    """What `audit --heal` did: the operations (orphan undos, heals), facts healed and not."""

    operations: list[OperationSummary]
    healed: list[int]
    failed: list[int]
    rounds: int = 1
    still_drifted: list[int] | None = None

    def then(self, other: HealResult) -> HealResult:
        """This round followed by another: operations and healed add up, failed is the latest."""
        return HealResult(self.operations + other.operations, self.healed + other.healed,
                          other.failed, self.rounds + other.rounds)


def heal(es: EditSession, report: dict) -> HealResult:
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
                history = workspace_history(s)
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
    return HealResult(out, healed, failed)
