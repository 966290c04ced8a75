"""`knowledger consolidate` on the editable tiny model: one `consolidate` operation of a new lineage
that re-solves every active fact jointly on the base weights; log, replay, audit and undo after it."""
import json

import numpy as np
import pytest
import torch
from sqlalchemy import select

from knowledger.agent import audit as au
from knowledger.agent import operations as ops
from knowledger.agent.consolidate import consolidate_workspace
from knowledger.agent.errors import KnowledgerError, NothingToDo
from knowledger.ledger.models import BaseModel, FactTarget, Operation, OperationRequest, RequestVector
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
    from knowledger.ledger.models import Delta
    assert [d.rank for d in rows(db, Delta, operation_id=row.id)] == [3, 3]  # rank N, not min(d_out, d_in)
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


def test_undo_of_the_whole_consolidation_and_redo(consolidated, corpus):
    db, r = consolidated
    u = call(ops.undo, db, seq=3)  # the whole consolidation: back to the base weights
    assert [o["reverted"] for o in u["operations"]] == [[1, 2, 3]]
    assert call(ops.replay, db)["mismatches"] == []
    again = call(ops.redo, db, seq=3)  # its recorded deltas (and targets), verbatim
    assert again["weights_sha256"] == r["weights_sha256"]
    redo_id = rows(db, Operation, seq=5)[0].id
    assert len(rows(db, FactTarget, operation_id=redo_id)) == 3


def _targets_of(db, seq) -> dict:
    from knowledger.ledger import repository as repo

    op_id = rows(db, Operation, seq=seq)[0].id
    return {t.request_id: repo.load_target(t) for t in rows(db, FactTarget, operation_id=op_id)}


def test_apply_stores_each_facts_residual_target_and_consolidation_uses_it(consolidated):
    db, r = consolidated
    t1, t2, t3 = _targets_of(db, 1), _targets_of(db, 2), _targets_of(db, 3)
    assert sorted(t1) == [1] and sorted(t2) == [2, 3] and sorted(t3) == [1, 2, 3]
    assert {(t.layer, t.site, t.value.shape) for t in t3.values()} == {(2, "block", (32,))}  # L = 2, d = 32
    for fid, t in [(1, t1[1]), (2, t2[2]), (3, t2[3])]:  # the consolidation re-solved from the stored z
        assert np.array_equal(t3[fid].value, t.value)
    [op] = rows(db, Operation, seq=3)
    assert op.metrics_json["stored_targets"] == 3 and not any("no stored target" in n for n in r["notes"])


def test_consolidating_operations_without_stored_targets_reads_z_from_the_live_weights(ws, corpus):
    """Operations recorded before revision 0007 stored no z: consolidation falls back, and says so."""
    from sqlalchemy import delete

    from knowledger.agent.workspace import open_workspace

    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    with open_workspace(ws) as w, w.writing() as s:
        s.execute(delete(FactTarget))
    r = call(consolidate_workspace, ws)
    assert any(n.startswith("2 of 2 fact(s) had no stored target at layer 2") for n in r["notes"])
    assert rows(ws, Operation, seq=2)[0].metrics_json["stored_targets"] == 0
    assert sorted(_targets_of(ws, 2)) == [1, 2]  # the consolidation stores the z it used
    assert [status(ws, i) for i in (1, 2)] == ["applied"] * 2


def test_a_stored_target_that_fails_its_checksum_is_an_error(consolidated):
    from sqlalchemy import update

    from knowledger.agent.workspace import open_workspace
    from knowledger.ledger.errors import IntegrityError

    db, _ = consolidated
    with open_workspace(db) as w, w.writing() as s:
        op_id = s.scalars(select(Operation.id).where(Operation.seq == 3)).one()  # the active holder
        row = s.scalars(select(FactTarget).where(FactTarget.operation_id == op_id).limit(1)).first()
        s.execute(update(FactTarget).where(FactTarget.id == row.id).values(sha256="0" * 64))
    with pytest.raises(IntegrityError, match="target of fact #.*checksum mismatch"):
        call(consolidate_workspace, db)


def _reference_deltas(db, seq, fact_ids, z):
    """An independent solve of `fact_ids` with targets z (n, d) on the base weights: the editor's
    own one-batch MEMIT layer loop (not agent.consolidate), its v* step replaced by δ = z − h_L."""
    import knowledger.editors.editor as editor_mod
    from knowledger.agent.consolidate import EXACT
    from knowledger.agent.records import edit_requests
    from knowledger.agent.session import session
    from knowledger.agent.workspace import open_workspace
    from knowledger.editors.values import ValueTargets
    from knowledger.ledger.models import Request

    with open_workspace(db) as w, session(w, what="test") as es:
        hp = es.batch_hparams("memit", rows(db, Operation, seq=seq)[0])
        ed = es.editor("memit", hp.replace(mom2_weight=hp.mom2_weight * EXACT))
        reqs = edit_requests([rows(db, Request, id=i)[0] for i in fact_ids])
        with es.live.at_base():
            _, cur = ed._keys_and_current(reqs, hp.v_layer, ed.contexts)  # (n, d) on the base weights
            real = editor_mod.optimise_values
            editor_mod.optimise_values = lambda *a, **k: ValueTargets(delta=z - cur, stats=[{}] * len(reqs))
            try:
                return {d.layer: d.dense(torch.float64) for d in ed.compute(reqs).deltas}
            finally:
                editor_mod.optimise_values = real


def test_undo_of_one_fact_after_a_consolidation_is_exact(consolidated):
    """consolidate(1, 2, 3) → undo fact 2 == consolidating facts 1 and 3 (float64 comparison)."""
    from knowledger.ledger import repository as repo
    from knowledger.ledger.models import Delta

    db, r = consolidated
    stored = _targets_of(db, 3)
    u = call(ops.undo, db, fact_id=2)
    assert [(o["kind"], o["reverted"], o["applied"]) for o in u["operations"]] == [
        ("undo", [1, 2, 3], []), ("consolidate", [], [1, 3])]
    assert [status(db, i) for i in (1, 2, 3)] == ["applied", "reverted", "applied"]
    [op] = rows(db, Operation, seq=5)
    assert op.metrics_json["reconsolidated_seq"] == 3 and op.metrics_json["without"] == [2]
    assert len(rows(db, BaseModel)) == 2  # the same lineage as the consolidation
    again = _targets_of(db, 5)
    assert sorted(again) == [1, 3] and all(np.array_equal(again[i].value, stored[i].value) for i in (1, 3))
    links = rows(db, OperationRequest, operation_id=op.id)
    assert all(l.metrics_json["after"]["rewrite_acc"] == 1.0 for l in links)  # still top-1
    got = {}
    for d in rows(db, Delta, operation_id=op.id):
        f = repo.load_delta(d)
        got[d.layer] = torch.from_numpy(f.left).double() @ torch.from_numpy(f.right).double().T
    z = torch.stack([torch.from_numpy(stored[i].value) for i in (1, 3)]).float()  # (2, d)
    ref = _reference_deltas(db, 3, [1, 3], z)
    assert sorted(got) == sorted(ref) == [1, 2]
    for l in ref:  # float32 factors: equal to float32 rounding
        assert float((got[l] - ref[l]).norm() / ref[l].norm()) < 1e-5, l  # measured ~3e-7
    with pytest.raises(NothingToDo, match="already undone"):
        call(ops.undo, db, seq=3)
    # consolidating the same active set again gives the same weights, bit for bit
    c = call(consolidate_workspace, db)
    assert c["weights_sha256"] == u["weights_sha256"]
    rep = call(ops.replay, db)
    assert rep["mismatches"] == [] and rep["weights_sha256"] == c["weights_sha256"]


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
