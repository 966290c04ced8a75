"""The table of methods: every consumer reads it, and a name it lacks is an error."""
from __future__ import annotations

import pytest

from knowledger.agent.scheduler import EDITOR_CHOICES, EDITORS, LIFELONG_EDITORS, batch_limit, plan
from knowledger.editors import methods as M
from knowledger.editors.base import ModelEditor
from knowledger.editors.editor import LIFELONG, METHODS, Editor
from knowledger.editors.hparams import EditHParams
from tests.editors.test_editor import make


def test_the_table_declares_each_method():
    assert M.method_names() == ("emmet", "memit", "rome", "pmet", "alphaedit", "encore", "malmen", "ultraedit")
    rome, pmet, encore, malmen, ultra = (M.get_method(n) for n in ("rome", "pmet", "encore", "malmen", "ultraedit"))
    assert (rome.max_batch, rome.distribution, rome.optimise) == (1, "last", "mlp")
    assert (pmet.distribution, pmet.optimise) == ("sqrt", "pmet")
    assert encore.value_stop == "mpes" and encore.reads_memory
    assert malmen.optimise == "none" and malmen.solve is None and not malmen.closed_form
    assert ultra.optimise == "none" and not ultra.closed_form and ultra.lifelong_stats and not ultra.reads_memory
    assert M.lifelong_stats_names() == ("ultraedit",)
    assert M.lifelong_names() == ("alphaedit", "encore") == LIFELONG == LIFELONG_EDITORS
    assert METHODS == M.closed_form_names() and EDITORS == M.method_names()
    assert EDITOR_CHOICES == ("auto",) + EDITORS


def test_unknown_names_are_errors_never_a_fall_through():
    with pytest.raises(M.UnknownMethod, match="unknown editor 'romee'"):
        M.get_method("romee")
    with pytest.raises(ValueError, match="unknown editor"):
        make("llama", "romee")
    with pytest.raises(ValueError, match="not a closed-form editor"):
        make("llama", "malmen")
    with pytest.raises(ValueError, match="unknown editor"):
        batch_limit("romee")


def test_policies_come_from_the_entries():
    hp = EditHParams(layers=(1, 2))
    assert M.get_method("encore").value_hparams(hp).early_stop_loss == 0.0
    assert M.get_method("memit").value_hparams(hp) is hp
    assert M.get_method("rome").distribution_for(hp) == "last"
    assert M.get_method("memit").distribution_for(hp.replace(distribution="sqrt")) == "sqrt"
    assert M.get_method("rome").batches([1, 2, 3]) == [[1], [2], [3]]
    assert M.get_method("emmet").batches([1, 2, 3]) == [[1, 2, 3]]
    assert batch_limit("rome") == 1 and batch_limit("auto") is None and batch_limit("emmet") is None


def test_both_editors_implement_the_protocol():
    _, editor = make("llama", "pmet")
    assert isinstance(editor, ModelEditor) and editor.distribution.name == "sqrt"
    assert editor.reads_memory is False and make("llama", "encore")[1].reads_memory is True
    import inspect

    from knowledger.editors.malmen import MalmenEditor

    assert MalmenEditor.method == "malmen" and MalmenEditor.reads_memory is False
    for cls in (Editor, MalmenEditor):  # one compute signature: keyword-only memory and progress
        params = inspect.signature(cls.compute).parameters
        assert list(params)[:2] == ["self", "requests"]
        assert {k: params[k].kind for k in ("memory", "progress")} == {
            "memory": inspect.Parameter.KEYWORD_ONLY, "progress": inspect.Parameter.KEYWORD_ONLY}


def test_editor_reports_progress_by_phase():
    _, editor = make("llama", "memit")
    from tests.editors.test_editor import FACTS

    seen = []
    editor.compute(FACTS, progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert {p for p, _, _ in seen} == {"values", "keys"}
    assert seen[-1] == ("keys", 2, 2) and all(t == 2 for _, _, t in seen)


def test_hparams_accept_the_retired_pmet_knob_only_at_its_old_default():
    d = EditHParams(layers=(1,)).to_dict()
    assert "pmet_attn_weight" not in d
    assert EditHParams.from_dict({**d, "pmet_attn_weight": 1.0}) == EditHParams(layers=(1,))
    with pytest.raises(ValueError, match="pmet_attn_weight"):
        EditHParams.from_dict({**d, "pmet_attn_weight": 0.5})
