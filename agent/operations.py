"""Apply, undo, redo and replay: every change of the live weights is one ledger operation.

One command = one `EditSession`: it holds the workspace lock (agent.lock), marks operations a killed
process left `running` as failed, and opens the live model (agent.live: base + active deltas,
snapshot checked against the ledger head). Work is computed in memory with no database
transaction open (a `submit` meanwhile never waits), then written in ONE write transaction
(`EditSession.commit`): the operation rows, their factored deltas and key/value vectors (blobs with
sha256), per-fact outcomes and metrics, hparams, timings and the weights hash after each, and the
facts' status changes. Only then is the snapshot rewritten; a crash in between leaves a stale
snapshot, which the next command detects and rebuilds.

Success criterion of an edit (checked on the batch's own facts after applying it): target_new is
the greedy continuation of the rewrite prompt, every token top-1 under teacher forcing
(editors.evaluate `rewrite_acc` == 1, i.e. CounterFact's efficacy_acc). A batch is evaluated
before and after. Facts that fail are marked `failed` and left out: the batch is recomputed once
without them. If that retry still has failures, nothing is applied: the operation is recorded as
failed, the failing facts as failed, and the facts that did succeed go back to `pending` (the next
apply tries them again). A batch in which every fact fails is a failed operation.

Undo removes one operation from the active set by recording an `undo` operation that targets it;
undoing one fact of a batch also re-applies the rest of that batch as a new apply operation (the
editor and hparams recorded with the batch, recomputed on the current weights). With `rebase`,
every later active operation is undone too and its facts recomputed in order on top of the
reverted state. Redo of an operation (or of a fact that was alone in its batch) reuses the
recorded deltas verbatim; redo of one fact of a larger batch recomputes it alone.

MALMEN batches are computed by a registered hyper-network (agent.hypernets), not from EditHParams:
a new batch uses the workspace's current one, and every recomputation of an operation's facts
(undo's re-apply, rebase, redo of one fact, replay --recompute) uses the one that operation
recorded (`artifact_id`), loaded only if its files still hash to the registered sha256. Its
`hparams_json` is the hyper-network's HyperConfig plus `hypernet_sha256`, never EditHParams.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime

from knowledger.agent import hypernets
from knowledger.agent import memory as amem
from knowledger.agent.editing import ensure_stats, open_model
from knowledger.agent.live import (ActiveDelta, LiveModel, delta_from_factors, expected_state,
                                   factors_from_delta, load_base, lock_path, open_live,
                                   remove_stale_temporaries, snapshot_path, state_hash, stored_delta)
from knowledger.agent.lock import WorkspaceLock, fault_point, try_lock
from knowledger.agent.scheduler import MALMEN, EditSettings
from knowledger.agent.workspace import Workspace, normalise_model
from knowledger.editors.editor import LIFELONG, Editor
from knowledger.editors.memory import KeyMemory
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.editors.hparams import EditHParams, load_preset, preset_for
from knowledger.editors.requests import EditRequest
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError, KnowledgerError
from knowledger.ledger.models import (OperationKind, OperationStatus, Request, RequestOutcome,
                                      RequestStatus, utcnow)

CRITERION = "rewrite_acc"  # target_new top-1 (every token) on the rewrite prompt
CRITERION_TEXT = "target_new is not the top-1 continuation of the rewrite prompt after the edit"


# --- what one operation will write ----------------------------------------------------------------
@dataclass
class FactOutcome:
    request_id: int
    outcome: RequestOutcome
    status: RequestStatus | None  # the fact's new status (None: unchanged)
    reason: str | None = None
    metrics: dict | None = None


@dataclass
class OpRecord:
    """An operation computed in memory; `EditSession.commit` writes it."""

    seq: int
    kind: OperationKind
    base_model_id: int | None  # None: the base model registered by the same commit
    status: OperationStatus = OperationStatus.committed
    target_operation_id: int | None = None
    editor: str | None = None
    distribution: str | None = None
    hparams: dict | None = None
    deltas: list[repo.DeltaFactors] = field(default_factory=list)
    vectors: list[repo.FactVectors] = field(default_factory=list)
    facts: list[FactOutcome] = field(default_factory=list)
    before: str | None = None
    after: str | None = None
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    artifact_id: int | None = None  # the MALMEN hyper-network it was computed with

    def summary(self) -> dict:
        by = lambda o: [f.request_id for f in self.facts if f.outcome == o]  # noqa: E731
        failed = [dict(id=f.request_id, reason=f.reason) for f in self.facts
                  if f.outcome == RequestOutcome.failed]
        return dict(seq=self.seq, kind=self.kind.value, status=self.status.value, editor=self.editor,
                    target_seq=self.metrics.get("target_seq"), applied=by(RequestOutcome.applied),
                    reverted=by(RequestOutcome.reverted), failed=failed,
                    requeued=by(RequestOutcome.skipped), weights_sha256=self.after,
                    error=self.error, seconds=round(self.timings.get("total_s", 0.0), 3))


def edit_requests(rows: list[Request]) -> list[EditRequest]:
    return [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                        target_true=r.target_true, paraphrases=tuple(r.paraphrase_prompts or ()),
                        neighborhood=tuple((n["prompt"], n["target"]) for n in r.neighborhood or ()),
                        id=r.id) for r in rows]


def json_safe(obj):
    """JSON-safe copy: tensors and numpy scalars to floats, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


# --- a command's session --------------------------------------------------------------------------
@dataclass
class EditSession:
    ws: Workspace
    live: LiveModel | None
    head_seq: int
    next_seq: int
    settings: EditSettings
    notes: list[str]
    progress: bool = False
    _editors: dict = field(default_factory=dict)
    _malmen: dict = field(default_factory=dict)  # (sha256, id(model)) -> MalmenEditor
    _stats_key: tuple | None = None
    _memory: KeyMemory | None = None  # the past-edit memory of the live weights (agent.memory)

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    # --- the past-edit memory --------------------------------------------------------------------
    def memory(self) -> KeyMemory:
        """Σ k kᵀ of the keys behind the live weights: loaded (or rebuilt) once, then kept in step
        with every record this session builds; `commit` saves it with the operations."""
        if self._memory is None:
            with self.ws.reading() as s:
                self._memory, rebuilt = amem.load(s, self.live.base_model_id, self.head_seq)
            if rebuilt:
                self.notes.append("past-edit memory rebuilt from the ledger's key vectors")
        return self._memory

    def _track(self, rec: OpRecord) -> None:
        if rec.after is None or rec.status != OperationStatus.committed:
            return
        with self.ws.reading() as s:
            amem.apply_changes(s, self.memory(), rec.kind, rec.vectors, rec.target_operation_id)

    # --- hyperparameters and editors ----------------------------------------------------------
    def hparams(self, recorded: dict | None = None) -> EditHParams:
        """A batch's hyperparameters: as recorded with an earlier operation, or from the settings."""
        if recorded:
            return EditHParams.from_dict(recorded)
        st = self.settings
        hp = load_preset(st.hparams_preset) if st.hparams_preset else preset_for(self.live.model)
        overrides = dict(st.hparams_overrides)
        if st.stats_tokens:
            overrides["stats_tokens"] = st.stats_tokens
        unknown = sorted(set(overrides) - set(EditHParams.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(unknown)}")
        return hp.replace(**overrides) if overrides else hp

    def batch_hparams(self, method: str, op=None, *, same_weights: bool = True):
        """What edit_batch computes a batch of `method` with. MALMEN: the hyper-network `op` ran on
        (a recorded operation's facts are recomputed with it, never with a newer one), else the
        workspace's current one. The others: EditHParams, as `op` recorded them on the same
        weights, else from the settings."""
        if method != MALMEN:
            return self.hparams(op.hparams_json if op is not None and same_weights else None)
        with self.ws.reading() as s:  # the current one as this command's settings (and plan) saw it
            return hypernets.current_ref(s, self.settings.malmen_hypernet) if op is None \
                else hypernets.recorded_ref(s, op)

    def editor(self, method: str, hp):
        """An editor whose key statistics and context prefixes come from the BASE weights; for
        MALMEN (hp a HypernetRef) one on the live weights, which is what its gradients are of."""
        if method == MALMEN:
            return self.malmen_editor(hp)
        key = (method, hp.to_json())
        if key not in self._editors:
            lm = self.live.lm
            stats_key = (self.settings.stats_corpus, hp.stats_tokens, hp.stats_dtype)
            if stats_key != self._stats_key:  # other statistics: drop them and their editors
                lm.stats.clear()
                self._editors.clear()
                self._stats_key = stats_key
            with self.live.at_base():
                ensure_stats(lm, hp, self.settings.stats_corpus, progress=self.progress)
                ed = Editor(lm.model, lm.tokenizer, hp, method=method, second_moments=lm.stats,
                            weights_sha=lm.weights_sha256)
                ed.contexts  # noqa: B018 (generated now, from the base weights)
            self._editors[key] = ed
        return self._editors[key]

    def malmen_editor(self, ref: hypernets.HypernetRef):
        """A MalmenEditor on the live model with a registered hyper-network, loaded once per
        session after checking its files against the registered sha256 and its shape against
        the model."""
        from knowledger.editors.malmen import MalmenEditor

        lm = self.live.lm
        key = (ref.sha256, id(lm.model))
        if key not in self._malmen:
            net, sha = hypernets.load_verified(self.ws.location, ref)
            try:
                self._malmen[key] = MalmenEditor(lm.model, lm.tokenizer, net, sha=sha)
            except ValueError as e:  # editors.malmen.check_compatible
                raise KnowledgerError(f"MALMEN hyper-network {sha[:12]}: {e}") from e
        return self._malmen[key]

    # --- building records ------------------------------------------------------------------------
    def undo_record(self, target_id: int, target_seq: int, reverted: list[int]) -> OpRecord:
        """Remove an operation's deltas from the live weights; its facts become reverted."""
        before = self.live.state_hash
        after = self.live.set_active([a for a in self.live.active if a.operation_id != target_id])
        facts = [FactOutcome(rid, RequestOutcome.reverted, RequestStatus.reverted,
                             f"undone (operation seq {target_seq})") for rid in reverted]
        rec = OpRecord(seq=self.take_seq(), kind=OperationKind.undo, base_model_id=self.live.base_model_id,
                       target_operation_id=target_id, facts=facts, before=before, after=after,
                       metrics=dict(target_seq=target_seq,
                                    norm_growth=max(self.live.norm_growth().values(), default=0.0)))
        self._track(rec)
        return rec

    def undo_records(self, target, fact: Request | None, applied: list[Request],
                     later: list[tuple]) -> list[OpRecord]:
        """Undo `target` (its `applied` facts become reverted) and, with `later` = [(operation,
        its applied facts)] for a rebase, every later operation first; then re-apply the rest of
        the batch of an undone `fact`, and the later operations' facts in order."""
        records = [self.undo_record(op.id, op.seq, [r.id for r in rs]) for op, rs in reversed(later)]
        records.append(self.undo_record(target.id, target.seq, [r.id for r in applied]))
        rest = [r for r in applied if fact is not None and r.id != fact.id]
        if rest:
            records.append(self.edit_batch(rest, target.editor, self.batch_hparams(target.editor, target),
                                           why=f"re-applied after undoing fact #{fact.id}"))
        for op, rs in later:
            if rs:
                records.append(self.edit_batch(rs, op.editor, self.batch_hparams(op.editor, op),
                                               why=f"rebased after undoing seq {target.seq}"))
        return records

    def edit_batch(self, rows: list[Request], method: str, hp, *,
                   kind: OperationKind = OperationKind.apply, target: tuple[int, int] | None = None,
                   why: str = "applied") -> OpRecord:
        """Compute one batch on the live weights, check it, retry once without failures.

        `hp`: what batch_hparams gives for `method` (EditHParams, or a HypernetRef for MALMEN).
        Leaves the live model at the result (or unchanged for a failed operation).
        """
        t0 = time.perf_counter()
        live, reqs = self.live, edit_requests(rows)
        start, h_before = list(live.active), live.state_hash
        before = fact_metrics(live.model, live.tokenizer, reqs)
        editor = self.editor(method, hp)
        eval_s = time.perf_counter() - t0
        failed: dict[int, tuple[str, dict]] = {}
        todo, attempts, result, after = list(reqs), 0, None, []
        while todo:
            attempts += 1
            result = editor.compute(todo, memory=self.memory() if method in LIFELONG else None)
            deltas = [stored_delta(d) for d in result.deltas]
            live.set_active(start + [ActiveDelta(self.next_seq, -1, d) for d in deltas])
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
        rec = OpRecord(seq=self.take_seq(), kind=kind, base_model_id=live.base_model_id,
                       editor=method, before=h_before, started_at=utcnow(),
                       target_operation_id=target[0] if target else None, **_recipe(method, hp, editor))
        for r in reqs:
            stats = None
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
            rec.facts.append(_clean_outcome(fo))
        if result is None:
            rec.status, rec.error = OperationStatus.failed, (
                "every fact of the batch failed" if not todo or len(failed) == len(reqs)
                else "the retry without the failed facts still had failures; nothing applied")
        else:
            rec.after = live.state_hash
            rec.deltas = [factors_from_delta(d) for d in result.deltas]
            for layer, K in result.keys.items():  # (d_in, n), (d_out, n): one column per fact
                V = result.values[layer]
                for j, r in enumerate(todo):
                    rec.vectors.append(repo.FactVectors(r.id, layer, K[:, j].float().numpy(),
                                                        V[:, j].float().numpy()))
        self._track(rec)
        timings = dict(result.timings) if result is not None else {}
        timings.update(eval_s=eval_s, attempts=attempts, total_s=time.perf_counter() - t0)
        rec.timings = json_safe(timings)
        rec.metrics = json_safe(dict(
            criterion=CRITERION, target_seq=target[1] if target else None,
            before=aggregate(before), after=aggregate(after) if result is not None else None,
            failed=sorted(failed), norm_growth=max(live.norm_growth().values(), default=0.0),
            stats=None if method == MALMEN else dict(corpus=self.settings.stats_corpus,
                                                     tokens=hp.stats_tokens),
            diagnostics={k: v for k, v in (result.diagnostics if result else {}).items()}))
        return rec

    def reuse_record(self, op, rows: list[Request], factors: list[repo.DeltaFactors],
                     vectors: list[repo.FactVectors]) -> OpRecord:
        """Redo with an undone operation's recorded deltas, verbatim (metrics recorded, not checked)."""
        t0, live = time.perf_counter(), self.live
        before = live.state_hash
        seq = self.take_seq()
        live.set_active(live.active + [ActiveDelta(seq, -1, delta_from_factors(f)) for f in factors])
        after = fact_metrics(live.model, live.tokenizer, edit_requests(rows))
        ids = {r.id for r in rows}
        rec = OpRecord(
            seq=seq, kind=OperationKind.redo, base_model_id=live.base_model_id,
            target_operation_id=op.id, editor=op.editor, distribution=op.distribution,
            hparams=op.hparams_json, artifact_id=op.artifact_id, deltas=factors, before=before,
            after=live.state_hash,
            vectors=[v for v in vectors if v.request_id in ids],
            facts=[_clean_outcome(FactOutcome(r.id, RequestOutcome.applied, RequestStatus.applied,
                                              f"redone with the deltas of operation seq {op.seq}",
                                              dict(after=m))) for r, m in zip(rows, after)],
            timings=dict(total_s=time.perf_counter() - t0),
            metrics=json_safe(dict(criterion=CRITERION, target_seq=op.seq, reused_deltas=True,
                                after=aggregate(after),
                                norm_growth=max(live.norm_growth().values(), default=0.0))))
        self._track(rec)
        return rec

    # --- writing -------------------------------------------------------------------------------------
    def commit(self, records: list[OpRecord], *, new_base: dict | None = None) -> None:
        """Write records in one transaction, then the snapshot (see the module docstring)."""
        fault_point("after-compute")
        ids: dict[int, int] = {}
        with self.ws.writing() as s:
            base_id = None
            if new_base is not None:
                base_id = repo.add_base_model(s, **new_base).id
            for rec in records:
                op = repo.record_operation(
                    s, kind=rec.kind, base_model_id=rec.base_model_id or base_id, deltas=rec.deltas,
                    vectors=rec.vectors, status=rec.status, started_at=rec.started_at,
                    editor=rec.editor, distribution=rec.distribution, hparams_json=rec.hparams,
                    layers_json=sorted({d.layer for d in rec.deltas}) or None,
                    target_operation_id=rec.target_operation_id, timings_json=rec.timings,
                    metrics_json=rec.metrics, error=rec.error, weights_sha256_before=rec.before,
                    weights_sha256_after=rec.after, artifact_id=rec.artifact_id)
                if op.seq != rec.seq:
                    raise KnowledgerError(f"operation seq {op.seq} was expected to be {rec.seq}: another "
                                          f"process recorded operations without the workspace lock")
                ids[rec.seq] = op.id
                repo.link_requests(s, op.id, [(f.request_id, f.outcome, f.metrics) for f in rec.facts])
                for f in rec.facts:
                    if f.status is not None:
                        repo.set_request_status(s, repo.get_request(s, f.request_id), f.status,
                                                reason=f.reason, operation_id=op.id)
            changed = [r.seq for r in records if r.after is not None and r.status == OperationStatus.committed]
            if changed:  # the memory of the live weights, stamped with the new head, same transaction
                amem.save(s, base_id or self.live.base_model_id, self.memory(), max(changed))
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


def _recipe(method: str, hp, editor) -> dict:
    """How a batch was computed, as its operation records it: distribution, hparams, artifact.
    MALMEN records its hyper-network (HyperConfig + sha256, and the artifact row), no distribution."""
    if method == MALMEN:
        return dict(distribution=None, artifact_id=hp.artifact_id,
                    hparams=dict(editor.net.config.to_dict(), hypernet_sha256=editor.sha))
    return dict(distribution="last" if method == "rome" else hp.distribution, hparams=hp.to_dict())


def _clean_outcome(fo: FactOutcome) -> FactOutcome:
    return replace(fo, metrics=json_safe(fo.metrics) if fo.metrics else None)


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
            progress: bool = False):
    """Lock the workspace, recover, open the live model: the frame of every weight-changing command."""
    with WorkspaceLock(lock_path(ws.location), wait=wait, what=what):
        notes = recover(ws)
        live, head = open_live(ws, refresh=True, notes=notes) if load_live else (None, 0)
        with ws.reading() as s:
            settings, next_seq = EditSettings.load(s), repo.next_seq(s)
        yield EditSession(ws, live, head, next_seq, settings, notes, progress)


class NothingToDo(KnowledgerError):
    """Nothing pending to apply, nothing to undo or redo."""


# --- apply ---------------------------------------------------------------------------------------
def plan_pending(ws: Workspace, *, batch_size: int | None = None, editor: str = "auto",
                 corpus=None, stats_tokens: int | None = None, overrides: dict | None = None,
                 preset: str | None = None):
    """(plan, settings with the given values in, their changes, {id: PendingFact})."""
    from knowledger.agent.scheduler import PendingFact, plan

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


def workspace_history(s):
    """What the scheduler's `auto` policy reads: applied facts, and the norm growth the latest
    weight-changing operation recorded (agent.scheduler.History)."""
    from knowledger.agent.scheduler import History

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
                  progress: bool = False) -> dict:
    """Apply every pending fact (see the module docstring); with dry_run only return the plan.

    corpus / stats_tokens / overrides / preset are stored in the workspace settings (and used by
    every later command) once the apply has checked them against the model.
    """
    kw = dict(batch_size=batch_size, editor=editor, corpus=corpus, stats_tokens=stats_tokens,
              overrides=overrides, preset=preset)
    p, _, changes, facts = plan_pending(ws, **kw)  # fails fast, before loading any model
    if dry_run:
        return dict(dry_run=True, plan=p.as_dict(facts), settings_changes=changes, operations=[],
                    notes=[])
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
        for b in p.batches:
            with ws.reading() as s:
                rows = repo.requests_by_ids(s, b.fact_ids)
            rec = es.edit_batch(rows, b.editor, hps[b.editor])
            es.commit([rec])
            ops.append(rec.summary())
        return dict(dry_run=False, plan=p.as_dict(facts), settings_changes=changes, operations=ops,
                    notes=es.notes, weights_sha256=es.live.state_hash, head_seq=es.head_seq)


# --- undo and redo -------------------------------------------------------------------------------
def _check_delta_op(op, base_model_id: int, verb: str) -> None:
    if op.kind not in repo.DELTA_KINDS:
        raise KnowledgerError(f"operation seq {op.seq} is an {op.kind.value} operation: only apply, "
                              f"redo, replay and heal operations can be {verb}ne")
    if op.status != OperationStatus.committed:
        raise KnowledgerError(f"operation seq {op.seq} {op.status.value}: it changed no weights")
    if op.base_model_id != base_model_id:
        raise KnowledgerError(f"operation seq {op.seq} belongs to an earlier base model of this workspace")


def _applied(s, operation_id: int) -> list[Request]:
    """The facts an operation applied that are still applied, in batch order."""
    return [req for link, req in repo.operation_facts(s, operation_id)
            if link.outcome == RequestOutcome.applied and req.status == RequestStatus.applied]


def _holding_operation(s, base_model_id: int, fact_id: int, *, active: bool):
    """The latest operation of this base that applied the fact (an active one, or any)."""
    ops = [op for op, link in repo.request_operations(s, fact_id)
           if link.outcome == RequestOutcome.applied and op.kind in repo.DELTA_KINDS
           and op.status == OperationStatus.committed and op.base_model_id == base_model_id]
    if active:
        ids = {op.id for op in repo.active_operations(s, base_model_id)}
        ops = [op for op in ops if op.id in ids]
    return ops[-1] if ops else None


def _undo_target(s, base_model_id: int, fact_id: int | None, seq: int | None):
    if fact_id is not None:
        req = repo.get_request(s, fact_id)
        if req.status == RequestStatus.reverted:
            raise NothingToDo(f"fact #{fact_id} is already reverted")
        if req.status != RequestStatus.applied:
            raise NothingToDo(f"fact #{fact_id} is {req.status.value}, not applied: nothing to undo")
        op = _holding_operation(s, base_model_id, fact_id, active=True)
        if op is None:
            raise KnowledgerError(f"fact #{fact_id} is applied but no active operation holds it "
                                  f"(run knowledger replay)")
        return op, req
    op = repo.get_operation_by_seq(s, seq)
    _check_delta_op(op, base_model_id, "undo")
    if repo.is_undone(s, op):
        raise NothingToDo(f"operation seq {seq} is already undone")
    return op, None


def _one_of(fact_id, seq) -> None:
    if (fact_id is None) == (seq is None):
        raise ValueError("give either a fact id or --op SEQ")


def undo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, rebase: bool = False,
         wait: bool = False, progress: bool = False) -> dict:
    """Undo a fact (its batch is reverted, the rest re-applied) or an operation; see the docstring."""
    _one_of(fact_id, seq)
    with session(ws, what="undo", wait=wait, progress=progress) as es:
        base_id = es.live.base_model_id
        with ws.reading() as s:
            target, fact = _undo_target(s, base_id, fact_id, seq)
            applied = _applied(s, target.id)
            later = [(op, _applied(s, op.id)) for op in repo.active_operations(s, base_id)
                     if op.seq > target.seq] if rebase else []
        records = es.undo_records(target, fact, applied, later)
        es.commit(records)
        return dict(operations=[r.summary() for r in records], notes=es.notes,
                    weights_sha256=es.live.state_hash, head_seq=es.head_seq)


def redo(ws: Workspace, *, fact_id: int | None = None, seq: int | None = None, wait: bool = False,
         progress: bool = False) -> dict:
    """Re-apply an undone operation or a reverted fact (see the module docstring)."""
    _one_of(fact_id, seq)
    with session(ws, what="redo", wait=wait, progress=progress) as es:
        base_id = es.live.base_model_id
        with ws.reading() as s:
            if seq is not None:
                op = repo.get_operation_by_seq(s, seq)
                _check_delta_op(op, base_id, "redo")
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
                op = _holding_operation(s, base_id, fact_id, active=False)
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
        if reuse:
            rec = es.reuse_record(op, rows, factors, vectors)
        else:
            rec = es.edit_batch(rows, op.editor, es.batch_hparams(op.editor, op), kind=OperationKind.redo,
                                target=(op.id, op.seq), why="redone (recomputed alone)")
        es.commit([rec])
        return dict(operations=[rec.summary()], notes=es.notes, weights_sha256=es.live.state_hash,
                    head_seq=es.head_seq)


# --- replay ----------------------------------------------------------------------------------------
def replay(ws: Workspace, *, to_seq: int | None = None) -> dict:
    """Rebuild the weights from the base model and the ledger's deltas, checking every recorded
    weights hash (before and after each operation) on the way; `mismatches` lists what differs.

    Without `to_seq`, and when everything matches, the snapshot is refreshed (if no other command
    holds the workspace lock). The live model is never changed by `to_seq`.
    """
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
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
    live = LiveModel(load_base(name, base_sha), base_id, base_sha)
    active, state = [], state_hash(base_sha, {})
    rows, mismatches = [], []
    for seq, op_id, kind, target, before, after, deltas, problem in steps:
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
        rows.append(dict(seq=seq, kind=kind.value, recorded=after, computed=state,
                         ok=ok and not problem))
    refreshed = False
    if to_seq is None and not mismatches and state == want:
        lock = try_lock(lock_path(ws.location), "replay")
        if lock is not None:
            try:
                live.set_active(active)
                live.write_snapshot(snapshot_path(ws.location), head_seq)
                refreshed = True
                with ws.writing() as s:  # the past-edit memory, rebuilt from the surviving keys
                    amem.save(s, base_id, amem.rebuild(s, base_id), head_seq)
            finally:
                lock.release()
    return dict(base_model=name, to_seq=to_seq, operations=rows, mismatches=mismatches,
                weights_sha256=state, head_seq=head_seq if to_seq is None else to_seq,
                snapshot_refreshed=refreshed, memory_rebuilt=refreshed)


def replay_recompute(ws: Workspace, *, model: str | None = None, wait: bool = False,
                     progress: bool = False) -> dict:
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
            batches = [(op, _applied(s, op.id)) for op in repo.active_operations(s, base.id)
                       if op.kind != OperationKind.heal]  # a heal re-applies facts its origin holds
            old_name, old_sha = base.name_or_path, base.weights_sha256
        name = normalise_model(model) if model else old_name
        try:
            lm = open_model(name)
        except OSError as e:
            raise KnowledgerError(f"cannot load model {name}: {e}") from e
        same = lm.weights_sha256 == old_sha
        es.live = LiveModel(lm, None, lm.weights_sha256)
        es._memory = KeyMemory()  # a new lineage starts with no past edits
        new_base = dict(name_or_path=name, architecture=str(lm.model.config.model_type),
                        weights_sha256=lm.weights_sha256,
                        config=json.loads(lm.model.config.to_json_string(use_diff=False)))
        records = [es.edit_batch(facts, op.editor, es.batch_hparams(op.editor, op, same_weights=same),
                                 kind=OperationKind.replay, target=(op.id, op.seq), why=f"replayed on {name}")
                   for op, facts in batches if facts]
        es.commit(records, new_base=new_base)
        facts = [dict(id=f.request_id, outcome=f.outcome.value, seq=r.seq, replays_seq=r.metrics.get("target_seq"),
                      p_new=((f.metrics or {}).get("after") or {}).get("rewrite_p_new"), reason=f.reason)
                 for r in records for f in r.facts]
        return dict(model=name, same_weights=same, base_model_id=es.live.base_model_id,
                    operations=[r.summary() for r in records], facts=facts, notes=es.notes,
                    weights_sha256=es.live.state_hash, head_seq=es.head_seq)
