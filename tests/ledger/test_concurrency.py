"""Many writers at once on one SQLite workspace: no submit is lost, none fails."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

from knowledger.agent.facts import submit_fact
from knowledger.agent.workspace import open_workspace
from knowledger.ledger.facts import validate_fact
from tests.ledger.helpers import count_events, count_facts

PROCESSES, SUBMITS = 4, 200


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
