"""Scoring a model on facts: target probabilities, top-1 hits and the CounterFact metrics.

Literature conventions (ROME/MEMIT; ../shared/data/README.md):
- efficacy: P(target_new) > P(target_true) on the rewrite prompt;
- paraphrase: the same on paraphrase prompts;
- neighbourhood: P(expected answer) > P(target_new) on unrelated prompts about other subjects;
- "_acc" variants: target_new (resp. the expected answer) is the greedy continuation, every token
  of it top-1 under teacher forcing;
- "_token_acc" variants: the fraction of the target's tokens that are top-1 under teacher forcing
  (zsRE's token accuracy, MEND/ROME convention; for neighbourhood prompts, of the expected answer).
P(target) of a multi-token target is the geometric mean of its token probabilities (mean log-prob).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .forward import model_device, unembed
from .model_spec import spec_for
from .requests import EditRequest
from .tokens import teacher_forced


@dataclass(frozen=True)
class Score:
    logprob: float  # mean log-probability of the target's tokens
    top1: bool  # every target token is the argmax under teacher forcing
    rank: int  # rank of the target's first token (0 = top)
    token_acc: float = 0.0  # fraction of the target's tokens that are top-1 (zsRE's token accuracy)


@torch.no_grad()
def score(model, tokenizer, items: list[tuple[str, str]], batch_size: int = 64) -> list[Score]:
    """Score (prompt, target) pairs; the prompt is full text, target a continuation."""
    spec = spec_for(model)
    base = model.get_submodule(spec.base)
    device = next(model.parameters()).device
    out: list[Score] = []
    for s in range(0, len(items), batch_size):
        tf = teacher_forced(tokenizer, items[s : s + batch_size])
        ids = tf.batch.ids.to(device)  # (B, T), on the model's device (an audit runs on CUDA)
        hidden = base(input_ids=ids, attention_mask=torch.ones_like(ids),
                      use_cache=False).last_hidden_state  # (B, T, d)
        r, c, t = tf.rows.to(device), tf.cols.to(device), tf.targets.to(device)
        logp = F.log_softmax(unembed(model, hidden[r, c]).float(), dim=-1)  # (m, V)
        lp = logp.gather(1, t[:, None]).squeeze(1)  # (m,)
        hit = logp.argmax(-1) == t
        rank = (logp > lp[:, None]).sum(-1)  # (m,)
        lp, hit, rank = lp.cpu(), hit.cpu(), rank.cpu()  # one transfer per batch, not per item
        first = tf.first()
        mean_lp, acc = tf.per_item_mean(lp), tf.per_item_mean(hit.float())
        for j in range(tf.n_items):
            sel = tf.owner == j
            out.append(Score(float(mean_lp[j]), bool(hit[sel].all()), int(rank[first[j]]), float(acc[j])))
    return out


def fact_metrics(model, tokenizer, requests: list[EditRequest], batch_size: int = 64) -> list[dict]:
    """Per fact: the CounterFact metrics (fractions over its prompts) and P(target_new).

    On the rewrite prompt also `rewrite_rank` (rank of target_new's first token, 0 = top) and,
    with a target_true, `rewrite_p_true` and `rewrite_margin` = mean log P(target_new) − mean
    log P(target_true), in nats: what agent.audit compares with the value recorded at apply time.
    """
    items: list[tuple[str, str]] = []
    groups: list[tuple[int, str, dict[str, int]]] = []  # (fact, kind, {"new"|"true": item index})

    def add(f, kind, prompt, answers: dict[str, str | None]):
        idx = {}
        for which, target in answers.items():
            if target:
                idx[which] = len(items)
                items.append((prompt, target))
        groups.append((f, kind, idx))

    for f, r in enumerate(requests):
        for kind, prompts in (("rewrite", [r.text]), ("paraphrase", list(r.paraphrases))):
            for p in prompts:
                add(f, kind, p, {"new": r.target_new, "true": r.target_true})
        for p, answer in r.neighborhood:
            add(f, "neighborhood", p, {"new": r.target_new, "true": answer})
    scores = score(model, tokenizer, items, batch_size)

    per: list[dict[str, list]] = [{} for _ in requests]
    for f, kind, idx in groups:
        new, true = scores[idx["new"]], scores[idx["true"]] if "true" in idx else None
        acc = per[f].setdefault(kind, [])
        if kind == "neighborhood":  # the expected answer must stay ahead of target_new
            acc.append({kind: true.logprob > new.logprob, f"{kind}_acc": true.top1,
                        f"{kind}_token_acc": true.token_acc})
        else:
            row = {f"{kind}_acc": new.top1, f"{kind}_p_new": float(torch.tensor(new.logprob).exp()),
                   f"{kind}_token_acc": new.token_acc}
            if kind == "rewrite":  # what an audit compares with the values recorded at apply time
                row["rewrite_rank"] = new.rank
            if true is not None:
                row[kind] = new.logprob > true.logprob
                if kind == "rewrite":
                    row["rewrite_p_true"] = float(torch.tensor(true.logprob).exp())
                    row["rewrite_margin"] = new.logprob - true.logprob
            acc.append(row)
    out = []
    for f in range(len(requests)):
        m: dict[str, float] = {}
        for rows in per[f].values():
            for key in rows[0]:
                m[key] = _mean([row[key] for row in rows])
        out.append(m)
    return out


def aggregate(per_fact: list[dict]) -> dict[str, float]:
    """Mean of each metric over the facts that have it; names as in the benchmark JSON."""
    rename = {"rewrite": "efficacy", "rewrite_acc": "efficacy_acc", "rewrite_p_new": "efficacy_p_new",
              "rewrite_token_acc": "efficacy_token_acc",
              "paraphrase_p_new": "paraphrase_p_new"}
    keys = sorted({k for m in per_fact for k in m})
    return {rename.get(k, k): _mean([m[k] for m in per_fact if k in m]) for k in keys}


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


@torch.no_grad()
def top_tokens(model, tokenizer, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most probable next tokens and their probabilities."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model_device(model))  # (1, T)
    probs = model(input_ids=ids, use_cache=False).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tokenizer.decode([int(t)]), float(q)) for t, q in zip(i, p)]
