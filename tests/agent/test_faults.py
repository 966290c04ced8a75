"""A process SIGKILLed at any point of apply or undo leaves a consistent workspace.

Each case runs the real CLI in a subprocess with KNOWLEDGER_FAULT=<point> (agent.lock), checks
that it died by SIGKILL, then runs the next command in this process and checks the ledger (every
operation committed or absent, facts in a matching state) and the live snapshot (used only if it
matches the ledger head, else rebuilt, and the rebuild is reported).
"""
import signal
import subprocess
import sys

import pytest

from knowledger.agent import operations as ops
from knowledger.agent.export import ask
from knowledger.agent.live import snapshot_path
from knowledger.agent.lock import FAULT_POINTS
from knowledger.agent.workspace import locate
from knowledger.ledger.models import Operation
from tests.agent.helpers import GOOD, apply, apply_args, call, rows, status, submit, subprocess_env

CLI = [sys.executable, "-c", "from knowledger.cli.main import cli; cli()"]


def killed_at(point, *args, db):
    proc = subprocess.run(CLI + [str(a) for a in args] + ["--db", str(db)], capture_output=True,
                          text=True, env=subprocess_env(KNOWLEDGER_FAULT=point), timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def committed(db):
    return [(o.seq, o.kind.value, o.status.value) for o in sorted(rows(db, Operation), key=lambda o: o.seq)]


def rebuilt(note: list[str]) -> bool:
    return len(note) == 1 and note[0].startswith("live snapshot not used: ") and "rebuilt from the base model" in note[0]


@pytest.fixture
def one_applied(ws, corpus):
    """seq 1 applied fact #1 (a snapshot at seq 1 exists); facts #2 and #3 pending."""
    submit(ws, *GOOD[0])
    apply(ws, corpus)
    submit(ws, *GOOD[1]), submit(ws, *GOOD[2])
    return ws


# point, what the ledger holds after the kill, whether the snapshot on disk is stale
CASES = [
    ("after-compute", [(1, "apply", "committed")], False),
    ("after-ledger-commit-before-snapshot", [(1, "apply", "committed"), (2, "apply", "committed")], True),
    ("mid-snapshot-write", [(1, "apply", "committed"), (2, "apply", "committed")], True),
    ("after-snapshot", [(1, "apply", "committed"), (2, "apply", "committed")], False),
]


def test_every_fault_point_is_exercised():
    assert sorted(p for p, _, _ in CASES) == sorted(FAULT_POINTS)


@pytest.mark.parametrize("point, ledger, stale", CASES, ids=[c[0] for c in CASES])
def test_a_killed_apply_leaves_a_consistent_workspace(one_applied, corpus, point, ledger, stale):
    db = one_applied
    killed_at(point, *apply_args(corpus), db=db)
    assert committed(db) == ledger
    expect = ["applied", "applied"] if len(ledger) == 2 else ["pending", "pending"]
    assert [status(db, i) for i in (2, 3)] == expect
    if point == "mid-snapshot-write":
        assert list(snapshot_path(locate(db)).parent.glob(".ledger.live.safetensors.*.tmp"))
    r = call(ask, db, prompt="Home of Bob")
    assert rebuilt(r["notes"]) == stale, r["notes"]
    assert r["weights_sha256"] == rows(db, Operation, seq=len(ledger))[0].weights_sha256_after
    assert not list(snapshot_path(locate(db)).parent.glob(".ledger.live.safetensors.*.tmp"))
    assert call(ask, db, prompt="Home of Bob")["notes"] == []  # the snapshot is good again
    if len(ledger) == 1:  # nothing was recorded: the next apply does the work
        assert [o["applied"] for o in apply(db, corpus)["operations"]] == [[2, 3]]
    assert call(ops.replay, db)["mismatches"] == []


def test_a_kill_between_two_batches_keeps_the_first(one_applied, corpus):
    db = one_applied
    killed_at("mid-snapshot-write@2", *apply_args(corpus), "--batch-size", "1", db=db)
    assert committed(db) == [(1, "apply", "committed"), (2, "apply", "committed"), (3, "apply", "committed")]
    assert rebuilt(call(ask, db, prompt="x")["notes"])
    assert call(ops.replay, db)["mismatches"] == []


@pytest.mark.parametrize("point", ["after-compute", "after-ledger-commit-before-snapshot"])
def test_a_killed_undo_leaves_a_consistent_workspace(one_applied, corpus, point):
    db = one_applied
    apply(db, corpus)  # seq 2: facts 2 and 3
    killed_at(point, "undo", "2", db=db)
    if point == "after-compute":
        assert committed(db) == [(1, "apply", "committed"), (2, "apply", "committed")]
        assert status(db, 2) == "applied"
        assert call(ask, db, prompt="x")["notes"] == []
    else:
        assert committed(db)[2:] == [(3, "undo", "committed"), (4, "apply", "committed")]
        assert [status(db, i) for i in (2, 3)] == ["reverted", "applied"]
        assert rebuilt(call(ask, db, prompt="x")["notes"])
    assert call(ops.replay, db)["mismatches"] == []


def test_a_resumed_apply_continues_its_recorded_plan(ws, corpus, tiny_dir, tmp_path):
    """Killed after the first batch's commit, the next apply continues the recorded plan: the same
    editors per batch and the same final weights as an uninterrupted apply of the same facts, although
    a fresh plan would now switch to the lifelong editor (the first batch's drift is past the threshold)."""
    from knowledger.agent.apply import PLAN_KEY, workspace_history
    from knowledger.agent.config import set_value
    from knowledger.agent.workspace import init_workspace, open_workspace
    from knowledger.ledger import repository as repo

    ref = tmp_path / "uninterrupted"
    init_workspace(ref, str(tiny_dir)).workspace.close()
    for db in (ws, ref):
        for fact in GOOD[:3]:
            submit(db, *fact)
        call(set_value, db, key="lifelong_norm_growth", raw="1e-9")
    want = apply(ref, corpus, batch_size=1)
    assert [o["editor"] for o in want["operations"]] == ["emmet"] * 3

    killed_at("after-ledger-commit-before-snapshot@1", *apply_args(corpus), "--batch-size", "1", db=ws)
    assert committed(ws) == [(1, "apply", "committed")]
    with open_workspace(ws) as w, w.reading() as s:
        assert workspace_history(s).norm_growth > 1e-9  # a new plan would pick the lifelong editor
        assert [b["done"] for b in repo.get_setting(s, PLAN_KEY)["batches"]] == [True, False, False]
    got = apply(ws, corpus, batch_size=1)
    assert [o["editor"] for o in got["operations"]] == ["emmet"] * 2
    assert [o["applied"] for o in got["operations"]] == [[2], [3]]
    assert got["weights_sha256"] == want["weights_sha256"]
    assert any(n.startswith("continuing the plan of a stopped apply") for n in got["notes"]), got["notes"]
    with open_workspace(ws) as w, w.reading() as s:
        assert repo.get_setting(s, PLAN_KEY) is None  # the finished plan's record is cleared
    assert call(ops.replay, ws)["mismatches"] == []
