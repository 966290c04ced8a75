"""NAS norm anchors (editors.nas): float64 math, and the editor's flag-guarded call site."""
import hashlib
import json

import pytest
import torch

from knowledger.editors.editor import Editor
from knowledger.editors.hparams import EditHParams
from knowledger.editors.nas import (PILOT_FACTS, PILOT_SHA256, AnchorError, anchor_targets, measure_anchor,
                                   pilot_norms, pilot_requests)
from tests.editors.test_editor import FACTS, TOK, identity_moments
from tests.tiny import tiny_model


def test_anchored_target_has_the_anchor_norm_and_the_same_direction():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 16, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.9, 7)[:, None]
    anchor = float(z.norm(dim=1).mean())
    out = anchor_targets(z, anchor, max_ratio=2.0)
    assert out.refused == {}
    assert out.values.dtype == torch.float64
    torch.testing.assert_close(out.values.norm(dim=1), torch.full((7,), anchor, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    cos = (out.values * z).sum(1) / (out.values.norm(dim=1) * z.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(7, dtype=torch.float64), rtol=1e-12, atol=0)
    assert bool(((out.values / z) > 0).all())  # same direction, not the opposite one


def test_targets_above_twice_the_anchor_are_refused_with_a_reason():
    z = torch.zeros(4, 3, dtype=torch.float64)
    z[:, 0] = torch.tensor([1.0, 1.99, 2.01, 5.0])
    cur = torch.full((4, 3), 0.25, dtype=torch.float64)
    out = anchor_targets(z, 1.0, max_ratio=2.0, fallback=cur)
    assert sorted(out.refused) == [2, 3]
    assert "above 2× the anchor" in out.refused[2] and "5" in out.refused[3]
    torch.testing.assert_close(out.values[2:], cur[2:], rtol=0, atol=0)  # refused: no change asked
    torch.testing.assert_close(out.values[:2, 0], torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert anchor_targets(z, 1.0, max_ratio=6.0).refused == {}
    assert 0 in anchor_targets(torch.zeros(1, 3), 1.0).refused  # a zero target has no direction


def test_measure_anchor_drops_the_high_tail_only():
    norms = torch.cat([torch.linspace(10.0, 12.0, 19), torch.tensor([100.0])]).double()
    a = measure_anchor(norms)
    assert a.n_pilot == 20 and a.n_used == 19 and a.norm == pytest.approx(11.0)
    assert measure_anchor([3.0]).norm == 3.0
    with pytest.raises(AnchorError):
        measure_anchor([])
    with pytest.raises(AnchorError):
        measure_anchor([1.0, float("nan")])


def test_nas_without_an_anchor_is_the_workspaces_anchor_and_the_editor_refuses_to_compute_without_one():
    hp = EditHParams(layers=(1, 2), nas=True)  # nas_anchor 0: filled in by the agent (agent.anchors)
    assert hp.nas and hp.nas_anchor == 0.0
    assert not EditHParams(layers=(1, 2)).nas  # off by default
    with pytest.raises(ValueError, match="no nas_anchor is given"):
        _editor(tiny_model("llama", init_range=0.1), nas=True).compute(FACTS)


def test_the_pilot_facts_are_fixed_and_named_by_their_sha256():
    reqs = pilot_requests()
    assert len(reqs) == len(PILOT_FACTS) == 20 and len({r.subject for r in reqs}) == 20
    assert PILOT_SHA256 == hashlib.sha256(json.dumps(PILOT_FACTS).encode()).hexdigest()


@pytest.mark.parametrize("method, site", [("memit", "block"), ("pmet", "mlp")])
def test_pilot_norms_are_the_norms_of_the_targets_the_editor_solves_for(method, site):
    """‖v*‖ from pilot_norms == ‖z‖ of the same facts in compute() (its EditResult.targets), at
    the site the method's target lives (PMET: layer L's MLP output)."""
    model = tiny_model("llama", init_range=0.1)
    ed = _editor(model, method=method)
    norms = pilot_norms(ed, FACTS)  # (n,)
    res = ed.compute(FACTS)
    assert res.target_layer == 2 and res.target_site == site
    torch.testing.assert_close(res.targets.double().norm(dim=1), norms, rtol=1e-4, atol=0)


def _editor(model, method="memit", **hp):
    params = dict(layers=(1, 2), v_steps=10, n_context=1, mom2_weight=1.0, emmet_ridge=0.0, **hp)
    return Editor(model, TOK, EditHParams(**params), method=method,
                  second_moments=identity_moments(model, range(4)))


def test_editor_anchors_targets_and_reports_refusals():
    model = tiny_model("llama", init_range=0.1)
    norms = pilot_norms(_editor(model), FACTS)  # (n,)
    assert norms.shape == (2,) and bool((norms > 0).all())
    anchor = measure_anchor(norms).norm
    res = _editor(model, nas=True, nas_anchor=anchor).compute(FACTS)
    assert res.diagnostics["refused"] == {}
    L = 2  # with the anchor far below every target, all facts are refused and ask for no change
    small = _editor(model, nas=True, nas_anchor=float(norms.min()) / 10).compute(FACTS)
    assert sorted(small.diagnostics["refused"]) == [0, 1]
    assert small.diagnostics[f"layer{L}"]["residual_before"] == pytest.approx(0.0, abs=1e-4)
