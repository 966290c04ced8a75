"""Model-health probes: perplexity against a per-sequence reference, norms, n-gram entropy, held-out slices."""
import math

import torch
import torch.nn.functional as F

from knowledger.editors.corpus import Corpus
from knowledger.editors.health import (generation_entropy, heldout_chunks, ngram_entropy, perplexity,
                                       weight_norms)
from tests.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


@torch.no_grad()
def test_perplexity_of_ragged_batches_matches_one_sequence_at_a_time():
    model = tiny_model("llama", init_range=0.3)
    chunks = [[5, 9, 3, 7, 11], [4, 4, 8], [2, 6, 10, 12, 14, 16, 18]]
    nll, n = 0.0, 0
    for c in chunks:
        logits = model(input_ids=torch.tensor([c])).logits[0, :-1]
        nll += float(F.cross_entropy(logits, torch.tensor(c[1:]), reduction="sum"))
        n += len(c) - 1
    assert abs(perplexity(model, TOK, chunks, batch_size=2) - math.exp(nll / n)) < 1e-3


def test_weight_norms_and_ngram_entropy():
    base = {3: torch.ones(2, 2)}
    out = weight_norms({3: torch.ones(2, 2) * 1.5}, base)[3]
    assert out["base_fro"] == 2.0 and out["w_fro"] == 3.0 and out["delta_fro"] == 1.0
    assert out["growth"] == 1.5 and out["delta_rel"] == 0.5
    assert ngram_entropy("a a a a a a") == 0.0  # one repeated bigram and trigram
    assert ngram_entropy("the cat sat on the mat") > ngram_entropy("the the the the the cat")


def test_heldout_chunks_start_after_the_statistics_tokens(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"Document number {i} talks about things and more things." for i in range(40)))
    corpus = Corpus.from_path(path)
    every = corpus.chunks(TOK, 400, seq_len=16)
    held = heldout_chunks(corpus, TOK, 100, skip_tokens=200, seq_len=16)
    starts = [sum(len(c) for c in every[:i]) for i in range(len(every))]
    first = next(i for i, s in enumerate(starts) if s >= 200)  # the first whole chunk after 200 tokens
    assert held and held[0] == every[first] and 200 <= starts[first] < 216
    assert held[:-1] == every[first:first + len(held) - 1]


def test_generation_entropy_is_reproducible_and_leaves_the_rng_alone():
    model = tiny_model("llama", init_range=0.3)
    torch.manual_seed(123)
    a = generation_entropy(model, TOK, ["Bob lives in", "The cat"], max_new_tokens=6)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = generation_entropy(model, TOK, ["Bob lives in", "The cat"], max_new_tokens=6)
    assert a == b and torch.equal(after, torch.rand(1))
