"""The KV-cache keyword and output field are picked by signature, so a renamed keyword (transformers
5.2x: past_key_values -> cache) can never be passed under a name the model silently ignores."""
import torch
from torch import nn

from knowledger.editors.forward import cache_kwarg, output_cache
from tests.tiny import tiny_model


class _Old(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        return input_ids


def test_the_installed_transformers_takes_the_name_we_pass_and_returns_a_cache():
    model = tiny_model("llama", n_layers=2)
    name = cache_kwarg(model.model)
    assert name in ("cache", "past_key_values")
    out = model.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3


def test_an_older_signature_gets_past_key_values():
    assert cache_kwarg(_Old()) == "past_key_values"
