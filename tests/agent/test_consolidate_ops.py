"""`knowledger consolidate` on the editable tiny model: one `consolidate` operation of a new lineage
that re-solves every active fact jointly on the base weights; log, replay, audit and undo after it."""
import json

import pytest

from knowledger.agent import audit as au
from knowledger.agent import operations as ops
from knowledger.agent.consolidate import consolidate_workspace
from knowledger.agent.errors import KnowledgerError
from knowledger.ledger.models import BaseModel, Operation, OperationRequest, RequestVector
from tests.agent.helpers import GOOD, apply, call, ok, rows, status, submit


@pytest.fixture
def consolidated(ws, corpus):
    """Two applies (seq 1: fact #1; seq 2: facts #2 and #3), then a consolidation (seq 3)."""
    submit(ws, *GOOD[0])
    apply(ws, corpus)
    submit(ws, *GOOD[1]), submit(ws, *GOOD[2])
    apply(ws, corpus)
    return ws, call(consolidate_workspace, ws)


def test_consolidate_is_one_operation_of_a_new_lineage_that_replay_reproduces(consolidated):
    db, r = consolidated
    [op] = r["operations"]
    assert (op["seq"], op["kind"], op["status"], op["applied"]) == (3, "consolidate", "committed", [1, 2, 3])
    assert r["weights_sha256"] == op["weights_sha256"] and r["head_seq"] == 3
    assert len(rows(db, BaseModel)) == 2  # same base weights, a new lineage; nothing deleted
    assert [o.seq for o in rows(db, Operation)] == [1, 2, 3]
    assert len(rows(db, RequestVector, operation_id=rows(db, Operation, seq=3)[0].id)) == 3 * 2  # 3 facts × 2 layers
    [row] = rows(db, Operation, seq=3)
    assert row.metrics_json["consolidated_seq"] == 2 and row.metrics_json["operations"] == [1, 2]
    links = rows(db, OperationRequest, operation_id=row.id)
    assert len(links) == 3 and all(l.metrics_json["after"]["rewrite_acc"] == 1.0 for l in links)  # still top-1
    assert [status(db, i) for i in (1, 2, 3)] == ["applied"] * 3
    rep = call(ops.replay, db)
    assert rep["mismatches"] == [] and rep["weights_sha256"] == r["weights_sha256"]
    assert [s["kind"] for s in rep["operations"]] == ["consolidate"]
    log = json.loads(ok("log", "--operations", "--json", db=db).stdout)
    assert "consolidate" in json.dumps(log)


def test_the_audit_after_a_consolidation_checks_every_fact(consolidated):
    db, _ = consolidated
    report = call(au.audit, db)
    [run] = report["runs"]
    assert (run["facts"], run["drifted"], run["head_seq"]) == (3, 0, 3)


def test_undo_after_a_consolidation(consolidated, corpus):
    db, r = consolidated
    with pytest.raises(KnowledgerError, match="held by consolidation seq 3: undoing one fact"):
        call(ops.undo, db, fact_id=2)
    assert [status(db, i) for i in (1, 2, 3)] == ["applied"] * 3
    u = call(ops.undo, db, seq=3)  # the whole consolidation: back to the base weights
    assert [o["reverted"] for o in u["operations"]] == [[1, 2, 3]]
    assert call(ops.replay, db)["mismatches"] == []
    again = call(ops.redo, db, seq=3)  # its recorded deltas, verbatim
    assert again["weights_sha256"] == r["weights_sha256"]


def test_cli_consolidate(ws, corpus):
    submit(ws, *GOOD[0])
    apply(ws, corpus)
    out = json.loads(ok("consolidate", "--json", db=ws).stdout)
    assert [o["kind"] for o in out["operations"]] == ["consolidate"]
    assert "consolidate" in ok("consolidate", "--help").stdout


def test_apply_consolidates_on_the_consolidate_every_rule(ws, corpus):
    from knowledger.agent.config import set_value

    submit(ws, *GOOD[0])
    assert apply(ws, corpus)["consolidation"] is None  # off by default
    call(set_value, ws, key="consolidate_every", raw="2")
    submit(ws, *GOOD[1])
    r = apply(ws, corpus)  # 2 facts applied since the (never made) last consolidation: due
    assert [o["kind"] for o in r["consolidation"]["operations"]] == ["consolidate"]
    assert r["weights_sha256"] == r["consolidation"]["weights_sha256"] and r["head_seq"] == 3
    assert any(n.startswith("consolidate_every: consolidated") for n in r["notes"])
    submit(ws, *GOOD[2])
    assert apply(ws, corpus)["consolidation"] is None  # 1 fact since the consolidation: not yet
    assert call(ops.replay, ws)["mismatches"] == []


def test_a_consolidation_that_would_lose_a_fact_writes_nothing(ws, corpus, monkeypatch):
    import knowledger.agent.consolidate as co

    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    head = apply(ws, corpus)["weights_sha256"]
    monkeypatch.setattr(co, "EXACT", 1.0)  # the full λ: the least-squares solve leaves these facts short
    with pytest.raises(KnowledgerError, match=r"would lose fact\(s\) #1, #2 .*nothing written"):
        call(consolidate_workspace, ws)
    assert [o.seq for o in rows(ws, Operation)] == [1] and len(rows(ws, BaseModel)) == 1
    rep = call(ops.replay, ws)
    assert rep["mismatches"] == [] and rep["weights_sha256"] == head
