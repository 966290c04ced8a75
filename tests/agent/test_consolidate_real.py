"""Consolidation end to end on the real default model (SmolLM2-135M-Instruct): `-m model`.

Six CounterFact facts applied in two batches, `consolidate` (every active fact re-solved jointly
on the base weights from its stored target z), undo of one fact after it (re-consolidation of
the others), replay. Asserts that the edits hold, that the undone one is gone, and what the ledger
says. Statistics: 5,000 WikiText tokens (small on purpose: the test is about the ledger and the
lifecycle, not edit quality). Prints each step's time (run with -s); see docs/lifelong.md.
"""
import json
import os
import time

import pytest

from knowledger.ledger.models import FactTarget, Operation
from tests.agent.helpers import ok, rows

pytestmark = pytest.mark.model

STATS_TOKENS = "5000"


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch):
    """Reuse the user's cache (the dequantised model, statistics): minutes otherwise."""
    monkeypatch.setenv("KNOWLEDGER_CACHE", os.environ.get("KNOWLEDGER_TEST_CACHE",
                                                          os.path.expanduser("~/.cache/knowledger")))


def _holds(db, ids) -> dict[int, float]:
    """{fact id: rewrite_acc} of facts on the workspace's live weights."""
    from knowledger.agent.live import open_live
    from knowledger.agent.records import edit_requests
    from knowledger.agent.workspace import open_workspace
    from knowledger.editors.evaluate import fact_metrics
    from knowledger.ledger import repository as repo

    with open_workspace(db) as ws:
        live, _ = open_live(ws, refresh=False)
        with ws.reading() as s:
            reqs = edit_requests(repo.requests_by_ids(s, list(ids)))
        return {r.id: m["rewrite_acc"] for r, m in zip(reqs, fact_metrics(live.model, live.tokenizer, reqs))}


def test_apply_consolidate_undo_one_fact_and_replay(shared_data, tmp_path):
    try:
        from knowledger.agent.editing import open_model
        open_model(None)
    except Exception as e:  # the model package is an install-time dependency of this marker
        pytest.skip(f"default model unavailable: {e}")
    cases = json.loads((shared_data / "counterfact" / "counterfact-val.json").read_text())[:6]
    facts_file = tmp_path / "facts.json"
    facts_file.write_text(json.dumps(cases))
    corpus = shared_data / "corpus" / "wiki.test.raw"
    db, times = tmp_path / "ws", {}

    def step(name, *args, as_json=True):
        t = time.perf_counter()
        r = ok(*args, *(["--json"] if as_json else []), db=db)
        out = json.loads(r.stdout) if as_json else r.stdout
        times[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {times[name]} s", flush=True)
        return out

    t0 = time.perf_counter()
    step("init", "init", as_json=False)
    step("submit", "submit", "--file", facts_file)
    applied_report = step("apply", "apply", "--corpus", corpus, "--stats-tokens", STATS_TOKENS,
                          "--batch-size", "3")
    applied = sorted(i for op in applied_report["operations"] for i in op["applied"])
    assert len(applied) >= 3, applied_report["operations"]
    assert set(_holds(db, applied).values()) == {1.0}

    cons = step("consolidate", "consolidate")
    [c] = cons["operations"]
    assert (c["kind"], sorted(c["applied"])) == ("consolidate", applied)
    assert not any("no stored target" in n for n in cons["notes"])  # every z came from the ledger
    [c_row] = rows(db, Operation, seq=c["seq"])
    assert c_row.metrics_json["stored_targets"] == len(applied)
    assert len(rows(db, FactTarget, operation_id=c_row.id)) == len(applied)
    assert set(_holds(db, applied).values()) == {1.0}  # all hold after the joint re-solve

    gone = applied[1]
    u = step("undo", "undo", str(gone))
    assert [(o["kind"], sorted(o["reverted"]), sorted(o["applied"])) for o in u["operations"]] == [
        ("undo", applied, []), ("consolidate", [], [i for i in applied if i != gone])]
    after = _holds(db, applied)
    assert after[gone] < 1.0  # the undone fact is gone
    assert {after[i] for i in applied if i != gone} == {1.0}  # the others still hold

    rep = step("replay", "replay")
    assert rep["mismatches"] == [] and rep["weights_sha256"] == u["weights_sha256"]
    log = step("log", "log", "--limit", "0")
    status = {f["id"]: f["status"] for f in log["facts"]}
    assert status[gone] == "reverted" and all(status[i] == "applied" for i in applied if i != gone)
    kinds = [o.kind.value for o in sorted(rows(db, Operation), key=lambda o: o.seq)]
    assert kinds[-3:] == ["consolidate", "undo", "consolidate"]
    print(f"\nconsolidation end to end (s): {times}, total {time.perf_counter() - t0:.0f} s; "
          f"applied {applied}, undone #{gone}")
