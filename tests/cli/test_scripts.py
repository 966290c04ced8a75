"""The CLI in scripts (issues 14, 15): progress lines off a terminal, --quiet, one error funnel
(one line, JSON under --json, the traceback with -v), ids too large, control characters escaped,
an apply that applied nothing exits 1, refused --set values are not kept, families at init."""
from __future__ import annotations

import errno
import json

import click
import pytest

from knowledger.cli.common import clean, describe
from knowledger.cli.progress import LineProgress
from tests.agent.helpers import BAD, GOOD, apply_args, ok, run, submit

HUGE = str(2**70)


# --- progress ---------------------------------------------------------------------------------
def test_progress_is_plain_lines_off_a_terminal(ws, corpus):
    for f in GOOD[:2]:
        submit(ws, *f)
    r = ok(*apply_args(corpus), "--batch-size", "1", db=ws)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("apply: apply")]
    assert lines[0] == "apply: apply 0/2" and lines[-1] == "apply: apply 2/2", r.stderr
    r = ok("replay", "--json", db=ws)
    assert "replay: replay 0/2" in r.stderr and json.loads(r.stdout)["mismatches"] == []


def test_no_bar_frames_in_a_log(ws, corpus):
    submit(ws, *GOOD[0])
    r = ok(*apply_args(corpus), db=ws)
    assert "\r" not in r.stderr and "%|" not in r.stderr, r.stderr


def test_quiet_drops_progress_and_notes(ws, corpus):
    submit(ws, *GOOD[0])
    r = ok("--quiet", *apply_args(corpus), db=ws)
    assert r.stderr == "" and r.stdout.startswith("seq 1 apply committed")


def test_line_progress_is_throttled():
    lines, now = [], [0.0]
    p = LineProgress("apply", interval_s=2.0, clock=lambda: now[0], echo=lines.append)
    for i in range(10):
        now[0] = i * 0.5
        p("values", i, 10)
    p("values", 10, 10)
    assert lines == ["apply: values 0/10", "apply: values 4/10", "apply: values 8/10", "apply: values 10/10"]
    p("keys", 3, None)
    assert lines[-1] == "apply: keys 3"


# --- the error funnel ---------------------------------------------------------------------------
def test_an_error_is_one_line_and_json_under_json(ws_dir):
    r = run("show", "99", db=ws_dir)
    assert (r.exit_code, r.stderr, r.stdout) == (1, "Error: no fact #99\n", "")
    r = run("show", "99", "--json", db=ws_dir)
    assert r.exit_code == 1 and json.loads(r.stdout) == {"error": "no fact #99", "kind": "NotFound"}


def test_verbose_shows_the_traceback(ws_dir):
    r = run("-v", "show", "99", db=ws_dir)
    assert r.exit_code == 1 and "Traceback" in r.stderr and r.stderr.endswith("Error: no fact #99\n")


@pytest.mark.parametrize("args", [["show", HUGE], ["undo", HUGE], ["redo", HUGE], ["undo", "--op", HUGE],
                                  ["redo", "--op", HUGE], ["replay", "--to", HUGE]])
def test_ids_beyond_the_database_are_a_one_line_usage_error(ws_dir, args):
    r = run(*args, db=ws_dir)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ")
    assert "Traceback" not in r.output


def test_a_usage_error_is_one_line(ws_dir):
    r = run("apply", "--batch-size", "0", db=ws_dir)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ")
    r = run("apply", "--batch-size", "0", "--json", db=ws_dir)
    assert r.exit_code == 2 and json.loads(r.stdout)["kind"] == "usage"


@pytest.mark.parametrize("error, expect", [
    (PermissionError(errno.EACCES, "Permission denied", "/ws/ledger.lock"),
     "Permission denied: /ws/ledger.lock (check the file's permissions)"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
     "No space left on device: /out/model.safetensors (free some disk space)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "facts.csv"),
     "No such file or directory: facts.csv"),
    (ModuleNotFoundError("No module named 'psycopg'", name="psycopg"),
     'the PostgreSQL driver is not installed: pip install "knowledger[postgres]"'),
    (RecursionError("maximum recursion depth exceeded"), "the input is nested too deeply to read"),
    (ValueError("hparams.v_lr must be finite"), "hparams.v_lr must be finite"),
])
def test_every_kind_of_failure_is_described_in_one_line(error, expect):
    message, kind, code = describe(error)
    assert (message, code) == (expect, 1) and "\n" not in message


def test_a_database_error_wrapping_a_missing_driver_names_the_extra():
    from sqlalchemy.exc import DBAPIError

    e = DBAPIError("connect", None, ModuleNotFoundError("No module named 'psycopg'", name="psycopg"))
    assert describe(e)[0] == 'the PostgreSQL driver is not installed: pip install "knowledger[postgres]"'


def test_a_click_usage_error_exits_2():
    assert describe(click.UsageError("give a fact ID"))[1:] == ("usage", 2)


# --- what is printed ------------------------------------------------------------------------------
def test_control_characters_in_facts_are_escaped_on_output(ws_dir):
    ok("submit", "--prompt", "{} lives in", "--subject", "Eve\x1b[2J", "--target", "Rome\u202e", db=ws_dir)
    for r in (ok("log", db=ws_dir), ok("show", "1", db=ws_dir)):
        assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
        assert "Eve\\x1b[2J" in r.stdout and "Rome\\u202e" in r.stdout
    assert json.loads(ok("show", "1", "--json", db=ws_dir).stdout)["subject"] == "Eve\x1b[2J"  # JSON is exact


def test_clean_keeps_printable_text():
    assert clean("Tour Eiffel → Rome, 東京") == "Tour Eiffel → Rome, 東京"
    assert clean("a\tb\nc\x07") == "a\\tb\\nc\\x07"


# --- apply -----------------------------------------------------------------------------------------
def test_an_apply_that_applied_nothing_exits_1(ws, corpus):
    submit(ws, *BAD[0])
    r = run(*apply_args(corpus), db=ws)
    assert r.exit_code == 1 and "failed #1" in r.stdout
    r = run(*apply_args(corpus), db=ws)  # nothing pending now: the one-line refusal
    assert r.exit_code == 1 and r.stderr.startswith("Error: nothing pending")


def test_a_refused_set_value_is_not_kept(ws, corpus):
    submit(ws, *GOOD[0])
    r = run(*apply_args(corpus), "--set", "v_steps=0", db=ws)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "v_steps" in r.stderr
    settings = {s["key"]: s for s in json.loads(ok("config", "show", "--json", db=ws).stdout)["settings"]}
    overrides = settings.get("hparams_overrides", {}).get("value") or {}
    assert "v_steps" not in overrides or overrides["v_steps"] != 0
    ok(*apply_args(corpus), db=ws)  # the next plain apply works


def test_init_refuses_a_family_the_editors_cannot_edit(tmp_path):
    from knowledger.agent.errors import UnsupportedModel
    from knowledger.agent.workspace import init_workspace

    fp = dict(name_or_path="bert-tiny", architecture="bert", weights_sha256="ab" * 32, config={})
    with pytest.raises(UnsupportedModel, match="'bert' model, which knowledger cannot edit"):
        init_workspace(tmp_path / "ws", "bert-tiny", fingerprint=fp)
    assert not (tmp_path / "ws" / "ledger.db").exists()
