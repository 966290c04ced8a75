"""Drift audits: do the applied edits still hold, and is the edited model still healthy?

An edit is checked when it is applied, on its own batch only; later batches (and the re-applied
rest of an undone batch) can push it off. An audit re-evaluates every *active* fact (applied, held
by an active operation of the current base model) on the live weights and records one `audit_runs`
row with one `audit_results` row per fact.

Per fact (editors.evaluate.fact_metrics on the rewrite prompt, paraphrases and neighbourhood):
P(target_new) and P(target_true), the rank of target_new's first token, the success flags. A fact
has **drifted** when
- it fails the success criterion used at apply time (agent.operations.CRITERION: `rewrite_acc`
  == 1, target_new top-1 on the rewrite prompt), or
- its margin logP(new) − logP(true) on the rewrite prompt fell by more than `audit_margin_drop`
  nats since it was applied: compared with `operation_requests.metrics_json["after"]` of the
  latest active operation holding it (the apply, or the heal that last restored it). Facts
  recorded before `rewrite_margin` existed, or without a target_true, have no margin: only the
  criterion applies to them.
A fact whose subject and prompt (compared as the scheduler compares them) were edited again by a
later active fact is **overridden**, not drifted: the newer edit is meant to win. Overridden facts
are reported and never healed.

Model health in the same run: perplexity of the live model on a held-out slice of the statistics
corpus (the text after the tokens the key statistics used) against the base model's (computed
inside `LiveModel.at_base()` once, cached in the settings under the base weights, corpus and token
counts), and per edited layer ‖W − W_base‖_F / ‖W_base‖_F (editors.health). **Danger**: a
perplexity ratio above `audit_ppl_ratio`, a layer above `audit_norm_ratio`, or an *orphan*: an
active operation whose facts are all no longer applied (its delta changes the weights for facts
that are reverted; this happens when the original operation of a healed fact is undone).

`heal_drift=True` (under the workspace lock): orphan operations are undone (an `undo` operation
each), then the drifted facts are re-applied on the live weights as `heal` operations (agent.heal,
which also says what undo does to them). Another audit then records the state after healing; since a heal can push other facts
off (sequential interference, as any edit), facts that drift then are healed in turn, for at most
HEAL_ROUNDS rounds, and never a fact whose heal already failed in this run.

Thresholds and the periodic audit are workspace settings (`AuditSettings`, set with `knowledger
config set`); their defaults are explained in docs/audit.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from knowledger.agent.device import on_device, resolve_device
from knowledger.agent.drift import AuditedFact, active_audit_facts, fact_view, judge
from knowledger.agent.heal import HealResult
from knowledger.agent.jsonutil import iso, json_safe
from knowledger.agent.live import LiveModel, expected_state
from knowledger.agent.model_health import BASE_PPL_KEY, dangers, health  # noqa: F401 (BASE_PPL_KEY: tests)
from knowledger.agent.scheduler import EditSettings
from knowledger.agent.workspace import Workspace
from knowledger.editors.progress import Progress, report
from knowledger.ledger import repository as repo
from knowledger.ledger.models import AuditStatus, OperationKind, utcnow

FACT_CHUNK = 256  # facts per fact_metrics call: the progress callback's step
HEAL_ROUNDS = 3  # heal, audit again; at most this many times


@dataclass(frozen=True)
class AuditSettings:
    """Audit thresholds and the periodic audit (workspace settings; docs/audit.md says why)."""

    audit_every: int = 0  # apply audits after this many new apply/redo operations; 0: never
    audit_margin_drop: float = 2.0  # nats: the odds of new vs true shrank e² ≈ 7.4×
    audit_ppl_ratio: float = 1.10  # held-out perplexity / base perplexity
    audit_norm_ratio: float = 0.5  # ‖W − W_base‖_F / ‖W_base‖_F of an edited layer
    audit_heldout_tokens: int = 8192  # 0: no perplexity check
    audit_batch_size: int = 0  # prompts per forward pass; 0: 64 on CPU, 256 on CUDA

    @classmethod
    def load(cls, session) -> AuditSettings:
        stored = {k: repo.get_setting(session, k) for k in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in stored.items() if v is not None})

    def thresholds(self) -> dict:
        return dict(margin_drop=self.audit_margin_drop, ppl_ratio=self.audit_ppl_ratio,
                    norm_ratio=self.audit_norm_ratio)


def measure(model, tokenizer, facts: list[AuditedFact], *, batch_size: int,
            progress: Progress | None = None) -> list[dict]:
    """fact_metrics of every fact, FACT_CHUNK facts a call, reported as phase "audit"."""
    from knowledger.editors.evaluate import fact_metrics

    out: list[dict] = []
    report(progress, "audit", 0, len(facts))
    for i in range(0, len(facts), FACT_CHUNK):
        chunk = facts[i:i + FACT_CHUNK]
        out += fact_metrics(model, tokenizer, [f.request for f in chunk], batch_size=batch_size)
        report(progress, "audit", len(out), len(facts))
    return out


# --- one audit ------------------------------------------------------------------------------------
def audit_live(ws: Workspace, live: LiveModel, head_seq: int, device: torch.device, *,
               batch_size: int | None = None, progress: Progress | None = None,
               notes: list[str] | None = None) -> dict:
    """Audit the given live model (whose weights are the ledger's at head_seq) and record the run."""
    from knowledger.editors.evaluate import aggregate

    started, t0 = utcnow(), time.perf_counter()
    notes = notes if notes is not None else []
    with ws.reading() as s:
        settings, audit = EditSettings.load(s), AuditSettings.load(s)
        facts, orphans = active_audit_facts(s, live.base_model_id, head_seq)
        now = expected_state(s, repo.current_base_model(s))[1]
    if now != head_seq and orphans:  # an undo committed meanwhile makes its target look orphaned
        notes.append(f"the ledger moved on during the audit (seq {head_seq} → {now}): orphan check skipped")
        orphans = []
    bs = batch_size or audit.audit_batch_size or (256 if device.type == "cuda" else 64)
    try:
        with on_device(live.model, device):
            per_fact = measure(live.model, live.tokenizer, facts, batch_size=bs, progress=progress)
            h = health(ws, live, settings, audit, device, notes)
    except Exception as e:
        with ws.writing() as s:
            repo.record_audit_run(s, started_at=started, head_seq=head_seq, device=str(device),
                                  status=AuditStatus.failed,
                                  metrics=dict(error=f"{type(e).__name__}: {e}"[:2000]))
        raise
    results, drifted, overridden = [], [], []
    margin_flags = 0
    for f, m in zip(facts, per_fact):
        is_drifted, reasons, drop = judge(f, m, audit.audit_margin_drop)
        view = json_safe(fact_view(f, m, reasons, drop))
        if is_drifted:
            drifted.append(view)
            margin_flags += m.get("rewrite_acc", 0.0) >= 1.0
        elif f.overridden_by is not None:
            overridden.append(view)
        results.append(repo.AuditFact(f.id, json_safe(dict(
            metrics=m, held_by=f.holders, reference_seq=(f.reference or {}).get("seq"),
            reference_margin=(f.reference or {}).get("rewrite_margin"), margin_drop=drop,
            overridden_by=f.overridden_by, reasons=reasons)), is_drifted))
    danger = dangers(h, orphans, audit)
    agg = aggregate(per_fact) if per_fact else {}
    counted = [m for f, m in zip(facts, per_fact) if f.overridden_by is None]
    metrics = json_safe(dict(
        facts=len(facts), drifted=len(drifted), drifted_by_margin_only=margin_flags,
        overridden=len(overridden), success_rate=(sum(m.get("rewrite_acc", 0.0) >= 1.0 for m in counted)
                                                  / len(counted)) if counted else None,
        aggregate=agg, health=h, danger=danger, orphans=orphans, thresholds=audit.thresholds(),
        weights_sha256=live.state_hash, batch_size=bs, seconds=time.perf_counter() - t0,
        healthy=not drifted and not danger))
    with ws.writing() as s:
        run = repo.record_audit_run(s, started_at=started, head_seq=head_seq, device=str(device),
                                    status=AuditStatus.completed, metrics=metrics, results=results)
        run_id = run.id
    return dict(audit_run_id=run_id, head_seq=head_seq, device=str(device), **metrics,
                drifted_facts=drifted, overridden_facts=overridden,
                drifted_ids=[v["id"] for v in drifted])


# --- the API the CLI calls ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditResult:
    """`audit`: the runs (one, or one per heal round plus the first), the healing, the verdict."""

    runs: list[dict]  # audit_live's reports, as recorded
    heal: HealResult | None
    healthy: bool
    notes: list[str]
    head_seq: int
    weights_sha256: str
    due: dict | None = None  # the periodic audit: why it was due


def audit(ws: Workspace, *, device: str | None = "auto", heal_drift: bool = False,
          batch_size: int | None = None, progress: Progress | None = None,
          wait: bool = False) -> AuditResult:
    """Audit the live model; with heal_drift, heal and audit again. `healthy` is the final verdict."""
    dev = resolve_device(device)
    if not heal_drift:
        from knowledger.agent.export import open_for_reading

        live, head, notes = open_for_reading(ws, "audit")
        first = audit_live(ws, live, head, dev, batch_size=batch_size, progress=progress, notes=notes)
        return AuditResult(runs=[first], heal=None, healthy=first["healthy"], notes=notes,
                           head_seq=head, weights_sha256=live.state_hash)
    from knowledger.agent.heal import heal
    from knowledger.agent.session import session

    with session(ws, what="audit --heal", wait=wait, progress=progress) as es:
        first = audit_live(ws, es.live, es.head_seq, dev, batch_size=batch_size, progress=progress,
                           notes=es.notes)
        runs, healed, tried = [first], None, set()
        for _ in range(HEAL_ROUNDS):  # healing some facts can push others off: heal those too
            last = runs[-1]
            if not last["orphans"] and set(last["drifted_ids"]) <= tried:
                break  # healthy, or only facts a heal already failed on
            h = heal(es, last)
            tried |= set(last["drifted_ids"])
            healed = h if healed is None else healed.then(h)
            runs.append(audit_live(ws, es.live, es.head_seq, dev, batch_size=batch_size,
                                   progress=progress, notes=es.notes))
        if healed is not None:
            healed = replace(healed, rounds=len(runs) - 1, still_drifted=runs[-1]["drifted_ids"])
        return AuditResult(runs=runs, heal=healed, healthy=runs[-1]["healthy"], notes=es.notes,
                           head_seq=es.head_seq, weights_sha256=es.live.state_hash)


def audit_due(ws: Workspace) -> dict | None:
    """Whether the periodic audit is due: `audit_every` new apply/redo operations committed since
    the last completed audit (dict(audit_every, operations_since_last_audit)), else None."""
    with ws.reading() as s:
        every = AuditSettings.load(s).audit_every
        if every <= 0:
            return None
        base = repo.current_base_model(s)
        last = repo.last_audit_run(s)
        since = (last.head_seq or 0) if last is not None else 0
        n = repo.count_operations_since(s, base.id, since, kinds=(OperationKind.apply, OperationKind.redo))
    return dict(audit_every=every, operations_since_last_audit=n) if n >= every else None


def audit_if_due(ws: Workspace, *, progress: Progress | None = None,
                 device: str | None = "auto") -> AuditResult | None:
    """The periodic audit (agent.apply runs it after an apply that committed something)."""
    due = audit_due(ws)
    if due is None:
        return None
    return replace(audit(ws, progress=progress, device=device), due=due)


def runs_view(ws: Workspace, limit: int | None = None) -> list[dict]:
    """The recorded audit runs, oldest first, as plain dicts (report, JSON)."""
    with ws.reading() as s:
        return [dict(id=r.id, started_at=iso(r.started_at), finished_at=iso(r.finished_at),
                     head_seq=r.head_seq, device=r.device, status=r.status.value,
                     metrics=r.metrics_json or {}) for r in repo.list_audit_runs(s, limit=limit)]
