"""`knowledger hypernet add|list|use` and `apply --editor malmen`: output and one-line errors."""
from __future__ import annotations

import json
import re

import pytest

from tests.agent.helpers import GOOD, ok, run, save_tiny_hypernet, submit

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


@pytest.fixture
def net(tmp_path, tiny_dir):
    folder = tmp_path / "net"
    meta = dict(step=40, validation=dict(efficacy=0.9, paraphrase=0.5, neighborhood=0.8, score=0.73))
    return folder, save_tiny_hypernet(folder, tiny_dir, meta=meta)


def one_line_error(r, code=1):
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_add_then_add_again_list_and_use(ws, net, tmp_path, tiny_dir):
    folder, sha = net
    r = ok("hypernet", "add", folder, db=ws)
    assert r.stdout == (f"Registered MALMEN hyper-network {sha[:12]} (layers 2, 3 of a llama), copied to "
                        f"{ws / 'artifacts' / sha}; it is the current one.\n")
    assert ok("hypernet", "add", folder, db=ws).stdout.startswith(f"Already registered: MALMEN hyper-network {sha[:12]}")
    other = save_tiny_hypernet(tmp_path / "other", tiny_dir, seed=1)
    added = json.loads(ok("hypernet", "add", tmp_path / "other", "--no-use", "--json", db=ws).stdout)
    assert (added["sha256"], added["created"], added["current"]) == (other, True, False)
    table = TIME.sub("TIME", ok("hypernet", "list", db=ws).stdout).splitlines()
    assert table[0].split() == ["sha256", "kind", "created", "layers", "step", "effic.", "para.", "neigh.", "path"]
    assert table[1].split() == ["*", sha[:12], "malmen-hypernet", "TIME", "2,3", "40", "0.900", "0.500", "0.800",
                                str(ws / "artifacts" / sha)]
    assert table[2].split() == [other[:12], "malmen-hypernet", "TIME", "2,3", "-", "-", "-", "-",
                                str(ws / "artifacts" / other)]
    listed = json.loads(ok("hypernet", "list", "--json", db=ws).stdout)["hypernets"]
    assert [(x["sha256"], x["current"], x["present"]) for x in listed] == [(sha, True, True), (other, False, True)]
    assert ok("hypernet", "use", other[:10], db=ws).stdout == (
        f"Current MALMEN hyper-network: {other[:12]} (layers 2, 3 of a llama) (was {sha[:12]}).\n")
    shown = ok("config", "show", db=ws).stdout
    assert f"* malmen_hypernet        {other} (set by knowledger hypernet add / use)\n" in shown


def test_list_on_a_workspace_without_any(ws):
    assert ok("hypernet", "list", db=ws).stdout == "No MALMEN hyper-networks registered (knowledger hypernet add DIR).\n"
    assert json.loads(ok("hypernet", "list", "--json", db=ws).stdout) == {"hypernets": []}


def test_errors_are_one_line(ws, tmp_path, net):
    (tmp_path / "not-a-net").mkdir()
    err = one_line_error(run("hypernet", "add", tmp_path / "not-a-net", db=ws))
    assert "is not a MALMEN hyper-network (no hypernet.safetensors and config.json)" in err
    assert "does not exist" in run("hypernet", "add", tmp_path / "nowhere", db=ws).stderr  # click: usage, exit 2
    submit(ws, *GOOD[0])
    err = one_line_error(run("apply", "--editor", "malmen", db=ws))
    assert err == ("Error: no MALMEN hyper-network registered: train one with `knowledger train-malmen` and "
                   "add it with `knowledger hypernet add DIR`\n")
    assert "no registered MALMEN hyper-network abcd1234" in one_line_error(run("hypernet", "use", "abcd1234", db=ws))
    assert "it is set by knowledger hypernet add / use" in one_line_error(
        run("config", "set", "malmen_hypernet", net[1], db=ws))
    assert "malmen_min_batch must be ≥ 0" in one_line_error(run("config", "set", "--db", ws, "--", "malmen_min_batch", "-1"))


def test_apply_with_malmen_then_log_show_and_undo(ws, net):
    folder, sha = net
    ok("hypernet", "add", folder, db=ws)
    for f in GOOD[:2]:
        submit(ws, *f)
    r = ok("apply", "--editor", "malmen", db=ws)
    assert r.stdout.startswith("seq 1 apply committed (malmen): applied #1 #2\n")
    line = ok("log", "--operations", db=ws).stdout
    assert re.fullmatch(rf"seq 1    apply   committed  malmen   2 facts  {TIME.pattern}  hypernet {sha[:12]}\n", line)
    assert f"  seq 1    apply   committed  applied  (malmen, hypernet {sha[:12]})\n" in ok("show", "1", db=ws).stdout
    assert ok("undo", "--op", "1", db=ws).stdout.startswith("seq 2 undo committed of seq 1: reverted #1 #2\n")
