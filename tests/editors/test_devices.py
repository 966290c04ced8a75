"""Device- and dtype-true editors: every tensor follows the model's device and dtype.

On the CPU: each closed-form editor on a bfloat16 and a float64 tiny llama (a tensor made without
the model's dtype shows up as a dtype error or a silent float32 result). On CUDA (marker `gpu`,
skipped without one): the editors × families table, with the model and every tensor on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from knowledger.editors.apply import apply_deltas
from knowledger.editors.editor import METHODS, Editor
from knowledger.editors.evaluate import top_tokens
from knowledger.editors.hparams import EditHParams, default_autocast_bf16, preset_for
from knowledger.editors.model_spec import spec_for
from tests.editors.test_editor import FACTS
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def editor_for(model, method: str, device) -> Editor:
    spec = spec_for(model)
    d_in = spec.mlp_dims(model)[1]
    params = dict(layers=(1, 2), v_steps=4, n_context=1, mom2_weight=1.0, emmet_ridge=0.0)
    if method == "alphaedit":
        params.update(alphaedit_null_threshold=0.9, alphaedit_null_scale="energy")
    C = {l: torch.eye(d_in, device=device) for l in range(spec.n_layers(model))}
    return Editor(model, TOK, EditHParams(**params), method=method, second_moments=C)


def run_editor(model, method: str, device):
    ed = editor_for(model, method, device)
    facts = FACTS[:1] if method == "rome" else FACTS
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ed.compute(facts)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"compute() changed {k}"
    for d in res.deltas:
        assert d.left.dtype == torch.float32 and d.right.dtype == torch.float32
        assert torch.isfinite(d.left).all() and torch.isfinite(d.right).all()
    w_dtype = ed.spec.edited_weight(model, res.deltas[0].layer).dtype
    apply_deltas(model, ed.spec, res.deltas)
    assert ed.spec.edited_weight(model, res.deltas[0].layer).dtype == w_dtype
    assert ed.spec.edited_weight(model, res.deltas[0].layer).device.type == torch.device(device).type
    return res


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
def test_editors_run_on_bf16_and_float64_models(method, dtype):
    model = tiny_model("llama", init_range=0.3).to(dtype)
    run_editor(model, method, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())


def test_top_tokens_and_the_bf16_default_follow_the_device():
    model = tiny_model("llama")
    assert len(top_tokens(model, TOK, "Bob lives in", k=3)) == 3
    assert default_autocast_bf16("meta") is False
    assert preset_for(model).autocast_bf16 == default_autocast_bf16("cpu")  # recorded, not implied


@pytest.mark.parametrize("flags, stats_bf16, v_bf16", [
    (set(), False, False),                        # AVX2: bf16 emulated, float32 everywhere
    ({"avx512_bf16"}, True, False),               # AVX512-BF16: the sampler gains, v* does not
    ({"avx512_bf16", "amx_bf16"}, True, True),    # AMX: both
])
def test_which_cpus_get_bf16(flags, stats_bf16, v_bf16, monkeypatch):
    """The statistics' default (`has_bf16_units`) and v*'s (`default_autocast_bf16`) read the same
    CPU flags and differ where the measurements did (docs/benchmarks.md, "An AVX512-BF16 host")."""
    from knowledger.editors import corpus, hparams

    monkeypatch.setattr(corpus, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hparams, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert corpus.has_bf16_units("cpu") is stats_bf16
    assert default_autocast_bf16("cpu") is v_bf16


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_editors_run_on_cuda(family, method):
    model = tiny_model(family, init_range=0.3).to("cuda")
    res = run_editor(model, method, "cuda")
    assert res.deltas and all(d.left.device.type == "cuda" for d in res.deltas)
    assert len(top_tokens(model, TOK, "Bob lives in", k=3)) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_cuda_and_cpu_give_close_deltas(method):
    cpu = run_editor(tiny_model("llama", init_range=0.3), method, "cpu")
    gpu = run_editor(tiny_model("llama", init_range=0.3).to("cuda"), method, "cuda")
    for a, b in zip(cpu.deltas, gpu.deltas):
        torch.testing.assert_close(b.dense().cpu(), a.dense(), atol=1e-3, rtol=1e-2)
