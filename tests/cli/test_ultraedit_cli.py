"""`--editor ultraedit` through the CLI and the Python API on the editable tiny model (smoke tests:
apply / log / undo / replay, `edit`, `bench counterfact`, and a refused --set value)."""
from __future__ import annotations

import json

from tests.agent.helpers import GOOD, apply_args, ok, run, submit

# strong enough for the tiny model's facts to become top-1 (see tests/agent/test_ultraedit_ops.py)
ULTRA = ["--set", "ultraedit_layers=[1,2,3]", "--set", "ultraedit_lr=0.1"]


def test_apply_editor_ultraedit_records_an_ultraedit_operation(ws, corpus):
    for f in GOOD[:4]:
        submit(ws, *f)
    r = ok(*apply_args(corpus), "--editor", "ultraedit", *ULTRA, "--batch-size", "4", db=ws)
    assert r.stdout.startswith("seq 1 apply committed (ultraedit): applied #"), r.stdout
    log = json.loads(ok("log", "--operations", "--json", db=ws).stdout)
    op = log["operations"][0]
    assert (op["seq"], op["editor"], op["status"]) == (1, "ultraedit", "committed")
    assert "ultraedit_lr" in r.stderr  # the setting is stored and said
    ok("undo", "--op", "1", db=ws)
    assert json.loads(ok("replay", "--json", db=ws).stdout)["mismatches"] == []
    ok("redo", "--op", "1", db=ws)
    assert json.loads(ok("replay", "--json", db=ws).stdout)["mismatches"] == []


def test_a_bad_ultraedit_value_is_one_line_and_a_non_zero_exit(ws, corpus):
    submit(ws, *GOOD[0])
    r = run(*apply_args(corpus), "--editor", "ultraedit", "--set", "ultraedit_lr=abc", db=ws)
    assert r.exit_code != 0
    assert r.output.strip().splitlines() == [
        "Error: hparams.ultraedit_lr must be a finite number ≥ 0, got 'abc'"], r.output


def test_edit_and_bench_with_ultraedit(tiny_dir, tmp_path):
    r = run("edit", "--model", tiny_dir, "--editor", "ultraedit", *ULTRA, "--prompt", GOOD[0][0],
            "--subject", GOOD[0][1], "--target", GOOD[0][2], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["editor"] == "ultraedit"
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(dict(prompt=p, subject=s, target_new=t, target_true="Paris"))
                              for p, s, t in GOOD[:4]) + "\n")
    out = tmp_path / "ultraedit.json"
    r = run("bench", "counterfact", "--model", tiny_dir, *ULTRA, "--data", data, "--n", 4,
            "--batch-size", 2, "--editor", "ultraedit", "--heldout-tokens", 0, "--out", out)
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert [b["editor"] for b in rec["batches"]] == ["ultraedit", "ultraedit"]
    assert rec["curve"] and rec["metrics"]["efficacy"] > 0
    assert rec["ultraedit"]["layers"] == [1, 2, 3] and rec["ultraedit"]["lr"] == 0.1


def test_python_api_edit_with_ultraedit(tiny_dir):
    import knowledger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = knowledger.edit(model, tok, [dict(prompt=p, subject=s, target_new=t) for p, s, t in GOOD[:3]],
                          editor="ultraedit", overrides=dict(ultraedit_layers=[1, 2, 3], ultraedit_lr=0.1))
    assert res.editor == "ultraedit" and res.layers == [1, 2, 3]
    changed = {k for k, v in model.state_dict().items() if not (v == before[k]).all()}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2, 3)}
