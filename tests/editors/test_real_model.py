"""Edits on the real default model (SmolLM2-135M-Instruct). Selected with `-m model`.

Key statistics come from the development corpus (../shared/data/corpus/wiki.test.raw); the tests
skip with a reason where it is absent.
"""
import pytest
from click.testing import CliRunner

from knowledger.editors.apply import restore_params, snapshot_params
from knowledger.editors.evaluate import top_tokens
from knowledger.editors.requests import EditRequest

pytestmark = pytest.mark.model

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris",
                     paraphrases=("The Eiffel Tower, a famous landmark, stands in the city of",))
LOUVRE = "The Louvre is located in the city of"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from knowledger.agent.editing import open_model

    try:
        return open_model(None)
    except Exception as e:  # the package is an install-time dependency of this marker
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def corpus():
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "corpus" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"development corpus not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch):
    """Real-model tests reuse the user's cache (dequantised model, statistics): minutes otherwise."""
    import os

    monkeypatch.setenv("KNOWLEDGER_CACHE", os.environ.get("KNOWLEDGER_TEST_CACHE",
                                                          os.path.expanduser("~/.cache/knowledger")))


def top1(lm, prompt):
    return top_tokens(lm.model, lm.tokenizer, prompt, 1)[0][0]


@pytest.mark.parametrize("method", ["emmet", "memit", "rome", "pmet"])
def test_eiffel_tower_moves_to_rome_and_the_louvre_stays(lm, corpus, method):
    from knowledger.agent.editing import apply_result, make_editor, resolve_hparams

    hp = resolve_hparams(lm)
    assert top1(lm, EIFFEL.text) == " Paris" and top1(lm, LOUVRE) == " Paris"
    editor = make_editor(lm, method, hp, corpus, progress=False)
    saved = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in editor.layers])
    try:
        apply_result(lm, editor.compute([EIFFEL]))
        assert top1(lm, EIFFEL.text) == " Rome"
        assert top1(lm, EIFFEL.paraphrases[0]) == " Rome"
        assert top1(lm, LOUVRE) == " Paris"
    finally:
        restore_params(lm.model, saved)
    assert top1(lm, EIFFEL.text) == " Paris"


def test_edit_command_prints_before_and_after(corpus, tmp_path):
    from knowledger.cli.main import cli

    out = tmp_path / "edited"
    res = CliRunner().invoke(cli, ["edit", "--prompt", EIFFEL.prompt, "--subject", EIFFEL.subject,
                                   "--target", "Rome", "--target-true", "Paris", "--corpus", str(corpus),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "before: ' Paris'" in res.output and "after:  ' Rome'" in res.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(EIFFEL.text, return_tensors="pt")["input_ids"]
    assert tok.decode(model(input_ids=ids).logits[0, -1].argmax()) == " Rome"


def test_malmen_trains_briefly_and_edits_held_out_facts_in_one_batch(lm, tmp_path):
    """MALMEN on the real model: 20 meta steps on 160 counterfact-train facts, then 32 held-out
    counterfact-val facts in one batch; their targets must become more probable and the weights
    come back exactly. (The quality of a properly trained network: docs/benchmarks.md.)"""
    import torch

    from knowledger.agent.bench import load_requests
    from knowledger.agent.malmen_train import TrainSettings, train
    from knowledger.editors.apply import apply_deltas
    from knowledger.editors.evaluate import score
    from knowledger.editors.malmen import MalmenEditor, load_hypernet
    from tests.conftest import SHARED_DATA

    cf = SHARED_DATA / "counterfact"
    if not (cf / "counterfact-train.json").is_file():
        pytest.skip(f"CounterFact not found at {cf}")
    train_facts, _ = load_requests(cf / "counterfact-train.json", 160)
    held_out, _ = load_requests(cf / "counterfact-val.json", 32)
    out = train(lm, train_facts, tmp_path / "net", TrainSettings(steps=20, batch=32, val_facts=0),
                progress=False)
    assert out["steps_done"] == 20
    net, sha = load_hypernet(tmp_path / "net")
    items = [(r.text, r.target_new) for r in held_out]
    before = torch.tensor([s.logprob for s in score(lm.model, lm.tokenizer, items)])
    res = MalmenEditor(lm.model, lm.tokenizer, net, sha=sha).compute(held_out)
    saved = snapshot_params(lm.model, [d.param for d in res.deltas])
    try:
        apply_deltas(lm.model, lm.spec, res.deltas)
        after = torch.tensor([s.logprob for s in score(lm.model, lm.tokenizer, items)])
    finally:
        restore_params(lm.model, saved)
    assert (after - before).mean() > 1.0 and (after > before).float().mean() > 0.8
