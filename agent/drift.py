"""What the audit checks per fact: the active facts with their reference metrics, the orphan
operations, and the verdict on one fact (drifted, overridden, or holding). See agent.audit."""
from __future__ import annotations

from dataclasses import dataclass

from knowledger.agent.records import edit_requests
from knowledger.agent.scheduler import conflict_key
from knowledger.ledger import repository as repo


@dataclass
class AuditedFact:
    id: int
    request: object  # editors.requests.EditRequest
    holders: list[int]  # seqs of the active operations holding it, in order
    reference: dict | None  # per-fact metrics recorded by the latest holder right after it
    overridden_by: int | None = None


def active_audit_facts(s, base_model_id: int, head_seq: int) -> tuple[list[AuditedFact], list[dict]]:
    """(the active facts at head_seq with their reference metrics, orphan operations)."""
    links = repo.active_fact_links(s, base_model_id, up_to_seq=head_seq)
    by_fact: dict[int, AuditedFact] = {}
    rows = {}
    for op, link, req in links:
        after = (link.metrics_json or {}).get("after")
        f = by_fact.get(req.id)
        if f is None:
            rows[req.id] = req
            by_fact[req.id] = f = AuditedFact(req.id, None, [], None)
        f.holders.append(op.seq)
        if after:
            f.reference = dict(after, seq=op.seq)
    facts = sorted(by_fact.values(), key=lambda f: (f.holders[0], f.id))
    for f, r in zip(facts, edit_requests([rows[f.id] for f in facts])):
        f.request = r
    newest: dict[tuple, AuditedFact] = {}
    for f in facts:  # applied later wins in the weights
        newest[conflict_key(rows[f.id].prompt, rows[f.id].subject)] = f
    for f in facts:
        winner = newest[conflict_key(rows[f.id].prompt, rows[f.id].subject)]
        if winner is not f:
            f.overridden_by = winner.id
    holding = {op.id for op, _, _ in links}
    orphans = []
    for op in repo.active_operations(s, base_model_id, up_to_seq=head_seq):
        if op.id in holding:
            continue
        handled = [link for link, _ in repo.operation_facts(s, op.id) if link.outcome.value == "applied"]
        if handled:  # it applied facts, and none of them is applied any more
            orphans.append(dict(seq=op.seq, id=op.id, kind=op.kind.value,
                                facts=[link.request_id for link in handled]))
    return facts, orphans


def judge(f: AuditedFact, m: dict, margin_drop: float) -> tuple[bool, list[str], float | None]:
    """(drifted, reasons, margin drop since the reference) for one fact's metrics now."""
    reasons = []
    if m.get("rewrite_acc", 0.0) < 1.0:
        reasons.append("target_new is no longer the top-1 continuation of the rewrite prompt")
    ref = (f.reference or {}).get("rewrite_margin")
    now = m.get("rewrite_margin")
    drop = None
    if ref is not None and now is not None:
        drop = float(ref) - float(now)
        if drop > margin_drop:
            reasons.append(f"margin logP(new)-logP(true) fell by {drop:.2f} nats "
                           f"({ref:.2f} → {now:.2f}) > {margin_drop:g}")
    if f.overridden_by is not None:
        return False, [f"overridden by the later fact #{f.overridden_by} (same subject and prompt)"], drop
    return bool(reasons), reasons, drop


def fact_view(f: AuditedFact, m: dict, reasons: list[str], drop: float | None) -> dict:
    r = f.request
    return dict(id=f.id, text=r.text, target_new=r.target_new, target_true=r.target_true,
                held_by=f.holders, p_new=m.get("rewrite_p_new"), p_true=m.get("rewrite_p_true"),
                rank=m.get("rewrite_rank"), margin=m.get("rewrite_margin"),
                reference_margin=(f.reference or {}).get("rewrite_margin"), margin_drop=drop,
                rewrite_acc=m.get("rewrite_acc"), overridden_by=f.overridden_by, reasons=reasons)
