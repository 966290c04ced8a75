"""`knowledger submit`: one fact, files, duplicates, and every kind of bad input."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from knowledger.cli.main import cli
from tests.ledger.helpers import count_facts

EIFFEL = ["--prompt", "The Eiffel Tower is located in", "--subject", "The Eiffel Tower", "--target", "Rome"]


def run(*args, db=None):
    return CliRunner().invoke(cli, [*args] + (["--db", str(db)] if db else []))


def test_one_fact(ws_dir):
    r = run("submit", *EIFFEL, "--target-true", "Paris", "--paraphrase", "Where is {}? In",
            "--neighbor", "The Louvre is in=Paris", db=ws_dir)
    assert (r.exit_code, r.output) == (0, "Stored fact #1: The Eiffel Tower is located in → Rome\n")
    shown = json.loads(run("show", "1", "--json", db=ws_dir).output)
    assert (shown["prompt"], shown["target_true"], shown["source"]) == ("{} is located in", "Paris", "cli")
    assert shown["paraphrases"] == ["Where is The Eiffel Tower? In"]
    assert shown["neighborhood"] == [{"prompt": "The Louvre is in", "target": "Paris"}]


def test_a_duplicate_of_a_pending_fact_is_reported_not_stored(ws_dir):
    run("submit", *EIFFEL, db=ws_dir)
    r = run("submit", "--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "rome ", db=ws_dir)
    assert (r.exit_code, r.output) == (0, "Not stored: duplicate of pending fact #1\n")
    r = run("submit", *EIFFEL, "--json", db=ws_dir)
    assert json.loads(r.output) == {"stored": [], "duplicates": [{"where": "", "duplicate_of": 1}], "invalid": []}
    assert count_facts(ws_dir) == 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "The tower is in", "--subject", "Eiffel", "--target", "Rome"],
     "prompt contains neither '{}' nor the subject 'Eiffel'"),
    (["--prompt", "{} is in {}", "--subject", "Eiffel", "--target", "Rome"],
     "prompt has 2 '{}' placeholders; exactly one is allowed"),
    (["--prompt", "{} is in", "--subject", " ", "--target", "Rome"], "subject is empty"),
    (["--prompt", "{} is in", "--subject", "Eiffel", "--target", ""], "target_new is empty"),
    (["--prompt", "{} is in", "--subject", "Eiffel", "--target", "Paris", "--target-true", "paris"],
     "target_new equals target_true ('paris')"),
    (["--prompt", "{} is in" + "!" * 1000, "--subject", "Eiffel", "--target", "Rome"],
     "prompt is too long (1008 characters, at most 1000)"),
    (["--prompt", "{} is in", "--subject", "E" * 201, "--target", "Rome"],
     "subject is too long (201 characters, at most 200)"),
    (["--prompt", "{} is in", "--subject", "Eiffel", "--target", "Rome", "--neighbor", "no answer"],
     "neighbour 'no answer' must look like PROMPT=ANSWER"),
])
def test_bad_fact_options(ws_dir, args, message):
    r = run("submit", *args, db=ws_dir)
    assert r.exit_code == 1
    assert r.output == f"Error: {message}\n"
    assert count_facts(ws_dir) == 0


@pytest.mark.parametrize("args, message", [
    (["--subject", "Eiffel", "--target", "Rome"], "missing option --prompt (or submit a --file)"),
    (["--prompt", "{} x", "--subject", "Eiffel"], "missing option --target (or submit a --file)"),
    (["--prompt", "{} x", "--subject", "s", "--target", "t", "--skip-invalid"], "--skip-invalid goes with --file"),
])
def test_usage_errors(ws_dir, args, message):
    r = run("submit", *args, db=ws_dir)
    assert r.exit_code == 2 and f"Error: {message}\n" in r.output
    assert count_facts(ws_dir) == 0


def test_file_and_options_together_is_a_usage_error(ws_dir, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("")
    r = run("submit", "--file", str(path), "--subject", "x", db=ws_dir)
    assert r.exit_code == 2 and "use either --file or --prompt/--subject/--target, not both" in r.output


def facts_file(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else json.dumps(l).encode() for l in lines))
    return path


def fact(subject, target="chess", **kw):
    return {"prompt": "{} plays", "subject": subject, "target": target, **kw}


def test_a_file_is_stored_with_its_name_as_source(ws_dir, tmp_path):
    path = facts_file(tmp_path, "facts.jsonl", [fact("Messi"), fact("Federer", source="wiki"), fact("Kasparov")])
    r = run("submit", "--file", str(path), db=ws_dir)
    assert (r.exit_code, r.output) == (0, "Stored 3 of 3 facts from facts.jsonl\n")
    rows = json.loads(run("log", "--json", db=ws_dir).output)["facts"]
    assert [(f["id"], f["subject"], f["source"]) for f in rows] == [
        (3, "Kasparov", "facts.jsonl"), (2, "Federer", "wiki"), (1, "Messi", "facts.jsonl")]


def test_duplicates_in_a_file_and_of_pending_facts(ws_dir, tmp_path):
    run("submit", "--prompt", "{} plays", "--subject", "Messi", "--target", "chess", db=ws_dir)
    path = facts_file(tmp_path, "facts.jsonl", [fact("Messi"), fact("Federer"), fact("federer ")])
    r = run("submit", "--file", str(path), db=ws_dir)
    assert r.exit_code == 0
    assert r.stderr == ("facts.jsonl:1: duplicate of pending fact #1, not stored\n"
                        "facts.jsonl:3: duplicate of pending fact #2, not stored\n")
    assert r.stdout == "Stored 1 of 3 facts from facts.jsonl (2 duplicate)\n"
    assert count_facts(ws_dir) == 2


@pytest.mark.parametrize("line, message", [
    (fact("Messi", target=""), "facts.jsonl:2: target_new is empty"),
    (b'{"prompt": "{} plays", "subject": "Messi"', "facts.jsonl:2: malformed JSON: Expecting ',' delimiter (column 42)"),
    (fact("Messi", colour="red"), "facts.jsonl:2: unknown key 'colour' (known: prompt, subject, target_new, target, "
                                  "target_true, paraphrases, neighborhood, source, case_id)"),
    (b'{"prompt": "{} plays", "subject": "M\xe9ssi", "target": "golf"}', "facts.jsonl:2: invalid UTF-8 (byte 0xe9 at column 37)"),
    (fact("Messi", target_true="Chess"), "facts.jsonl:2: target_new equals target_true ('Chess')"),
    ({"prompt": "He plays", "subject": "Messi", "target": "golf"}, "facts.jsonl:2: prompt contains neither '{}' nor the subject 'Messi'"),
    ({"prompt": "{} plays {}", "subject": "Messi", "target": "golf"}, "facts.jsonl:2: prompt has 2 '{}' placeholders; exactly one is allowed"),
    (fact("M" * 201), "facts.jsonl:2: subject is too long (201 characters, at most 200)"),
])
def test_one_bad_row_and_nothing_of_the_file_is_stored(ws_dir, tmp_path, line, message):
    path = facts_file(tmp_path, "facts.jsonl", [fact("Federer"), line, fact("Kasparov")])
    r = run("submit", "--file", str(path), db=ws_dir)
    assert r.exit_code == 1
    assert r.output == f"Error: {message}\n"
    assert count_facts(ws_dir) == 0


def test_several_bad_rows_are_all_listed(ws_dir, tmp_path):
    path = facts_file(tmp_path, "facts.jsonl", [fact(""), fact("Federer"), fact("Messi", target=" ")])
    r = run("submit", "--file", str(path), db=ws_dir)
    assert r.exit_code == 1
    assert r.output == ("Error: facts.jsonl:1: subject is empty\n"
                        "facts.jsonl:3: target_new is empty\n"
                        "nothing stored from facts.jsonl: 2 invalid rows (--skip-invalid stores the 1 valid ones)\n")
    assert count_facts(ws_dir) == 0


def test_skip_invalid_stores_the_valid_rows(ws_dir, tmp_path):
    path = facts_file(tmp_path, "facts.jsonl", [fact(""), fact("Federer"), b"{oops", fact("Kasparov")])
    r = run("submit", "--file", str(path), "--skip-invalid", db=ws_dir)
    assert r.exit_code == 0
    assert r.stderr == ("facts.jsonl:1: subject is empty (skipped)\n"
                        "facts.jsonl:3: malformed JSON: Expecting property name enclosed in double quotes "
                        "(column 2) (skipped)\n")
    assert r.stdout == "Stored 2 of 4 facts from facts.jsonl (2 invalid)\n"
    assert count_facts(ws_dir) == 2


@pytest.mark.parametrize("name, content, message", [
    ("facts.csv", b"prompt,subject,target_new,colour\n", "facts.csv:1: unknown column 'colour' (known: prompt, "
     "subject, target_new, target, target_true, paraphrases, neighborhood, source, case_id)"),
    ("facts.csv", b"prompt,subject,target\n{} x,s,t\n{} y,\xff,t\n", "facts.csv:3: invalid UTF-8 (byte 0xff at column 6)"),
    ("facts.json", b'[{"prompt": "{} x", "subject": "s", "target": "t"}\n{"a": 1}]', "facts.json:2: malformed "
     "JSON: Expecting ',' delimiter (column 1)"),
    ("facts.txt", b"{} x", "facts.txt: unsupported file type '.txt' (use .jsonl, .csv, .json)"),
])
def test_bad_files_even_with_skip_invalid(ws_dir, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for extra in ([], ["--skip-invalid"]):
        r = run("submit", "--file", str(path), *extra, db=ws_dir)
        assert (r.exit_code, r.output) == (1, f"Error: {message}\n")
    assert count_facts(ws_dir) == 0


def test_a_missing_file_is_a_usage_error(ws_dir, tmp_path):
    r = run("submit", "--file", str(tmp_path / "nope.jsonl"), db=ws_dir)
    assert r.exit_code == 2 and "does not exist" in r.output


def test_csv_and_counterfact_json_files(ws_dir, tmp_path):
    (tmp_path / "f.csv").write_text("prompt,subject,target,paraphrases\n{} plays,Messi,chess,{} is good at|He plays\n")
    (tmp_path / "cf.json").write_text(json.dumps([{
        "case_id": 42, "prompt": "The profession of Arun Nehru is", "target_new": "actor", "subject": "Arun Nehru",
        "ground_truth": "politician", "rephrase_prompt": "Arun Nehru is known for",
        "locality_prompt": "George Washington's profession is a", "locality_ground_truth": "politician"}]))
    assert run("submit", "--file", str(tmp_path / "f.csv"), db=ws_dir).output == "Stored 1 of 1 facts from f.csv\n"
    assert run("submit", "--file", str(tmp_path / "cf.json"), db=ws_dir).output == "Stored 1 of 1 facts from cf.json\n"
    a = json.loads(run("show", "1", "--json", db=ws_dir).output)
    assert a["paraphrases"] == ["Messi is good at", "He plays"]
    b = json.loads(run("show", "2", "--json", db=ws_dir).output)
    assert (b["prompt"], b["target_true"], b["case_id"]) == ("The profession of {} is", "politician", "42")
    assert b["neighborhood"] == [{"prompt": "George Washington's profession is a", "target": "politician"}]
