"""`knowledger log`, `show` and `status`: exact text output and --json."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from knowledger.agent.workspace import open_workspace
from knowledger.cli.main import cli
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationKind, RequestStatus


def run(*args, db):
    return CliRunner().invoke(cli, [*args, "--db", str(db)])


@pytest.fixture
def filled(ws_dir):
    run("submit", "--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "Rome",
        "--target-true", "Paris", "--paraphrase", "Where is {}? In", "--neighbor", "The Louvre is in=Paris", db=ws_dir)
    run("submit", "--prompt", "{} plays", "--subject", "Messi", "--target", "chess", db=ws_dir)
    run("submit", "--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "Berlin", db=ws_dir)
    with open_workspace(ws_dir) as ws, ws.writing() as s:
        bm = repo.current_base_model(s)
        op = repo.record_operation(s, kind=OperationKind.apply, base_model_id=bm.id, request_ids=[1, 2],
                                   editor="memit", deltas=[repo.DeltaFactors(
                                       0, "w", np.ones((4, 1), np.float32), np.ones((3, 1), np.float32))])
        repo.set_request_status(s, repo.get_request(s, 1), RequestStatus.applied, operation_id=op.id,
                                reason="applied by operation 1")
        repo.set_request_status(s, repo.get_request(s, 2), RequestStatus.applied, operation_id=op.id)
        repo.set_request_status(s, repo.get_request(s, 1), RequestStatus.superseded, superseded_by_id=3,
                                reason="replaced by #3")
    return ws_dir


def test_log_lists_facts_newest_first(filled):
    r = run("log", db=filled)
    assert (r.exit_code, r.output) == (0, (
        "#3    pending    The Eiffel Tower is located in → Berlin\n"
        "#2    applied    Messi plays → chess\n"
        "#1    superseded The Eiffel Tower is located in → Rome (was Paris)\n"))
    assert run("log", "--status", "applied", db=filled).output == "#2    applied    Messi plays → chess\n"
    assert run("log", "--limit", "1", db=filled).output.count("\n") == 1
    assert run("log", "--status", "rejected", db=filled).output == "No facts with status rejected.\n"
    rows = json.loads(run("log", "--json", "--limit", "0", db=filled).output)["facts"]
    assert [(f["id"], f["status"]) for f in rows] == [(3, "pending"), (2, "applied"), (1, "superseded")]


def test_log_operations(filled, ws_dir):
    r = run("log", "--operations", db=filled)
    assert r.exit_code == 0
    assert re.fullmatch(r"seq 1    apply   committed  memit    2 facts  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\n", r.output)
    (op,) = json.loads(run("log", "--operations", "--json", db=filled).output)["operations"]
    assert (op["seq"], op["kind"], op["facts"], op["editor"]) == (1, "apply", 2, "memit")
    assert run("log", "--operations", "--status", "failed", db=filled).output == "No operations with status failed.\n"
    r = run("log", "--operations", "--status", "pending", db=filled)
    assert r.exit_code == 2 and "operations have no status 'pending' (one of: running, committed, failed)" in r.output


def test_log_on_an_empty_workspace(ws_dir):
    assert run("log", db=ws_dir).output == "No facts.\n"
    assert run("log", "--operations", db=ws_dir).output == "No operations.\n"
    assert json.loads(run("log", "--json", db=ws_dir).output) == {"facts": []}


def test_show_a_fact_with_its_history(filled):
    r = run("show", "1", db=filled)
    assert r.exit_code == 0
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "TIME", r.output)
    assert text == (
        "Fact #1 (superseded)\n"
        "  rewrite:       The Eiffel Tower is located in → Rome\n"
        "  prompt:        {} is located in\n"
        "  subject:       The Eiffel Tower\n"
        "  target_new:    Rome\n"
        "  target_true:   Paris\n"
        "  source:        cli\n"
        "  submitted:     TIME\n"
        "  reason:        replaced by #3\n"
        "  superseded by: #3\n"
        f"  fingerprint:   {json.loads(run('show', '1', '--json', db=filled).output)['fingerprint'][:12]}\n"
        "Paraphrases:\n"
        "  - Where is The Eiffel Tower? In\n"
        "Neighbourhood:\n"
        "  - The Louvre is in → Paris\n"
        "History:\n"
        "  TIME  pending    submitted (cli)\n"
        "  TIME  applied    applied by operation 1 (operation 1)\n"
        "  TIME  superseded replaced by #3\n"
        "Operations:\n"
        "  seq 1    apply   committed  applied\n")
    three = json.loads(run("show", "3", "--json", db=filled).output)
    assert three["supersedes"] == [1] and three["operations"] == [] and three["superseded_by"] is None
    assert "  supersedes:    #1\n" in run("show", "3", db=filled).output


def test_show_an_unknown_fact(ws_dir):
    r = run("show", "99", db=ws_dir)
    assert (r.exit_code, r.output) == (1, "Error: no fact #99\n")
    assert run("show", "abc", db=ws_dir).exit_code == 2


def test_status(filled):
    r = run("status", db=filled)
    assert r.exit_code == 0
    assert r.output == (
        f"workspace:   {filled}\n"
        f"database:    sqlite:///{filled}/ledger.db\n"
        "schema:      0007 (head)\n"
        f"base model:  tiny-test-model (llama, weights {'ab' * 6})\n"
        "facts:       3 (pending 1, applied 1, superseded 1)\n"
        "operations:  1\n")
    info = json.loads(run("status", "--json", db=filled).output)
    assert info["facts"]["by_status"] == dict(pending=1, applied=1, superseded=1, rejected=0, reverted=0, failed=0)
    assert info["schema"] == {"current": "0007", "head": "0007"} and info["operations"] == {"total": 1}
