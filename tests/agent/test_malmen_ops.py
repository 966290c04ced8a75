"""MALMEN in the workspace: registering hyper-networks, apply / undo / redo / replay with one, and
the scheduler's MALMEN rule. On the editable tiny model with an untrained hyper-network."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from knowledger.agent import config, hypernets
from knowledger.agent import operations as ops
from knowledger.agent.facts import list_operations, show_fact
from knowledger.agent.live import state_hash
from knowledger.agent.scheduler import (DEFAULT_MALMEN_MIN_BATCH, EditSettings, History, PendingFact,
                                        choose_editor, plan)
from knowledger.agent.workspace import Location, open_workspace
from knowledger.editors.malmen import HyperConfig, HyperNet, save_hypernet
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError, KnowledgerError
from knowledger.ledger.models import Artifact, BaseModel, Delta, Operation, Request, RequestVector
from tests.agent.helpers import GOOD, OVERRIDES, STATS_TOKENS, call, data, rows, save_tiny_hypernet, submit



@pytest.fixture
def net_a(tmp_path, tiny_dir):
    folder = tmp_path / "net-a"
    sha = save_tiny_hypernet(folder, tiny_dir, meta=dict(step=40, model="tiny", validation=dict(
        efficacy=0.9, paraphrase=0.5, neighborhood=0.8, score=0.73, seconds=1.0)))
    return folder, sha


@pytest.fixture
def net_b(tmp_path, tiny_dir):
    folder = tmp_path / "net-b"
    return folder, save_tiny_hypernet(folder, tiny_dir, seed=1)


def add(db, folder, **kw):
    return call(hypernets.add, db, folder=folder, **kw)


def apply(db, **kw):
    with open_workspace(db) as w:
        return data(ops.apply_pending(w, **kw))


def status(db, fact_id):
    return rows(db, Request, id=fact_id)[0].status.value


def base_hash(db):
    [bm] = rows(db, BaseModel)
    return state_hash(bm.weights_sha256, {})


# --- registering --------------------------------------------------------------------------------
def test_add_copies_it_into_the_workspace_records_it_once_and_makes_it_current(ws, net_a, net_b):
    folder, sha = net_a
    report = add(ws, folder)
    assert (report["sha256"], report["created"], report["copied"], report["current"]) == (sha, True, True, True)
    assert report["path"] == str(ws / "artifacts" / sha) and report["recorded_path"] == f"artifacts/{sha}"
    assert sorted(p.name for p in (ws / "artifacts" / sha).iterdir()) == ["config.json", "hypernet.safetensors"]
    again = add(ws, folder)
    assert (again["created"], again["copied"], again["id"]) == (False, False, report["id"])
    [row] = rows(ws, Artifact)
    assert row.kind == "malmen-hypernet" and row.meta_json["hyper"]["layers"] == [2, 3]
    assert row.meta_json["meta"]["step"] == 40
    b = add(ws, net_b[0], use=False)
    listed = call(hypernets.list_hypernets, ws)
    assert [(r["sha256"], r["current"]) for r in listed] == [(sha, True), (net_b[1], False)]
    assert listed[0]["training"]["validation"] == dict(efficacy=0.9, paraphrase=0.5, neighborhood=0.8, score=0.73)
    assert listed[1]["training"] is None  # saved without training metadata
    used = call(hypernets.use, ws, sha_prefix=b["sha256"][:8])
    assert used["current"] and used["previous"] == sha
    with open_workspace(ws) as w, w.reading() as s:
        assert EditSettings.load(s).malmen_hypernet == net_b[1]


def test_add_refuses_a_folder_that_is_not_a_hypernet_or_does_not_fit_the_base_model(ws, tmp_path, tiny_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KnowledgerError, match="is not a MALMEN hyper-network .*train-malmen"):
        add(ws, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "bad" / "hypernet.safetensors").write_bytes(b"nope")
    with pytest.raises(KnowledgerError, match="bad is not a usable MALMEN hyper-network"):
        add(ws, tmp_path / "bad")
    from knowledger.editors.models import load_model

    cfg = HyperConfig.for_model(load_model(str(tiny_dir))[0], layers=(2, 3), rank=8)
    save_hypernet(HyperNet(replace(cfg, n_model_layers=6)), tmp_path / "deeper")
    with pytest.raises(KnowledgerError, match="trained for a llama with 6 layers .*this model is a llama with 4 layers"):
        add(ws, tmp_path / "deeper")
    save_hypernet(HyperNet(replace(cfg, model_type="gpt2")), tmp_path / "gpt2")
    with pytest.raises(KnowledgerError, match="trained for a gpt2; the workspace's base model .* is a llama"):
        add(ws, tmp_path / "gpt2")
    assert rows(ws, Artifact) == [] and not (ws / "artifacts").exists()  # checked before any copy


# --- apply / undo / redo / replay ----------------------------------------------------------------
def test_apply_with_malmen_records_the_hypernet_vectors_and_memory_and_undo_restores_the_weights(ws, net_a):
    folder, sha = net_a
    art = add(ws, folder)["id"]
    ids = [submit(ws, *f) for f in GOOD[:3]]
    report = apply(ws, editor="malmen")
    [op] = rows(ws, Operation)
    assert (op.editor, op.status.value, op.artifact_id, op.distribution) == ("malmen", "committed", art, None)
    assert op.hparams_json["hypernet_sha256"] == sha and op.hparams_json["layers"] == [2, 3]
    assert op.layers_json == [2, 3] and op.metrics_json["stats"] is None
    assert op.metrics_json["diagnostics"]["hypernet_sha256"] == sha
    assert [status(ws, i) for i in ids] == ["applied"] * 3
    assert sorted(d.layer for d in rows(ws, Delta, operation_id=op.id)) == [2, 3]
    vectors = rows(ws, RequestVector, operation_id=op.id)
    assert sorted((v.request_id, v.layer) for v in vectors) == [(i, l) for i in ids for l in (2, 3)]
    for v in vectors:
        fv = repo.load_vectors(v)
        assert fv.key.shape == (96,) and fv.value.shape == (32,)
    with open_workspace(ws) as w, w.reading() as s:
        assert [(m.layer, m.n_keys, m.as_of_seq) for m in repo.load_memory(s, op.base_model_id)] == [(2, 3, 1), (3, 3, 1)]
    assert report["weights_sha256"] == op.weights_sha256_after != base_hash(ws)
    undone = call(ops.undo, ws, seq=1)
    assert undone["weights_sha256"] == base_hash(ws) and [status(ws, i) for i in ids] == ["reverted"] * 3
    redone = call(ops.redo, ws, seq=1)  # the recorded deltas, verbatim, and the same hyper-network
    assert redone["weights_sha256"] == op.weights_sha256_after
    assert rows(ws, Operation, seq=3)[0].artifact_id == art
    replayed = call(ops.replay, ws)
    assert replayed["mismatches"] == [] and replayed["weights_sha256"] == op.weights_sha256_after


def test_log_and_show_name_the_hypernet(ws, net_a):
    add(ws, net_a[0])
    fid = submit(ws, *GOOD[0])
    apply(ws, editor="malmen")
    [op] = call(list_operations, ws)
    assert (op["editor"], op["hypernet_sha256"]) == ("malmen", net_a[1])
    [held] = call(show_fact, ws, fact_id=fid)["operations"]
    assert (held["editor"], held["hypernet_sha256"]) == ("malmen", net_a[1])


def test_recomputing_a_malmen_batch_uses_its_own_hypernet_not_the_current_one(ws, net_a, net_b):
    a = add(ws, net_a[0])["id"]
    ids = [submit(ws, *f) for f in GOOD[:3]]
    apply(ws, editor="malmen")
    b = add(ws, net_b[0])["id"]  # now the current one
    report = call(ops.undo, ws, fact_id=ids[0])  # undo seq 2, re-apply #2 #3 as seq 3
    assert [(o["kind"], o["editor"]) for o in report["operations"]] == [("undo", None), ("apply", "malmen")]
    again = rows(ws, Operation, seq=3)[0]
    assert again.artifact_id == a != b and again.hparams_json["hypernet_sha256"] == net_a[1]
    assert [status(ws, i) for i in ids] == ["reverted", "applied", "applied"]
    call(ops.redo, ws, fact_id=ids[0])  # one fact of a larger batch: recomputed alone, same network
    assert rows(ws, Operation, seq=4)[0].artifact_id == a
    with open_workspace(ws) as w:  # a new lineage from clean weights: each batch keeps its network
        recomputed = data(ops.replay_recompute(w))
    assert [f["outcome"] for f in recomputed["facts"]] == ["applied"] * 3
    assert {op.artifact_id for op in rows(ws, Operation) if op.kind.value == "replay"} == {a}


def test_a_hypernet_whose_files_changed_is_refused_and_adding_it_again_repairs_the_copy(ws, net_a):
    folder, sha = net_a
    add(ws, folder)
    weights = ws / "artifacts" / sha / "hypernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # still loads, hashes differently
    weights.write_bytes(bytes(data))
    submit(ws, *GOOD[0])
    with pytest.raises(IntegrityError, match=f"hyper-network {sha[:12]} in .*not the registered sha256"):
        apply(ws, editor="malmen")
    assert rows(ws, Operation) == [] and status(ws, 1) == "pending"
    assert add(ws, folder)["copied"]
    assert apply(ws, editor="malmen")["operations"][0]["applied"] == [1]
    weights.unlink()
    submit(ws, *GOOD[1])
    with pytest.raises(KnowledgerError, match=f"hyper-network {sha[:12]} is missing from .*hypernet add"):
        apply(ws, editor="malmen")


def test_malmen_without_a_registered_hypernet_is_one_clear_error(ws):
    submit(ws, *GOOD[0])
    for dry_run in (True, False):
        with pytest.raises(KnowledgerError) as e:
            apply(ws, editor="malmen", dry_run=dry_run)
        assert str(e.value) == hypernets.NONE_REGISTERED


def test_auto_picks_malmen_from_malmen_min_batch_only_with_a_hypernet(ws, net_a, corpus):
    for f in GOOD[:3]:
        submit(ws, *f)
    call(config.set_value, ws, key="malmen_min_batch", raw="3")
    plan_of = lambda **kw: [(b["editor"], b["reason"]) for b in apply(ws, dry_run=True, **kw)["plan"]["batches"]]  # noqa: E731
    assert plan_of() == [("emmet", "auto: 3 facts < auto_memit_min_batch 256")]
    add(ws, net_a[0])
    assert plan_of() == [("malmen", f"auto: 3 facts ≥ malmen_min_batch 3, hyper-network {net_a[1][:12]}")]
    assert [e for e, _ in plan_of(batch_size=2)] == ["emmet", "emmet"]
    report = apply(ws, corpus=corpus, stats_tokens=STATS_TOKENS, overrides=OVERRIDES)
    assert [(o["editor"], o["applied"]) for o in report["operations"]] == [("malmen", [1, 2, 3])]
    with open_workspace(ws) as w, w.reading() as s:  # apply stored its settings, not the hyper-network's
        assert repo.get_setting(s, "malmen_min_batch") == 3 and repo.get_setting(s, "hparams_overrides") == OVERRIDES


def test_a_bare_url_workspace_records_the_folder_where_it_is(tmp_path, net_a):
    loc = Location("postgresql://u@db.example/ledger", home=tmp_path / "home")
    assert hypernets._keep(loc, net_a[0], net_a[1]) == (str(net_a[0].resolve()), False)
    assert hypernets.folder_of(loc, str(net_a[0].resolve())) == net_a[0].resolve()
    assert not (tmp_path / "home").exists()


def test_an_operation_without_artifact_id_is_recomputed_with_the_sha_its_hparams_name(ws, net_a):
    """What a downgrade through 0004 and back leaves: artifact_id gone, hparams_json intact."""
    art = add(ws, net_a[0])["id"]
    op = SimpleNamespace(seq=7, artifact_id=None, hparams_json={"hypernet_sha256": net_a[1]})
    gone = SimpleNamespace(seq=7, artifact_id=None, hparams_json={"hypernet_sha256": "0" * 64})
    with open_workspace(ws) as w, w.reading() as s:
        assert hypernets.recorded_ref(s, op).artifact_id == art
        with pytest.raises(KnowledgerError, match="operation seq 7 ran MALMEN with hyper-network 000000000000, "
                                                  "which this workspace has not registered"):
            hypernets.recorded_ref(s, gone)


# --- the scheduler's rule (no model) -----------------------------------------------------------------
def pending(n):
    return [PendingFact(i, "{} is in", f"S{i}", "X") for i in range(1, n + 1)]


def test_choose_editor_picks_malmen_at_the_threshold_only_with_a_hypernet():
    with_net = EditSettings(malmen_min_batch=100, malmen_hypernet="ab" * 32)
    assert choose_editor(100, "auto", 256, None, with_net) == (
        "malmen", f"auto: 100 facts ≥ malmen_min_batch 100, hyper-network {'ab' * 6}")
    assert choose_editor(99, "auto", 256, None, with_net)[0] == "emmet"
    assert choose_editor(5000, "auto", 256, None, EditSettings(malmen_min_batch=100))[0] == "memit"
    assert EditSettings().malmen_min_batch == DEFAULT_MALMEN_MIN_BATCH == 0  # off unless asked for
    assert choose_editor(5000, "auto", 256, None, EditSettings(malmen_hypernet="ab" * 32))[0] == "memit"
    # before the lifelong rule: a batch this large is MALMEN's, below it the lifelong editor as today
    lifelong = replace(with_net, lifelong_min_active=10, lifelong_norm_growth=10.0)
    assert choose_editor(100, "auto", 256, History(active_edits=50), lifelong)[0] == "malmen"
    assert choose_editor(10, "auto", 256, History(active_edits=50), lifelong)[0] == "encore"
    assert choose_editor(3, "malmen", 256) == ("malmen", "asked for")


def test_plan_cuts_batches_and_picks_malmen_for_the_full_ones():
    st = EditSettings(malmen_min_batch=3, malmen_hypernet="cd" * 32)
    p = plan(pending(7), batch_size=3, settings=st)
    assert [b.editor for b in p.batches] == ["malmen", "malmen", "emmet"]
    assert [b.editor for b in plan(pending(7), batch_size=3, settings=replace(st, malmen_hypernet=None)).batches] \
        == ["emmet"] * 3
    assert json.dumps(p.as_dict())  # JSON-ready


def test_settings_save_leaves_the_hypernet_to_its_commands(ws):
    with open_workspace(ws) as w:
        with w.writing() as s:
            repo.set_setting(s, "malmen_hypernet", "ef" * 32)
            stale = replace(EditSettings.load(s), malmen_hypernet="00" * 32)
            stale.save(s)
        with w.reading() as s:
            assert repo.get_setting(s, "malmen_hypernet") == "ef" * 32
            assert repo.get_setting(s, "malmen_min_batch") == DEFAULT_MALMEN_MIN_BATCH


def test_malmen_lambda_tokens_is_recorded_and_recomputed_with_the_same_scale(ws, tmp_path, tiny_dir):
    """The workspace's malmen_lambda reaches the ledger's MALMEN batches: recorded in the operation's
    hparams, applied to λ (diagnostics), and an undo's re-apply recomputes with the recorded scale
    even after the setting changed back."""
    folder = tmp_path / "net-t"
    save_tiny_hypernet(folder, tiny_dir, meta=dict(train_tokens=1.0))  # trained at 1 row per step
    add(ws, folder)
    ids = [submit(ws, *f) for f in GOOD[:3]]
    apply(ws, editor="malmen", overrides=dict(OVERRIDES, malmen_lambda="tokens"))
    [op] = rows(ws, Operation)
    assert op.hparams_json["malmen_lambda"] == "tokens"
    diag = op.metrics_json["diagnostics"]
    n = diag["layer2"]["tokens"]
    assert n == 3 and diag["layer2"]["log_lambda"] == pytest.approx(math.log(3))  # untrained λ is 0
    with open_workspace(ws) as w, w.writing() as s:  # the setting back to "trained" (as an apply stores it)
        repo.set_setting(s, "hparams_overrides", dict(OVERRIDES, malmen_lambda="trained"))
    call(ops.undo, ws, fact_id=ids[0])  # re-applies #2 #3 with the recorded scale
    again = rows(ws, Operation, seq=3)[0]
    assert again.hparams_json["malmen_lambda"] == "tokens"
    assert again.metrics_json["diagnostics"]["layer2"]["log_lambda"] == pytest.approx(math.log(2))


def test_malmen_lambda_tokens_refuses_a_hypernet_that_does_not_record_its_batch(ws, net_a):
    add(ws, net_a[0])
    submit(ws, *GOOD[0])
    with pytest.raises(KnowledgerError, match="does not record"):
        apply(ws, editor="malmen", overrides=dict(OVERRIDES, malmen_lambda="tokens"))
    [fact] = rows(ws, Request)
    assert fact.status.value == "pending" and rows(ws, Operation) == []
