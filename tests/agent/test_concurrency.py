"""The workspace lock (a second apply waits or fails) and submissions while an apply computes."""
import threading
import time

from knowledger.agent.facts import list_facts, submit_fact
from knowledger.agent.live import lock_path
from knowledger.agent.lock import WorkspaceLock
from knowledger.agent.workspace import Workspace, locate, open_workspace
from knowledger.editors.editor import Editor
from knowledger.ledger.db import make_engine
from knowledger.ledger.facts import validate_fact
from tests.agent.helpers import GOOD, apply, apply_args, run, status, submit


def test_a_second_apply_fails_at_once_or_waits_for_the_lock(ws, corpus):
    submit(ws, *GOOD[0])
    lock = WorkspaceLock(lock_path(locate(ws)), what="test").acquire()
    try:
        r = run(*apply_args(corpus), db=ws)
        assert r.exit_code == 1
        assert r.output.startswith(f"Error: another command holds the workspace lock {lock_path(locate(ws))} "
                                   f"(test, pid ")
        assert r.output.endswith("; try again later or pass --wait\n")
        threading.Timer(0.5, lock.release).start()
        t = time.perf_counter()
        r = run(*apply_args(corpus), "--wait", db=ws)
        assert r.exit_code == 0, r.output
        assert time.perf_counter() - t >= 0.4
    finally:
        lock.release()
    assert status(ws, 1) == "applied"


def test_facts_submitted_while_an_apply_computes_are_stored_at_once_and_stay_pending(ws, corpus, monkeypatch):
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    loc = locate(ws)
    # another writer that gives up after 0.5 s: it fails if the apply holds a write transaction
    other = Workspace(loc, make_engine(loc.url, busy_timeout_s=0.5))
    stored = []
    real = Editor.compute

    def compute(self, requests, *a, **kw):
        fact = validate_fact("Capital of {}", f"Land{len(stored)}", "Oslo")
        stored.append(submit_fact(other, fact).stored[0][1])
        return real(self, requests, *a, **kw)

    monkeypatch.setattr(Editor, "compute", compute)
    try:
        report = apply(ws, corpus, batch_size=1)
    finally:
        other.close()
    assert len(stored) == 2 and [o["applied"] for o in report["operations"]] == [[1], [2]]
    assert [status(ws, i) for i in stored] == ["pending", "pending"]
    with open_workspace(ws) as w:
        assert [f["id"] for f in list_facts(w, status="pending")] == stored[::-1]
