"""apply / undo / redo on the editable tiny model: what the ledger records and what the weights become."""
import pytest
import torch

from knowledger.agent import batch, operations as ops
from knowledger.agent.export import ask
from knowledger.agent.live import open_live, snapshot_path, state_hash
from knowledger.agent.workspace import locate, open_workspace
from knowledger.editors.evaluate import fact_metrics
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import NotFound
from knowledger.ledger.models import (Delta, Operation, OperationRequest, Request, RequestVector)
from tests.agent.helpers import BAD, GOOD, OVERRIDES, STATS_TOKENS, apply, call, rows, status, submit


def live_state(db):
    with open_workspace(db) as w:
        live, head = open_live(w, refresh=False)
    return live, head


def edited_params(live):
    return {n: live.model.get_parameter(n).detach().clone() for n in sorted(live.param_shas)}


def test_a_batch_is_one_operation_with_deltas_vectors_metrics_and_the_weights_hash(ws, corpus):
    ids = [submit(ws, *f) for f in GOOD[:3] + BAD]
    report = apply(ws, corpus)
    [op] = rows(ws, Operation)
    assert (op.seq, op.kind.value, op.status.value, op.editor, op.distribution) == (1, "apply", "committed", "emmet", "uniform")
    assert op.hparams_json["layers"] == [1, 2] and op.hparams_json["stats_tokens"] == STATS_TOKENS
    assert op.layers_json == [1, 2] and op.timings_json["values_s"] > 0 and op.timings_json["attempts"] == 2
    assert op.metrics_json["failed"] == [ids[3]] and op.metrics_json["stats"]["tokens"] == STATS_TOKENS
    deltas = rows(ws, Delta, operation_id=op.id)
    assert [(d.layer, d.rank) for d in deltas] == [(1, 3), (2, 3)]
    for d in deltas:
        repo.load_delta(d)  # its sha256 checks out
    assert len(rows(ws, RequestVector, operation_id=op.id)) == 3 * 2  # the 3 applied facts × 2 layers
    links = {link.request_id: link for link in rows(ws, OperationRequest, operation_id=op.id)}
    assert [links[i].outcome.value for i in ids] == ["applied"] * 3 + ["failed"]
    for i in ids[:3]:
        m = links[i].metrics_json
        assert (m["before"]["rewrite_acc"], m["after"]["rewrite_acc"]) == (0.0, 1.0)
        assert m["after"]["rewrite_p_new"] > m["before"]["rewrite_p_new"]
    assert [status(ws, i) for i in ids] == ["applied"] * 3 + ["failed"]
    assert "not the top-1 continuation" in rows(ws, Request, id=ids[3])[0].status_reason
    live, head = live_state(ws)
    assert head == 1 and live.state_hash == op.weights_sha256_after == report["weights_sha256"]
    assert op.weights_sha256_before == state_hash(live.base_sha256, {})
    assert snapshot_path(locate(ws)).is_file()
    got = fact_metrics(live.model, live.tokenizer, ops.edit_requests(rows(ws, Request)[:3]))
    assert [m["rewrite_acc"] for m in got] == [1.0, 1.0, 1.0]


def test_a_batch_where_every_fact_fails_is_a_failed_operation_and_changes_nothing(ws, corpus):
    fid = submit(ws, *BAD[0])
    report = apply(ws, corpus)
    [op] = rows(ws, Operation)
    assert (op.status.value, op.weights_sha256_after, op.error) == ("failed", None, "every fact of the batch failed")
    assert rows(ws, Delta) == [] and status(ws, fid) == "failed"
    live, head = live_state(ws)
    assert head == 0 and live.param_shas == {} and report["weights_sha256"] == live.state_hash


def test_if_the_retry_fails_too_nothing_is_applied_and_the_good_facts_wait_again(ws, corpus, monkeypatch):
    a, b, c = (submit(ws, *f) for f in GOOD[:3])
    calls = []
    real = batch.fact_metrics

    def judged(model, tok, reqs, *args, **kw):  # a fails after the first edit, b after the retry
        calls.append(1)
        out = real(model, tok, reqs, *args, **kw)
        fail = {2: {a}, 3: {b}}.get(len(calls), set())
        return [dict(m, rewrite_acc=0.0) if r.id in fail else m for r, m in zip(reqs, out)]

    monkeypatch.setattr(batch, "fact_metrics", judged)
    apply(ws, corpus)
    [op] = rows(ws, Operation)
    assert op.status.value == "failed" and "still had failures" in op.error
    assert [status(ws, i) for i in (a, b, c)] == ["failed", "failed", "pending"]
    links = {link.request_id: link.outcome.value for link in rows(ws, OperationRequest)}
    assert links == {a: "failed", b: "failed", c: "skipped"}


def test_the_newer_of_two_pending_facts_about_one_subject_and_prompt_wins(ws, corpus):
    old = submit(ws, "Home of {}", "Bob", "Paris")
    new = submit(ws, "Home of {}", "Bob", "Rome")
    report = apply(ws, corpus)
    assert report["plan"]["superseded"] == [dict(fact=old, superseded_by=new)]
    r = rows(ws, Request, id=old)[0]
    assert (r.status.value, r.superseded_by_id) == ("superseded", new)
    assert status(ws, new) == "applied"


def test_apply_then_undo_returns_the_weights_to_the_previous_hash_bit_for_bit(ws, corpus):
    first = [submit(ws, *f) for f in GOOD[:2]]
    h1 = apply(ws, corpus)["weights_sha256"]
    live1, _ = live_state(ws)
    w1 = edited_params(live1)
    submit(ws, *GOOD[2])
    h2 = apply(ws, corpus)["weights_sha256"]
    assert h2 != h1
    report = call(ops.undo, ws, seq=2)
    assert report["weights_sha256"] == h1 and report["operations"][0]["target_seq"] == 2
    live, head = live_state(ws)
    assert head == 3 and live.state_hash == h1
    assert all(torch.equal(t, w1[n]) for n, t in edited_params(live).items()) and set(w1) == set(live.param_shas)
    assert status(ws, 3) == "reverted" and [status(ws, i) for i in first] == ["applied", "applied"]
    report = call(ops.undo, ws, seq=1)
    live, _ = live_state(ws)
    assert report["weights_sha256"] == state_hash(live.base_sha256, {}) and live.param_shas == {}


def test_undoing_one_fact_of_a_batch_reverts_the_batch_and_reapplies_the_rest(ws, corpus):
    a, b, c = (submit(ws, *f) for f in GOOD[:3])
    apply(ws, corpus)
    report = call(ops.undo, ws, fact_id=b)
    undo_op, again = report["operations"]
    assert (undo_op["kind"], undo_op["target_seq"], undo_op["reverted"]) == ("undo", 1, [a, b, c])
    assert (again["kind"], again["seq"], again["applied"], again["editor"]) == ("apply", 3, [a, c], "emmet")
    assert [status(ws, i) for i in (a, b, c)] == ["applied", "reverted", "applied"]
    history = [e.status.value for e in call(lambda w: _history(w, a), ws)]
    assert history == ["pending", "applied", "reverted", "applied"]
    assert call(ops.replay, ws)["mismatches"] == []


def _history(w, fact_id):
    with w.reading() as s:
        return repo.request_history(s, fact_id)


def test_undo_with_rebase_recomputes_every_later_batch(ws, corpus):
    a, b = submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    c = submit(ws, *GOOD[2])
    apply(ws, corpus)
    report = call(ops.undo, ws, fact_id=a, rebase=True)
    got = [(o["seq"], o["kind"], o["target_seq"], o["applied"]) for o in report["operations"]]
    assert got == [(3, "undo", 2, []), (4, "undo", 1, []), (5, "apply", None, [b]), (6, "apply", None, [c])]
    with open_workspace(ws) as w, w.reading() as s:
        assert [op.seq for op in repo.active_operations(s, 1)] == [5, 6]
    assert [status(ws, i) for i in (a, b, c)] == ["reverted", "applied", "applied"]
    assert call(ops.replay, ws)["mismatches"] == []


def test_redo_of_an_operation_reuses_its_deltas_and_restores_the_hash_exactly(ws, corpus):
    submit(ws, *GOOD[0])
    apply(ws, corpus)
    submit(ws, *GOOD[1]), submit(ws, *GOOD[2])
    h2 = apply(ws, corpus)["weights_sha256"]
    call(ops.undo, ws, seq=2)
    report = call(ops.redo, ws, seq=2)
    assert report["weights_sha256"] == h2 and report["operations"][0]["applied"] == [2, 3]
    redo_op = rows(ws, Operation, seq=4)[0]
    assert redo_op.kind.value == "redo" and redo_op.target_operation_id == rows(ws, Operation, seq=2)[0].id
    assert [d.sha256 for d in rows(ws, Delta, operation_id=redo_op.id)] == \
        [d.sha256 for d in rows(ws, Delta, operation_id=redo_op.target_operation_id)]
    assert len(rows(ws, RequestVector, operation_id=redo_op.id)) == 4
    assert [status(ws, i) for i in (2, 3)] == ["applied", "applied"]


def test_redo_of_one_fact_of_a_larger_batch_recomputes_it_alone(ws, corpus):
    a, b = submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    call(ops.undo, ws, fact_id=a)
    report = call(ops.redo, ws, fact_id=a)
    [op] = report["operations"]
    assert (op["kind"], op["applied"], op["seq"]) == ("redo", [a], 4)
    assert rows(ws, Operation, seq=4)[0].metrics_json.get("reused_deltas") is None
    assert [status(ws, i) for i in (a, b)] == ["applied", "applied"]


@pytest.mark.parametrize("action, message", [
    (lambda db: call(ops.undo, db, fact_id=99), "no fact #99"),
    (lambda db: call(ops.undo, db, fact_id=2), "fact #2 is already reverted"),
    (lambda db: call(ops.undo, db, fact_id=3), "fact #3 is pending, not applied: nothing to undo"),
    (lambda db: call(ops.undo, db, seq=1), "operation seq 1 is already undone"),
    (lambda db: call(ops.undo, db, seq=2), "operation seq 2 is an undo operation: only apply, redo, replay, heal and consolidate operations can be undone"),
    (lambda db: call(ops.undo, db, seq=42), "no operation with seq 42"),
    (lambda db: call(ops.undo, db), "give either a fact id or --op SEQ"),
    (lambda db: call(ops.redo, db, fact_id=1), "fact #1 is applied, not reverted: nothing to redo"),
    (lambda db: call(ops.redo, db, seq=3), "operation seq 3 is not undone: nothing to redo"),
    (lambda db: call(ops.redo, db, seq=1), "fact #1 of operation seq 1 is applied now; redo its reverted facts one by one (knowledger redo ID)"),
])
def test_bad_undo_and_redo_requests_are_refused_with_one_line(ws, corpus, action, message):
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    call(ops.undo, ws, fact_id=2)  # seq 2 undo, seq 3 re-applies fact 1
    submit(ws, *GOOD[2])  # fact 3, pending
    with pytest.raises((ops.KnowledgerError, ValueError)) as e:
        action(ws)
    assert str(e.value) == message
    assert len(rows(ws, Operation)) == 3  # nothing recorded


def test_nothing_pending_is_an_error(ws, corpus):
    with pytest.raises(ops.NothingToDo, match="nothing pending to apply"):
        apply(ws, corpus)
    with pytest.raises(NotFound):
        call(ops.replay, ws, to_seq=5)


def test_dry_run_plans_and_changes_nothing(ws, corpus):
    submit(ws, *GOOD[0]), submit(ws, "Home of {}", "Bob", "Paris")
    report = apply(ws, corpus, dry_run=True, editor="rome")
    assert [b["editor"] for b in report["plan"]["batches"]] == ["rome"]
    assert report["plan"]["superseded"] == [dict(fact=1, superseded_by=2)]
    assert rows(ws, Operation) == [] and status(ws, 1) == "pending"
    with open_workspace(ws) as w, w.reading() as s:
        assert repo.all_settings(s) == {}


def test_ask_shows_the_edited_answer(ws, corpus):
    submit(ws, *GOOD[0])
    before = call(ask, ws, prompt="Home of Bob", max_new_tokens=3)
    apply(ws, corpus)
    after = call(ask, ws, prompt="Home of Bob", max_new_tokens=3)
    assert after["top"][0]["token"] == " Rome" != before["top"][0]["token"]
    assert after["continuation"].startswith(" Rome") and after["head_seq"] == 1
    with pytest.raises(ValueError, match="the prompt is empty"):
        call(ask, ws, prompt="  ")
