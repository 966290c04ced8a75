"""Trace / TraceDict on tiny random models: retained tensors, edits, early stop, hook cleanup."""
import pytest
import torch

from knowledger.editors.hooks import Trace, TraceDict
from knowledger.editors.model_spec import spec_for
from tests.tiny import tiny_model


def _ids(n=2, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n, t), generator=g)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retains_mlp_out_input_and_output(family):
    model = tiny_model(family)
    spec = spec_for(model)
    name = spec.mlp_out_name(1)
    with torch.inference_mode(), Trace(model, name, retain_input=True) as tr:
        model(_ids())
    k, out = tr.input, tr.output  # (2, 7, d_in), (2, 7, d)
    d_out, d_in = spec.mlp_dims(model)
    assert k.shape == (2, 7, d_in) and out.shape == (2, 7, d_out)
    module = spec.mlp_out_module(model, 1)
    w = spec.to_math(module.weight)  # (d_out, d_in)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        expected = k @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert tr.calls == 1 and _no_hooks(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tracedict_layer_outputs_match_hidden_states(family):
    """Decoder layers return a tensor (transformers 5) or a tuple: output is the hidden state."""
    model = tiny_model(family)
    spec = spec_for(model)
    names = [spec.layer(i) for i in range(spec.n_layers(model) - 1)]  # the last one is normed
    with torch.inference_mode(), TraceDict(model, names, retain_input=True) as td:
        hidden = model(_ids(), output_hidden_states=True).hidden_states
    for i, name in enumerate(names):
        torch.testing.assert_close(td[name].input, hidden[i])
        torch.testing.assert_close(td[name].output, hidden[i + 1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_output_adds_a_vector_at_a_position(family):
    model = tiny_model(family)
    spec = spec_for(model)
    ids = _ids(1, 6)
    delta = torch.randn(model.config.hidden_size)

    def add(output, name):
        assert name == spec.layer(1)
        output = output.clone()
        output[:, 3] += delta
        return output

    with torch.inference_mode():
        base = model(ids).logits
        with Trace(model, spec.layer(1), edit_output=add) as tr:
            edited = model(ids).logits
    torch.testing.assert_close(edited[:, :3], base[:, :3])  # causal: earlier positions unchanged
    assert not torch.allclose(edited[:, 3:], base[:, 3:])
    assert tr.output is not None and _no_hooks(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_prevents_later_layers(family):
    model = tiny_model(family)
    spec = spec_for(model)
    n = spec.n_layers(model)
    with Trace(model, spec.layer(n - 1)) as counter:  # counts calls of the last block
        with torch.inference_mode(), TraceDict(model, [spec.mlp_out_name(1), spec.mlp_out_name(0)],
                                               retain_input=True, stop=True) as td:
            out = model(_ids())
            pytest.fail("the forward pass should have been stopped")  # pragma: no cover
        assert td[spec.mlp_out_name(1)].input is not None
        assert counter.calls == 0 and "out" not in locals()
        with torch.inference_mode():
            model(_ids())
        assert counter.calls == 1
    assert _no_hooks(model)


def test_stop_with_repeated_forwards_inside_the_block():
    model = tiny_model("llama")
    spec = spec_for(model)
    seen = []
    with Trace(model, spec.layer(3)) as last:
        for seed in range(3):
            with torch.inference_mode(), Trace(model, spec.mlp_out_name(2), retain_input=True,
                                               stop=True) as tr:
                model(_ids(seed=seed))
            seen.append(tr.input)
    assert last.calls == 0 and len(seen) == 3 and not torch.equal(seen[0], seen[1])


def test_no_hook_left_after_an_exception():
    model = tiny_model("gpt2")
    spec = spec_for(model)
    names = [spec.mlp_out_name(i) for i in range(2)] + [spec.layer(2)]

    def boom(output, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(model, names, edit_output=boom, stop=True):
            model(_ids())
    assert _no_hooks(model)
    with pytest.raises(KeyError):
        with TraceDict(model, names, stop=True):
            raise KeyError("body")
    assert _no_hooks(model)
    with pytest.raises(AttributeError):  # a typo in a name fails before anything is registered
        TraceDict(model, ["transformer.h.0.nope"])
    assert _no_hooks(model)


def test_detach_false_keeps_gradients():
    model = tiny_model("llama")
    spec = spec_for(model)
    emb = model.get_submodule(spec.embed)
    emb.weight.requires_grad_(True)
    with Trace(model, spec.mlp_out_name(0), retain_input=True, detach=False) as tr:
        model(_ids())
    assert tr.input.requires_grad
    with Trace(model, spec.mlp_out_name(0), retain_input=True) as tr:
        model(_ids())
    assert not tr.input.requires_grad
