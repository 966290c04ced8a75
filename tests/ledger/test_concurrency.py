"""Many writers at once on one workspace (SQLite and PostgreSQL): no submit is lost, none fails, the
same fact submitted by many at once is stored once, and operation numbers never collide."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

from knowledger.agent.facts import submit_fact
from knowledger.agent.workspace import open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.facts import validate_fact
from knowledger.ledger.models import OperationKind
from tests.ledger.helpers import count_events, count_facts

PROCESSES, SUBMITS, SAME_FACTS, OPERATIONS = 4, 200, 100, 25


def _submitter(db: str, worker: int, n: int, start) -> int:
    start.wait()
    stored = 0
    with open_workspace(db) as ws:
        for i in range(n):
            report = submit_fact(ws, validate_fact("{} is located in", f"Tower {worker}-{i}", "Rome"))
            stored += len(report.stored)
    return stored


def test_four_processes_submitting_at_once_lose_nothing(ws_dir):
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        results = [pool.apply_async(_submitter, (str(ws_dir), w, SUBMITS, start)) for w in range(PROCESSES)]
        time.sleep(0.5)
        start.set()
        stored = [r.get(timeout=120) for r in results]
    assert stored == [SUBMITS] * PROCESSES
    assert count_facts(ws_dir) == PROCESSES * SUBMITS
    assert count_events(ws_dir) == PROCESSES * SUBMITS


def _same_facts_submitter(db: str, n: int, start) -> tuple[list[int], list[int]]:
    start.wait()
    stored, dups = [], []
    with open_workspace(db) as ws:
        for i in range(n):
            report = submit_fact(ws, validate_fact("{} is located in", f"Tower {i}", "Rome"))
            stored += [fid for _, fid in report.stored]
            dups += [fid for _, fid in report.duplicates]
    return stored, dups


def test_four_processes_submitting_the_same_facts_store_each_once(ws_dir):
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        results = [pool.apply_async(_same_facts_submitter, (str(ws_dir), SAME_FACTS, start))
                   for _ in range(PROCESSES)]
        time.sleep(0.5)
        start.set()
        outcomes = [r.get(timeout=300) for r in results]
    stored = [fid for s, _ in outcomes for fid in s]
    assert len(stored) == len(set(stored)) == SAME_FACTS  # each fact stored by exactly one process
    assert all(len(s) + len(d) == SAME_FACTS for s, d in outcomes)  # the others were told duplicate
    assert {fid for _, d in outcomes for fid in d} <= set(stored)
    assert count_facts(ws_dir) == SAME_FACTS and count_events(ws_dir) == SAME_FACTS


def _operation_recorder(db: str, n: int, start) -> list[int]:
    start.wait()
    seqs = []
    with open_workspace(db) as ws:
        for _ in range(n):
            with ws.writing() as s:
                base = repo.current_base_model(s)
                seqs.append(repo.record_operation(s, kind=OperationKind.apply, base_model_id=base.id).seq)
    return seqs


def test_concurrent_operations_never_get_the_same_seq(ws_dir):
    """The sequence number comes from the database's counter row, not max + 1: writers that record
    operations at once (the workspace lock is not taken here) get distinct, gapless numbers."""
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        results = [pool.apply_async(_operation_recorder, (str(ws_dir), OPERATIONS, start))
                   for _ in range(PROCESSES)]
        time.sleep(0.5)
        start.set()
        seqs = [r.get(timeout=300) for r in results]
    assert all(s == sorted(s) for s in seqs)  # increasing within each writer
    assert sorted(x for s in seqs for x in s) == list(range(1, PROCESSES * OPERATIONS + 1))
    with open_workspace(ws_dir) as ws, ws.reading() as s:
        assert sorted(op.seq for op in repo.list_operations(s)) == list(range(1, PROCESSES * OPERATIONS + 1))
        assert repo.next_seq(s) == PROCESSES * OPERATIONS + 1


def test_concurrent_cli_file_submissions(ws_dir, tmp_path):
    files = []
    for w in range(3):
        path = tmp_path / f"facts{w}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": "{} plays", "subject": f"Player {w}-{i}", "target": "chess"})
                                  for i in range(30)))
        files.append(path)
    # the same fact in every file: exactly one of them stores it
    for path in files:
        with path.open("a") as f:
            f.write("\n" + json.dumps({"prompt": "{} plays", "subject": "Messi", "target": "chess"}))
    cmd = [sys.executable, "-c", "from knowledger.cli.main import cli; cli()", "submit", "--db", str(ws_dir)]
    procs = [subprocess.Popen(cmd + ["--file", str(p), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in files]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    reports = [json.loads(out) for out, _ in outs]
    assert sorted(len(r["stored"]) for r in reports) == [30, 30, 31]
    assert sum(len(r["duplicates"]) for r in reports) == 2
    assert count_facts(ws_dir) == 91
