"""The UltraEdit-class editor: ridge solve, lifelong statistics (update/undo), behaviour on tiny models."""
import pytest
import torch

from knowledger.editors.apply import apply_deltas, snapshot_params
from knowledger.editors.evaluate import score
from knowledger.editors.lifelong_norm import BatchMoments, LifelongStats, Moments
from knowledger.editors.requests import EditRequest
from knowledger.editors.ultraedit import UltraEditHParams, UltraEditor, preset_for, ridge_delta
from tests.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
FACTS = [EditRequest("{} lives in", s, t) for s, t in zip(
    ["Bob", "Zork", "Alice", "Kim", "Lee", "Max", "Sam", "Tom"], ["Rome", "Qux", "Abc", "Xy", "Pq", "Mn", "Jk", "Wv"])]


def test_ridge_solve_matches_the_dense_float64_reference():
    g = torch.Generator().manual_seed(1)
    K = torch.randn(12, 5, generator=g, dtype=torch.float64)  # (d_in, m)
    V = torch.randn(7, 5, generator=g, dtype=torch.float64)  # (d_out, m)
    left, right, diag = ridge_delta(K, V, 0.3, out_dtype=torch.float64)
    dense = V @ K.T @ torch.linalg.inv(K @ K.T + 0.3 * torch.eye(12, dtype=torch.float64))  # (d_out, d_in)
    torch.testing.assert_close(left @ right.T, dense, rtol=1e-10, atol=1e-12)
    rows = torch.linalg.solve(K @ K.T + 0.3 * torch.eye(12, dtype=torch.float64), K @ V.T)  # paper's row form
    torch.testing.assert_close(left @ right.T, rows.T, rtol=1e-10, atol=1e-12)
    assert diag["delta_fro"] == pytest.approx(float(dense.norm()), rel=1e-10)
    with pytest.raises(ValueError):
        ridge_delta(K, V, 0.0)


def _batches():
    g = torch.Generator().manual_seed(2)
    return [BatchMoments.of({3: torch.randn(m, 6, generator=g, dtype=torch.float64) * s + mu,
                             5: torch.randn(m, 4, generator=g, dtype=torch.float64)})
            for m, s, mu in ((9, 1.0, 0.0), (4, 3.0, 5.0), (13, 0.5, -2.0))]


def test_merged_statistics_equal_the_moments_of_all_rows():
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(m, 6, generator=g, dtype=torch.float64) + i for i, m in enumerate((5, 1, 8))]
    state = LifelongStats()
    for r in rows:
        state = state.update({0: r})
    ref = Moments.of(torch.cat(rows))
    got = state.layers[0]
    assert got.n == 14
    torch.testing.assert_close(got.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.m2, ref.m2, rtol=1e-12, atol=1e-12)


def test_statistics_after_update_update_undo_equal_those_rebuilt_from_the_surviving_batches():
    b1, b2, b3 = _batches()
    s0 = LifelongStats()
    s1 = s0.update(b1)
    s2 = s1.update(b2)
    s3 = s2.update(b3)
    assert s0.layers == {} and s1.count(3) == 9  # update returns a new state, never mutates
    undone = s3.remove(b2)  # undo the middle batch
    rebuilt = LifelongStats.rebuild([b1, b3])
    for layer in (3, 5):
        a, b = undone.layers[layer], rebuilt.layers[layer]
        assert a.n == b.n == 22
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-10, atol=1e-10)
    back = LifelongStats.from_tensors(s3.to_tensors())
    torch.testing.assert_close(back.layers[3].m2, s3.layers[3].m2, rtol=0, atol=0)
    assert BatchMoments.from_tensors(b2.to_tensors()).layers[5].n == 4
    empty = s1.remove(b1)
    assert empty.count(3) == 0
    with pytest.raises(ValueError):
        s1.remove(b3)  # more rows than the state holds


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_edit_raises_the_target_probability_and_leaves_model_and_state_alone(family):
    model = tiny_model(family, init_range=0.3, n_layers=6)
    editor = UltraEditor(model, TOK, UltraEditHParams(layers=(2, 3, 4), lr=1e-2))
    names = [editor.spec.weight_name(l) for l in editor.layers]
    saved = snapshot_params(model, names)
    items = [(r.text, r.target_new) for r in FACTS]
    before = [s.logprob for s in score(model, TOK, items)]
    res = editor.compute(FACTS)
    for n in names:  # compute() never writes weights
        assert torch.equal(model.get_parameter(n), saved[n])
    assert editor.state.layers == {} and editor.last_step.after.count(2) > 0
    assert [d.layer for d in res.deltas] == [2, 3, 4]
    assert res.keys[2].shape == (model.get_parameter(names[0]).shape[-1 if family == "llama" else 0], 8)
    apply_deltas(model, editor.spec, res.deltas)
    after = [s.logprob for s in score(model, TOK, items)]
    assert sum(a > b + 0.5 for a, b in zip(after, before)) >= 7
    editor.advance(editor.last_step)
    assert editor.state.count(2) == editor.last_step.batch.layers[2].n


def test_without_normalisation_and_bad_settings():
    model = tiny_model("llama", init_range=0.3, n_layers=6)
    res = UltraEditor(model, TOK, UltraEditHParams(layers=(3,), normalise=False, lr=1e-2)).compute(FACTS[:2])
    from knowledger.editors.tokens import target_ids
    assert res.deltas[0].rank == sum(len(target_ids(TOK, r.target_new)) for r in FACTS[:2])  # a row per token
    with pytest.raises(ValueError):
        UltraEditHParams(layers=(3, 2))
    with pytest.raises(ValueError):
        UltraEditHParams(layers=(1,), lr=0.0)
    with pytest.raises(ValueError):
        UltraEditor(model, TOK, UltraEditHParams(layers=(6,)))
    hp, measured = preset_for(tiny_model("llama", n_layers=4))
    assert not measured and hp.layers[-1] < 4


def test_the_workspace_knobs_fill_in_over_the_family_preset():
    """editors.hparams' ultraedit_* knobs (what --set and the ledger carry) over editors.ultraedit's
    presets: 0 / [] keep the preset's value; only the untouched llama-30L preset is 'measured'."""
    from types import SimpleNamespace

    from knowledger.editors.hparams import EditHParams, HParamError, parse_value
    from knowledger.editors.ultraedit import as_edit_hparams, hparams_for

    smollm = SimpleNamespace(model_type="llama", num_hidden_layers=30)
    hp = EditHParams(layers=(3, 4))
    got, measured = hparams_for(smollm, hp)
    assert got == UltraEditHParams(layers=(18, 19, 20, 21, 22, 23), lr=1e-4, ridge=1.0) and measured
    faster, m = hparams_for(smollm, hp.replace(ultraedit_lr=1e-3))
    assert (faster.lr, faster.layers, m) == (1e-3, got.layers, False)
    assert hparams_for(smollm, hp.replace(ultraedit_normalise=False))[0].normalise is False
    recorded = as_edit_hparams(hp, faster)  # what an operation records: the values that ran
    assert recorded.ultraedit_layers == (18, 19, 20, 21, 22, 23) and recorded.ultraedit_lr == 1e-3
    assert hparams_for(smollm, EditHParams.from_dict(recorded.to_dict())) == (faster, False)
    assert hparams_for(SimpleNamespace(model_type="qwen2", num_hidden_layers=24), hp)[1] is False
    assert parse_value("ultraedit_layers", "[]") == () and parse_value("ultraedit_layers", "[3,4]") == (3, 4)
    for name, bad in (("ultraedit_layers", "[4,3]"), ("ultraedit_layers", "[-1]"), ("ultraedit_eps", 0),
                      ("ultraedit_ridge", -1), ("ultraedit_lr", "inf"), ("ultraedit_normalise", "maybe")):
        with pytest.raises(HParamError, match=f"hparams.{name}"):
            parse_value(name, bad)
