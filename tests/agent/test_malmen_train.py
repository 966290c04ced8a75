"""MALMEN meta-training: data order, the lower-block cache, checkpoints and resume, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from knowledger.agent.editing import open_model
from knowledger.agent.malmen_train import LowerCache, TrainSettings, batch_at, read_checkpoint, split, train
from knowledger.editors.malmen import HyperConfig, final_hidden, load_hypernet
from knowledger.editors.model_spec import spec_for
from knowledger.editors.tokens import teacher_forced
from tests.agent.helpers import CITIES, run, save_editable_tiny
from tests.editors.test_malmen import _facts

NAMES = [a + b for a in "BCDFGHJKLM" for b in "aeiou"]


@pytest.fixture
def editable(tmp_path):
    return open_model(str(save_editable_tiny(tmp_path / "m")))


def test_batches_are_epochs_of_permutations_fixed_by_the_step():
    n, size = 10, 3
    epoch0 = [i for s in range(3) for i in batch_at(n, s, size, seed=0)]
    assert len(set(epoch0)) == 9  # no fact twice within an epoch
    assert batch_at(n, 4, size, 0) == batch_at(n, 4, size, 0)
    assert batch_at(n, 3, size, 0) != batch_at(n, 0, size, 0)  # a new permutation per epoch
    assert batch_at(n, 0, size, 1) != batch_at(n, 0, size, 0)
    assert len(batch_at(2, 0, 5, 0)) == 2


def test_validation_split_is_the_tail_and_never_empty_of_training():
    facts = list(range(10))
    tr, va = split(facts, 3)
    assert tr == list(range(7)) and va == [7, 8, 9]
    with pytest.raises(ValueError, match="nothing to train on"):
        split(facts, 10)


def test_lower_cache_reproduces_the_full_forward(editable):
    model, spec = editable.model, spec_for(editable.model)
    tf = teacher_forced(editable.tokenizer, [("Home of Bob", " Rome"), ("Capital of Zork is", " Tokyo")])
    lower = LowerCache(model, spec, 2)
    with torch.no_grad():
        full = final_hidden(model, spec, tf)
        for _ in range(2):  # computed, then read back; padding columns are never read
            got = lower.final(tf)
            for b, n in enumerate(tf.batch.lengths.tolist()):
                torch.testing.assert_close(got[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
    assert len(lower.rows) == 2


def _cfg(model):
    return HyperConfig.for_model(model, layers=(2, 3), rank=8, lm_batch=8)


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(editable, tmp_path):
    facts = _facts(NAMES[:24])
    cfg = _cfg(editable.model)
    st = dict(batch=8, val_facts=4, val_every=100, ckpt_every=2, seed=3)
    train(editable, facts, tmp_path / "a", TrainSettings(steps=6, **st), hyper=cfg, progress=False)
    train(editable, facts, tmp_path / "b", TrainSettings(steps=3, **st), hyper=cfg, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(editable, facts, tmp_path / "b", TrainSettings(steps=6, **st), hyper=cfg, progress=False)
    with pytest.raises(ValueError, match="different batch"):
        train(editable, facts, tmp_path / "b", TrainSettings(steps=6, **{**st, "batch": 4}), resume=True,
              progress=False)
    out = train(editable, facts, tmp_path / "b", TrainSettings(steps=6, **st), resume=True, progress=False)
    assert out["steps_done"] == 6
    a, b = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")  # safetensors + JSON
    for k, v in a["net"].items():
        torch.testing.assert_close(b["net"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    steps_a = [h["step"] for h in a["history"] if "edit_loss" in h]
    steps_b = [h["step"] for h in b["history"] if "edit_loss" in h]
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6]
    history = json.loads((tmp_path / "b" / "training.json").read_text())
    assert history["steps_done"] == 6 and history["meta"]["train_facts"] == 20


def test_the_artefact_is_the_best_validated_network(editable, tmp_path):
    facts = _facts(NAMES[:24])
    out = train(editable, facts, tmp_path / "r", TrainSettings(steps=4, batch=8, val_facts=4, val_every=2),
                hyper=_cfg(editable.model), progress=False)
    validations = [h["validation"] for h in json.loads((tmp_path / "r" / "training.json").read_text())["history"]
                   if "validation" in h]
    assert [v["step"] for v in validations] == [0, 2, 4]
    assert out["best"]["score"] == max(v["score"] for v in validations)
    net, sha = load_hypernet(tmp_path / "r")
    assert sha == out["best"]["sha256"]
    meta = json.loads((tmp_path / "r" / "config.json").read_text())["meta"]
    assert meta["step"] == out["best"]["step"] and meta["val_facts"] == 4


def test_cli_trains_and_refuses_bad_input(tmp_path):
    model_dir = save_editable_tiny(tmp_path / "m")
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                                            target_true=r.target_true, paraphrases=list(r.paraphrases),
                                            neighborhood=[{"prompt": p, "target": a} for p, a in r.neighborhood]))
                            + "\n" for r in _facts(NAMES[:20])))
    args = ["train-malmen", "--data", data, "--out", tmp_path / "net", "--model", model_dir, "--steps", 3,
            "--batch", 8, "--val-facts", 4, "--layers", "2,3", "--rank", 8]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "held out" in r.output and "hyper-network" in r.output
    assert (tmp_path / "net" / "hypernet.safetensors").is_file()
    again = run(*args)
    assert again.exit_code == 1 and "Error:" in again.output and "--resume" in again.output.splitlines()[-1]
    r = run(*args[:-4], "--layers", "2,x", "--out", tmp_path / "other")
    assert r.exit_code == 2 and "--layers" in r.output
    r = run(*args, "--resume", "--steps", 4, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["steps_done"] == 4


@pytest.fixture
def trained(tmp_path):
    """A tiny model and a hyper-network trained for a few steps on it."""
    model_dir = save_editable_tiny(tmp_path / "m")
    lm = open_model(str(model_dir))
    train(lm, _facts(NAMES[:24]), tmp_path / "net", TrainSettings(steps=6, batch=8, val_facts=4, val_every=3),
          hyper=_cfg(lm.model), progress=False)
    return model_dir, tmp_path / "net"


def test_edit_and_bench_commands_take_a_hypernet(trained, tmp_path):
    model_dir, net = trained
    r = run("edit", "--model", model_dir, "--editor", "malmen", "--hypernet", net, "--prompt", "Home of {}",
            "--subject", "Zed", "--target", "Rome", "--target-true", "Paris")
    assert r.exit_code == 0, r.output
    assert "malmen on layers [2, 3]" in r.output and "after:" in r.output
    r = run("edit", "--model", model_dir, "--editor", "malmen", "--prompt", "Home of {}", "--subject", "Zed",
            "--target", "Rome")
    assert r.exit_code == 1 and "needs --hypernet" in r.output.splitlines()[-1]
    data = tmp_path / "cf.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                                            target_true=r.target_true)) + "\n" for r in _facts(NAMES[30:36])))
    r = run("bench", "counterfact", "--model", model_dir, "--data", data, "--n", 6, "--batch-size", 6,
            "--editor", "malmen", "--hypernet", net, "--heldout-tokens", 0, "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output[r.output.index("{"):])
    assert rec["editors_used"] == {"malmen": 1} and rec["hypernet"]["sha256"] == load_hypernet(net)[1]
    assert rec["timing"]["per_fact_s"] > 0 and "hypernet_s" in rec["timing"]
