"""Safe at the edges (issue 15): one row per probe, so that none of it slips back.

Each row is a probe a hostile but fair user ran, and what knowledger must do instead of what it
did: refuse in one line (naming the file, setting or operation), write nothing through a symlink,
never trust a damaged ledger or cache. Probes that already held have their own tests, listed in
HELD at the bottom (SIGKILL at every fault point: tests/agent/test_faults.py).
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

import pytest

from knowledger.agent.live import snapshot_path
from knowledger.agent.workspace import locate
from tests.agent.helpers import GOOD, HPARAMS, STATS_TOKENS, run, save_editable_tiny, submit, write_corpus


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_editable_tiny(tmp_path_factory.mktemp("models") / "tiny-editable")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path / "cache"))


def one_line_error(result) -> str:
    """The CLI refused: non-zero exit, and its complaint is exactly one `Error: ` line."""
    assert result.exit_code != 0, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output, result.output
    return lines[-1]


def _apply_args(corpus):
    sets = [a for h in HPARAMS for a in ("--set", h)]
    return ["apply", "--corpus", corpus, "--stats-tokens", STATS_TOKENS, "--batch-size", 1, *sets]


@pytest.fixture(scope="module")
def two_ops(tmp_path_factory, tiny_dir):
    """A workspace where seq 1 and seq 2 each applied one fact on layers 1 and 2; one fact pending.
    Copied per test (tests damage it)."""
    root = tmp_path_factory.mktemp("two-ops")
    os.environ["KNOWLEDGER_CACHE"] = str(root / "cache")
    try:
        ws, corpus = root / "ws", write_corpus(root / "corpus.txt")
        assert run("init", "--model", tiny_dir, db=ws).exit_code == 0
        for fact in GOOD[:2]:
            submit(ws, *fact)
        result = run(*_apply_args(corpus), db=ws)
        assert result.exit_code == 0, result.output
        submit(ws, *GOOD[2])
    finally:
        del os.environ["KNOWLEDGER_CACHE"]
    return ws, corpus


@pytest.fixture
def damaged_ws(two_ops, tmp_path):
    import shutil

    ws, corpus = two_ops
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    return copy, corpus


def _sql(ws: Path, *statements: str) -> None:
    con = sqlite3.connect(locate(ws).sqlite_file)
    with con:
        for st in statements:
            con.execute(st)
    con.close()


def _delete_one_delta_row(ws):
    _sql(ws, "DELETE FROM layer_deltas WHERE id = (SELECT MIN(d.id) FROM layer_deltas d "
             "JOIN operations o ON o.id = d.operation_id WHERE o.seq = 1)")


def _swap_two_param_names(ws):
    con = sqlite3.connect(locate(ws).sqlite_file)
    (a, pa), (b, pb) = con.execute("SELECT d.id, d.param FROM layer_deltas d JOIN operations o "
                                   "ON o.id = d.operation_id WHERE o.seq = 1 ORDER BY d.id").fetchall()[:2]
    con.close()
    assert pa != pb
    _sql(ws, f"UPDATE layer_deltas SET param = 'x' WHERE id = {a}",
         f"UPDATE layer_deltas SET param = '{pa}' WHERE id = {b}",
         f"UPDATE layer_deltas SET param = '{pb}' WHERE id = {a}")


DAMAGE = {"one layer_deltas row deleted": _delete_one_delta_row,
          "two rows' parameter names swapped (checksums still valid)": _swap_two_param_names}
COMMANDS = {
    "apply": lambda ws, corpus, tmp: _apply_args(corpus),
    "undo": lambda ws, corpus, tmp: ["undo", "--op", 2],
    "redo": lambda ws, corpus, tmp: ["redo", "--op", 1],
    "export": lambda ws, corpus, tmp: ["export", tmp / "out"],
    "ask": lambda ws, corpus, tmp: ["ask", "Home of Bob"],
    "audit": lambda ws, corpus, tmp: ["audit"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_ledger_is_refused_before_anything_is_computed_or_written(damaged_ws, tmp_path,
                                                                            damage, command):
    ws, corpus = damaged_ws
    snap = snapshot_path(locate(ws))
    before, n_ops = snap.read_bytes(), _count(ws, "operations")
    DAMAGE[damage](ws)
    os.environ["KNOWLEDGER_CACHE"] = str(tmp_path / "cache")
    err = one_line_error(run(*COMMANDS[command](ws, corpus, tmp_path), db=ws))
    assert "the ledger is damaged at operation seq 1 (apply)" in err, err
    assert snap.read_bytes() == before  # the good snapshot is never overwritten
    assert _count(ws, "operations") == n_ops  # no operation recorded on wrong weights
    assert not (tmp_path / "out").exists()


def _count(ws, table) -> int:
    con = sqlite3.connect(locate(ws).sqlite_file)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        con.close()
