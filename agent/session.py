"""A weight-changing command's session: the workspace lock, crash recovery, the live model, the
next operation seq, the past-edit memory, and the one write transaction that records it all.

`session(ws, what=...)` is the frame of apply, undo, redo, replay --recompute and audit --heal:
it holds the workspace lock (agent.lock), marks operations a killed process left `running` as
failed (`recover`), and opens the live model (agent.live: base + active deltas, snapshot checked
against the ledger head). Work is computed in memory with no database transaction open (a
`submit` meanwhile never waits), then written in ONE write transaction (`EditSession.commit`):
the operation rows, their factored deltas, key/value vectors and residual targets (blobs with
sha256), per-fact outcomes and metrics, NAS anchors measured on the way, hparams, timings and the
weights hash after each, the facts' status changes, the past-edit memory and UltraEdit's lifelong
statistics (agent.lifelong). Only then is the snapshot rewritten; a crash in between leaves a
stale snapshot, which the next command detects and rebuilds.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from knowledger.agent import batch
from knowledger.agent import lifelong as alife
from knowledger.agent import memory as amem
from knowledger.agent import recipes
from knowledger.agent.errors import KnowledgerError
from knowledger.agent.live import LiveModel, lock_path, open_live, remove_stale_temporaries, snapshot_path
from knowledger.agent.lock import WorkspaceLock, fault_point
from knowledger.agent.records import OpRecord
from knowledger.agent.scheduler import EditSettings
from knowledger.agent.workspace import Workspace
from knowledger.editors.hparams import EditHParams
from knowledger.editors.lifelong_norm import BatchMoments, LifelongStats
from knowledger.editors.memory import KeyMemory
from knowledger.editors.progress import Progress
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind, OperationStatus, Request, utcnow


@dataclass
class EditSession:
    ws: Workspace
    live: LiveModel | None
    head_seq: int
    next_seq: int
    settings: EditSettings
    notes: list[str]
    progress: Progress | None = None
    editors: recipes.Editors | None = None
    memory_state: KeyMemory | None = None  # the past-edit memory of the live weights (agent.memory)
    lifelong_state: LifelongStats | None = None  # UltraEdit's statistics of the lineage (agent.lifelong)
    anchors: list = field(default_factory=list)  # NAS anchors measured here (agent.anchors.Measured)

    def __post_init__(self):
        if self.editors is None:
            self.editors = recipes.Editors(self.ws, self.progress)

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def start_lineage(self, live: LiveModel) -> None:
        """Work on a fresh base model from here on (replay --recompute): no past edits."""
        self.live, self.memory_state, self.lifelong_state = live, KeyMemory(), LifelongStats()

    # --- the past-edit memory --------------------------------------------------------------------
    def memory(self) -> KeyMemory:
        """Σ k kᵀ of the keys behind the live weights: loaded (or rebuilt) once, then kept in step
        with every record this session builds; `commit` saves it with the operations."""
        if self.memory_state is None:
            with self.ws.reading() as s:
                self.memory_state, rebuilt = amem.load(s, self.live.base_model_id, self.head_seq)
            if rebuilt:
                self.notes.append("past-edit memory rebuilt from the ledger's key vectors")
        return self.memory_state

    # --- UltraEdit's lifelong statistics ---------------------------------------------------------
    def lifelong(self) -> LifelongStats:
        """The lineage's normalisation statistics: loaded (or rebuilt) once, then kept in step with
        every record this session builds; `commit` saves them with the operations that changed them."""
        if self.lifelong_state is None:
            with self.ws.reading() as s:
                self.lifelong_state, rebuilt = alife.load(s, self.live.base_model_id)
            if rebuilt:
                self.notes.append("ultraedit statistics rebuilt from the active operations' batch moments")
        return self.lifelong_state

    def track(self, rec: OpRecord) -> None:
        """Keep the memory and the lifelong statistics in step with a record just built
        (committed weight changes only)."""
        if rec.after is None or rec.status != OperationStatus.committed:
            return
        with self.ws.reading() as s:
            amem.apply_changes(s, self.memory(), rec.kind, rec.vectors, rec.target_operation_id)
            undone = alife.undone_batch(s, rec.target_operation_id) if rec.kind == OperationKind.undo else None
        if rec.lifelong_batch:
            self.lifelong_state = self.lifelong().update(BatchMoments(alife.from_stored(rec.lifelong_batch)))
        elif undone is not None:
            self.lifelong_state = self.lifelong().remove(undone)
        else:
            return
        rec.lifelong_after = alife.to_stored(self.lifelong_state.layers)

    # --- recipes (agent.recipes) -----------------------------------------------------------------
    def hparams(self, recorded: dict | None = None) -> EditHParams:
        return recipes.recorded_or_settings(self.settings, self.live.model, recorded)

    def batch_hparams(self, method: str, op=None, *, same_weights: bool = True):
        return recipes.batch_hparams(self.ws, self.settings, self.live.model, method, op,
                                     same_weights=same_weights)

    def editor(self, method: str, hp):
        return self.editors.get(self.live, method, hp, self.settings.stats_corpus)

    # --- building records (agent.batch) ----------------------------------------------------------
    def edit_batch(self, rows: list[Request], method: str, hp, **kw) -> OpRecord:
        return batch.edit_batch(self, rows, method, hp, **kw)

    def reuse_record(self, op, rows, factors, vectors, targets=()) -> OpRecord:
        return batch.reuse_record(self, op, rows, factors, vectors, targets)

    def undo_record(self, target_id: int, target_seq: int, reverted: list[int]) -> OpRecord:
        return batch.undo_record(self, target_id, target_seq, reverted)

    def undo_records(self, target, fact, applied, later, reapply=None) -> list[OpRecord]:
        return batch.undo_records(self, target, fact, applied, later, reapply)

    # --- writing -------------------------------------------------------------------------------------
    def commit(self, records: list[OpRecord], *, new_base: dict | None = None,
               also=None) -> None:
        """Write records in one transaction, then the snapshot (see the module docstring).
        `also(session)`: more writes of the caller's, in the same transaction (apply's plan)."""
        fault_point("after-compute")
        ids: dict[int, int] = {}
        with self.ws.writing() as s:
            base_id = None
            if new_base is not None:
                base_id = repo.add_base_model(s, **new_base).id
            for rec in records:
                op = repo.record_operation(
                    s, kind=rec.kind, base_model_id=rec.base_model_id or base_id, deltas=rec.deltas,
                    vectors=rec.vectors, targets=rec.targets, status=rec.status, started_at=rec.started_at,
                    editor=rec.editor, distribution=rec.distribution, hparams_json=rec.hparams,
                    layers_json=sorted({d.layer for d in rec.deltas}) or None,
                    target_operation_id=rec.target_operation_id, timings_json=rec.timings,
                    metrics_json=rec.metrics, error=rec.error, weights_sha256_before=rec.before,
                    weights_sha256_after=rec.after, artifact_id=rec.artifact_id)
                if op.seq != rec.seq:
                    raise KnowledgerError(f"operation seq {op.seq} was expected to be {rec.seq}: another "
                                          f"process recorded operations without the workspace lock")
                ids[rec.seq] = op.id
                if rec.lifelong_batch:  # UltraEdit's statistics (agent.lifelong), same transaction
                    repo.save_lifelong(s, op.id, op.base_model_id, repo.BATCH, rec.lifelong_batch)
                if rec.lifelong_after is not None:
                    repo.save_lifelong(s, op.id, op.base_model_id, repo.STATE, rec.lifelong_after)
                repo.link_requests(s, op.id, [(f.request_id, f.outcome, f.metrics) for f in rec.facts])
                for f in rec.facts:
                    if f.status is not None:
                        repo.set_request_status(s, repo.get_request(s, f.request_id), f.status,
                                                reason=f.reason, operation_id=op.id)
            for m in self.anchors:  # measured by this command (agent.anchors), beside the base model
                repo.add_anchor(s, **m.row(base_id or self.live.base_model_id))
            changed = [r.seq for r in records if r.after is not None and r.status == OperationStatus.committed]
            if changed:  # the memory of the live weights, stamped with the new head, same transaction
                amem.save(s, base_id or self.live.base_model_id, self.memory(), max(changed))
            if also is not None:
                also(s)
        fault_point("after-ledger-commit-before-snapshot")
        live = self.live
        if base_id is not None:
            live.base_model_id = base_id
        live.active = [replace(a, operation_id=ids[a.seq]) if a.operation_id == -1 else a
                       for a in live.active]
        heads = [r.seq for r in records if r.after is not None]
        if heads:
            self.head_seq = max(heads)
        live.write_snapshot(snapshot_path(self.ws.location), self.head_seq)
        fault_point("after-snapshot")

    def result(self, records: list[OpRecord]):
        """The OperationsResult of the records this command committed."""
        from knowledger.agent.records import OperationsResult

        return OperationsResult([r.summary() for r in records], list(self.notes),
                                self.live.state_hash, self.head_seq)


def recover(ws: Workspace) -> list[str]:
    """Mark operations a killed process left `running` as failed; drop stale snapshot temp files."""
    notes = []
    with ws.writing() as s:
        for op in repo.running_operations(s):
            op.status, op.finished_at = OperationStatus.failed, utcnow()
            op.error = "interrupted: the process stopped before the operation finished; nothing applied"
            notes.append(f"operation seq {op.seq} was left running by a stopped process: marked failed")
    if remove_stale_temporaries(snapshot_path(ws.location)):
        notes.append("removed a half-written snapshot left by a stopped process")
    return notes


@contextmanager
def session(ws: Workspace, *, what: str, wait: bool = False, load_live: bool = True,
            progress: Progress | None = None):
    """Lock the workspace, recover, open the live model: the frame of every weight-changing command."""
    with WorkspaceLock(lock_path(ws.location), wait=wait, what=what):
        notes = recover(ws)
        live, head = open_live(ws, refresh=True, notes=notes) if load_live else (None, 0)
        with ws.reading() as s:
            settings, next_seq = EditSettings.load(s), repo.next_seq(s)
        yield EditSession(ws, live, head, next_seq, settings, notes, progress)
