"""read_facts: .jsonl, .csv and .json files, the benchmark layouts, and bad files."""
from __future__ import annotations

import json

import pytest

from knowledger.ledger.errors import InvalidFacts
from knowledger.ledger.facts import Fact, ParsedRow, read_facts


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def errors(rows):
    return [(r.line, r.error) for r in rows if not r.ok]


# --- .jsonl ----------------------------------------------------------------------------------------
def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = write(tmp_path, "facts.jsonl", "\n".join([
        json.dumps({"prompt": "{} is located in", "subject": "The Eiffel Tower", "target": "Rome",
                    "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"],
                    "neighborhood": [{"prompt": "The Louvre is in", "target": "Paris"}], "source": "me"}),
        "",
        "   ",
        json.dumps({"prompt": "{} plays", "subject": "Messi", "target_new": "basketball"}),
    ]) + "\n")
    rows = read_facts(path)
    assert [r.line for r in rows] == [1, 4]
    assert rows[0] == ParsedRow(1, Fact("{} is located in", "The Eiffel Tower", "Rome", "Paris",
                                        ["The Eiffel Tower stands in"], [("The Louvre is in", "Paris")],
                                        source="me"))
    assert rows[1].fact.target_new == "basketball" and rows[1].fact.source is None


def test_jsonl_bad_rows_do_not_stop_the_reader(tmp_path):
    good = json.dumps({"prompt": "{} plays", "subject": "Messi", "target": "chess"})
    path = write(tmp_path, "facts.jsonl", b"\n".join([
        good.encode(),
        b'{"prompt": "{} plays", "subject": "Messi"',
        json.dumps({"prompt": "{} plays", "subject": "Messi", "target": "golf", "colour": "red"}).encode(),
        json.dumps({"prompt": "{} plays", "subject": "Messi", "target": " "}).encode(),
        b'{"prompt": "{} plays", "subject": "M\xffssi", "target": "golf"}',
        b'["a list"]',
        good.encode(),
    ]))
    rows = read_facts(path)
    assert [r.line for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert errors(rows) == [
        (2, "malformed JSON: Expecting ',' delimiter (column 42)"),
        (3, "unknown key 'colour' (known: prompt, subject, target_new, target, target_true, "
            "paraphrases, neighborhood, source, case_id)"),
        (4, "target_new is empty"),
        (5, "invalid UTF-8 (byte 0xff at column 37)"),
        (6, "expected a JSON object, got a list"),
    ]


def test_jsonl_target_and_target_new_together_is_ambiguous(tmp_path):
    path = write(tmp_path, "f.jsonl", json.dumps({"prompt": "{} x", "subject": "s", "target": "a",
                                                  "target_new": "b"}))
    assert errors(read_facts(path)) == [(1, "both 'target' and 'target_new' given; use one")]


# --- .csv -----------------------------------------------------------------------------------------
def test_csv_with_list_cells_and_a_multiline_cell(tmp_path):
    path = write(tmp_path, "facts.csv", (
        "prompt,subject,target_new,target_true,paraphrases,neighborhood,source\n"
        '{} is located in,The Eiffel Tower,Rome,Paris,"Where is {}? In|The Eiffel Tower stands in",'
        '"The Louvre is in=Paris|Big Ben is in=London",\n'
        "\n"
        '"{} plays\nthe sport of",Messi,chess,,"[""Messi is good at""]",'
        '"[{""prompt"": ""Federer plays"", ""target"": ""tennis""}]",sheet\n'
        "{} sings,Adele,,,,,\n"))
    rows = read_facts(path)
    assert [r.line for r in rows] == [2, 4, 6]
    a, b = rows[0].fact, rows[1].fact
    assert a == Fact("{} is located in", "The Eiffel Tower", "Rome", "Paris",
                     ["Where is The Eiffel Tower? In", "The Eiffel Tower stands in"],
                     [("The Louvre is in", "Paris"), ("Big Ben is in", "London")])
    assert (b.prompt, b.target_true, b.paraphrases, b.neighborhood, b.source) == (
        "{} plays\nthe sport of", None, ["Messi is good at"], [("Federer plays", "tennis")], "sheet")
    assert errors(rows) == [(6, "target_new is empty")]


def test_csv_target_alias_and_bad_cells(tmp_path):
    path = write(tmp_path, "f.csv", "prompt,subject,target,paraphrases,neighborhood\n"
                                     "{} x,s,a,[broken,\n"
                                     "{} x,s,a,,no equals sign\n"
                                     "{} x,s,a,,,extra\n"
                                     "{} x,s,a,,\n")
    rows = read_facts(path)
    assert errors(rows) == [
        (2, "paraphrases is not a valid JSON list: Expecting value"),
        (3, "neighbour 'no equals sign' must look like PROMPT=ANSWER"),
        (4, "row has 6 cells, the header 5"),
    ]
    assert rows[3].fact.target_new == "a"


@pytest.mark.parametrize("text, message", [
    ("prompt,subject,target_new,colour\n", "f.csv:1: unknown column 'colour' (known: prompt, subject, "
                                           "target_new, target, target_true, paraphrases, neighborhood, source, case_id)"),
    ("prompt,target_new\n", "f.csv:1: missing column 'subject'"),
    ("prompt,subject\n", "f.csv:1: missing column 'target_new'"),
    (b"prompt,subject,target_new\n{} x,s,a\n{} x,\xe9t\xe9,a\n", "f.csv:3: invalid UTF-8 (byte 0xe9 at column 6)"),
])
def test_csv_file_level_problems(tmp_path, text, message):
    with pytest.raises(InvalidFacts) as e:
        read_facts(write(tmp_path, "f.csv", text))
    assert str(e.value) == message


def test_csv_with_bom_and_only_a_header(tmp_path):
    assert read_facts(write(tmp_path, "f.csv", "\ufeffprompt,subject,target_new\n")) == []


# --- .json and the benchmark layouts ----------------------------------------------------------------
COUNTERFACT = [
    {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One",
     "ground_truth": "BBC", "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
     "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"},
    {"case_id": 11, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "Where she is from, people speak",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 12, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Someone Else",
     "ground_truth": "guitar", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"},
]
ROME = [{
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's mother tongue is"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "The mother tongue of Montesquieu is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"], "generation_prompts": ["..."],
}]
ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
     "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"},
    {"subject": "Delta Serpentis", "src": "Which constellation is Delta Serpentid in?", "alt": "Virgo",
     "answers": ["Serpens"], "rephrase": "r", "loc": "l", "loc_ans": "a"},
]


def test_counterfact_easyedit_layout(tmp_path):
    rows = read_facts(write(tmp_path, "cf.json", json.dumps(COUNTERFACT, indent=2)))
    assert [r.line for r in rows] == [2, 12, 22]  # where each item's "{" is
    assert rows[0].fact == Fact("{}, by", "BBC One", "Sega", "BBC",
                                ["BBC One is my favorite product out of everything owned by"],
                                [("BBC Radio, by", "BBC")], case_id="10")
    assert rows[1].fact.prompt == "The mother tongue of {} is"
    assert errors(rows) == [(22, "prompt contains neither '{}' nor the subject 'Someone Else'")]


def test_rome_layout(tmp_path):
    (row,) = read_facts(write(tmp_path, "rome.json", json.dumps(ROME)))
    assert row == ParsedRow(1, Fact(
        "The mother tongue of {} is", "Danielle Darrieux", "English", "French",
        ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's mother tongue is"],
        [("Michel Rocard is a native speaker of", "French"), ("The mother tongue of Montesquieu is", "French")],
        case_id="0"))


def test_zsre_layout_needs_the_subject_in_the_question(tmp_path):
    rows = read_facts(write(tmp_path, "zsre.json", json.dumps(ZSRE)))
    assert rows[0].fact == Fact("What is the product made by {}?", "UniFirst", "unmanned aircraft", "uniform",
                                ["What will be the product of UniFirst?"],
                                [("nq question: john goodman's character in the big lebowski", "Walter Sobchak")])
    assert errors(rows) == [(1, "zsRE src does not contain the subject 'Delta Serpentis'")]


def test_layouts_mix_in_one_file_and_in_jsonl(tmp_path):
    items = [ROME[0], ZSRE[0], COUNTERFACT[0], {"prompt": "{} x", "subject": "s", "target": "t"}]
    rows = read_facts(write(tmp_path, "mix.jsonl", "\n".join(json.dumps(i) for i in items)))
    assert [r.fact.subject for r in rows] == ["Danielle Darrieux", "UniFirst", "BBC One", "s"]


@pytest.mark.parametrize("name, text, message", [
    ("f.json", '[{"prompt": "{} x",\n "subject": "s" "target": "t"}]',
     "f.json:2: malformed JSON: Expecting ',' delimiter (column 17)"),
    ("f.json", '{"prompt": "{} x"}', "f.json:1: expected a JSON list of facts, got dict"),
    ("f.json", b'[\n{"prompt": "\xc3{} x"}]', "f.json:2: invalid UTF-8 (byte 0xc3 at column 13)"),
    ("f.txt", "hello", "f.txt: unsupported file type '.txt' (use .jsonl, .csv, .json)"),
])
def test_json_file_level_problems(tmp_path, name, text, message):
    with pytest.raises(InvalidFacts) as e:
        read_facts(write(tmp_path, name, text))
    assert str(e.value) == message


def test_missing_file(tmp_path):
    with pytest.raises(InvalidFacts, match="^nope.jsonl: cannot read: No such file or directory$"):
        read_facts(tmp_path / "nope.jsonl")


def test_json_item_lines_with_nested_lists_and_strings(tmp_path):
    items = [{"prompt": "{} [x], y", "subject": "s", "target": "a\n[b]"},
             {"prompt": "{} z", "subject": "s", "target": "c", "paraphrases": ["[", "]"]}]
    text = "[\n\n  " + json.dumps(items[0], indent=1) + " ,\n" + json.dumps(items[1]) + "\n]"
    assert [r.line for r in read_facts(write(tmp_path, "f.json", text))] == [3, 8]


# --- the development data (skipped without it) -----------------------------------------------------
def test_shared_counterfact_and_zsre_files_load(shared_data):
    rows = read_facts(shared_data / "counterfact" / "counterfact-val.json")
    assert len(rows) == 1919 and all(r.ok for r in rows)
    assert all(r.fact.prompt.count("{}") == 1 and r.fact.neighborhood for r in rows)
    rows = read_facts(shared_data / "zsre" / "zsre_mend_train-1k.json")
    assert len(rows) == 1000
    assert sum(r.ok for r in rows) >= 950  # the rest: alt equal to the old answer, empty alt
