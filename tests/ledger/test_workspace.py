"""Finding, creating and opening workspaces."""
from __future__ import annotations

import sqlite3

import pytest

from knowledger.agent import workspace as wsm
from knowledger.ledger.errors import KnowledgerError, WorkspaceExists, WorkspaceNotFound
from tests.ledger.helpers import FINGERPRINT, make_workspace


def test_locate_a_directory_a_db_file_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = wsm.locate("ws")
    assert (d.home, d.sqlite_file, d.url) == (tmp_path / "ws", tmp_path / "ws" / "ledger.db",
                                              f"sqlite:///{tmp_path}/ws/ledger.db")
    f = wsm.locate("data/my.sqlite")
    assert (f.home, f.sqlite_file) == (tmp_path / "data", tmp_path / "data" / "my.sqlite")
    u = wsm.locate("sqlite:///rel/x.db")
    assert (u.home, u.sqlite_file, u.url) == (tmp_path / "rel", tmp_path / "rel" / "x.db",
                                              f"sqlite:///{tmp_path}/rel/x.db")
    monkeypatch.setenv("KNOWLEDGER_HOME", str(tmp_path / "files"))
    pg = wsm.locate("postgresql://me:secret@db.example/kl")
    assert (pg.home, pg.sqlite_file) == (tmp_path / "files", None)
    assert pg.display_url == "postgresql://me:***@db.example/kl"
    monkeypatch.delenv("KNOWLEDGER_HOME")
    # without KNOWLEDGER_HOME: a per-ledger folder of the cache, never the working directory; the
    # same ledger (whatever the driver or password) gets the same folder, another ledger another
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path / "cache"))
    home = wsm.locate("postgresql://me@db.example/kl").home
    assert home.parent == tmp_path / "cache" / "ledgers" and len(home.name) == 16
    assert wsm.locate("postgresql+psycopg://me:pw@db.example/kl").home == home
    assert wsm.locate("postgresql://me@db.example/other").home != home


def test_locate_falls_back_to_the_environment_then_dot_knowledger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert wsm.locate().sqlite_file == tmp_path / ".knowledger" / "ledger.db"
    monkeypatch.setenv("KNOWLEDGER_DB", str(tmp_path / "env.db"))
    assert wsm.locate().sqlite_file == tmp_path / "env.db"
    assert wsm.locate(tmp_path / "arg").home == tmp_path / "arg"  # the argument wins


def test_an_existing_file_without_suffix_is_a_database(tmp_path):
    (tmp_path / "ledger").write_bytes(b"")
    assert wsm.locate(tmp_path / "ledger").sqlite_file == tmp_path / "ledger"


def test_init_creates_then_is_idempotent_and_refuses_another_model(tmp_path):
    first = wsm.init_workspace(tmp_path / "ws", fingerprint=FINGERPRINT)
    first.workspace.close()
    assert first.created and first.base_model["name_or_path"] == "tiny-test-model"
    assert (tmp_path / "ws" / "ledger.db").is_file()
    again = wsm.init_workspace(tmp_path / "ws", "tiny-test-model")
    again.workspace.close()
    assert not again.created and again.base_model == first.base_model
    with pytest.raises(WorkspaceExists) as e:
        wsm.init_workspace(tmp_path / "ws", "other-model")
    assert str(e.value) == (f"the workspace at {tmp_path / 'ws'} already edits tiny-test-model; refusing "
                            f"to switch it to other-model (use another --db for another model)")


def test_a_failing_model_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(name):
        raise FileNotFoundError(f"model {name} not found")

    monkeypatch.setattr(wsm, "_fingerprint", boom)
    with pytest.raises(FileNotFoundError):
        wsm.init_workspace(tmp_path / "ws", "missing-model")
    assert not (tmp_path / "ws").exists()


def test_opening_a_missing_workspace_creates_nothing(tmp_path):
    with pytest.raises(WorkspaceNotFound) as e:
        wsm.open_workspace(tmp_path / "nowhere")
    assert str(e.value) == f"no knowledger workspace at {tmp_path / 'nowhere'}: run `knowledger init`"
    assert not (tmp_path / "nowhere").exists()


def test_a_foreign_sqlite_database_is_refused_by_open_and_init(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    for call in (lambda: wsm.open_workspace(db), lambda: wsm.init_workspace(db, fingerprint=FINGERPRINT)):
        with pytest.raises(WorkspaceNotFound, match=r"other.db is not a knowledger database \(no schema revision\)"):
            call()


def test_a_file_that_is_not_a_database(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KnowledgerError, match="cannot read the workspace database .*junk.db: file is not a database"):
        wsm.open_workspace(tmp_path / "junk.db")


def test_an_empty_database_file_can_be_initialised(tmp_path):
    (tmp_path / "empty.db").write_bytes(b"")
    result = wsm.init_workspace(tmp_path / "empty.db", fingerprint=FINGERPRINT)
    result.workspace.close()
    assert result.created


def test_status_summary(tmp_path):
    make_workspace(tmp_path / "ws")
    with wsm.open_workspace(tmp_path / "ws") as ws:
        info = wsm.workspace_status(ws)
    assert info["schema"] == {"current": "0007", "head": "0007"}
    assert info["facts"]["total"] == 0 and info["operations"] == {"total": 0}
    assert info["base_model"]["weights_sha256"] == "ab" * 32


def test_normalise_model(tmp_path):
    (tmp_path / "m").mkdir()
    assert wsm.normalise_model(None) == wsm.normalise_model("default") == "SmolLM2-135M-Instruct"
    assert wsm.normalise_model(str(tmp_path / "m" / ".." / "m")) == str(tmp_path / "m")
    assert wsm.normalise_model("org/some-hub-model") == "org/some-hub-model"
