"""`knowledger apply / undo / redo / replay / export / ask` on the editable tiny model: output and errors."""
from __future__ import annotations

import json
import re

import pytest

from tests.agent.helpers import BAD, GOOD, apply_args, ok, run, submit

HASH = re.compile(r"\b[0-9a-f]{12}\b")
P = re.compile(r"P\(target_new\) \d\.\d{3}")


def scrub(text: str) -> str:
    return P.sub("P(target_new) P", HASH.sub("HASH", text))


@pytest.fixture
def applied(ws, corpus):
    """Facts #1 #2 applied by seq 1, #3 failed in it."""
    for f in GOOD[:2] + BAD:
        submit(ws, *f)
    ok(*apply_args(corpus), db=ws)
    return ws


def test_dry_run_prints_the_plan_and_changes_nothing(ws, corpus):
    for f in GOOD[:2]:
        submit(ws, *f)
    submit(ws, "Home of {}", "Bob", "Paris")
    r = ok(*apply_args(corpus), "--dry-run", "--batch-size", "1", db=ws)
    assert r.stdout == (
        "#1 superseded by #3 (same subject and prompt)\n"
        "Dry run: 2 facts in 2 batches; nothing changed.\n"
        "batch 1: emmet (auto: 1 facts < auto_memit_min_batch 256)\n"
        "  #2 Capital of Zork → Tokyo\n"
        "batch 2: emmet (auto: 1 facts < auto_memit_min_batch 256)\n"
        "  #3 Home of Bob → Paris\n")
    assert json.loads(ok("log", "--json", db=ws).stdout)["facts"][2]["status"] == "pending"
    plan = json.loads(ok(*apply_args(corpus), "--dry-run", "--json", "--editor", "memit", db=ws).stdout)
    assert plan["dry_run"] and [b["editor"] for b in plan["plan"]["batches"]] == ["memit"]


def test_apply_reports_each_operation_and_the_live_weights(ws, corpus):
    for f in GOOD[:2] + BAD:
        submit(ws, *f)
    r = ok(*apply_args(corpus), db=ws)
    assert scrub(r.stdout) == (
        "seq 1 apply committed (emmet): applied #1 #2, failed #3\n"
        "  #3: target_new is not the top-1 continuation of the rewrite prompt after the edit "
        "(P(target_new) P, attempt 1)\n"
        "Live weights HASH at seq 1.\n")
    assert "note: setting stats_tokens = 1000\n" in r.stderr
    assert ok("show", "3", db=ws).stdout.startswith("Fact #3 (failed)\n")
    submit(ws, *GOOD[2])
    report = json.loads(ok(*apply_args(corpus), "--json", db=ws).stdout)
    assert report["operations"][0]["applied"] == [4] and report["head_seq"] == 2
    assert report["settings_changes"] == []  # the same settings as stored


def test_undo_redo_and_replay_print_what_they_did(applied):
    r = ok("undo", "1", db=applied)
    assert scrub(r.stdout) == ("seq 2 undo committed of seq 1: reverted #1 #2\n"
                               "seq 3 apply committed (emmet): applied #2\n"
                               "Live weights HASH at seq 3.\n")
    r = ok("redo", "1", db=applied)
    assert scrub(r.stdout) == "seq 4 redo committed (emmet): applied #1\nLive weights HASH at seq 4.\n"
    r = ok("replay", db=applied)
    assert scrub(r.stdout) == ("seq 1    apply   HASH  ok\n"
                               "seq 2    undo    HASH  ok\n"
                               "seq 3    apply   HASH  ok\n"
                               "seq 4    redo    HASH  ok\n"
                               "4 operations replayed, 0 mismatches; weights HASH at seq 4.\n")
    report = json.loads(ok("replay", "--to", "2", "--json", db=applied).stdout)
    assert [o["seq"] for o in report["operations"]] == [1, 2] and report["mismatches"] == []
    r = ok("undo", "--op", "4", "--json", db=applied)
    assert json.loads(r.stdout)["operations"][0]["reverted"] == [1]


def test_replay_exits_non_zero_on_a_mismatch(applied):
    from sqlalchemy import update

    from knowledger.agent.workspace import open_workspace
    from knowledger.ledger.models import Operation

    with open_workspace(applied) as w, w.writing() as s:
        s.execute(update(Operation).values(weights_sha256_after="e" * 64))
    r = run("replay", db=applied)
    assert r.exit_code == 1
    assert "seq 1    apply   " in r.stdout and r.stdout.split("\n")[0].endswith("MISMATCH")
    assert "mismatch: operation seq 1 (apply): recorded weights eeeeeeeeeeee…, replay gives " in r.stderr
    assert run("replay", "--json", db=applied).exit_code == 1


def test_export_and_ask(applied, tmp_path):
    r = ok("export", tmp_path / "out", db=applied)
    assert scrub(r.stdout) == (f"Exported the live model (seq 1, weights HASH, 2 active edits, float32) to "
                               f"{tmp_path / 'out'}\n")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    r = ok("ask", "Home of Bob", "--max-new-tokens", "1", db=applied)
    first, second = r.stdout.splitlines()
    assert first.startswith("' Rome' ") and second == "Home of Bob Rome"
    top = json.loads(ok("ask", "Capital of Zork", "--json", "--top-k", "2", db=applied).stdout)["top"]
    assert len(top) == 2 and top[0]["token"] == " Tokyo"


@pytest.mark.parametrize("args, code, message", [
    (["undo", "99"], 1, "Error: no fact #99\n"),
    (["undo", "3"], 1, "Error: fact #3 is failed, not applied: nothing to undo\n"),
    (["redo", "1"], 1, "Error: fact #1 is applied, not reverted: nothing to redo\n"),
    (["undo", "--op", "7"], 1, "Error: no operation with seq 7\n"),
    (["undo"], 2, "Error: give a fact ID or --op SEQ (not both)\n"),
    (["undo", "1", "--op", "1"], 2, "Error: give a fact ID or --op SEQ (not both)\n"),
    (["undo", "abc"], 2, None),
    (["replay", "--model", "x"], 2, "Error: --model goes with --recompute\n"),
    (["replay", "--to", "9"], 1, "Error: no operation with seq 9\n"),
    (["apply"], 1, "Error: nothing pending to apply: submit facts first (knowledger submit)\n"),
    (["apply", "--editor", "nope"], 2, None),
    (["apply", "--batch-size", "0"], 2, None),
    (["ask", " "], 1, "Error: the prompt is empty\n"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(applied, args, code, message):
    r = run(*args, db=applied)
    assert r.exit_code == code, r.output
    if message is not None:
        assert r.output.endswith(message) and r.output.count("Error:") == 1


def test_undo_of_a_reverted_fact_and_bad_settings_are_refused(applied, corpus, tmp_path):
    ok("undo", "2", db=applied)
    assert run("undo", "2", db=applied).output == "Error: fact #2 is already reverted\n"
    submit(applied, *GOOD[2])
    r = run(*apply_args(corpus), "--set", "nope=1", db=applied)
    assert (r.exit_code, r.output) == (1, "Error: unknown hyperparameter(s): nope\n")
    r = run(*apply_args(corpus), "--set", "layers=[1,9]", db=applied)
    assert r.exit_code == 1 and "out of range" in r.output
    assert json.loads(ok("show", "4", "--json", db=applied).stdout)["status"] == "pending"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = run("export", tmp_path / "full", db=applied)
    assert (r.exit_code, r.output) == (1, f"Error: {tmp_path / 'full'} exists and is not an empty directory\n")
    r = run("apply", "--db", "/nonexistent/ws")
    assert r.exit_code == 1 and "no knowledger workspace" in r.output
