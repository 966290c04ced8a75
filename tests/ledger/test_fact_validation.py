"""validate_fact: every kind of bad input, one by one, and what good input becomes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from knowledger.ledger.facts import Fact, fingerprint, parse_neighbor, validate_fact

GOOD = dict(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")


def test_good_fact_is_stripped_and_complete():
    f = validate_fact(prompt="  {} is located in ", subject=" The Eiffel Tower", target_new="Rome ",
                      target_true="Paris", paraphrases=["Where is {}? In"],
                      neighborhood=[{"prompt": "The Louvre is in", "target": "Paris"}, ("Big Ben is in", "London")],
                      source="cli", case_id=7)
    assert f == Fact(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome",
                     target_true="Paris", paraphrases=["Where is The Eiffel Tower? In"],
                     neighborhood=[("The Louvre is in", "Paris"), ("Big Ben is in", "London")],
                     source="cli", case_id="7")
    assert f.text == "The Eiffel Tower is located in"


def test_subject_verbatim_becomes_the_template():
    f = validate_fact("The Eiffel Tower, in The Eiffel Tower street, is in", "The Eiffel Tower", "Rome")
    assert f.prompt == "{}, in The Eiffel Tower street, is in"  # first occurrence only


@pytest.mark.parametrize("change, message", [
    (dict(prompt="The tower is located in"), "prompt contains neither '{}' nor the subject 'The Eiffel Tower'"),
    (dict(prompt="{} is located in {}"), "prompt has 2 '{}' placeholders; exactly one is allowed"),
    (dict(prompt="{} is {located} in"), "prompt has a '{' or '}' besides its one '{}' placeholder"),
    (dict(prompt=" {} "), "prompt has no words besides the subject"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=None), "prompt is missing"),
    (dict(subject="   "), "subject is empty"),
    (dict(target_new=""), "target_new is empty"),
    (dict(target_new=1984), "target_new must be a string, got int"),
    (dict(target_true=" rome "), "target_new equals target_true ('rome')"),
    (dict(prompt="{} is" + " x" * 500), "prompt is too long (1005 characters, at most 1000)"),
    (dict(subject="S" * 201, prompt="{} is in"), "subject is too long (201 characters, at most 200)"),
    (dict(target_new="R" * 201), "target_new is too long (201 characters, at most 200)"),
    (dict(target_new="Ro\x00me"), "target_new contains a NUL character"),
    (dict(paraphrases="Where is it?"), "paraphrases must be a list, got str"),
    (dict(paraphrases=["ok", " "]), "paraphrases[1] is empty"),
    (dict(paraphrases=["{} {}"]), "paraphrases[0] has more than one '{}'"),
    (dict(paraphrases=["p"] * 101), "too many paraphrases (101, at most 100)"),
    (dict(neighborhood=["Big Ben is in"]), 'neighborhood[0] must be {"prompt": ..., "target": ...}'),
    (dict(neighborhood=[{"prompt": "Big Ben is in", "answer": "London"}]),
     "neighborhood[0] has unknown key 'answer' (expected prompt, target)"),
    (dict(neighborhood=[{"prompt": "Big Ben is in", "target": ""}]), "neighborhood[0].target is empty"),
    (dict(case_id=1.5), "case_id must be a string or an integer, got float"),
    (dict(source="s" * 201), "source is too long (201 characters, at most 200)"),
])
def test_bad_input_names_the_problem(change, message):
    with pytest.raises(ValueError) as e:
        validate_fact(**{**GOOD, "target_true": None, **change})
    assert str(e.value) == message


def test_limits_are_inclusive():
    f = validate_fact(prompt="{}" + "x" * 998, subject="S" * 200, target_new="T" * 200)
    assert len(f.prompt) == 1000


def test_parse_neighbor_splits_at_the_last_equals():
    assert parse_neighbor("a=b is = c") == ("a=b is", "c")
    for bad in ("no equals", "=answer", "prompt= "):
        with pytest.raises(ValueError, match="must look like PROMPT=ANSWER"):
            parse_neighbor(bad)


def test_fingerprint_ignores_case_spacing_and_the_prompt_form():
    a = validate_fact("{} is located in", "The Eiffel Tower", "Rome")
    b = validate_fact("The Eiffel Tower  is LOCATED in", "The Eiffel Tower", " rome")
    c = validate_fact("{} is located in", "THE EIFFEL\tTOWER", "Rome")
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.fingerprint != validate_fact("{} is located in", "The Eiffel Tower", "Berlin").fingerprint
    assert a.fingerprint != validate_fact("{} is found in", "The Eiffel Tower", "Rome").fingerprint
    # the parts are delimited: moving text between fields changes the fingerprint
    assert fingerprint("{} a", "b", "c") != fingerprint("{} a b", "", "c")


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(max_size=60), subject=st.text(max_size=20), target=st.text(max_size=20))
def test_any_text_gives_a_usable_fact_or_a_value_error(prompt, subject, target):
    try:
        f = validate_fact(prompt, subject, target)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert f.prompt.count("{}") == 1
    assert f.text == f.prompt.replace("{}", f.subject)
    assert f.subject and f.target_new and f.subject == f.subject.strip()
    assert f.fingerprint == validate_fact(f.prompt, f.subject, f.target_new).fingerprint
