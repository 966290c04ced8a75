"""MALMEN: the normal-equation aggregation, the token cache, the hyper-network and the editor."""
from __future__ import annotations

import json
import math

import pytest
import torch

from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params, weight_sha256
from knowledger.editors.evaluate import score
from knowledger.editors.hooks import TraceDict
from knowledger.editors.malmen import (HyperConfig, HyperNet, MalmenEditor, Normal, RunningNorm, aggregate,
                                       cache_tokens, check_compatible, edit_loss, factor, final_hidden,
                                       load_hypernet, save_hypernet)
from knowledger.editors.model_spec import spec_for
from knowledger.editors.requests import EditRequest
from knowledger.editors.tokens import teacher_forced
from tests.agent.helpers import CITIES, save_editable_tiny
from tests.tiny import tiny_model


def _ridge_reference(U, D, log_lambda):
    """min ‖U S − D‖² + e^λ ‖S‖² as an ordinary least-squares problem on the stacked system."""
    d_in = U.shape[1]
    A = torch.cat([U, math.exp(log_lambda / 2) * torch.eye(d_in, dtype=torch.float64)])
    B = torch.cat([D, torch.zeros(d_in, D.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(A, B).solution


@pytest.mark.parametrize("n", [5, 40])  # fewer tokens than key width, and more
def test_aggregation_matches_float64_least_squares(n):
    g = torch.Generator().manual_seed(n)
    U = torch.randn(n, 12, generator=g, dtype=torch.float64)
    D = torch.randn(n, 7, generator=g, dtype=torch.float64)
    S = aggregate(U, D, log_lambda=math.log(0.3))
    assert S.dtype == torch.float64 and S.shape == (12, 7)
    torch.testing.assert_close(S, _ridge_reference(U, D, math.log(0.3)), rtol=1e-10, atol=1e-10)


def test_normal_equation_accumulates_in_chunks_and_reports_the_residual():
    g = torch.Generator().manual_seed(1)
    U, D = torch.randn(30, 10, generator=g), torch.randn(30, 4, generator=g)
    acc = Normal.empty(10, 4)
    for s in range(0, 30, 7):
        acc.add(U[s : s + 7], D[s : s + 7])
    assert acc.n == 30
    S = acc.solve(0.0)
    torch.testing.assert_close(S, aggregate(U, D, 0.0), rtol=1e-10, atol=1e-10)
    direct = float((U.double() @ S - D.double()).norm() / D.double().norm())
    assert acc.residual(S) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_factor_gives_delta_w_as_s_transposed(shape):
    S = torch.randn(*shape, dtype=torch.float64)
    left, right = factor(S)
    assert left.shape[0] == shape[1] and right.shape[0] == shape[0]
    assert left.shape[1] == right.shape[1] <= min(shape)
    torch.testing.assert_close(left @ right.T, S.T)


def test_running_norm_merges_batches_exactly():
    x = torch.randn(50, 6, dtype=torch.float64) * 3 + 1
    norm = RunningNorm(2, 6)
    assert torch.equal(norm(0, x), x)  # identity before any statistics
    for s in range(0, 50, 13):
        norm.update(1, x[s : s + 13])
    z = norm(1, x)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6, dtype=torch.float64))
    assert torch.equal(norm(0, x), x)  # per layer


def test_untrained_network_is_a_scaled_normalised_gradient_step():
    cfg = HyperConfig(layers=(0,), d_in=6, d_out=4, model_type="x", n_model_layers=1, rank=3)
    net = HyperNet(cfg)
    u, g = torch.randn(5, 6), torch.randn(5, 4)
    with torch.no_grad():
        net.log_lr[0] = math.log(0.5)
    d = net(0, u, g)  # blocks start as the identity; no statistics yet
    torch.testing.assert_close(d, -0.5 * (u * u).sum(-1, keepdim=True) * g)
    torch.testing.assert_close(net.shifts(0, u, g), d)


def test_cached_gradient_is_the_edit_loss_gradient_at_the_layer_output():
    """A finite difference: shifting layer l's output at one edit token by ε·g changes the loss by
    about ε‖g‖² (the cache's g is ∂L/∂v there)."""
    model = tiny_model("llama", init_range=0.3)
    spec = spec_for(model)
    tf = teacher_forced(_WordTok(), [("a b c", "d e"), ("b c", "a")])
    cache = cache_tokens(model, spec, [1, 2], tf)
    assert cache.u[1].shape == (3, spec.mlp_dims(model, 1)[1]) and cache.g[2].shape == (3, 32)
    row, col = int(tf.rows[1]), int(tf.cols[1])
    name, layer, eps = spec.mlp_out_name(1), 1, 1e-3
    g = cache.g[layer][1]

    def loss_with(shift):
        def edit(out, _):
            out = out.clone()
            out[row, col] += shift
            return out
        with torch.no_grad(), TraceDict(model, [name], edit_output=edit):
            return float(edit_loss(model, tf, final_hidden(model, spec, tf)).double())

    change = (loss_with(eps * g) - loss_with(-eps * g)) / 2
    assert change == pytest.approx(eps * float(g @ g), rel=1e-2)


class _WordTok:
    """Words a..z -> ids 3..28: enough to address a 512-token tiny model."""

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [3 + ord(w) - ord("a") for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    pad_token_id, eos_token_id = 0, 2


# --- the editor on a tiny model that edits can move ---------------------------------------------------
def _facts(names, offset=0):
    prompts = ["Home of {}", "Capital of {}", "The mayor of {}", "Sister of {}"]
    return [EditRequest(prompt=prompts[i % 4], subject=n, target_new=CITIES[(i * 7 + offset) % 10],
                        target_true=CITIES[(i * 3 + 1) % 10], paraphrases=(f"Friend of {n}",),
                        neighborhood=(("Home of Xavier", "Paris"),))
            for i, n in enumerate(names)]


@pytest.fixture
def editable(tmp_path):
    from knowledger.agent.editing import open_model

    return open_model(str(save_editable_tiny(tmp_path / "m")))


def test_editor_leaves_the_model_alone_and_chunking_does_not_change_the_result(editable):
    model, tok = editable.model, editable.tokenizer
    spec = spec_for(model)
    cfg = HyperConfig.for_model(model, layers=(2, 3), rank=4, lm_batch=2)
    net = HyperNet(cfg)
    with torch.no_grad():
        net.log_lr.fill_(math.log(1e-2))
    facts = _facts(["Bob", "Ann", "Eve", "Max", "Ada"])
    before = {l: weight_sha256(spec.edited_weight(model, l)) for l in (2, 3)}
    res = MalmenEditor(model, tok, net, sha="x").compute(facts)
    assert {l: weight_sha256(spec.edited_weight(model, l)) for l in (2, 3)} == before
    assert [d.layer for d in res.deltas] == [2, 3] and res.diagnostics["hypernet_sha256"] == "x"
    d_out, d_in = spec.mlp_dims(model, 2)
    assert res.keys[2].shape == (d_in, 5) and res.values[3].shape == (d_out, 5)
    W = spec.to_math(spec.edited_weight(model, 3)).detach().double()
    torch.testing.assert_close(res.values[3].double(), (W + res.deltas[1].dense(torch.float64)) @ res.keys[3].double(),
                               rtol=1e-4, atol=1e-5)
    whole = MalmenEditor(model, tok, HyperNet(cfg.__class__(**{**cfg.to_dict(), "lm_batch": 100})), sha="x")
    whole.net.load_state_dict(net.state_dict())
    res2 = whole.compute(facts)
    for a, b in zip(res.deltas, res2.deltas):
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-4, atol=1e-6)


def test_a_freshly_trained_small_hypernet_raises_the_targets_probability(editable, tmp_path):
    from knowledger.agent.malmen_train import TrainSettings, train

    model, tok = editable.model, editable.tokenizer
    names = [a + b for a in "BCDFGHJKLM" for b in "aeiou"]  # 50 subjects
    train_facts = _facts(names[:40])
    held_out = _facts(names[40:], offset=3)  # other subjects, never trained on
    cfg = HyperConfig.for_model(model, layers=(2, 3), rank=16, lm_batch=16)
    summary = train(editable, train_facts, tmp_path / "net", TrainSettings(steps=12, batch=16, val_facts=8,
                    val_every=6, ckpt_every=6), hyper=cfg, progress=False)
    assert summary["steps_done"] == 12 and summary["best"] is not None
    net, sha = load_hypernet(tmp_path / "net")
    assert sha == summary["best"]["sha256"]
    rows = [h["tokens"] for h in json.loads((tmp_path / "net" / "training.json").read_text())["history"]
            if "tokens" in h]
    k = summary["best"]["step"]  # kept at step k: the mean rows of the steps before it, or at step 0
    want = sum(rows[:k]) / k if k else rows[0]  # the first batch's (primed for step 0, then step 1's)
    assert rows and net.train_tokens == pytest.approx(want, abs=0.05)
    items = [(r.text, r.target_new) for r in held_out]
    p_before = torch.tensor([s.logprob for s in score(model, tok, items)])
    res = MalmenEditor(model, tok, net, sha=sha).compute(held_out)  # the whole batch at once
    saved = snapshot_params(model, [d.param for d in res.deltas])
    apply_deltas(model, spec_for(model), res.deltas)
    p_after = torch.tensor([s.logprob for s in score(model, tok, items)])
    restore_params(model, saved)
    assert (p_after - p_before).mean() > 1.0  # nats: the targets became far more probable
    assert (p_after > p_before).float().mean() >= 0.8


def test_save_load_round_trip_and_compatibility(tmp_path):
    model = tiny_model("llama")
    cfg = HyperConfig.for_model(model, rank=4)
    assert cfg.layers == (3,)  # the last fifth of 4 blocks
    net = HyperNet(cfg)
    with torch.no_grad():
        net.blocks[0].up.weight.normal_()
    sha = save_hypernet(net, tmp_path / "h", {"note": "test"})
    again, sha2 = load_hypernet(tmp_path / "h")
    assert sha == sha2 and len(sha) == 64
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    check_compatible(again.config, model)
    with pytest.raises(ValueError, match="trained for a llama with 4 layers"):
        check_compatible(again.config, tiny_model("gpt2"))
    with pytest.raises(FileNotFoundError, match="not a MALMEN hyper-network"):
        load_hypernet(tmp_path)
    with pytest.raises(ValueError, match="unknown hyper-network setting"):
        HyperConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_lambda_scaled_by_tokens_keeps_the_ridge_share_of_the_normal_matrix(editable):
    """lambda_scale "tokens": e^λ · n / n_train. At n = n_train it is the trained solve; at n_train
    = n / 4 the solve is the trained one with e^λ four times larger (a dense ridge reference)."""
    model, tok = editable.model, editable.tokenizer
    cfg = HyperConfig.for_model(model, layers=(2, 3), rank=4, lm_batch=8)
    net = HyperNet(cfg)
    with torch.no_grad():
        net.log_lr.fill_(math.log(1e-2))
        net.log_lambda.copy_(torch.tensor([0.5, -1.0]))
    facts = _facts(["Bob", "Ann", "Eve", "Max", "Ada"])
    with pytest.raises(ValueError, match="does not record"):
        MalmenEditor(model, tok, net, lambda_scale="tokens")
    with pytest.raises(ValueError, match="unknown lambda_scale"):
        MalmenEditor(model, tok, net, lambda_scale="batch")
    trained = MalmenEditor(model, tok, net).compute(facts)
    n = trained.diagnostics["layer2"]["tokens"]
    net.train_tokens = float(n)
    same = MalmenEditor(model, tok, net, lambda_scale="tokens").compute(facts)
    for a, b in zip(trained.deltas, same.deltas):
        torch.testing.assert_close(a.dense(torch.float64), b.dense(torch.float64))
    net.train_tokens = n / 4
    scaled = MalmenEditor(model, tok, net, lambda_scale="tokens").compute(facts)
    for i, l in enumerate((2, 3)):
        lam = float(net.log_lambda.detach()[i]) + math.log(4)
        assert scaled.diagnostics[f"layer{l}"]["log_lambda"] == pytest.approx(lam)
    # the same shifts, solved densely with the larger ridge
    from knowledger.editors.malmen import cache_tokens
    from knowledger.editors.malmen.gradients import rewrite_chunks

    spec = spec_for(model)
    U = {l: [] for l in (2, 3)}
    D = {l: [] for l in (2, 3)}
    for _, tf in rewrite_chunks(tok, facts, 8):
        cache = cache_tokens(model, spec, (2, 3), tf)
        for i, l in enumerate((2, 3)):
            U[l].append(cache.u[l].double())
            D[l].append(net.shifts(i, cache.u[l], cache.g[l]).detach().double())
    for i, l in enumerate((2, 3)):
        S = _ridge_reference(torch.cat(U[l]), torch.cat(D[l]), float(net.log_lambda.detach()[i]) + math.log(4))
        torch.testing.assert_close(scaled.deltas[i].dense(torch.float64), S.T, rtol=1e-4, atol=1e-6)
