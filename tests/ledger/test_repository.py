"""Repository functions: facts, duplicates, history, operations with factored deltas, settings."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from knowledger.agent.workspace import open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError, NotFound
from knowledger.ledger.facts import validate_fact
from knowledger.ledger.models import (OperationKind, OperationStatus, RequestOutcome, RequestStatus,
                                      RequestVector)

EIFFEL = validate_fact("{} is located in", "The Eiffel Tower", "Rome", "Paris", source="test")
MESSI = validate_fact("{} plays", "Messi", "chess")


@pytest.fixture
def ws(ws_dir):
    with open_workspace(ws_dir) as ws:
        yield ws


def test_add_requests_skips_duplicates_of_pending_facts(ws):
    same = validate_fact("The Eiffel Tower is located in", "The Eiffel Tower", "ROME")
    with ws.writing() as s:
        added = repo.add_requests(s, [EIFFEL, MESSI, same], source="batch")
    assert added == [repo.Added(0, request_id=1), repo.Added(1, request_id=2), repo.Added(2, duplicate_of=1)]
    with ws.writing() as s:
        assert repo.add_requests(s, [EIFFEL]) == [repo.Added(0, duplicate_of=1)]
        repo.set_request_status(s, repo.get_request(s, 1), RequestStatus.applied, reason="test")
        # no longer pending: the same fact can be submitted again
        assert repo.add_requests(s, [EIFFEL]) == [repo.Added(0, request_id=3)]
    with ws.reading() as s:
        rows = repo.list_requests(s)
        assert [r.id for r in rows] == [3, 2, 1]
        assert [(r.source, r.status) for r in rows] == [
            ("test", RequestStatus.pending), ("batch", RequestStatus.pending), ("test", RequestStatus.applied)]
        assert rows[1].neighborhood == [] and rows[2].paraphrase_prompts == []


def test_counts_history_and_supersession(ws):
    with ws.writing() as s:
        repo.add_requests(s, [EIFFEL, MESSI])
        newer = repo.add_requests(s, [validate_fact("{} is located in", "The Eiffel Tower", "Berlin")])[0]
        repo.set_request_status(s, repo.get_request(s, 1), RequestStatus.superseded,
                                reason="a newer fact", superseded_by_id=newer.request_id)
    with ws.reading() as s:
        assert repo.count_requests_by_status(s) == dict(pending=2, applied=0, superseded=1, rejected=0,
                                                        reverted=0, failed=0)
        old = repo.get_request(s, 1)
        assert (old.status, old.status_reason, old.superseded_by_id) == (RequestStatus.superseded,
                                                                         "a newer fact", 3)
        assert [(e.status, e.reason) for e in repo.request_history(s, 1)] == [
            (RequestStatus.pending, "submitted (test)"), (RequestStatus.superseded, "a newer fact")]
        assert repo.superseded_facts(s, 3) == [1]
        assert [r.id for r in repo.list_requests(s, status="pending", limit=1)] == [3]
        with pytest.raises(NotFound, match="^no fact #99$"):
            repo.get_request(s, 99)


def test_record_operation_stores_factors_that_round_trip(ws):
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal((8, 2)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    with ws.writing() as s:
        ids = [a.request_id for a in repo.add_requests(s, [EIFFEL, MESSI])]
        bm = repo.current_base_model(s)
        op1 = repo.record_operation(
            s, kind=OperationKind.apply, base_model_id=bm.id, request_ids=ids[::-1], editor="memit",
            layers_json=[3], deltas=[repo.DeltaFactors(3, "model.layers.3.mlp.down_proj.weight", left, right)],
            vectors=[repo.FactVectors(ids[0], 3, np.ones(5, np.float32), np.zeros(8, np.float32))])
        op2 = repo.record_operation(s, kind=OperationKind.undo, base_model_id=bm.id,
                                    target_operation_id=op1.id, request_ids=[ids[0]],
                                    outcome=RequestOutcome.reverted, status=OperationStatus.running)
        assert (op1.seq, op2.seq) == (1, 2)
        assert op2.finished_at is None and op1.finished_at is not None
    with ws.reading() as s:
        assert [op.seq for op in repo.list_operations(s)] == [2, 1]
        assert [op.seq for op in repo.list_operations(s, status="committed")] == [1]
        assert repo.count_operations(s) == 2
        (delta,) = repo.operation_deltas(s, op1.id)
        assert (delta.shape_json, delta.rank, delta.dtype) == ([8, 5], 2, "float32")
        assert delta.frobenius_norm == pytest.approx(np.linalg.norm(left.astype(float) @ right.T.astype(float)))
        factors = repo.load_delta(delta)
        np.testing.assert_array_equal(factors.left, left)
        np.testing.assert_array_equal(factors.right, right)
        ops = repo.request_operations(s, ids[0])
        assert [(op.seq, link.position, link.outcome) for op, link in ops] == [
            (1, 1, RequestOutcome.applied), (2, 0, RequestOutcome.reverted)]
        assert s.query(RequestVector).one().layer == 3
        assert repo.operation_request_counts(s, [op1.id, op2.id]) == {op1.id: 2, op2.id: 1}


def test_corrupt_delta_bytes_are_detected(ws):
    with ws.writing() as s:
        bm = repo.current_base_model(s)
        op = repo.record_operation(s, kind=OperationKind.apply, base_model_id=bm.id, deltas=[
            repo.DeltaFactors(0, "w", np.ones((3, 1), np.float32), np.ones((2, 1), np.float32))])
        delta = repo.operation_deltas(s, op.id)[0]
        raw = bytearray(delta.left)
        raw[-1] ^= 0xFF
        delta.left = bytes(raw)
    with ws.reading() as s:
        with pytest.raises(IntegrityError, match="^delta w of operation 1: checksum mismatch"):
            repo.load_delta(repo.operation_deltas(s, op.id)[0])


def test_settings(ws):
    with ws.writing() as s:
        assert repo.get_setting(s, "editor", "memit") == "memit"
        repo.set_setting(s, "editor", "emmet")
        repo.set_setting(s, "layers", [3, 4])
        repo.set_setting(s, "editor", "alphaedit")
    with ws.reading() as s:
        assert repo.all_settings(s) == {"editor": "alphaedit", "layers": [3, 4]}


def test_the_ledger_and_agent_facts_do_not_import_torch():
    code = ("import sys, knowledger.ledger.repository, knowledger.ledger.migrate, knowledger.agent.facts, "
            "knowledger.agent.workspace; import knowledger.migrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
