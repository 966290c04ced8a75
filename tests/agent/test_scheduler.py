"""The scheduler: conflicts, batches, the editor per batch, and the workspace settings. No model."""
import pytest

from knowledger.agent.scheduler import (EditSettings, PendingFact, choose_editor, plan,
                                        resolve_conflicts)


def facts(*rows):
    return [PendingFact(i, p, s, t) for i, (p, s, t) in enumerate(rows, 1)]


def test_the_newer_of_two_facts_about_the_same_subject_and_prompt_supersedes_the_older():
    fs = facts(("{} is in", "Eiffel Tower", "Rome"), ("{} plays", "Ann", "chess"),
               ("{}  IS in", "eiffel tower", "Berlin"), ("{} is in", "Louvre", "Oslo"),
               ("{} is in", "Eiffel Tower", "Lima"))
    kept, superseded = resolve_conflicts(fs)
    assert [f.id for f in kept] == [2, 4, 5]
    assert superseded == [(1, 5), (3, 5)]


def test_batches_keep_submission_order_and_auto_switches_to_memit_at_the_threshold():
    fs = facts(*[("{} is in", f"S{i}", "X") for i in range(7)])
    p = plan(fs, batch_size=3, memit_min_batch=3)
    assert [b.fact_ids for b in p.batches] == [(1, 2, 3), (4, 5, 6), (7,)]
    assert [b.editor for b in p.batches] == ["memit", "memit", "emmet"]
    assert p.batches[2].reason == "auto: 1 facts < auto_memit_min_batch 3"
    assert [b.editor for b in plan(fs, batch_size=10).batches] == ["emmet"]  # default threshold 256


def test_rome_and_pmet_only_when_asked_and_rome_one_fact_a_batch():
    fs = facts(("{} is in", "A", "X"), ("{} is in", "B", "Y"))
    p = plan(fs, batch_size=8, editor="rome")
    assert [(b.editor, b.fact_ids) for b in p.batches] == [("rome", (1,)), ("rome", (2,))]
    assert "ROME edits one fact per batch" in p.batches[0].reason
    assert [b.editor for b in plan(fs, batch_size=8, editor="pmet").batches] == ["pmet"]
    assert choose_editor(100, "emmet", 32) == ("emmet", "asked for")


def test_bad_editor_or_batch_size_is_refused():
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        plan(facts(("{} x", "A", "B")), batch_size=2, editor="nope")
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        plan(facts(("{} x", "A", "B")), batch_size=0)


def test_plan_as_dict_names_facts_and_supersessions():
    fs = facts(("{} is in", "A", "X"), ("{} is in", "A", "Y"))
    d = plan(fs, batch_size=4).as_dict({f.id: f for f in fs})
    assert d == {"batches": [{"index": 1, "editor": "emmet", "reason": "auto: 1 facts < auto_memit_min_batch 256",
                              "facts": [{"id": 2, "text": "A is in", "target_new": "Y"}]}],
                 "superseded": [{"fact": 1, "superseded_by": 2}]}


def test_settings_merge_overrides_and_report_only_real_changes(tmp_path):
    st = EditSettings(hparams_overrides={"v_steps": 5})
    new, changes = st.updated(overrides={"layers": [1, 2]}, stats_tokens=1000, corpus=None)
    assert new.hparams_overrides == {"v_steps": 5, "layers": [1, 2]} and new.stats_tokens == 1000
    assert changes == ["setting stats_tokens = 1000",
                       "setting hparams_overrides = {'v_steps': 5, 'layers': [1, 2]}"]
    again, changes = new.updated(overrides={"layers": [1, 2]}, stats_tokens=1000)
    assert again == new and changes == []
    f = tmp_path / "c.txt"
    assert new.updated(corpus=f)[0].stats_corpus == str(f.resolve())


def test_auto_prefers_the_lifelong_editor_past_either_threshold():
    from knowledger.agent.scheduler import EditSettings, History, choose_editor

    st = EditSettings(lifelong_min_active=200, lifelong_norm_growth=0.3, lifelong_editor="encore")
    assert choose_editor(10, "auto", 256, History(199, 0.29), st)[0] == "emmet"
    name, why = choose_editor(10, "auto", 256, History(200, 0.0), st)
    assert name == "encore" and "200 active edits" in why
    name, why = choose_editor(10, "auto", 256, History(5, 0.31), st)
    assert name == "encore" and "lifelong_norm_growth" in why
    assert choose_editor(10, "memit", 256, History(10**6, 9.0), st)[0] == "memit"  # asked for


def test_a_long_plan_switches_part_way_as_its_batches_add_up():
    from knowledger.agent.scheduler import EditSettings, History, PendingFact, plan

    facts = [PendingFact(i, "{} x", f"s{i}", "t") for i in range(1, 8)]
    p = plan(facts, batch_size=2, history=History(1, 0.0),
             settings=EditSettings(lifelong_min_active=4, lifelong_norm_growth=10.0))
    assert [b.editor for b in p.batches] == ["emmet", "emmet", "encore", "encore"]
