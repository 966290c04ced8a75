"""The scores behind every benchmark number, checked against the full model's logits."""
import torch

from knowledger.editors.evaluate import aggregate, fact_metrics, score
from knowledger.editors.requests import EditRequest
from knowledger.editors.tokens import target_ids
from tests.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def reference_logprobs(model, prompt, target):
    ids = TOK(prompt)["input_ids"] + target_ids(TOK, target)
    logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, V)
    n = len(target_ids(TOK, target))
    rows = logp[len(ids) - n - 1 : len(ids) - 1]  # the positions that predict the target
    tgt = torch.tensor(ids[-n:])
    return rows.gather(1, tgt[:, None]).squeeze(1), rows.argmax(-1) == tgt


@torch.no_grad()
def test_score_matches_the_full_forward_for_batched_ragged_items():
    model = tiny_model("gpt2", init_range=0.3)
    items = [("Bob lives in", "Rome"), ("The capital of Zork is a big", "Qux"), ("Hi", "a")]
    for (prompt, target), s in zip(items, score(model, TOK, items, batch_size=2)):
        lp, hit = reference_logprobs(model, prompt, target)
        assert abs(s.logprob - float(lp.mean())) < 1e-4
        assert s.top1 == bool(hit.all())
        assert abs(s.token_acc - float(hit.float().mean())) < 1e-6  # zsRE's token accuracy


@torch.no_grad()
def test_counterfact_metrics_compare_the_right_pairs():
    model = tiny_model("llama", init_range=0.3)
    r = EditRequest("{} lives in", "Bob", "Rome", target_true="Paris",
                    paraphrases=("Bob's home is in",), neighborhood=(("Alice lives in", "Oslo"),))
    (m,) = fact_metrics(model, TOK, [r])
    new, _ = reference_logprobs(model, "Bob lives in", "Rome")
    true, _ = reference_logprobs(model, "Bob lives in", "Paris")
    assert m["rewrite"] == float(new.mean() > true.mean())
    n_true, _ = reference_logprobs(model, "Alice lives in", "Oslo")
    n_new, _ = reference_logprobs(model, "Alice lives in", "Rome")
    assert m["neighborhood"] == float(n_true.mean() > n_new.mean())
    agg = aggregate([m, m])
    assert agg["efficacy"] == m["rewrite"] and agg["paraphrase"] == m["paraphrase"]
