import json

import pytest

from knowledger.editors.hparams import EditHParams, load_preset, preset_for, preset_names
from tests.tiny import tiny_config


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips_through_json(name):
    hp = load_preset(name)
    assert EditHParams.from_dict(json.loads(hp.to_json())) == hp


def test_the_default_models_preset_is_found_by_family_and_depth():
    config = tiny_config("llama", n_layers=30)
    assert preset_for(config) == load_preset("llama-30L")
    generic = preset_for(tiny_config("llama", n_layers=12))  # no file: a sixth of the depth, 5 layers
    assert generic.layers == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("bad, message", [
    (dict(layers=()), "empty"),
    (dict(layers=(4, 3)), "ascending"),
    (dict(layers=(1,), v_lr=0), "v_lr"),
    (dict(layers=(1,), distribution="spiral"), "unknown distribution"),
])
def test_invalid_hyperparameters_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        EditHParams(**bad)


def test_unknown_keys_are_refused_and_unknown_presets_named():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        EditHParams.from_dict({"layers": [1], "learning_rate": 1})
    with pytest.raises(ValueError, match="unknown hyperparameter.*nope"):
        load_preset("llama-30L").replace(nope=1)  # what --set nope=1 does
    with pytest.raises(ValueError, match="no hyperparameter preset"):
        load_preset("nope")
