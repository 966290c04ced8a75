"""What one operation writes (`OpRecord`, built in memory, written by `EditSession.commit`) and
what the commands return about it (frozen summaries: the agent→CLI contract, `--json` is their
`dataclasses.asdict` through agent.jsonutil.to_jsonable).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from knowledger.agent.jsonutil import json_safe
from knowledger.editors.requests import EditRequest
from knowledger.ledger import repository as repo
from knowledger.ledger.models import (OperationKind, OperationStatus, Request, RequestOutcome,
                                      RequestStatus, utcnow)


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
    targets: list[repo.TargetVector] = field(default_factory=list)  # z at layer L per applied fact
    facts: list[FactOutcome] = field(default_factory=list)
    before: str | None = None
    after: str | None = None
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    artifact_id: int | None = None  # the MALMEN hyper-network it was computed with
    # UltraEdit's lifelong statistics (agent.lifelong): this operation's batch moments, and the
    # lineage's statistics after it (set by EditSession.track when the operation changed them)
    lifelong_batch: list[repo.StoredMoments] = field(default_factory=list)
    lifelong_after: list[repo.StoredMoments] | None = None

    def summary(self) -> OperationSummary:
        by = lambda o: [f.request_id for f in self.facts if f.outcome == o]  # noqa: E731
        failed = [FailedFact(f.request_id, f.reason) for f in self.facts
                  if f.outcome == RequestOutcome.failed]
        return OperationSummary(
            seq=self.seq, kind=self.kind.value, status=self.status.value, editor=self.editor,
            target_seq=self.metrics.get("target_seq"), applied=by(RequestOutcome.applied),
            reverted=by(RequestOutcome.reverted), failed=failed, requeued=by(RequestOutcome.skipped),
            weights_sha256=self.after, error=self.error,
            seconds=round(self.timings.get("total_s", 0.0), 3))


def clean_outcome(fo: FactOutcome) -> FactOutcome:
    return replace(fo, metrics=json_safe(fo.metrics) if fo.metrics else None)


def edit_requests(rows: list[Request]) -> list[EditRequest]:
    """Ledger rows -> editor requests (ids kept)."""
    return [EditRequest(prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                        target_true=r.target_true, paraphrases=tuple(r.paraphrase_prompts or ()),
                        neighborhood=tuple((n["prompt"], n["target"]) for n in r.neighborhood or ()),
                        id=r.id) for r in rows]


# --- what the commands return ---------------------------------------------------------------------
@dataclass(frozen=True)
class FailedFact:
    id: int
    reason: str | None


@dataclass(frozen=True)
class OperationSummary:
    """One operation a command recorded."""

    seq: int
    kind: str
    status: str
    editor: str | None
    target_seq: int | None  # undo/redo/replay: the operation it acts on
    applied: list[int]
    reverted: list[int]
    failed: list[FailedFact]
    requeued: list[int]  # facts pending again (their batch failed)
    weights_sha256: str | None
    error: str | None
    seconds: float


@dataclass(frozen=True)
class OperationsResult:
    """undo / redo / audit --heal's healing: the operations recorded and the head after them."""

    operations: list[OperationSummary]
    notes: list[str]
    weights_sha256: str | None
    head_seq: int


@dataclass(frozen=True)
class ApplyResult:
    """`apply`: the plan, the settings it changed, the operations, and the periodic audit."""

    dry_run: bool
    plan: dict
    settings_changes: list[str]
    operations: list[OperationSummary]
    notes: list[str]
    weights_sha256: str | None = None
    head_seq: int | None = None
    audit: dict | None = None  # the periodic audit's report (agent.audit) when one was due
    consolidation: OperationsResult | None = None  # the scheduled one (consolidate_every) when due

    @property
    def applied_any(self) -> bool:
        return any(op.status == OperationStatus.committed.value and op.applied for op in self.operations)


@dataclass(frozen=True)
class ReplayStep:
    seq: int
    kind: str
    recorded: str | None
    computed: str
    ok: bool


@dataclass(frozen=True)
class ReplayResult:
    """`replay`: every operation's recomputed hash against the recorded one."""

    base_model: str
    to_seq: int | None
    operations: list[ReplayStep]
    mismatches: list[str]
    weights_sha256: str
    head_seq: int
    snapshot_refreshed: bool
    memory_rebuilt: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReplayedFact:
    id: int
    outcome: str
    seq: int
    replays_seq: int | None
    p_new: float | None
    reason: str | None


@dataclass(frozen=True)
class RecomputeResult:
    """`replay --recompute`: a new lineage, fact by fact."""

    model: str
    same_weights: bool
    base_model_id: int | None
    operations: list[OperationSummary]
    facts: list[ReplayedFact]
    notes: list[str]
    weights_sha256: str | None
    head_seq: int
