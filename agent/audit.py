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

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from knowledger.agent.live import LiveModel, expected_state
from knowledger.agent.operations import json_safe
from knowledger.agent.scheduler import EditSettings, conflict_key
from knowledger.agent.workspace import Workspace, iso
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import KnowledgerError
from knowledger.ledger.models import AuditStatus, OperationKind, utcnow

FACT_CHUNK = 256  # facts per fact_metrics call: the progress bar's step
PPL_SEQ_LEN = 128
HEAL_ROUNDS = 3  # heal, audit again; at most this many times
BASE_PPL_KEY = "audit_base_ppl"


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


# --- device ---------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KnowledgerError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}") from e


@contextmanager
def on_device(model, device: torch.device):
    """The model on `device` for the duration, then back where it was."""
    home = next(model.parameters()).device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- what is audited --------------------------------------------------------------------------------
@dataclass
class AuditedFact:
    id: int
    request: object  # editors.requests.EditRequest
    holders: list[int]  # seqs of the active operations holding it, in order
    reference: dict | None  # per-fact metrics recorded by the latest holder right after it
    overridden_by: int | None = None


def active_audit_facts(s, base_model_id: int, head_seq: int) -> tuple[list[AuditedFact], list[dict]]:
    """(the active facts at head_seq with their reference metrics, orphan operations)."""
    from knowledger.agent.operations import edit_requests

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


def measure(model, tokenizer, facts: list[AuditedFact], *, batch_size: int,
            progress: bool | None) -> list[dict]:
    """fact_metrics of every fact, FACT_CHUNK facts a call, with a progress bar."""
    from knowledger.editors.evaluate import fact_metrics

    out: list[dict] = []
    with tqdm(total=len(facts), desc="audit", unit="fact", file=sys.stderr,
              disable=None if progress is None else not progress) as bar:
        for i in range(0, len(facts), FACT_CHUNK):
            chunk = facts[i:i + FACT_CHUNK]
            out += fact_metrics(model, tokenizer, [f.request for f in chunk], batch_size=batch_size)
            bar.update(len(chunk))
    return out


# --- model health -------------------------------------------------------------------------------
def stats_tokens_used(settings: EditSettings, model) -> int:
    """How many corpus tokens the key statistics used (settings, overrides, else the preset)."""
    if settings.stats_tokens:
        return int(settings.stats_tokens)
    if settings.hparams_overrides.get("stats_tokens"):
        return int(settings.hparams_overrides["stats_tokens"])
    from knowledger.editors.hparams import load_preset, preset_for

    hp = load_preset(settings.hparams_preset) if settings.hparams_preset else preset_for(model)
    return int(hp.stats_tokens)


def heldout_corpus(settings: EditSettings, base_sha256: str, stats_tokens: int):
    """(the corpus the statistics came from, None) or (None, why there is none)."""
    from knowledger.editors.corpus import Corpus
    from knowledger.editors.models import cache_root

    if settings.stats_corpus:
        path = Path(settings.stats_corpus)
        if not path.is_file():
            return None, f"the statistics corpus {path} is missing: perplexity not checked"
    else:  # the text the base model sampled for the statistics (editors.stats, seed 0)
        path = cache_root() / "corpora" / f"{base_sha256[:16]}-{stats_tokens}-0.txt"
        if not path.is_file():
            return None, ("no statistics corpus (statistics from sampled text that is not in the "
                          "cache): perplexity not checked; `knowledger apply --corpus FILE` sets one")
    return Corpus.from_path(path), None


def health(ws: Workspace, live: LiveModel, settings: EditSettings, audit: AuditSettings,
           device: torch.device, notes: list[str]) -> dict:
    """Perplexity vs the base model and the edited layers' norm growth (see the module docstring)."""
    from knowledger.editors.health import heldout_chunks, perplexity, weight_norms

    out: dict = dict(perplexity=None, base_perplexity=None, ppl_ratio=None, layers={})
    model, tok = live.model, live.tokenizer
    if audit.audit_heldout_tokens > 0:
        skip = stats_tokens_used(settings, model)
        corpus, why = heldout_corpus(settings, live.base_sha256, skip)
        chunks = None
        if corpus is not None:
            try:
                chunks = heldout_chunks(corpus, tok, audit.audit_heldout_tokens, skip_tokens=skip,
                                        seq_len=PPL_SEQ_LEN)
            except ValueError as e:
                why = f"{e}: perplexity not checked"
        if chunks is None:
            notes.append(why)
            out["note"] = why
        else:
            n = sum(len(c) for c in chunks)
            key = (f"{BASE_PPL_KEY}:{live.base_sha256[:16]}:{corpus.sha256[:16]}:{skip}:"
                   f"{audit.audit_heldout_tokens}")
            with ws.reading() as s:
                cached = repo.get_setting(s, key)
            ppl = perplexity(model, tok, chunks, device=device)
            if cached is None:
                with live.at_base():
                    base_ppl = perplexity(model, tok, chunks, device=device)
                with ws.writing() as s:
                    repo.set_setting(s, key, dict(perplexity=base_ppl, tokens=n, corpus=str(corpus.path),
                                                  computed_at=iso(utcnow())))
            else:
                base_ppl = float(cached["perplexity"])
            out.update(perplexity=ppl, base_perplexity=base_ppl, ppl_ratio=ppl / base_ppl,
                       heldout_tokens=n, corpus=str(corpus.path), skip_tokens=skip)
    params = sorted({(a.delta.layer, a.delta.param) for a in live.active})
    if params:
        layer_of = {}
        for layer, name in params:
            layer_of.setdefault(layer, name)  # one edited projection per layer (editors.model_spec)
        current = {layer: model.get_parameter(name) for layer, name in layer_of.items()}
        base = {layer: live._base_value(name) for layer, name in layer_of.items()}
        norms = weight_norms(current, base)
        out["layers"] = {str(layer): dict(v, param=layer_of[layer]) for layer, v in norms.items()}
    return out


def dangers(h: dict, orphans: list[dict], audit: AuditSettings) -> list[str]:
    found = []
    if h.get("ppl_ratio") is not None and h["ppl_ratio"] > audit.audit_ppl_ratio:
        found.append(f"held-out perplexity {h['perplexity']:.3g} is {h['ppl_ratio']:.3f}× the base "
                     f"model's {h['base_perplexity']:.3g} (> {audit.audit_ppl_ratio:g})")
    for layer, v in h.get("layers", {}).items():
        if v["delta_rel"] > audit.audit_norm_ratio:
            found.append(f"layer {layer}: ||W - W_base|| / ||W_base|| = {v['delta_rel']:.3f} "
                         f"(> {audit.audit_norm_ratio:g})")
    for o in orphans:
        found.append(f"operation seq {o['seq']} ({o['kind']}) is active but none of its facts "
                     f"({', '.join(f'#{i}' for i in o['facts'])}) is applied any more: "
                     f"`knowledger audit --heal` or `knowledger undo --op {o['seq']}` removes it")
    return found


# --- one audit ------------------------------------------------------------------------------------
def _fact_view(f: AuditedFact, m: dict, reasons: list[str], drop: float | None) -> dict:
    r = f.request
    return dict(id=f.id, text=r.text, target_new=r.target_new, target_true=r.target_true,
                held_by=f.holders, p_new=m.get("rewrite_p_new"), p_true=m.get("rewrite_p_true"),
                rank=m.get("rewrite_rank"), margin=m.get("rewrite_margin"),
                reference_margin=(f.reference or {}).get("rewrite_margin"), margin_drop=drop,
                rewrite_acc=m.get("rewrite_acc"), overridden_by=f.overridden_by, reasons=reasons)


def audit_live(ws: Workspace, live: LiveModel, head_seq: int, device: torch.device, *,
               batch_size: int | None = None, progress: bool | None = None,
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
        view = json_safe(_fact_view(f, m, reasons, drop))
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
def audit(ws: Workspace, *, device: str = "auto", heal_drift: bool = False, batch_size: int | None = None,
          progress: bool | None = None, wait: bool = False) -> dict:
    """Audit the live model; with heal_drift, heal and audit again. `healthy` is the final verdict.

    Returns dict(runs=[audit reports], heal=None|{operations, healed, failed}, healthy, notes,
    head_seq, weights_sha256).
    """
    dev = resolve_device(device)
    if not heal_drift:
        from knowledger.agent.export import open_for_reading

        live, head, notes = open_for_reading(ws, "audit")
        first = audit_live(ws, live, head, dev, batch_size=batch_size, progress=progress, notes=notes)
        return dict(runs=[first], heal=None, healthy=first["healthy"], notes=notes, head_seq=head,
                    weights_sha256=live.state_hash)
    from knowledger.agent.heal import heal
    from knowledger.agent.operations import session

    with session(ws, what="audit --heal", wait=wait, progress=bool(progress)) as es:
        first = audit_live(ws, es.live, es.head_seq, dev, batch_size=batch_size, progress=progress,
                           notes=es.notes)
        runs, healed, tried = [first], None, set()
        for _ in range(HEAL_ROUNDS):  # healing some facts can push others off: heal those too
            last = runs[-1]
            if not last["orphans"] and set(last["drifted_ids"]) <= tried:
                break  # healthy, or only facts a heal already failed on
            h = heal(es, last)
            tried |= set(last["drifted_ids"])
            healed = h if healed is None else dict(operations=healed["operations"] + h["operations"],
                                                   healed=healed["healed"] + h["healed"], failed=h["failed"])
            runs.append(audit_live(ws, es.live, es.head_seq, dev, batch_size=batch_size,
                                   progress=progress, notes=es.notes))
        if healed is not None:
            healed.update(rounds=len(runs) - 1, still_drifted=runs[-1]["drifted_ids"])
        return dict(runs=runs, heal=healed, healthy=runs[-1]["healthy"], notes=es.notes,
                    head_seq=es.head_seq, weights_sha256=es.live.state_hash)


def exit_code(report: dict) -> int:
    """0 healthy, 1 drift or danger found (errors exit 2 in the CLI)."""
    return 0 if report["healthy"] else 1


def audit_after_apply(ws: Workspace, apply_report: dict, *, progress: bool | None = None) -> dict | None:
    """The periodic audit: after `apply`, audit when `audit_every` new apply/redo operations were
    committed since the last completed audit (None when it is not due or not enabled)."""
    if apply_report.get("dry_run") or not any(op["status"] == "committed"
                                              for op in apply_report.get("operations", [])):
        return None
    with ws.reading() as s:
        every = AuditSettings.load(s).audit_every
        if every <= 0:
            return None
        base = repo.current_base_model(s)
        last = repo.last_audit_run(s)
        since = (last.head_seq or 0) if last is not None else 0
        n = repo.count_operations_since(s, base.id, since, kinds=(OperationKind.apply, OperationKind.redo))
    if n < every:
        return None
    report = audit(ws, progress=progress)
    report["due"] = dict(audit_every=every, operations_since_last_audit=n)
    return report


def head_state(ws: Workspace) -> tuple:
    """(base id, head seq, head weights hash): what `watch` compares to see the ledger move."""
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
        want, head = expected_state(s, base)
        return base.id, head, want


def watch(ws: Workspace, *, interval_s: float, on_report, on_error, device: str = "auto",
          heal_drift: bool = False, batch_size: int | None = None, progress: bool | None = None,
          max_audits: int | None = None, sleep=time.sleep) -> int:
    """Audit now, then whenever the ledger head moves (polled every min(interval, 5 s)) or every
    interval_s seconds. Returns the exit code of the last audit when max_audits is reached;
    KeyboardInterrupt propagates (the CLI turns it into a clean exit)."""
    poll = max(0.01, min(interval_s, 5.0))
    last_state, last_at, n, code = None, -math.inf, 0, 0
    while True:
        state = head_state(ws)
        if state != last_state or time.monotonic() - last_at >= interval_s:
            try:
                report = audit(ws, device=device, heal_drift=heal_drift, batch_size=batch_size,
                               progress=progress, wait=True)
                code = exit_code(report)
                on_report(report)
            except (KnowledgerError, ValueError) as e:
                code = 2
                on_error(e)
            last_state, last_at, n = head_state(ws), time.monotonic(), n + 1
            if max_audits is not None and n >= max_audits:
                return code
        sleep(poll)


def runs_view(ws: Workspace, limit: int | None = None) -> list[dict]:
    """The recorded audit runs, oldest first, as plain dicts (report, JSON)."""
    with ws.reading() as s:
        return [dict(id=r.id, started_at=iso(r.started_at), finished_at=iso(r.finished_at),
                     head_seq=r.head_seq, device=r.device, status=r.status.value,
                     metrics=r.metrics_json or {}) for r in repo.list_audit_runs(s, limit=limit)]

