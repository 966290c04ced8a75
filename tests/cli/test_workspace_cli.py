"""`knowledger init`, the workspace search order, and `knowledger db` on an older database."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from knowledger.agent.workspace import open_workspace
from knowledger.cli.main import cli
from knowledger.ledger import migrate
from knowledger.ledger.db import make_engine
from tests.ledger.helpers import count_facts

OUTDATED = ("Error: the workspace database is at schema revision 0001, this knowledger needs 0007: "
            "run `knowledger db upgrade`\n")


def run(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def test_init_with_a_real_tiny_model(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("init", "--model", str(tiny_llama_dir))
    assert r.exit_code == 0, r.output
    ws = tmp_path / ".knowledger"
    info = json.loads(run("status", "--json").output)
    bm = info["base_model"]
    assert (bm["name_or_path"], bm["architecture"]) == (str(tiny_llama_dir), "llama")
    assert len(bm["weights_sha256"]) == 64
    assert r.stdout == (f"Initialised workspace at {ws}\n"
                        f"  database:   sqlite:///{ws}/ledger.db\n"
                        f"  base model: {tiny_llama_dir} (llama, weights {bm['weights_sha256'][:12]})\n")
    again = run("init", "--model", str(tiny_llama_dir))
    assert (again.exit_code, again.stdout) == (0, f"Workspace already exists at {ws} (base model {tiny_llama_dir}); "
                                                  "nothing changed\n")
    other = run("init", "--model", str(tmp_path / "other"))
    assert other.exit_code == 1
    assert other.output == (f"Error: the workspace at {ws} already edits {tiny_llama_dir}; refusing to switch it "
                            f"to {tmp_path / 'other'} (use another --db for another model)\n")


def test_init_with_a_missing_model_creates_nothing(tmp_path):
    r = run("init", "--model", str(tmp_path / "no-such-model"), "--db", str(tmp_path / "ws"))
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and "no-such-model" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("args", [["status"], ["log"], ["show", "1"], ["db", "current"],
                                  ["submit", "--prompt", "{} x", "--subject", "s", "--target", "t"]])
def test_commands_without_a_workspace(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    assert (r.exit_code, r.output) == (1, f"Error: no knowledger workspace at {tmp_path / '.knowledger'}: "
                                          "run `knowledger init`\n")
    assert not (tmp_path / ".knowledger").exists()


def test_the_db_option_and_the_environment_variable(ws_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["submit", "--prompt", "{} x", "--subject", "s", "--target", "t"]
    assert run(*args, "--db", str(ws_dir)).exit_code == 0
    monkeypatch.setenv("KNOWLEDGER_DB", str(ws_dir / "ledger.db"))
    assert run("log").output == "#1    pending    s x → t\n"
    assert run("log", env={"KNOWLEDGER_DB": f"sqlite:///{ws_dir}/ledger.db"}).output == "#1    pending    s x → t\n"


@pytest.fixture
def old_ws(ws_dir):
    """A workspace with one fact whose database was left at the first revision."""
    assert run("submit", "--prompt", "{} x", "--subject", "s", "--target", "t", "--db", str(ws_dir)).exit_code == 0
    with open_workspace(ws_dir) as ws:
        migrate.downgrade(ws.engine, "0001")
    return ws_dir


@pytest.mark.parametrize("args", [["status"], ["log"], ["log", "--operations"], ["show", "1"], ["init"],
                                  ["submit", "--prompt", "{} y", "--subject", "s", "--target", "t"]])
def test_an_older_database_is_refused_by_every_command_but_db_upgrade(old_ws, args):
    r = run(*args, "--db", str(old_ws))
    assert (r.exit_code, r.output) == (1, OUTDATED)
    engine = make_engine(f"sqlite:///{old_ws}/ledger.db")
    try:
        assert migrate.current_revision(engine) == "0001"  # nothing migrated it
    finally:
        engine.dispose()


def test_db_current_and_upgrade(old_ws):
    db = ["--db", str(old_ws)]
    assert run("db", "current", *db).output == "0001 (head is 0007: run `knowledger db upgrade`)\n"
    info = json.loads(run("db", "current", "--json", *db).output)
    assert info == {"database": f"sqlite:///{old_ws}/ledger.db", "current": "0001", "head": "0007",
                    "up_to_date": False}
    r = run("db", "upgrade", *db)
    assert (r.exit_code, r.output) == (0, "Upgraded the workspace database from revision 0001 to 0007\n")
    assert run("db", "upgrade", *db).output == "The workspace database is already at revision 0007\n"
    assert run("db", "current", *db).output == "0007 (head)\n"
    assert count_facts(old_ws) == 1
    assert run("log", *db).output == "#1    pending    s x → t\n"


def test_db_upgrade_without_a_workspace(tmp_path):
    r = run("db", "upgrade", "--db", str(tmp_path / "none"))
    assert (r.exit_code, r.output) == (1, f"Error: no knowledger workspace at {tmp_path / 'none'}: "
                                          "run `knowledger init`\n")
