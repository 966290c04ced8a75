"""Consolidation math (agent.consolidate) in float64 on a tiny model."""
import pytest
import torch

from knowledger.agent.consolidate import consolidate, editor_keys, resolve_recorded
from knowledger.editors import editor as editor_mod
from knowledger.editors.editor import Editor
from knowledger.editors.hparams import EditHParams
from knowledger.editors.requests import EditRequest
from knowledger.editors.values import ValueTargets
from tests.editors.test_editor import TOK
from tests.tiny import tiny_model

FACTS = [EditRequest(p, s, t) for p, s, t in [
    ("{} lives in", "Bob", "Rome"), ("The capital of {} is", "Zork", "Qux"), ("{} works at", "Alice", "Abc"),
    ("{} was born in", "Kim", "Xy"), ("{} plays the", "Lee", "Pq"), ("{} speaks", "Max", "Mn")]]


def _setup(n_context=1):
    torch.manual_seed(0)
    model = tiny_model("llama", init_range=0.1, n_layers=4).double()
    d_in = model.config.intermediate_size
    g = torch.Generator().manual_seed(5)
    X = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    C = {l: X @ X.T / X.shape[1] for l in range(4)}  # a full-rank, non-identity second moment
    hp = EditHParams(layers=(1, 2, 3), n_context=n_context, context_tokens=3, mom2_weight=0.5, v_steps=2)
    return model, Editor(model, TOK, hp, method="memit", second_moments=C), C


def _fixed_targets(monkeypatch, deltas):
    """Make the editor's v* step return given δ, so its solve and consolidation share targets."""
    def fake(model, tokenizer, spec, requests, hp, contexts, **kw):
        return ValueTargets(delta=deltas[[FACTS.index(r) for r in requests]].float(), stats=[{}] * len(requests))
    monkeypatch.setattr(editor_mod, "optimise_values", fake)


def _dense(deltas):
    return {d.layer: d.left.double() @ d.right.double().T for d in deltas}


def _targets(editor, reqs, deltas):
    _, cur = editor._keys_and_current(reqs, editor.hp.v_layer, editor.contexts)  # (n, d) on the base
    return cur.double() + deltas[[FACTS.index(r) for r in reqs]]


def test_consolidating_n_facts_equals_the_one_batch_solve_on_the_base_weights(monkeypatch):
    model, editor, C = _setup()
    deltas = 0.5 * torch.randn(len(FACTS), model.config.hidden_size, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    _fixed_targets(monkeypatch, deltas)
    ref = _dense(editor.compute(FACTS).deltas)  # the editor's one-batch MEMIT solve
    z = _targets(editor, FACTS, deltas)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for chunk in (len(FACTS), 2, 1):
        got = _dense(consolidate(model, editor.spec, FACTS, z, layers=editor.layers, keys=editor_keys(editor),
                                 second_moments=C, lam=editor.hp.mom2_weight, chunk=chunk))
        assert sorted(got) == [1, 2, 3]
        for l in got:  # the factors are float32 (as the editor's): agree to float32 rounding
            assert float((got[l] - ref[l]).norm() / ref[l].norm()) < 1e-5
            assert float(ref[l].norm()) > 1e-3
    for n, p in model.named_parameters():  # consolidation never leaves the model changed
        assert torch.equal(p, before[n])


def test_consolidating_after_dropping_a_fact_equals_consolidating_the_rest():
    model, editor, C = _setup()
    deltas = 0.5 * torch.randn(len(FACTS), model.config.hidden_size, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64)
    kw = dict(layers=editor.layers, keys=editor_keys(editor), second_moments=C, lam=editor.hp.mom2_weight)
    keep = [r for i, r in enumerate(FACTS) if i != 2]
    full = _dense(consolidate(model, editor.spec, FACTS, _targets(editor, FACTS, deltas), **kw))
    # "undo" fact 2 after consolidating all: the state is a function of the active set alone
    rest = _dense(consolidate(model, editor.spec, keep, _targets(editor, keep, deltas), chunk=4, **kw))
    shuffled = keep[::-1]
    again = _dense(consolidate(model, editor.spec, shuffled, _targets(editor, shuffled, deltas), chunk=2, **kw))
    for l in rest:
        assert float((again[l] - rest[l]).norm() / rest[l].norm()) < 1e-5
        assert float((full[l] - rest[l]).norm()) > 1e-6  # dropping the fact does change the solve


def test_joint_ridge_on_recorded_pairs_matches_the_dense_formula():
    g = torch.Generator().manual_seed(3)
    K, V, W0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((10, 7), (5, 7), (5, 10)))
    (d,) = resolve_recorded({4: K}, {4: V}, {4: W0}, {4: "w"}, alpha=0.2)
    ref = (V - W0 @ K) @ K.T @ torch.linalg.inv(K @ K.T + 0.2 * torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(d.left.double() @ d.right.double().T, ref, rtol=1e-5, atol=1e-6)


def test_consolidate_refuses_mismatched_targets():
    model, editor, C = _setup()
    with pytest.raises(ValueError, match="one target per fact"):
        consolidate(model, editor.spec, FACTS, torch.zeros(2, 32), layers=editor.layers,
                    keys=editor_keys(editor), second_moments=C, lam=1.0)
