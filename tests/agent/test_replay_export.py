"""Replay (hash checks, corruption, recompute on another model), snapshots, export."""
import json

import pytest
from sqlalchemy import update
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowledger.agent import operations as ops
from knowledger.agent.export import ask, export
from knowledger.agent.live import snapshot_path, state_hash
from knowledger.editors.apply import weight_sha256
from knowledger.agent.workspace import locate, open_workspace
from knowledger.editors.evaluate import fact_metrics
from knowledger.editors.requests import EditRequest
from knowledger.ledger.errors import IntegrityError, KnowledgerError
from knowledger.ledger.models import BaseModel, Delta, Operation, Request
from tests.agent.helpers import GOOD, apply, call, rows, save_editable_tiny, status, submit


@pytest.fixture
def history(ws, corpus):
    """seq 1 apply #1 #2, seq 2 apply #3, seq 3 undo of seq 2."""
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    submit(ws, *GOOD[2])
    apply(ws, corpus)
    call(ops.undo, ws, seq=2)
    return ws


def sql(db, stmt):
    with open_workspace(db) as w, w.writing() as s:
        s.execute(stmt)


def test_replay_reproduces_every_recorded_hash_and_can_stop_early(history):
    report = call(ops.replay, history)
    recorded = [op.weights_sha256_after for op in sorted(rows(history, Operation), key=lambda o: o.seq)]
    assert [o["computed"] for o in report["operations"]] == recorded
    assert report["mismatches"] == [] and report["snapshot_refreshed"] and report["head_seq"] == 3
    partial = call(ops.replay, history, to_seq=2)
    assert [o["seq"] for o in partial["operations"]] == [1, 2]
    assert partial["weights_sha256"] == recorded[1] and not partial["snapshot_refreshed"]


def test_replay_names_a_corrupt_delta_blob_and_a_wrong_recorded_hash(history):
    sql(history, update(Operation).where(Operation.seq == 2).values(weights_sha256_after="f" * 64))
    [d] = [d for d in rows(history, Delta) if d.layer == 1 and d.operation_id == 1]
    sql(history, update(Delta).where(Delta.id == d.id).values(left=d.left[:-1] + bytes([d.left[-1] ^ 1])))
    report = call(ops.replay, history)
    assert [o["ok"] for o in report["operations"]] == [False, False, False]
    assert report["mismatches"][0] == (
        f"operation seq 1: delta model.layers.1.mlp.down_proj.weight of operation 1: checksum mismatch "
        f"(stored {d.sha256[:12]}…, bytes hash to " + report["mismatches"][0].split("bytes hash to ")[1])
    assert any(m.startswith("operation seq 2 (apply): recorded weights ffffffffffff…") for m in report["mismatches"])
    with pytest.raises(IntegrityError, match="delta model.layers.1.mlp.down_proj.weight of operation 1: checksum mismatch"):
        call(ask, history, prompt="Home of Bob")  # the live model never loads a corrupt delta


def test_a_missing_corrupt_or_stale_snapshot_is_rebuilt_and_said_so(history):
    path = snapshot_path(locate(history))
    good = call(ask, history, prompt="Home of Bob")
    assert good["notes"] == []
    path.unlink()
    r = call(ask, history, prompt="Home of Bob")
    assert r["notes"] == ["live snapshot not used: ledger.live.safetensors is missing; rebuilt from the "
                          "base model and 1 active operation(s)"]
    assert r["weights_sha256"] == good["weights_sha256"] and path.is_file()  # rewritten
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    r = call(ask, history, prompt="Home of Bob")
    assert "is corrupt (its tensors do not hash to its recorded state)" in r["notes"][0]
    assert r["top"] == good["top"]


def test_a_base_model_that_changed_is_refused(history):
    sql(history, update(BaseModel).values(weights_sha256="0" * 64))
    with pytest.raises(IntegrityError, match="the ledger recorded 000000000000…: refusing to edit another model"):
        call(ask, history, prompt="x")


def test_export_writes_a_loadable_folder_with_a_model_card(history, tmp_path):
    out = tmp_path / "exported"
    report = call(export, history, out=out)
    assert [f["id"] for f in report["facts"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir left
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    facts = [EditRequest(p, s, t) for p, s, t in GOOD[:2]]
    assert [m["rewrite_acc"] for m in fact_metrics(model, tok, facts)] == [1.0, 1.0]
    card = (out / "README.md").read_text()
    assert "## Active edits (2)" in card and "| #1 | Home of Bob | Rome | - | 1 | emmet |" in card
    info = json.loads((out / "knowledger-export.json").read_text())
    assert info["head_seq"] == 3 and info["edited_params"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    shas = {p: weight_sha256(model.get_parameter(p)) for p in info["edited_params"]}
    assert state_hash(info["base_model"]["weights_sha256"], shas) == report["weights_sha256"]  # bit for bit
    with pytest.raises(KnowledgerError, match="exists and is not an empty directory"):
        call(export, history, out=out)


def test_replay_recompute_on_the_same_model_starts_a_new_lineage_with_the_same_facts(history):
    report = call(ops.replay_recompute, history)
    assert report["same_weights"] and [f["outcome"] for f in report["facts"]] == ["applied", "applied"]
    assert [(o["kind"], o["target_seq"]) for o in report["operations"]] == [("replay", 1)]
    assert len(rows(history, BaseModel)) == 2
    assert call(ops.replay, history)["operations"] == [dict(seq=4, kind="replay", ok=True,
                                                            recorded=report["weights_sha256"],
                                                            computed=report["weights_sha256"])]
    assert [status(history, i) for i in (1, 2, 3)] == ["applied", "applied", "reverted"]


def test_replay_recompute_carries_the_edits_to_another_base_model(history, tmp_path):
    other = save_editable_tiny(tmp_path / "other", seed=1)
    report = call(ops.replay_recompute, history, model=str(other))
    assert not report["same_weights"] and report["model"] == str(other)
    assert {f["id"]: f["outcome"] for f in report["facts"]} == {1: "applied", 2: "applied"}
    [old, new] = sorted(rows(history, BaseModel), key=lambda b: b.id)
    assert new.name_or_path == str(other) and new.weights_sha256 != old.weights_sha256
    [op] = rows(history, Operation, kind=ops.OperationKind.replay)
    assert op.base_model_id == new.id and op.hparams_json["layers"] == [1, 2]  # the stored overrides
    r = call(ask, history, prompt="Home of Bob")
    assert r["notes"] == [] and r["top"][0]["token"] == " Rome"
    with pytest.raises(KnowledgerError, match="cannot load model /nonexistent"):
        call(ops.replay_recompute, history, model="/nonexistent")
    assert rows(history, Request, id=3)[0].status.value == "reverted"
