"""Drift audits on the editable tiny model: what is drift, what heal records, health, the report."""
import math

import pytest
import torch

from knowledger.agent import audit as au, config as cfg, operations as ops, watch as watching
from knowledger.agent.live import ActiveDelta, factors_from_delta, open_live, stored_delta
from knowledger.agent.report import write_report
from knowledger.agent.workspace import open_workspace
from knowledger.editors.evaluate import fact_metrics, score
from knowledger.editors.requests import EditRequest
from knowledger.editors.result import LayerDelta
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import KnowledgerError
from knowledger.ledger.models import AuditResult, AuditRun, Operation, OperationKind, Request
from tests.agent.helpers import GOOD, STATS_TOKENS, call, counter_edit, exit_status, plain_undo, rows, submit

from tests.agent.helpers import OVERRIDES


def apply(db, corpus):
    return call(ops.apply_pending, db, corpus=corpus, stats_tokens=STATS_TOKENS, overrides=OVERRIDES)


@pytest.fixture
def applied(ws, corpus):
    """Four facts with an old answer applied by seq 1; the tiny model's edits are large (‖ΔW‖ is
    about half of ‖W‖), so the norm danger threshold is raised out of the way."""
    for f in GOOD[:4]:
        submit(ws, *f, target_true="Paris")
    apply(ws, corpus)
    call(cfg.set_value, ws, key="audit_norm_ratio", raw="100")
    return ws


def test_fact_metrics_report_the_rewrite_margin_rank_and_p_true(tiny_dir):
    from knowledger.editors.models import load_model

    model, tok = load_model(str(tiny_dir))
    r = EditRequest("Home of {}", "Bob", "Rome", target_true="Paris")
    (m,) = fact_metrics(model, tok, [r])
    new, true = score(model, tok, [("Home of Bob", "Rome"), ("Home of Bob", "Paris")])
    assert m["rewrite_margin"] == pytest.approx(new.logprob - true.logprob)
    assert m["rewrite_p_true"] == pytest.approx(math.exp(true.logprob)) and m["rewrite_rank"] == new.rank
    (m,) = fact_metrics(model, tok, [EditRequest("Home of {}", "Bob", "Rome")])
    assert "rewrite_margin" not in m and "rewrite_rank" in m


def test_an_audit_right_after_apply_finds_no_drift_and_records_the_run(applied):
    report = call(au.audit, applied)
    [run] = report["runs"]
    assert report["healthy"] and exit_status(report) == 0 and report["heal"] is None
    assert (run["facts"], run["drifted"], run["success_rate"], run["head_seq"]) == (4, 0, 1.0, 1)
    [row] = rows(applied, AuditRun)
    assert (row.status.value, row.head_seq, row.device, row.metrics_json["healthy"]) == ("completed", 1, "cpu", True)
    results = rows(applied, AuditResult, audit_run_id=row.id)
    assert len(results) == 4 and not any(r.drifted for r in results)
    for r in results:  # same weights as at apply time: the margin has not moved
        assert r.metrics_json["margin_drop"] == pytest.approx(0.0, abs=1e-4)
        assert r.metrics_json["reference_seq"] == 1
    h = run["health"]
    assert h["skip_tokens"] == STATS_TOKENS and h["heldout_tokens"] > 1000
    assert 1.0 <= h["ppl_ratio"] < 1.1 and set(h["layers"]) == {"1", "2"}
    # the base perplexity is the unedited model's, cached in the settings and reused
    with open_workspace(applied) as w, w.reading() as s:
        cached = [k for k in repo.all_settings(s) if k.startswith(au.BASE_PPL_KEY)]
    assert len(cached) == 1
    again = call(au.audit, applied)["runs"][0]["health"]
    assert again["base_perplexity"] == h["base_perplexity"] and again["perplexity"] == h["perplexity"]


def test_large_weight_changes_are_danger(ws, corpus):
    submit(ws, *GOOD[0])
    apply(ws, corpus)
    call(cfg.set_value, ws, key="audit_norm_ratio", raw="0.01")
    report = call(au.audit, ws)
    run = report["runs"][0]
    assert run["drifted"] == 0 and not report["healthy"] and exit_status(report) == 1
    assert [d.split(":")[0] for d in run["danger"]] == ["layer 1", "layer 2"]
    assert run["thresholds"]["norm_ratio"] == 0.01


def test_weakened_edits_are_drift_heal_restores_them_and_replay_still_matches(applied):
    counter_edit(applied, 0.8)
    report = call(au.audit, applied)
    run = report["runs"][0]
    assert not report["healthy"] and exit_status(report) == 1 and run["drifted_ids"] == [1, 2, 3, 4]
    assert all(f["margin_drop"] > 0 and f["reasons"] for f in run["drifted_facts"])
    assert sum(r.drifted for r in rows(applied, AuditResult, audit_run_id=run["audit_run_id"])) == 4

    healed = call(au.audit, applied, heal_drift=True)
    assert healed["healthy"] and [r["drifted"] for r in healed["runs"]] == [4, 0]
    [op] = rows(applied, Operation, kind=OperationKind.heal)
    assert (op.seq, op.status.value, op.metrics_json["audit_run_id"]) == (3, "committed", healed["runs"][0]["audit_run_id"])
    assert healed["heal"]["healed"] == [1, 2, 3, 4] and healed["head_seq"] == 3
    assert all(r.status.value == "applied" for r in rows(applied, Request))
    with open_workspace(applied) as w, w.reading() as s:
        assert repo.request_history(s, 1)[-1].reason == f"healed after drifting (audit #{healed['runs'][0]['audit_run_id']}) (operation seq 3)"
        assert [o.seq for o in repo.active_operations(s, 1)] == [1, 2, 3]
        assert [(op.seq, req.id) for op, req in repo.active_facts(s, 1)] == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert call(au.audit, applied)["healthy"]  # the next audit is clean
    assert call(ops.replay, applied)["mismatches"] == []  # heal deltas are active deltas like apply's


def test_undoing_a_heal_keeps_its_facts_applied_and_brings_the_drift_back(applied):
    counter_edit(applied, 0.8)
    call(au.audit, applied, heal_drift=True)  # heal: seq 3
    report = call(ops.undo, applied, seq=3)
    assert [(o["kind"], o["target_seq"], o["reverted"]) for o in report["operations"]] == [("undo", 3, [])]
    assert {r.status.value for r in rows(applied, Request)} == {"applied"}
    assert call(au.audit, applied)["runs"][0]["drifted_ids"] == [1, 2, 3, 4]
    with pytest.raises(KnowledgerError, match="heals are not redone"):
        call(ops.redo, applied, seq=3)


def test_undoing_the_original_operation_of_a_healed_fact_undoes_the_heal_too(applied):
    counter_edit(applied, 0.8)
    call(au.audit, applied, heal_drift=True)  # heal: seq 3
    report = call(ops.undo, applied, seq=1)
    assert [(o["seq"], o["target_seq"], o["reverted"]) for o in report["operations"]] == [
        (4, 3, []), (5, 1, [1, 2, 3, 4])]
    assert {r.status.value for r in rows(applied, Request)} == {"reverted"}
    with open_workspace(applied) as w, w.reading() as s:
        assert [o.seq for o in repo.active_operations(s, 1)] == [2]  # the counter-edit alone
    assert call(au.audit, applied)["runs"][0]["facts"] == 0
    # redo of the original reuses its deltas; its heal stays undone, so the facts drift again
    call(ops.redo, applied, seq=1)
    assert call(au.audit, applied)["runs"][0]["drifted_ids"] == [1, 2, 3, 4]


def test_undoing_one_healed_fact_undoes_heal_and_batch_and_reapplies_the_rest(applied):
    counter_edit(applied, 0.8)
    call(au.audit, applied, heal_drift=True)  # heal: seq 3
    report = call(ops.undo, applied, fact_id=2)
    assert [(o["kind"], o["target_seq"], o["reverted"]) for o in report["operations"]] == [
        ("undo", 3, []), ("undo", 1, [1, 2, 3, 4]), ("apply", None, [])]
    rest = report["operations"][2]  # recomputed on the weakened weights: some may fail
    assert sorted(rest["applied"] + [f["id"] for f in rest["failed"]]) == [1, 3, 4]
    assert rows(applied, Request, id=2)[0].status.value == "reverted"
    with open_workspace(applied) as w, w.reading() as s:
        assert [o.seq for o in repo.active_operations(s, 1)] == [2, 6]


def test_redo_of_a_healed_fact_reuses_its_original_operation_not_the_heal(ws, corpus):
    submit(ws, *GOOD[0], target_true="Paris")
    apply(ws, corpus)  # seq 1 holds #1 alone
    call(cfg.set_value, ws, key="audit_norm_ratio", raw="100")
    counter_edit(ws, 0.8)  # seq 2
    assert call(au.audit, ws, heal_drift=True)["heal"]["healed"] == [1]  # seq 3
    call(ops.undo, ws, fact_id=1)  # seq 4 undoes the heal, seq 5 the apply
    [op] = call(ops.redo, ws, fact_id=1)["operations"]
    assert (op["seq"], op["kind"], op["target_seq"], op["applied"]) == (6, "redo", 1, [1])
    with open_workspace(ws) as w, w.reading() as s:
        redo = repo.get_operation_by_seq(s, 6)
        assert redo.metrics_json["reused_deltas"] and [o.seq for o in repo.active_operations(s, 1)] == [2, 6]


def test_the_plain_ledger_undo_of_an_original_leaves_an_orphan_heal_that_heal_removes(applied):
    counter_edit(applied, 0.8)
    call(au.audit, applied, heal_drift=True)  # heal: seq 3
    plain_undo(applied, 1)  # an undo that leaves the heal on top of it: seq 4
    assert {r.status.value for r in rows(applied, Request)} == {"reverted"}
    report = call(au.audit, applied)
    run = report["runs"][0]
    assert run["facts"] == 0 and [o["seq"] for o in run["orphans"]] == [3] and exit_status(report) == 1
    assert "operation seq 3 (heal) is active but none of its facts" in run["danger"][0]
    fixed = call(au.audit, applied, heal_drift=True)
    assert fixed["healthy"] and fixed["heal"]["operations"][0]["kind"] == "undo"
    assert fixed["heal"]["operations"][0]["target_seq"] == 3
    with open_workspace(applied) as w, w.reading() as s:
        assert [o.seq for o in repo.active_operations(s, 1)] == [2]
    live, head = call(lambda w: open_live(w, refresh=False), applied)
    assert head == 5 and live.state_hash == fixed["weights_sha256"]


def test_an_older_fact_edited_again_later_is_overridden_not_drifted(applied, corpus):
    submit(applied, "Home of {}", "Bob", "Berlin", target_true="Paris")  # fact #5 rewrites fact #1
    apply(applied, corpus)
    run = call(au.audit, applied, heal_drift=True)["runs"][0]
    assert run["overridden"] == 1 and run["overridden_facts"][0]["overridden_by"] == 5
    assert 1 not in run["drifted_ids"] and not rows(applied, Operation, kind=OperationKind.heal)


def test_judge_margin_drop_criterion_and_facts_without_a_recorded_margin():
    f = au.AuditedFact(1, None, [1], dict(rewrite_margin=5.0, seq=1))
    assert au.judge(f, dict(rewrite_acc=1.0, rewrite_margin=3.5), 2.0)[:2] == (False, [])
    drifted, reasons, drop = au.judge(f, dict(rewrite_acc=1.0, rewrite_margin=2.5), 2.0)
    assert drifted and drop == 2.5 and reasons == ["margin logP(new)-logP(true) fell by 2.50 nats (5.00 → 2.50) > 2"]
    old = au.AuditedFact(2, None, [1], dict(rewrite_acc=1.0, seq=1))  # recorded before rewrite_margin
    assert au.judge(old, dict(rewrite_acc=1.0, rewrite_margin=-9.0), 2.0)[0] is False
    assert au.judge(old, dict(rewrite_acc=0.0, rewrite_margin=-9.0), 2.0)[0] is True


def test_perplexity_is_skipped_with_a_note_when_the_corpus_is_gone(applied, corpus):
    corpus.unlink()
    report = call(au.audit, applied)
    assert report["healthy"] and report["runs"][0]["health"]["perplexity"] is None
    assert any("is missing: perplexity not checked" in n for n in report["notes"])


def test_the_periodic_audit_runs_after_every_n_apply_operations(applied, corpus):
    call(cfg.set_value, applied, key="audit_every", raw="3")
    submit(applied, *GOOD[4])
    report = apply(applied, corpus)  # seq 2: two apply operations so far, not due
    assert report["audit"] is None
    submit(applied, *GOOD[5])
    report = apply(applied, corpus)  # seq 3: due, run by the apply itself
    result = report["audit"]
    assert result["due"] == dict(audit_every=3, operations_since_last_audit=3) and result["healthy"]
    assert call(au.audit_due, applied) is None  # counted from the last audit's head
    assert [r.head_seq for r in rows(applied, AuditRun)] == [3]


def test_watch_audits_again_when_the_head_moves_and_stops_after_max_audits(applied):
    seen, sleeps = [], []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 1:
            counter_edit(applied, 0.8)  # the head moves: audited at once, drifted

    last = call(watching.watch, applied, interval_s=3600, on_report=seen.append, on_error=pytest.fail,
                max_audits=2, sleep=sleep)
    assert exit_status(last) == 1 and [r.head_seq for r in seen] == [1, 2] and sleeps == [5.0]


def test_the_report_plots_the_audits(applied, tmp_path):
    empty = call(write_report, applied, out=tmp_path / "r0")
    assert empty["audits"] == 0 and "No audits yet" in (tmp_path / "r0" / "index.html").read_text()
    call(au.audit, applied)
    counter_edit(applied, 0.8)
    call(au.audit, applied, heal_drift=True)
    result = call(write_report, applied, out=tmp_path / "r")
    page = (tmp_path / "r" / "index.html").read_text()
    assert result["audits"] == 3 and result["charts"] == ["success", "drift", "perplexity", "norms"]
    assert page.count("src='data:image/png;base64,iVBORw0KGgo") == 4  # PNG signature
    assert "Audit runs" in page and "healthy" in page


def test_device_errors(applied):
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA is not available"):
            call(au.audit, applied, device="cuda")
    assert au.resolve_device("cpu").type == "cpu"
