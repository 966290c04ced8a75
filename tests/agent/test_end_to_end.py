"""End to end on the real default model (SmolLM2-135M-Instruct): `-m model` selects it.

20 CounterFact facts: submit, apply (batches of 5), undo 5, redo 2, replay, export, reload the
export, check that it holds the live weights bit for bit, and measure how many active facts still
have their rewrite top-1. Prints the time of each step and that count (run with -s).
"""
import json
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowledger.agent.live import state_hash
from knowledger.editors.apply import weight_sha256
from knowledger.editors.evaluate import fact_metrics
from knowledger.editors.requests import EditRequest
from tests.agent.helpers import ok

pytestmark = pytest.mark.model


def test_twenty_counterfact_facts_through_the_whole_lifecycle(shared_data, tmp_path):
    cases = json.loads((shared_data / "counterfact" / "counterfact-val.json").read_text())[:20]
    facts_file = tmp_path / "facts.json"
    facts_file.write_text(json.dumps(cases))
    corpus = shared_data / "corpus" / "wiki.test.raw"
    db = tmp_path / "ws"
    times = {}

    def step(name, *args):
        t = time.perf_counter()
        r = ok(*args, db=db)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {times[name]} s", flush=True)
        return json.loads(r.stdout) if "--json" in args else r

    def statuses():
        return {f["id"]: f["status"] for f in step("log", "log", "--limit", "0", "--json")["facts"]}

    step("init", "init")
    step("submit", "submit", "--file", facts_file)
    report = step("apply", "apply", "--corpus", corpus, "--stats-tokens", "20000", "--batch-size", "5", "--json")
    applied = [i for op in report["operations"] for i in op["applied"]]
    failed = [f["id"] for op in report["operations"] for f in op["failed"]]
    assert len(applied) + len(failed) == 20 and len(applied) >= 15, report["operations"]
    undone = []
    for n in range(5):  # a re-applied rest may lose a fact (then failed): pick among applied ones
        now = statuses()
        fid = [i for i in applied if now[i] == "applied" and i not in undone][n * 2 % 5]
        step(f"undo #{fid}", "undo", fid, "--json")
        undone.append(fid)
    for fid in undone[:2]:  # recomputed alone on today's weights: checked, so it may fail
        redone = step(f"redo #{fid}", "redo", fid, "--json")["operations"][0]
        print(f"  redo #{fid}: {redone['status']}, applied {redone['applied']}, failed {redone['failed']}")
    shown = statuses()
    assert {shown[i] for i in undone[:2]} <= {"applied", "failed"}
    assert [shown[i] for i in undone[2:]] == ["reverted"] * 3
    replay = step("replay", "replay", "--json")
    assert replay["mismatches"] == [] and all(o["ok"] for o in replay["operations"])
    out = tmp_path / "exported"
    export = step("export", "export", out, "--json")
    active = {f["id"] for f in export["facts"]}
    assert active == {i for i, s in shown.items() if s == "applied"}

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    info = json.loads((out / "knowledger-export.json").read_text())
    shas = {p: weight_sha256(model.get_parameter(p)) for p in info["edited_params"]}
    assert state_hash(info["base_model"]["weights_sha256"], shas) == export["weights_sha256"]
    by_id = {f["id"]: f for f in step("log", "log", "--limit", "0", "--json")["facts"]}
    reqs = [EditRequest(prompt=by_id[i]["prompt"], subject=by_id[i]["subject"],
                        target_new=by_id[i]["target_new"]) for i in sorted(active)]
    metrics = fact_metrics(model, tok, reqs)
    times["reload+check"] = round(time.perf_counter() - t, 1)
    broken = [(i, r.text, r.target_new, round(m["rewrite_p_new"], 3))
              for i, r, m in zip(sorted(active), reqs, metrics) if m["rewrite_acc"] < 1]
    print(f"\nend-to-end timings (s): {times}\napplied {len(applied)}/20 at first; at the end "
          f"{len(active)} active, {len(active) - len(broken)} of them still top-1; broken: {broken}\n"
          f"statuses {sorted(shown.items())}")
    # Each batch is checked on its own facts when it is applied; later batches (and the re-applied
    # rest of an undone batch) can still move earlier facts off top-1 (docs/agent.md). So: most,
    # not necessarily all, active facts hold; the broken ones are printed above.
    assert len(broken) <= len(active) // 4, broken
