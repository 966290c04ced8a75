"""The ledger's tables: SQLAlchemy 2.0 typed ORM over one `MetaData` with a naming convention.

The whole lifecycle of a knowledge edit is modelled here, so later work adds behaviour, not tables:

    base_models ─< operations ─< layer_deltas           (what an operation wrote, factored)
                       │    └──< request_vectors       (the keys k and values v* it used)
                       └──< operation_requests >── edit_requests ─< request_events
    audit_runs ─< audit_results >── edit_requests       settings (key → JSON)
    base_models ─< edit_memory                          (Σ k kᵀ of the active edits, per layer)
    operations ─< ultraedit_stats >── base_models       (UltraEdit's lifelong statistics, per layer)
    artifacts ─< operations                             (the MALMEN hyper-network an operation used)
    operations ─< fact_targets >── edit_requests        (the residual target z at layer L per fact)
    nas_anchors                                         (NAS reference norm, per base weights sha256)
    counters                                            (operation_seq: the database numbers operations)

Append-only: no row is ever deleted (nor is an `artifacts` row ever changed: registering the same
content again finds the existing row). `edit_memory` and `settings` are the two running states that
(and the `counters` row) are updated in place; edit_memory is derived from request_vectors and can always be rebuilt. Undo, redo, replay and healing add operations and change
statuses; every status change of a fact also appends a `request_events` row (its history).
Times are UTC. Alembic's env.py imports `Base.metadata` from here, so this module imports nothing
heavier than SQLAlchemy.
"""
from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (JSON, DateTime, Enum, ForeignKey, Index, Integer, LargeBinary, MetaData,
                        String, Text, UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


# --- enumerations (stored as their lowercase values in VARCHAR columns) ----------------------
class RequestStatus(str, enum.Enum):
    pending = "pending"  # submitted, waiting for the scheduler
    applied = "applied"  # its edit is in the current weights
    superseded = "superseded"  # a later fact about the same subject and relation replaced it
    rejected = "rejected"  # refused (by a user or a check) before being applied
    reverted = "reverted"  # was applied, then undone
    failed = "failed"  # an operation tried and could not apply it


class OperationKind(str, enum.Enum):
    apply = "apply"
    undo = "undo"
    redo = "redo"
    replay = "replay"
    heal = "heal"
    consolidate = "consolidate"  # every active fact re-solved jointly on the base (a new lineage)


class OperationStatus(str, enum.Enum):
    running = "running"
    committed = "committed"
    failed = "failed"


class RequestOutcome(str, enum.Enum):
    """What an operation did to one fact."""

    applied = "applied"
    failed = "failed"
    reverted = "reverted"
    skipped = "skipped"


class AuditStatus(str, enum.Enum):
    running = "running"
    completed = "completed"
    failed = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


# --- tables -------------------------------------------------------------------------------------
class BaseModel(Base):
    """The unedited model a workspace edits: name, family and a hash of its weights."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name_or_path: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(64))  # config.model_type
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_json: Mapped[dict]
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)


class Request(Base):
    """One submitted fact (an edit request): rewrite `prompt.format(subject)` → `target_new`."""

    __tablename__ = "edit_requests"
    # at most one pending fact per fingerprint, enforced by the database: concurrent submits of the
    # same fact store it once (repository.add_requests tolerates the losing insert)
    __table_args__ = (Index("uq_edit_requests_pending_fingerprint", "fingerprint", unique=True,
                            sqlite_where=text("status = 'pending'"),
                            postgresql_where=text("status = 'pending'")),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)  # template with exactly one "{}" for the subject
    subject: Mapped[str] = mapped_column(Text)
    target_new: Mapped[str] = mapped_column(Text)
    target_true: Mapped[str | None] = mapped_column(Text)
    paraphrase_prompts: Mapped[list] = mapped_column(default=list)  # full prompts
    neighborhood: Mapped[list] = mapped_column(default=list)  # [{"prompt": ..., "target": ...}]
    source: Mapped[str | None] = mapped_column(Text)  # "cli", a file name, ...
    case_id: Mapped[str | None] = mapped_column(String(64))  # the id in a benchmark's file
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus), index=True,
                                                  default=RequestStatus.pending)
    status_reason: Mapped[str | None] = mapped_column(Text)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("edit_requests.id"))
    # sha256 of the normalised (prompt, subject, target_new): finds duplicates
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)


class RequestEvent(Base):
    """One status change of a fact, in order: its history."""

    __tablename__ = "request_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus))
    reason: Mapped[str | None] = mapped_column(Text)
    operation_id: Mapped[int | None] = mapped_column(ForeignKey("operations.id"))


class Operation(Base):
    """One change to the weights (or an attempt): apply, undo, redo, replay or heal."""

    __tablename__ = "operations"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # strictly increasing order of operations
    kind: Mapped[OperationKind] = mapped_column(_enum(OperationKind))
    status: Mapped[OperationStatus] = mapped_column(_enum(OperationStatus), index=True,
                                                    default=OperationStatus.running)
    editor: Mapped[str | None] = mapped_column(String(32))  # "memit", "emmet", ...
    distribution: Mapped[str | None] = mapped_column(String(32))  # how the residual is spread
    hparams_json: Mapped[dict | None]
    layers_json: Mapped[list | None]
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    target_operation_id: Mapped[int | None] = mapped_column(ForeignKey("operations.id"))  # undo/redo
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    timings_json: Mapped[dict | None]
    metrics_json: Mapped[dict | None]
    error: Mapped[str | None] = mapped_column(Text)
    weights_sha256_before: Mapped[str | None] = mapped_column(String(64))
    weights_sha256_after: Mapped[str | None] = mapped_column(String(64))
    knowledger_version: Mapped[str] = mapped_column(String(32))
    # the file-based artefact the editor ran on (a MALMEN hyper-network); None for the others
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))


class Artifact(Base):
    """A file an operation depends on besides the base model, named by the sha256 of its content.

    Today: MALMEN hyper-networks (`kind` "malmen-hypernet", a folder of hypernet.safetensors +
    config.json, see editors.malmen). `path` is where the workspace keeps the files: relative to
    the workspace's home for a copy the workspace owns (`artifacts/<sha256>`), absolute otherwise.
    The sha256 is checked against the files every time they are loaded.
    """

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    meta_json: Mapped[dict | None]  # config.json's "hyper" (shape) and "meta" (training summary)


class OperationRequest(Base):
    """Which facts an operation handled, in batch order, and what became of each."""

    __tablename__ = "operation_requests"

    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id"), primary_key=True,
                                            index=True)
    position: Mapped[int]  # column of this fact in the operation's key/value matrices
    outcome: Mapped[RequestOutcome] = mapped_column(_enum(RequestOutcome))
    metrics_json: Mapped[dict | None]


class Delta(Base):
    """ΔW = left @ rightᵀ for one edited parameter of one operation, as safetensors bytes."""

    __tablename__ = "layer_deltas"
    __table_args__ = (UniqueConstraint("operation_id", "param"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), index=True)
    layer: Mapped[int]
    param: Mapped[str] = mapped_column(Text)  # name in model.state_dict()
    left: Mapped[bytes] = mapped_column(LargeBinary)  # (d_out, r)
    right: Mapped[bytes] = mapped_column(LargeBinary)  # (d_in, r)
    dtype: Mapped[str] = mapped_column(String(16))
    shape_json: Mapped[list]  # [d_out, d_in]
    rank: Mapped[int]
    frobenius_norm: Mapped[float]
    sha256: Mapped[str] = mapped_column(String(64))  # over left then right bytes


class RequestVector(Base):
    """The key k (d_in,) and target value v* (d_out,) one fact used at one layer of an operation."""

    __tablename__ = "request_vectors"
    __table_args__ = (UniqueConstraint("operation_id", "request_id", "layer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), index=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id"), index=True)
    layer: Mapped[int]
    key: Mapped[bytes] = mapped_column(LargeBinary)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))  # over key then value bytes


class FactTarget(Base):
    """The residual target z (d,) one fact was written with by one operation: the output of layer
    `layer` (L, the last edited one) at the subject's last token of the bare prompt that the solve
    asked for, v* = v₀ + δ (anchored when NAS was on). No layer above L is edited, so z stays a
    valid target whatever the layers below do: consolidation re-solves the active facts from it.
    `site` is where z lives: "block" (the block's output; MEMIT, EMMET, AlphaEdit, ENCORE, ROME)
    or "mlp" (layer L's MLP output; PMET)."""

    __tablename__ = "fact_targets"
    __table_args__ = (UniqueConstraint("operation_id", "request_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), index=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id"), index=True)
    layer: Mapped[int]
    site: Mapped[str] = mapped_column(String(16))
    value: Mapped[bytes] = mapped_column(LargeBinary)  # (d,) float32, safetensors bytes
    sha256: Mapped[str] = mapped_column(String(64))


class NasAnchor(Base):
    """A NAS reference norm ā (editors.nas) measured once on clean base weights from pilot edits.

    Keyed by what it depends on: the base weights (`weights_sha256`, so every lineage of the same
    weights shares it), the layer L whose output the targets live at and the `site` there ("block"
    or "mlp"). `pilot_sha256` names the pilot facts, `hparams_json` the v* optimisation they ran
    with, `pilot_norms_json` the measured ‖v*‖ (ā is recomputable from them). Never changed; a
    re-measurement adds a row and the newest one is used."""

    __tablename__ = "nas_anchors"

    id: Mapped[int] = mapped_column(primary_key=True)
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"))  # measured for
    layer: Mapped[int]
    site: Mapped[str] = mapped_column(String(16))
    norm: Mapped[float]  # ā
    n_pilot: Mapped[int]
    n_used: Mapped[int]  # after dropping the high tail
    cutoff: Mapped[float]  # pilot norms above this were dropped
    rule: Mapped[str] = mapped_column(Text)
    pilot_norms_json: Mapped[list]
    pilot_sha256: Mapped[str] = mapped_column(String(64))
    hparams_json: Mapped[dict]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditRun(Base):
    """A check of the edited model: do applied facts still hold, is the model still healthy."""

    __tablename__ = "audit_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    head_seq: Mapped[int | None]  # operations.seq the audited weights correspond to
    device: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[AuditStatus] = mapped_column(_enum(AuditStatus), default=AuditStatus.running)
    metrics_json: Mapped[dict | None]  # model health: perplexity, norms


class AuditResult(Base):
    """One fact's result in one audit."""

    __tablename__ = "audit_results"
    __table_args__ = (UniqueConstraint("audit_run_id", "request_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    audit_run_id: Mapped[int] = mapped_column(ForeignKey("audit_runs.id"), index=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id"), index=True)
    metrics_json: Mapped[dict | None]
    drifted: Mapped[bool] = mapped_column(default=False)


class EditMemory(Base):
    """The past-edit memory of one edited layer: M = Σ k kᵀ over the keys of every active edit.

    A snapshot: written in the same transaction as an operation that changes the active set,
    every agent.memory.SNAPSHOT_EVERY seqs (113 MB on the default model, so not at every one); it
    matches the ledger at `as_of_seq`, and a reader brings it to the head with the stored keys of
    the operations after it (apply, redo, replay, heal add theirs; undo subtracts its target's).
    Derived from request_vectors, it is rebuilt from them when it cannot be brought up to date.
    """

    __tablename__ = "edit_memory"
    __table_args__ = (UniqueConstraint("base_model_id", "layer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    layer: Mapped[int]
    matrix: Mapped[bytes] = mapped_column(LargeBinary)  # (d_in, d_in) float64, safetensors bytes
    n_keys: Mapped[int]  # keys summed into it
    as_of_seq: Mapped[int]  # operations.seq of the last operation it reflects
    sha256: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UltraEditStats(Base):
    """UltraEdit's lifelong normalisation statistics (editors.lifelong_norm) of one edited layer,
    as one operation left them: per-dimension count n, mean μ (D,) and M2 = Σ (z − μ)² (D,) of
    z = [k ‖ g], float64 safetensors bytes.

    Two roles, both append-only and written in the operation's own transaction:
    - "batch": the moments of the operation's own batch (an ultraedit apply, redo, replay or heal);
      what an undo of it subtracts, and what a rebuild merges in seq order;
    - "state": the running statistics of the lineage right after the operation (every operation
      that changed them: the ultraedit ones and undos of them); the latest one is what the next
      ultraedit batch is normalised with.
    """

    __tablename__ = "ultraedit_stats"
    __table_args__ = (UniqueConstraint("operation_id", "layer", "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    layer: Mapped[int]
    role: Mapped[str] = mapped_column(String(8))  # "batch" | "state"
    n: Mapped[int]  # rows (target-token positions) merged in
    mean: Mapped[bytes] = mapped_column(LargeBinary)  # (D,) float64
    m2: Mapped[bytes] = mapped_column(LargeBinary)  # (D,) float64
    sha256: Mapped[str] = mapped_column(String(64))  # over mean, m2 and n
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """A named counter the database increments atomically (`UPDATE ... SET value = value + 1
    RETURNING value`): `operation_seq` numbers the operations. The row stays locked until the
    transaction ends, so two transactions never get the same number, and a rolled-back one gives
    its number back (no gaps)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int]


class Setting(Base):
    """A workspace setting: a key and a JSON value."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value_json: Mapped[dict | list | str | int | float | bool | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
