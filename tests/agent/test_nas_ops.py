"""NAS anchors in a workspace (agent.anchors): measured once per base model from the pilot facts on
the clean weights, stored in the ledger beside it, looked up when `nas` is on, re-measured on a new
base; a target above nas_max_ratio × the anchor is refused end to end (fact failed, nothing written)."""
import json

import numpy as np
import pytest

from knowledger.agent import operations as ops
from knowledger.agent.apply import apply_pending
from knowledger.ledger import repository as repo
from knowledger.editors.nas import PILOT_FACTS, PILOT_SHA256, measure_anchor
from knowledger.ledger.models import (BaseModel, Delta, FactTarget, NasAnchor, Operation, RequestVector)
from tests.agent.helpers import (GOOD, HPARAMS, OVERRIDES, STATS_TOKENS, apply_args, call, ok, rows, run,
                                 save_editable_tiny, status, submit)


def nas_apply(db, corpus, **hp):
    return call(apply_pending, db, corpus=corpus, stats_tokens=STATS_TOKENS,
                overrides={**OVERRIDES, "nas": True, **hp})


def _op(db, seq):
    return rows(db, Operation, seq=seq)[0]


def test_the_anchor_is_measured_once_per_base_model_stored_beside_it_and_recorded(ws, corpus):
    submit(ws, *GOOD[0])
    r = nas_apply(ws, corpus)
    assert any(n.startswith("NAS anchor measured on the base weights: ā = ") for n in r["notes"])
    [a] = rows(ws, NasAnchor)
    [base] = rows(ws, BaseModel)
    assert (a.weights_sha256, a.base_model_id, a.layer, a.site) == (base.weights_sha256, base.id, 2, "block")
    assert (a.n_pilot, a.pilot_sha256, len(a.pilot_norms_json)) == (len(PILOT_FACTS), PILOT_SHA256, 20)
    assert a.norm == pytest.approx(measure_anchor(a.pilot_norms_json).norm, rel=1e-12) and a.norm > 0
    assert a.hparams_json["nas"] is False and a.hparams_json["layers"] == [1, 2]
    hp = _op(ws, 1).hparams_json
    assert hp["nas"] is True and hp["nas_anchor"] == a.norm  # the operation records the ā it used
    submit(ws, *GOOD[1])
    r2 = nas_apply(ws, corpus)  # looked up, not measured again
    assert not any("NAS anchor" in n for n in r2["notes"])
    assert len(rows(ws, NasAnchor)) == 1 and _op(ws, 2).hparams_json["nas_anchor"] == a.norm


def test_a_target_above_the_limit_is_refused_the_fact_failed_and_nothing_written(ws, corpus):
    submit(ws, *GOOD[0])
    r = nas_apply(ws, corpus, nas_max_ratio=0.01)  # every target is far above 0.01 ā
    [op] = r["operations"]
    assert op["status"] == "failed" and op["applied"] == []
    [f] = op["failed"]
    assert f["id"] == 1 and f["reason"].startswith("NAS: the solved target's norm ")
    assert "above 0.01× the anchor" in f["reason"]
    assert status(ws, 1) == "failed"
    for table in (Delta, RequestVector, FactTarget):
        assert rows(ws, table) == []
    assert r["weights_sha256"] == call(ops.replay, ws)["weights_sha256"]  # the base weights
    assert _op(ws, 1).weights_sha256_after is None


def test_one_refused_fact_of_a_batch_is_failed_and_the_rest_applied(ws, corpus):
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    call(apply_pending, ws, corpus=corpus, stats_tokens=STATS_TOKENS, overrides=OVERRIDES)
    norms = {t.request_id: float(np.linalg.norm(repo.load_target(t).value))
             for t in rows(ws, FactTarget)}  # ‖z‖ without NAS
    small, big = sorted(norms, key=norms.get)
    assert norms[big] > 1.05 * norms[small]
    call(ops.undo, ws, seq=1)  # back on the base weights: the same v* again
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])  # facts #3 and #4
    ratio = (norms[small] + norms[big]) / (2 * norms[small])
    r = nas_apply(ws, corpus, nas_anchor=norms[small], nas_max_ratio=ratio)  # a manual anchor
    [op] = r["operations"]
    assert op["status"] == "committed" and op["applied"] == [small + 2]
    [f] = op["failed"]
    assert f["id"] == big + 2 and f"above {ratio:g}× the anchor" in f["reason"]
    assert (status(ws, small + 2), status(ws, big + 2)) == ("applied", "failed")
    applied = _op(ws, 3)
    assert {t.request_id for t in rows(ws, FactTarget, operation_id=applied.id)} == {small + 2}
    assert {v.request_id for v in rows(ws, RequestVector, operation_id=applied.id)} == {small + 2}
    assert rows(ws, NasAnchor) == []  # a manual anchor is used as given: nothing measured


def test_replay_recompute_on_a_new_base_measures_its_anchor(ws, corpus, tmp_path):
    submit(ws, *GOOD[0])
    nas_apply(ws, corpus)
    [first] = rows(ws, NasAnchor)
    same = call(ops.replay_recompute, ws)  # the same weights: the recorded anchor, nothing measured
    assert same["same_weights"] and len(rows(ws, NasAnchor)) == 1
    other = save_editable_tiny(tmp_path / "other-base", seed=1)
    r = call(ops.replay_recompute, ws, model=str(other))
    assert not r["same_weights"]
    a, b = rows(ws, NasAnchor)
    assert a.id == first.id and b.weights_sha256 != a.weights_sha256 and b.norm != a.norm
    assert b.weights_sha256 == rows(ws, BaseModel)[-1].weights_sha256
    assert any(n.startswith("NAS anchor measured") for n in r["notes"])
    [replayed] = [o for o in rows(ws, Operation) if o.kind.value == "replay" and o.base_model_id == b.base_model_id]
    assert replayed.hparams_json["nas_anchor"] == b.norm


def test_cli_apply_with_nas(ws, corpus):
    submit(ws, *GOOD[0])
    r = run(*apply_args(corpus), "--set", "nas=true", "--set", "nas_max_ratio=0.01", "--json", db=ws)
    assert r.exit_code == 1  # a fact failed
    out = json.loads(r.stdout)
    [op] = out["operations"]
    assert op["failed"][0]["reason"].startswith("NAS: ")
    assert any(n.startswith("NAS anchor measured") for n in out["notes"])
    shown = ok("show", "1", db=ws).stdout
    assert "NAS: the solved target's norm" in shown


def test_editing_a_loaded_model_with_nas_measures_the_anchor_on_it(tiny_dir, corpus):
    """No ledger (knowledger edit / edit_loaded): the anchor is measured on the model as loaded."""
    import torch

    from knowledger.agent.direct import edit_loaded
    from knowledger.agent.loaded import open_model
    from knowledger.ledger.facts import validate_fact

    facts = [validate_fact(*GOOD[0])]
    changes = {}
    for ratio in (0.01, 2.0):
        lm = open_model(str(tiny_dir))
        w = lm.model.model.layers[2].mlp.down_proj.weight
        w0 = w.detach().clone()
        edit_loaded(lm.model, lm.tokenizer, facts, editor="memit", stats_tokens=STATS_TOKENS, corpus=corpus,
                    overrides={**OVERRIDES, "nas": True, "nas_max_ratio": ratio})
        changes[ratio] = float((w.detach() - w0).norm() / w0.norm())
    assert changes[0.01] < 1e-6 < 1e-3 < changes[2.0]  # refused: no change asked; anchored: an edit
