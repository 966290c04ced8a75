"""The workspace lock (agent.lock): a PostgreSQL advisory lock, or a lock file that is never written
through a symlink; two processes applying against one ledger serialise before any compute."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from knowledger.agent.live import lock_path
from knowledger.agent.lock import LockHeld, UnsafeLock, WorkspaceLock, try_lock
from knowledger.agent.workspace import init_workspace, locate, open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.models import OperationStatus, RequestStatus
from tests.agent.helpers import GOOD, apply_args, run, save_editable_tiny, submit, subprocess_env, write_corpus

HOLD = """
import sys, time
from knowledger.agent.live import lock_path
from knowledger.agent.lock import WorkspaceLock
from knowledger.agent.workspace import locate
with WorkspaceLock(lock_path(locate(sys.argv[1])), what="holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_sits_beside_the_database_not_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_path(locate(tmp_path / "a" / "my.db")).file == tmp_path / "a" / "my.lock"
    assert lock_path(locate("ws")).file == tmp_path / "ws" / "ledger.lock"
    pg = lock_path(locate("postgresql://u:secret@db.example/kl"))
    assert pg.file is None and str(pg) == "(advisory lock on postgresql://u:***@db.example/kl)"


def test_a_lock_held_by_another_process_refuses_in_one_line_then_waits(ws_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws_dir), "1.5"], stdout=subprocess.PIPE,
                            text=True, env=subprocess_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        target = lock_path(locate(ws_dir))
        with pytest.raises(LockHeld) as e:
            WorkspaceLock(target, what="apply").acquire()
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"another command holds the workspace lock {target} (holder, pid {proc.pid} on ")
        assert msg.endswith("; try again later or pass --wait")
        assert try_lock(target, "ask") is None
        t = time.perf_counter()
        with WorkspaceLock(target, wait=True, what="apply") as lock:
            assert lock.held and time.perf_counter() - t > 0.3
            assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    with try_lock(lock_path(locate(ws_dir)), "ask") as again:  # released: free again
        assert again.held


@pytest.mark.sqlite_only
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, ws_dir):
    important = tmp_path / "important.txt"
    important.write_text("keep me\n")
    lock = lock_path(locate(ws_dir)).file
    lock.unlink(missing_ok=True)
    lock.symlink_to(important)
    for take in (lambda: WorkspaceLock(lock_path(locate(ws_dir))).acquire(),
                 lambda: try_lock(lock_path(locate(ws_dir)), "ask")):
        with pytest.raises(UnsafeLock, match=f"refusing the workspace lock {lock}: it is a symlink"):
            take()
    assert important.read_text() == "keep me\n" and lock.is_symlink()


@pytest.mark.sqlite_only
def test_a_hard_linked_lock_file_is_refused_and_its_target_untouched(tmp_path, ws_dir):
    important = tmp_path / "important.txt"
    important.write_text("keep me\n")
    lock = lock_path(locate(ws_dir)).file
    lock.unlink(missing_ok=True)
    os.link(important, lock)
    with pytest.raises(UnsafeLock, match="not a plain file with one link"):
        WorkspaceLock(lock_path(locate(ws_dir))).acquire()
    assert important.read_text() == "keep me\n"


@pytest.fixture
def tiny(tmp_path_factory):
    return save_editable_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.sqlite_only
def test_ask_and_apply_refuse_a_symlinked_lock_in_one_line(tmp_path, tiny):
    ws = tmp_path / "ws"
    init_workspace(ws, str(tiny)).workspace.close()
    submit(ws, *GOOD[0])
    important = tmp_path / "important.txt"
    important.write_text("keep me\n")
    (ws / "ledger.lock").unlink(missing_ok=True)
    (ws / "ledger.lock").symlink_to(important)
    for args in (["ask", "Home of Bob"], apply_args(write_corpus(tmp_path / "c.txt"))):
        r = run(*args, db=ws)
        assert r.exit_code == 1, r.output
        assert r.output == (f"Error: refusing the workspace lock {ws / 'ledger.lock'}: it is a symlink "
                            f"(remove it; knowledger creates a plain file there)\n")
    assert important.read_text() == "keep me\n"


# a CLI process whose editor records when it computes, and computes only once the file GO exists
TIMED_CLI = """
import json, os, sys, time
from knowledger.editors.editor import Editor
real = Editor.compute
def compute(self, requests, *a, **kw):
    t0 = time.time()
    with open(os.environ["MARKS"], "a") as f:
        f.write(json.dumps({"who": os.environ["WHO"], "start": t0}) + "\\n")
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.05)
    out = real(self, requests, *a, **kw)
    with open(os.environ["MARKS"], "a") as f:
        f.write(json.dumps({"who": os.environ["WHO"], "start": t0, "end": time.time()}) + "\\n")
    return out
Editor.compute = compute
from knowledger.cli.main import cli
cli(sys.argv[1:])
"""


def _cli(who: str, marks: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TIMED_CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(WHO=who, MARKS=str(marks), GO=str(marks.with_suffix(".go"))))


def _wait_for(marks: Path, who: str, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if marks.exists() and any(json.loads(l)["who"] == who for l in marks.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{who} never started computing")


def test_two_processes_applying_on_one_ledger_serialise_before_computing(tmp_path, ledger_db, tiny):
    init_workspace(ledger_db, str(tiny)).workspace.close()
    corpus, marks = write_corpus(tmp_path / "corpus.txt"), tmp_path / "marks.jsonl"
    submit(ledger_db, *GOOD[0])
    base = apply_args(corpus) + ["--editor", "emmet", "--db", str(ledger_db)]
    a = _cli("A", marks, base + ["--wait"])
    _wait_for(marks, "A")  # A holds the lock and computes
    refused = _cli("C", marks, base)  # no --wait: refuses at once
    out_c, err_c = refused.communicate(timeout=120)
    b = _cli("B", marks, base + ["--wait"])  # waits for A
    time.sleep(5.0)  # (B is importing or already waiting at the lock: either way it computes after A)
    submit(ledger_db, *GOOD[1])  # pending for B, stored while A computes
    marks.with_suffix(".go").touch()  # A may finish now
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0, err_a
    assert b.returncode == 0, err_b
    assert refused.returncode == 1
    assert err_c.startswith("Error: another command holds the workspace lock ") and "(apply, pid " in err_c
    assert len(err_c.strip().splitlines()) == 1, err_c
    spans = [json.loads(l) for l in marks.read_text().splitlines() if "end" in json.loads(l)]
    assert sorted(s["who"] for s in spans) == ["A", "B"]  # C never computed
    (sa,), (sb,) = ([s for s in spans if s["who"] == w] for w in "AB")
    assert sa["end"] <= sb["start"]  # B computed only after A finished
    with open_workspace(ledger_db) as ws, ws.reading() as s:
        ops = list(reversed(repo.list_operations(s)))
        assert [(op.seq, op.status) for op in ops] == [(1, OperationStatus.committed),
                                                       (2, OperationStatus.committed)], [op.error for op in ops]
        facts = [sorted(link.request_id for link, _ in repo.operation_facts(s, op.id)) for op in ops]
        assert facts == [[1], [2]]  # each fact in one operation: none lost, none twice
        assert {r.id: r.status for r in repo.list_requests(s)} == {i: RequestStatus.applied for i in (1, 2)}
