"""Per-fact residual targets (fact_targets) and NAS anchors (nas_anchors) in the repository."""
from __future__ import annotations

import numpy as np
import pytest

from knowledger.agent.workspace import open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import IntegrityError
from knowledger.ledger.facts import validate_fact
from knowledger.ledger.models import FactTarget, OperationKind, RequestStatus

FACTS = [validate_fact("{} is located in", "The Eiffel Tower", "Rome"), validate_fact("{} plays", "Messi", "chess")]


@pytest.fixture
def ws(ws_dir):
    with open_workspace(ws_dir) as ws:
        yield ws


def _z(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)  # (d,)


def test_targets_round_trip_checked_and_the_newest_active_holder_wins(ws):
    with ws.writing() as s:
        base = repo.current_base_model(s)
        repo.add_requests(s, FACTS)
        first = repo.record_operation(s, kind=OperationKind.apply, base_model_id=base.id, request_ids=[1, 2],
                                      targets=[repo.TargetVector(1, 5, "block", _z(1)),
                                               repo.TargetVector(2, 5, "block", _z(2))])
        second = repo.record_operation(s, kind=OperationKind.heal, base_model_id=base.id, request_ids=[2],
                                       targets=[repo.TargetVector(2, 5, "block", _z(3))])
        for i in (1, 2):
            repo.set_request_status(s, repo.get_request(s, i), RequestStatus.applied, reason="test")
        first_id, second_id = first.id, second.id
    with ws.reading() as s:
        got = repo.active_targets(s, base.id)
        assert sorted(got) == [1, 2]
        assert np.array_equal(got[1].value, _z(1)) and np.array_equal(got[2].value, _z(3))  # the heal's
        assert (got[1].layer, got[1].site, got[1].value.dtype) == (5, "block", np.float32)
        assert sorted(repo.active_targets(s, base.id, [2])) == [2]
        assert [t.request_id for t in repo.operation_targets(s, first_id)] == [1, 2]
    with ws.writing() as s:  # undo the heal: the original's target again
        repo.record_operation(s, kind=OperationKind.undo, base_model_id=base.id, target_operation_id=second_id)
    with ws.reading() as s:
        assert np.array_equal(repo.active_targets(s, base.id)[2].value, _z(2))
    with ws.writing() as s:  # a reverted fact has no active target
        repo.set_request_status(s, repo.get_request(s, 1), RequestStatus.reverted, reason="test")
    with ws.reading() as s:
        assert sorted(repo.active_targets(s, base.id)) == [2]
    with ws.writing() as s:
        row = s.get(FactTarget, repo.operation_targets(s, first_id)[1].id)
        row.value = row.value[:-4] + b"\0\0\0\0"
    with ws.reading() as s, pytest.raises(IntegrityError, match="target of fact #2 at layer 5.*checksum mismatch"):
        repo.active_targets(s, base.id)


def test_anchors_are_found_by_weights_layer_and_site_newest_first(ws):
    kw = dict(n_pilot=20, n_used=19, cutoff=30.0, rule="mean", pilot_norms=[1.0] * 20, pilot_sha256="ab" * 32,
              hparams={"layers": [3, 4]})
    with ws.writing() as s:
        base = repo.current_base_model(s)
        repo.add_anchor(s, weights_sha256="aa" * 32, base_model_id=base.id, layer=4, site="block", norm=10.0, **kw)
        repo.add_anchor(s, weights_sha256="aa" * 32, base_model_id=base.id, layer=4, site="mlp", norm=3.0, **kw)
        repo.add_anchor(s, weights_sha256="aa" * 32, base_model_id=None, layer=4, site="block", norm=11.0, **kw)
    with ws.reading() as s:
        assert repo.find_anchor(s, "aa" * 32, 4, "block").norm == 11.0
        assert repo.find_anchor(s, "aa" * 32, 4, "mlp").norm == 3.0
        assert repo.find_anchor(s, "aa" * 32, 5, "block") is None
        assert repo.find_anchor(s, "bb" * 32, 4, "block") is None
        [a, b, c] = repo.list_anchors(s, "aa" * 32)
        assert (a.pilot_norms_json, a.hparams_json, a.base_model_id) == ([1.0] * 20, {"layers": [3, 4]}, base.id)
        assert repo.list_anchors(s, "bb" * 32) == []
