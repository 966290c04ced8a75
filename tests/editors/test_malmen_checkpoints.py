"""MALMEN training checkpoints are safetensors + JSON: round trip, torn files, pickles refused;
facts that training cannot use are refused before anything runs."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from knowledger.editors.malmen import HyperConfig, HyperNet
from knowledger.editors.malmen.train import (CheckpointError, check_training_facts, read_checkpoint,
                                             write_checkpoint)
from knowledger.editors.requests import EditRequest
from tests.editors.test_malmen import _facts


def _state(seed=0):
    torch.manual_seed(seed)
    net = HyperNet(HyperConfig(layers=(1, 2), d_in=12, d_out=8, model_type="llama", n_model_layers=4, rank=3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(0, torch.randn(5, 12), torch.randn(5, 8)).sum().backward()
    opt.step()
    return dict(net=net.state_dict(), opt=opt.state_dict(), step=7, history=[{"step": 7, "edit_loss": 1.5}],
                best={"score": 0.5}, initialised=True, meta={"hyper": net.config.to_dict()})


def test_a_checkpoint_round_trips_through_safetensors_and_json(tmp_path):
    state = _state()
    write_checkpoint(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    assert oct(os.stat(tmp_path / "checkpoint.json").st_mode & 0o777) == "0o644"
    got = read_checkpoint(tmp_path)
    for k, v in state["net"].items():
        assert torch.equal(got["net"][k], v), k
    assert got["opt"]["param_groups"] == json.loads(json.dumps(state["opt"]["param_groups"]))
    for idx, entry in state["opt"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["opt"]["state"][idx][key], value), (idx, key)
    assert (got["step"], got["history"], got["best"], got["initialised"]) == (7, state["history"], {"score": 0.5}, True)
    net = HyperNet(HyperConfig.from_dict(got["meta"]["hyper"]))
    net.load_state_dict(got["net"])  # and the optimiser accepts its state back
    torch.optim.Adam(net.parameters(), lr=1e-3).load_state_dict(got["opt"])


def test_a_torn_checkpoint_is_refused(tmp_path):
    write_checkpoint(tmp_path, _state(0))
    json_text = (tmp_path / "checkpoint.json").read_text()
    write_checkpoint(tmp_path, _state(1))
    (tmp_path / "checkpoint.json").write_text(json_text)  # the JSON of one save, the tensors of another
    with pytest.raises(CheckpointError, match="does not match"):
        read_checkpoint(tmp_path)


class _Payload:
    """What a malicious pickle does when loaded: here, make a folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_crafted_pickle_checkpoint_is_refused_with_one_line_and_never_loaded(tmp_path):
    from knowledger.agent.malmen_train import TrainSettings, train

    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(pickle.dumps({"net": _Payload(str(marker))}))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "run")
    assert "pickle" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="never loads pickles"):
        train(None, _facts(["Bob", "Eve", "Max"]), tmp_path / "run", TrainSettings(val_facts=1), resume=True)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(None, _facts(["Bob", "Eve", "Max"]), tmp_path / "run", TrainSettings(val_facts=1))
    assert not marker.exists()


def test_facts_without_target_true_or_paraphrase_are_refused_before_training(tmp_path):
    from knowledger.agent.malmen_train import TrainSettings, train

    facts = _facts(["Bob", "Eve", "Max"])
    bare = EditRequest(prompt="Home of {}", subject="Ann", target_new="Rome", paraphrases=("Friend of Ann",))
    check_training_facts(facts)
    for bad in (bare, EditRequest(prompt="Home of {}", subject="Ann", target_new="Rome", target_true="Oslo")):
        with pytest.raises(ValueError, match="target_true and at least one paraphrase") as e:
            train(None, facts + [bad], tmp_path / "never", TrainSettings(val_facts=1))  # no model needed
        assert "fact 4" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "never").exists()  # nothing was written


def test_train_malmen_cli_refuses_such_facts_before_loading_a_model(tmp_path):
    from click.testing import CliRunner

    from knowledger.cli.main import cli

    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(dict(prompt="Home of {}", subject=s, target_new="Rome"))
                              for s in ("Bob", "Eve", "Max")) + "\n")
    res = CliRunner().invoke(cli, ["train-malmen", "--data", str(data), "--out", str(tmp_path / "o"),
                                   "--model", str(tmp_path / "no-such-model")])
    assert res.exit_code != 0
    assert "target_true and at least one paraphrase" in res.output and "no-such-model" not in res.output
