"""The reference implementation's v* step (v_prefix_cache=False: the whole model, every position,
every step) against knowledger's (prefix cache, blocks above L only, logits where read): the same
optimisation, step for step, on tiny models of several families and for both kinds of target."""
import pytest
import torch

from knowledger.editors.hparams import EditHParams
from knowledger.editors.model_spec import spec_for
from knowledger.editors.requests import EditRequest
from knowledger.editors.values import optimise_values
from tests.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
FACTS = [EditRequest("{} lives in", "Bob", "Rome", target_true="Paris"),
         EditRequest("The capital of {} is", "Zork", "Qux", target_true="Abc")]
CONTEXTS = ["", "Hello there. ", "A b c d e f g. "]


def _targets(model, steps, *, pmet=False, **hp):
    hparams = EditHParams(layers=(1, 2), v_steps=steps, early_stop=False, v_lr=0.5, **hp)
    with torch.enable_grad():
        return optimise_values(model, TOK, spec_for(model), FACTS, hparams, CONTEXTS, pmet=pmet)


@pytest.mark.parametrize("family,pmet", [("llama", False), ("gpt2", False), ("qwen2", False), ("llama", True)])
def test_full_forward_and_prefix_cache_follow_the_same_trajectory(family, pmet):
    model = tiny_model(family, init_range=0.3)
    for steps in (1, 3, 6):  # δ after k steps equal for every k: the same trajectory
        fast = _targets(model, steps, pmet=pmet)
        slow = _targets(model, steps, pmet=pmet, v_prefix_cache=False)
        torch.testing.assert_close(fast.delta, slow.delta, atol=1e-4, rtol=1e-3)
        for a, b in zip(fast.stats, slow.stats):
            assert a["steps"] == b["steps"] == steps
            assert a["nll"] == pytest.approx(b["nll"], rel=1e-3, abs=1e-5)
    assert fast.delta.abs().sum() > 0  # it moved: the comparison is not of two zeros


def test_the_reference_stop_point_is_recorded_and_fixed_steps_ignore_it():
    model = tiny_model("llama", init_range=0.3)
    hp = dict(early_stop_loss=float("inf"))  # the loss is "below" at once: step 0
    out = _targets(model, 4, v_prefix_cache=False, **hp)
    assert [s["steps"] for s in out.stats] == [4, 4]  # early_stop=False: all 4 steps run anyway
    assert [s["steps_to_loss"] for s in out.stats] == [0, 0]
    never = _targets(model, 2, early_stop_loss=0.0)
    assert [s["steps_to_loss"] for s in never.stats] == [None, None]


def test_the_switch_is_a_validated_hyperparameter():
    assert EditHParams(layers=(1,)).v_prefix_cache is True
    assert EditHParams(layers=(1,)).replace(v_prefix_cache="false").v_prefix_cache is False
    with pytest.raises(ValueError, match="v_prefix_cache"):
        EditHParams(layers=(1,), v_prefix_cache="sometimes")


def test_length_buckets_partition_the_rows_and_cut_the_padding():
    from knowledger.editors.forward import length_buckets

    lengths = torch.tensor([18, 5, 18, 8, 17, 5, 18])
    groups = length_buckets(lengths, 3)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))  # every row exactly once
    padded = sum(len(g) * int(lengths[g].max()) for g in groups)
    assert padded < 7 * 18 and len(groups) > 1
    assert len(length_buckets(lengths, 1)) == 1
    assert len(length_buckets(torch.tensor([9, 9, 9]), 4)) == 1  # nothing to save: one pass


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bucketed_prefix_pass_gives_the_same_targets(family):
    model = tiny_model(family, init_range=0.3)
    one = _targets(model, 4)
    many = _targets(model, 4, v_prefix_buckets=3)
    torch.testing.assert_close(one.delta, many.delta, atol=1e-4, rtol=1e-3)


def test_facts_grouped_by_suffix_width_give_the_same_targets_in_the_requests_order():
    model = tiny_model("llama", init_range=0.3)
    facts = FACTS + [EditRequest("{} is", "Al", "Rome"), EditRequest("The old friend of {} was born in", "Cy", "Qux")]
    hp = EditHParams(layers=(1, 2), v_steps=4, early_stop=False, v_lr=0.5)
    spec = spec_for(model)
    with torch.enable_grad():
        one = optimise_values(model, TOK, spec, facts, hp, CONTEXTS)
        grouped = optimise_values(model, TOK, spec, facts, hp.replace(v_buckets=3, v_batch=2), CONTEXTS)
    torch.testing.assert_close(one.delta, grouped.delta, atol=1e-4, rtol=1e-3)
    assert [s["h_norm"] for s in one.stats] == pytest.approx([s["h_norm"] for s in grouped.stats], rel=1e-4)
