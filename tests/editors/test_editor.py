"""The editor pipeline on tiny random models of every family: invariants, shapes, exactness."""
import pytest
import torch

from knowledger.editors.apply import apply_deltas
from knowledger.editors.editor import METHODS, Editor
from knowledger.editors.evaluate import score
from knowledger.editors.forward import PrefixCache, capture, run_from
from knowledger.editors.hparams import EditHParams
from knowledger.editors.model_spec import spec_for
from knowledger.editors.requests import EditRequest
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
FACTS = [
    EditRequest("{} lives in", "Bob", "Rome", target_true="Paris",
                paraphrases=("Where is Bob? Bob lives in",), neighborhood=(("Alice lives in", "Paris"),)),
    EditRequest("The capital of {} is", "Zork", "Qux", target_true="Abc"),
]


SHORT = [EditRequest("{} lives in", "Bob", "X", target_true="Y"),
         EditRequest("The capital of {} is", "Zork", "Q", target_true="Z")]


def identity_moments(model, layers):
    spec = spec_for(model)
    d_in = spec.mlp_dims(model)[1]
    return {l: torch.eye(d_in) for l in layers}


def make(family, method, init_range=None, n_layers=4, **hp):
    model = tiny_model(family, init_range=init_range, n_layers=n_layers)
    params = dict(layers=(1, 2), v_steps=15, n_context=2, mom2_weight=1.0, emmet_ridge=0.0)
    if method == "alphaedit":  # C = I has no null space to speak of: let 90% of it count
        params.update(alphaedit_null_threshold=0.9, alphaedit_null_scale="energy")
    params.update(hp)
    hparams = EditHParams(**params)
    return model, Editor(model, TOK, hparams, method=method, second_moments=identity_moments(model, range(n_layers)))


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_forward_matches_the_full_model(family):
    model = tiny_model(family)
    spec = spec_for(model)
    ids = torch.randint(4, 60, (3, 9))
    with torch.no_grad():
        full = model.get_submodule(spec.base)(input_ids=ids, use_cache=False).last_hidden_state
        for start in (1, 2, 3):
            h = capture(model, spec, ids, block_inputs=[start])[f"in:{start}"]
            torch.testing.assert_close(run_from(model, spec, start, h), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_forward_continues_the_prefix_cache_exactly(family):
    """Recomputing only the columns from each row's start on, against the cached prefix, gives
    what the full forward gives there (the v* optimisation's inner loop)."""
    model = tiny_model(family, init_range=0.1)
    spec = spec_for(model)
    ids = torch.randint(4, 60, (3, 10))
    lengths, start = torch.tensor([10, 7, 9]), torch.tensor([4, 2, 6])
    with torch.no_grad():
        full = model.get_submodule(spec.base)(input_ids=ids, use_cache=False).last_hidden_state
        prefix = PrefixCache(model, spec, ids, block_inputs=[2])
        S = int((lengths - start).max())
        cols = (start[:, None] + torch.arange(S)[None]).clamp(max=9)  # (3, S)
        hidden = prefix.block_inputs[2][torch.arange(3)[:, None], cols]  # (3, S, d)
        pos, mask = prefix.suffix_inputs(start, S)
        out = run_from(model, spec, 2, hidden, position_ids=pos, cache=prefix.select(torch.arange(3)),
                       attention_mask=mask)
    for r in range(3):
        n = int(lengths[r] - start[r])
        torch.testing.assert_close(out[r, :n], full[r, start[r]:lengths[r]], atol=1e-5, rtol=1e-4)


def test_editing_at_the_last_layer_works():
    _, editor = make("llama", "emmet", layers=(2, 3))
    assert [d.layer for d in editor.compute(FACTS).deltas] == [2, 3]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compute_leaves_the_model_untouched_and_returns_consistent_deltas(family, method):
    model, editor = make(family, method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    facts = FACTS[:1] if method == "rome" else FACTS
    res = editor.compute(facts)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"compute() changed {k}"
    spec = editor.spec
    expected_layers = [2] if method == "rome" else [1, 2]
    assert [d.layer for d in res.deltas] == expected_layers
    d_out, d_in = spec.mlp_dims(model)
    for d in res.deltas:
        assert d.param == spec.weight_name(d.layer)
        assert d.shape == (d_out, d_in) and d.rank == len(facts)
        assert torch.isfinite(d.left).all() and torch.isfinite(d.right).all()
        assert res.keys[d.layer].shape == (d_in, len(facts))
        assert res.values[d.layer].shape == (d_out, len(facts))
    assert len(res.value_stats) == len(facts)
    assert res.timings["values_s"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_emmet_meets_its_equality_constraints(family):
    model, editor = make(family, "emmet")
    res = editor.compute(FACTS)
    spec = editor.spec
    for d in res.deltas:  # each layer's constraint, at the keys it was solved for
        W = spec.to_math(spec.edited_weight(model, d.layer)).double()
        lhs = (W + d.dense(torch.float64)) @ res.keys[d.layer].double()
        torch.testing.assert_close(lhs, res.values[d.layer].double(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_applied_emmet_edit_puts_layer_L_exactly_on_the_target_value(family):
    """With no context prefixes the keys are the bare prompt's, and EMMET (ridge 0) meets the last
    layer's constraint exactly: layer L's output at the subject becomes z = h_L + δ."""
    model, editor = make(family, "emmet", init_range=0.1, n_context=0)
    spec, L = editor.spec, editor.hp.v_layer
    res = editor.compute(FACTS)
    _, cur = editor._keys_and_current(FACTS, L, [""])  # (n, d) unedited h_L
    apply_deltas(model, spec, res.deltas)
    _, after = editor._keys_and_current(FACTS, L, [""])  # (n, d) edited h_L
    target = res.values[L] - spec.to_math(spec.edited_weight(model, L)).double() @ res.keys[L].double()
    torch.testing.assert_close(target.abs().max().item(), 0.0, atol=1e-3, rtol=0)  # W'K = V
    moved = (after - cur).norm(dim=-1)
    wanted = torch.tensor([s["delta_norm"] for s in res.value_stats])
    torch.testing.assert_close(moved, wanted, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["memit", "emmet", "pmet", "alphaedit", "encore"])
def test_applying_the_edit_raises_the_target_probability(method):
    model, editor = make("gpt2", method, init_range=0.3, n_layers=6, v_steps=30, mom2_weight=0.1)
    items = [(f.text, f.target_new) for f in SHORT]
    before = [s.logprob for s in score(model, TOK, items)]
    apply_deltas(model, editor.spec, editor.compute(SHORT).deltas)
    after = [s.logprob for s in score(model, TOK, items)]
    assert sum(after) > sum(before) + 1.0, (before, after)


def test_value_optimisation_stops_early_and_only_when_allowed():
    _, editor = make("llama", "emmet", v_steps=7, early_stop_loss=float("inf"))
    assert [s["steps"] for s in editor.compute(FACTS).value_stats] == [0, 0]  # goal met at once
    _, editor = make("llama", "emmet", v_steps=7, early_stop=False)
    stats = editor.compute(FACTS).value_stats
    assert [s["steps"] for s in stats] == [7, 7] and not any(s["converged"] for s in stats)


def test_rome_edits_one_fact_and_bad_settings_are_refused():
    model, editor = make("llama", "rome")
    with pytest.raises(ValueError, match="one fact"):
        editor.compute(FACTS)
    with pytest.raises(ValueError, match="unknown editor"):
        make("llama", "nope")
    with pytest.raises(ValueError, match="out of range"):
        make("llama", "memit", layers=(2, 7))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no key statistics"):
        Editor(model, TOK, EditHParams(layers=(1,)), method="memit", second_moments={})


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_key_passes_that_start_at_a_cached_block_match_fresh_full_passes(family, monkeypatch):
    from knowledger.editors import editor as editor_module

    model, editor = make(family, "memit", layers=(0, 1, 3), init_range=0.1)
    fast = editor.compute(FACTS)
    original = editor_module._KeyPass.at

    def fresh(self, layer):
        for part in self.parts:
            part[2] = None  # forget the cached block input: a full pass every time
        return original(self, layer)

    monkeypatch.setattr(editor_module._KeyPass, "at", fresh)
    slow = editor.compute(FACTS)
    for a, b in zip(fast.deltas, slow.deltas):
        torch.testing.assert_close(a.dense(), b.dense(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_key_passes_in_length_groups_and_small_chunks_match_one_pass(family, monkeypatch):
    from knowledger.editors import editor as editor_module

    facts = FACTS + [EditRequest("A long prompt about {} lives in", "Bobby", "Rome", target_true="Paris")]
    model, editor = make(family, "memit", layers=(0, 1, 3), init_range=0.1)
    monkeypatch.setattr(editor_module, "KEY_BUCKETS", 1)
    monkeypatch.setattr(editor_module, "KEY_ROWS", 10_000)
    one = editor.compute(facts)
    monkeypatch.setattr(editor_module, "KEY_BUCKETS", 3)
    monkeypatch.setattr(editor_module, "KEY_ROWS", 2)
    parts = editor_module._KeyPass(editor, facts, editor.contexts).parts
    assert len(parts) > 2 and sum(len(p[0]) for p in parts) == len(facts) * len(editor.contexts)
    grouped = editor.compute(facts)
    for a, b in zip(one.deltas, grouped.deltas):
        torch.testing.assert_close(a.dense(), b.dense(), atol=1e-5, rtol=1e-4)


def test_large_batches_optimise_values_in_chunks_with_the_same_result():
    _, whole = make("llama", "emmet", v_steps=5)
    _, chunked = make("llama", "emmet", v_steps=5, v_batch=1)
    a, b = whole.compute(FACTS), chunked.compute(FACTS)
    assert [s["steps"] for s in a.value_stats] == [s["steps"] for s in b.value_stats]
    for x, y in zip(a.deltas, b.deltas):
        torch.testing.assert_close(x.dense(), y.dense(), atol=1e-4, rtol=1e-3)
