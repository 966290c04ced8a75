"""apply.py on tiny GPT-2 (Conv1D, stores Wᵀ) and Llama (Linear, stores W) models."""
from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from knowledger.editors.apply import (NonFiniteDelta, apply_deltas, dense_delta, remove_deltas,
                                      restore_params, snapshot_params, weight_sha256)
from knowledger.editors.model_spec import spec_for
from knowledger.editors.result import LayerDelta
from tests.tiny import tiny_model


def square_model(family: str):
    """MLP output projection is square (d×d): a transposed delta would go unnoticed by shapes."""
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=16, n_positions=16, vocab_size=64)
    else:
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=16, vocab_size=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def make_model(family: str, square: bool):
    return square_model(family) if square else tiny_model(family)


def random_delta(model, spec, layer: int, rank: int = 2, seed: int = 0, scale: float = 0.1) -> LayerDelta:
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = spec.mlp_dims(model, layer)
    left = scale * torch.randn(d_out, rank, generator=g)  # (d_out, r)
    right = torch.randn(d_in, rank, generator=g)  # (d_in, r)
    return LayerDelta(layer=layer, param=spec.weight_name(layer), left=left, right=right)


def weights(model, spec):
    return {spec.weight_name(i): spec.edited_weight(model, i).detach().clone() for i in range(spec.n_layers(model))}


@pytest.mark.parametrize("square", [False, True], ids=["rect", "square"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_module_output_changes_by_delta_times_key(family, square):
    model = make_model(family, square)
    spec = spec_for(model)
    assert spec.orientation == ("conv1d" if family == "gpt2" else "linear")
    layer = 1
    delta = random_delta(model, spec, layer)
    module = spec.mlp_out_module(model, layer)
    k = torch.randn(5, delta.shape[1])  # (batch, d_in): 5 keys as rows
    with torch.no_grad():
        before = module(k)  # (batch, d_out)
        apply_deltas(model, spec, [delta])
        after = module(k)  # (batch, d_out)
    expected = k @ delta.dense().T  # (batch, d_out): row b is ΔW k_b
    assert float(expected.abs().max()) > 1e-2  # the check is not vacuous
    torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=1e-5)
    assert dense_delta(spec, delta).shape == spec.edited_weight(model, layer).shape


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_apply_then_remove_round_trip_and_restore_is_bit_exact(family):
    model = tiny_model(family)
    spec = spec_for(model)
    original = weights(model, spec)
    deltas = [random_delta(model, spec, 1, seed=1), random_delta(model, spec, 2, seed=2),
              random_delta(model, spec, 1, seed=3)]  # two on layer 1: they accumulate
    snap = snapshot_params(model, sorted({d.param for d in deltas}))
    applied = apply_deltas(model, spec, deltas)
    assert set(applied) == {spec.weight_name(1), spec.weight_name(2)}
    w1 = spec.edited_weight(model, 1).detach()
    expected1 = original[spec.weight_name(1)] + dense_delta(spec, deltas[0]) + dense_delta(spec, deltas[2])
    torch.testing.assert_close(w1, expected1, atol=1e-6, rtol=1e-6)
    assert not torch.equal(w1, original[spec.weight_name(1)])

    remove_deltas(model, spec, deltas)
    for name, w in weights(model, spec).items():
        torch.testing.assert_close(w, original[name], atol=1e-6, rtol=0)  # a few ulps, not bits

    restored = restore_params(model, snap)
    for name, w in weights(model, spec).items():
        assert torch.equal(w, original[name]), name
    assert restored[spec.weight_name(1)] == weight_sha256(original[spec.weight_name(1)])


def test_returned_sha256_is_of_the_new_weight_bytes():
    model = tiny_model("gpt2")
    spec = spec_for(model)
    delta = random_delta(model, spec, 0)
    sums = apply_deltas(model, spec, [delta])
    w = spec.edited_weight(model, 0).detach()
    assert sums == {delta.param: hashlib.sha256(w.numpy().tobytes()).hexdigest()}
    assert sums[delta.param] != weight_sha256(w - dense_delta(spec, delta))


def test_non_finite_delta_raises_and_leaves_every_weight_untouched():
    model = tiny_model("llama")
    spec = spec_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_delta(model, spec, 0)
    bad = random_delta(model, spec, 2)
    bad.left[0, 0] = float("nan")
    with pytest.raises(NonFiniteDelta, match="no weight was written"):
        apply_deltas(model, spec, [good, bad])  # the good one comes first and must not land
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_overflow_in_half_precision_is_caught_before_writing():
    model = tiny_model("llama").to(torch.float16)
    spec = spec_for(model)
    before = spec.edited_weight(model, 0).detach().clone()
    delta = random_delta(model, spec, 0, scale=1e4)  # finite in float32, beyond float16's 65504
    with pytest.raises(NonFiniteDelta, match="float16"):
        apply_deltas(model, spec, [delta])
    assert torch.equal(spec.edited_weight(model, 0).detach(), before)


def test_float64_weights_are_updated_in_float64():
    model = tiny_model("gpt2").to(torch.float64)
    spec = spec_for(model)
    w0 = spec.edited_weight(model, 1).detach().clone()
    delta = random_delta(model, spec, 1)
    apply_deltas(model, spec, [delta])
    got = spec.edited_weight(model, 1).detach()
    assert got.dtype == torch.float64  # composed in float64 (rank one at a time), not via float32
    torch.testing.assert_close(got, w0 + dense_delta(spec, delta, torch.float64), atol=1e-14, rtol=0)


def test_mismatched_param_or_shape_is_rejected():
    model = tiny_model("llama")
    spec = spec_for(model)
    d = random_delta(model, spec, 1)
    with pytest.raises(ValueError, match="table says"):
        apply_deltas(model, spec, [LayerDelta(1, spec.weight_name(2), d.left, d.right)])
    with pytest.raises(ValueError, match="does not match"):
        apply_deltas(model, spec, [LayerDelta(1, d.param, d.right, d.left)])  # transposed


# --- one composer, one writer ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_out_and_apply_then_export_give_the_same_bits(family):
    """`knowledger edit --out` (apply_deltas / apply_from_base on the loaded model) and `apply` +
    `export` (the ledger's LiveModel composing base + stored float32 factors) are one arithmetic."""
    from types import SimpleNamespace

    from knowledger.agent.live import ActiveDelta, LiveModel, stored_delta
    from knowledger.editors.apply import apply_from_base

    spec = spec_for(tiny_model(family))
    batches = [[random_delta(tiny_model(family), spec, 1, seed=1)],
               [random_delta(tiny_model(family), spec, 1, rank=3, seed=2), random_delta(tiny_model(family), spec, 2)]]
    direct = tiny_model(family)  # one batch after another, each composed from the base
    base = snapshot_params(direct, [spec.weight_name(1), spec.weight_name(2)])
    done = []
    for batch in batches:
        done += batch
        edit_shas = apply_from_base(direct, spec, base, done)
    one = tiny_model(family)  # a single batch through apply_deltas
    apply_deltas(one, spec, batches[0])
    live_model = tiny_model(family)
    live = LiveModel(SimpleNamespace(model=live_model, spec=spec), 1, "base")
    live.set_active([ActiveDelta(1, 1, stored_delta(batches[0][0]))])
    assert torch.equal(live_model.get_parameter(spec.weight_name(1)), one.get_parameter(spec.weight_name(1)))
    live.set_active([ActiveDelta(s, s, stored_delta(d)) for s, b in enumerate(batches, 1) for d in b])
    for name, sha in edit_shas.items():
        assert torch.equal(live_model.get_parameter(name), direct.get_parameter(name)), name
        assert live.param_shas[name] == sha


def test_compose_is_the_float64_rank_one_sum_and_continues_a_partial_sum():
    model = tiny_model("gpt2")
    spec = spec_for(model)
    from knowledger.editors.apply import compose

    a, b = random_delta(model, spec, 1, rank=3, seed=1), random_delta(model, spec, 1, rank=2, seed=2)
    W = spec.edited_weight(model, 1).detach()  # stored layout (d_in, d_out) for Conv1D
    full = compose(W, [a, b], spec)
    assert full.dtype == torch.float64 and full.shape == W.shape
    dense = W.double() + spec.from_math(a.left.double() @ a.right.double().T + b.left.double() @ b.right.double().T)
    assert float((full - dense).abs().max()) < 1e-12
    assert torch.equal(compose(compose(W, [a], spec), [b], spec), full)  # a cached prefix continues exactly
    assert torch.equal(spec.edited_weight(model, 1).detach(), W)  # the base is never touched


def test_write_checks_everything_before_writing_anything():
    from knowledger.editors.apply import write

    model = tiny_model("llama")
    spec = spec_for(model)
    names = [spec.weight_name(0), spec.weight_name(1)]
    before = snapshot_params(model, names)
    with pytest.raises(ValueError, match="is \\(3, 3\\)"):
        write(model, {names[0]: before[names[0]] + 1, names[1]: torch.zeros(3, 3)})
    bad = before[names[1]].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteDelta):
        write(model, {names[0]: before[names[0]] + 1, names[1]: bad})
    for n in names:
        assert torch.equal(model.get_parameter(n), before[n])
    shas = write(model, {names[0]: before[names[0]] + 1})
    assert shas == {names[0]: weight_sha256(before[names[0]] + 1)}
