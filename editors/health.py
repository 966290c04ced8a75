"""Model health after edits: perplexity on held-out text, edited-weight norms, generation entropy.

Sequential editing degrades a model in ways per-fact metrics do not show: the edited matrices'
norms grow, text elsewhere gets less likely, generations turn repetitive. These are the numbers
the audit (agent.audit) and the benchmark (agent.bench) record next to the fact metrics.

- perplexity: exp(mean next-token NLL) over token sequences, padding excluded. The held-out slice
  (`heldout_chunks`) comes from the corpus *after* the tokens the key statistics used, so it is
  text the editors never saw.
- weight norms per edited layer: ‖W‖_F, ‖W_base‖_F, ‖W − W_base‖_F and their ratios.
- generation entropy (ROME's fluency measure, "GE"): the weighted mean of the bigram and trigram
  entropies (weights 1/3, 2/3, in bits) of the words of text the model generates from a prompt;
  repetitive text scores low. Generation samples top-k 5 with a fixed seed (as ROME's does),
  so two runs of the same weights agree.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.nn.functional as F

from .tokens import pad_id


def heldout_chunks(corpus, tokenizer, n_tokens: int = 8192, *, skip_tokens: int = 0,
                   seq_len: int = 128) -> list[list[int]]:
    """n_tokens of token sequences from `corpus` (an editors.corpus.Corpus), after its first
    `skip_tokens` (pass the statistics' token count: the slice is then held out from them)."""
    chunks = corpus.chunks(tokenizer, skip_tokens + n_tokens, seq_len=seq_len)
    seen, out = 0, []
    for c in chunks:
        if seen >= skip_tokens:
            out.append(c)
        seen += len(c)
    if not out:
        raise ValueError(f"corpus {corpus.path.name} has no text beyond its first {skip_tokens} tokens")
    return out


@torch.no_grad()
def perplexity(model, tokenizer, chunks: list[list[int]], *, batch_size: int = 16,
               device: torch.device | str | None = None) -> float:
    """exp(mean NLL per predicted token) over right-padded batches of `chunks` (lists of ids)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad = pad_id(tokenizer)
    nll, count = 0.0, 0
    for s in range(0, len(chunks), batch_size):
        rows = [c for c in chunks[s:s + batch_size] if len(c) >= 2]
        if not rows:
            continue
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum"))
        count += int(mask[:, 1:].sum())
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(nll / count)


def weight_norms(current: dict, base: dict) -> dict:
    """Per layer: ‖W‖_F, ‖W_base‖_F, ‖W − W_base‖_F, the growth ‖W‖/‖W_base‖ and ‖W−W_base‖/‖W_base‖.

    current / base: {layer or name: weight} in any (matching) layout; computed in float64."""
    out = {}
    for layer, w in sorted(current.items()):
        w64, b64 = w.detach().double(), base[layer].detach().double().to(w.device)
        wn, bn, dn = (float(torch.linalg.norm(w64)), float(torch.linalg.norm(b64)),
                      float(torch.linalg.norm(w64 - b64)))
        out[layer] = dict(w_fro=wn, base_fro=bn, delta_fro=dn, growth=wn / bn if bn else math.inf,
                          delta_rel=dn / bn if bn else math.inf)
    return out


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (1 / 3, 2 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of the text's words (lower-cased)."""
    words = _WORD.findall(text.lower())
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        m = sum(grams.values())
        h = -sum(c / m * math.log2(c / m) for c in grams.values()) if m else 0.0
        total += w * h
    return total / sum(weights)


@torch.no_grad()
def generation_entropy(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48,
                       batch_size: int = 16, seed: int = 0) -> float:
    """Mean n-gram entropy of top-k-5 samples (fixed seed) continuing each prompt."""
    device = next(model.parameters()).device
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = pad_id(tokenizer)
    scores = []
    try:
        torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True)
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=True, top_k=5, use_cache=True,
                                 pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            scores += [ngram_entropy(p + t) for p, t in zip(prompts[s:s + batch_size], texts)]
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return sum(scores) / len(scores) if scores else float("nan")
