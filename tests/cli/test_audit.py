"""`knowledger audit / report / config` on the editable tiny model: output, exit codes, errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from tests.agent.helpers import GOOD, apply_args, counter_edit, ok, run, submit

NUM = re.compile(r"\d+\.\d+")


def scrub(text: str) -> str:
    return NUM.sub("N", re.sub(r"\b[0-9a-f]{12}\b", "HASH", text))


@pytest.fixture
def applied(ws, corpus):
    """Facts #1 #2 applied by seq 1; the tiny model's large edits (‖ΔW‖ ≈ ‖W‖/2) are not a danger here."""
    for f in GOOD[:2]:
        submit(ws, *f, target_true="Paris")
    ok(*apply_args(corpus), db=ws)
    ok("config", "set", "audit_norm_ratio", "100", db=ws)
    return ws


def test_audit_after_apply_is_healthy_and_exits_0(applied):
    r = run("audit", db=applied)
    assert r.exit_code == 0, r.output
    assert scrub(r.stdout) == (
        "Audit #1 of seq 1 on cpu: 2 active facts, 0 drifted (N s).\n"
        "Health: perplexity N (base N, ×N); ||ΔW||/||W|| layer 1 N, layer 2 N.\n"
        "Live weights HASH at seq 1: healthy.\n")
    report = json.loads(ok("audit", "--json", db=applied).stdout)
    assert report["healthy"] and report["runs"][0]["audit_run_id"] == 2


def test_drift_exits_1_heal_repairs_it_and_the_next_audit_exits_0(applied):
    counter_edit(applied, 0.8)
    r = run("audit", db=applied)
    assert r.exit_code == 1, r.output
    lines = scrub(r.stdout).splitlines()
    assert lines[0] == "Audit #1 of seq 2 on cpu: 2 active facts, 2 drifted (N s)."
    assert lines[1].startswith("  #1 Home of Bob → Rome: P(new) N vs P(true) N, rank ")
    assert "    target_new is no longer the top-1 continuation of the rewrite prompt" in lines
    assert lines[-1] == "Live weights HASH at seq 2: drift or danger found (knowledger audit --heal re-applies drifted facts)."
    r = run("audit", "--heal", db=applied)
    assert r.exit_code == 0, r.output
    assert "seq 3 heal committed" in r.stdout and "applied #1 #2" in r.stdout
    assert "Audit #3 of seq 3 on cpu: 2 active facts, 0 drifted" in r.stdout
    assert r.stdout.endswith(": healthy.\n")
    assert run("audit", db=applied).exit_code == 0
    assert "seq 3    heal" in ok("replay", db=applied).stdout
    r = ok("undo", "--op", "3", db=applied)  # the heal alone: the facts stay applied
    assert scrub(r.stdout).startswith("seq 4 undo committed of seq 3: no facts\n")
    assert run("audit", db=applied).exit_code == 1
    r = run("redo", "--op", "3", db=applied)
    assert r.exit_code == 1 and "heals are not redone" in r.stderr


def test_danger_alone_exits_1(applied):
    ok("config", "set", "audit_norm_ratio", "0.01", db=applied)
    r = run("audit", db=applied)
    assert r.exit_code == 1 and "0 drifted" in r.stdout
    assert "  danger: layer 1: ||W - W_base|| / ||W_base|| = " in r.stdout


def test_errors_exit_2_with_one_line(tmp_path, applied):
    r = run("audit", db=tmp_path / "nowhere")
    assert r.exit_code == 2 and r.stderr.startswith("Error: no knowledger workspace at ") and r.stderr.count("\n") == 1
    if not torch.cuda.is_available():
        r = run("audit", "--device", "cuda", db=applied)
        assert r.exit_code == 2 and r.stderr == "Error: --device cuda: CUDA is not available on this machine\n"
    for bad in ("0", "10x", "-5m"):
        assert run("audit", "--watch", "--interval", bad, db=applied).exit_code == 2
    assert run("audit", "--max-audits", "1", db=applied).exit_code == 2


def test_watch_audits_every_interval_and_stops_after_max_audits(applied):
    r = run("audit", "--watch", "--interval", "0.05s", "--max-audits", "2", db=applied)
    assert r.exit_code == 0, r.output
    assert re.findall(r"Audit #(\d+) of seq 1", r.stdout) == ["1", "2"]


def test_watch_stops_cleanly_on_ctrl_c(applied, monkeypatch):
    from knowledger.agent import watch as api

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "watch", interrupted)
    r = run("audit", "--watch", db=applied)
    assert r.exit_code == 0 and r.stderr == "Stopped watching.\n"


def test_apply_runs_the_periodic_audit(applied, corpus):
    ok("config", "set", "audit_every", "1", db=applied)
    submit(applied, *GOOD[2])
    r = ok(*apply_args(corpus), db=applied)
    assert "Periodic audit (audit_every 1):\nAudit #1 of seq 2 on cpu: 3 active facts, 0 drifted" in r.stdout
    submit(applied, *GOOD[3])
    report = json.loads(ok(*apply_args(corpus), "--json", db=applied).stdout)
    assert report["audit"]["runs"][0]["head_seq"] == 3 and report["audit"]["healthy"]


def test_config_show_and_set(applied):
    r = ok("config", "show", db=applied)
    assert "* audit_norm_ratio       100        (default 0.5)" in r.stdout  # set; JSON keeps 100.0 as 100
    assert "  audit_every            0          (default 0)" in r.stdout
    assert "* stats_tokens           1000       (stored by knowledger apply)" in r.stdout
    assert ok("config", "set", "audit_margin_drop", "1.5", db=applied).stdout == "audit_margin_drop = 1.5 (was 2.0)\n"
    assert ok("config", "set", "lifelong_editor", "alphaedit", db=applied).stdout == \
        "lifelong_editor = alphaedit (was encore)\n"
    rows = {x["key"]: x for x in json.loads(ok("config", "show", "--json", db=applied).stdout)["settings"]}
    assert rows["lifelong_editor"]["value"] == "alphaedit"
    assert rows["audit_margin_drop"]["value"] == 1.5 and rows["audit_every"]["set"] is False
    for args, msg in ((("nope", "1"), "unknown setting 'nope'"), (("audit_margin_drop", "0"), "audit_margin_drop must be > 0.0"),
                      (("audit_ppl_ratio", "1"), "audit_ppl_ratio must be > 1.0"),
                      (("batch_size", "x"), "batch_size takes an integer"),
                      (("lifelong_editor", "memit"), "lifelong_editor takes one of alphaedit, encore"),
                      (("stats_tokens", "5"), "it is stored by knowledger apply")):
        r = run("config", "set", *args, db=applied)
        assert r.exit_code == 1 and msg in r.stderr and r.stderr.count("\n") == 1


def test_report_writes_one_html_file_with_the_charts(applied, tmp_path):
    ok("audit", db=applied)
    counter_edit(applied, 0.8)
    run("audit", "--heal", db=applied)
    r = ok("report", "--out", tmp_path / "rep", db=applied)
    assert r.stdout == f"Wrote {tmp_path / 'rep' / 'index.html'} (3 audits, 3 operations, 4 charts).\n"
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<h2>Audit runs</h2>" in page
    result = json.loads(ok("report", "--json", db=applied).stdout)
    assert result["path"] == str(applied / "report" / "index.html")
