"""`knowledger export DIR [--adapter] [--dtype]`: output, JSON, the adapter, one-line errors."""
from __future__ import annotations

import json
import sys

import pytest

from tests.agent.helpers import GOOD, apply_args, ok, run, submit


@pytest.fixture
def applied(ws, corpus):
    for f in GOOD[:2]:
        submit(ws, *f)
    ok(*apply_args(corpus), db=ws)
    return ws


def test_export_json_dtype_and_adapter(applied, tmp_path):
    r = json.loads(ok("export", tmp_path / "bf16", "--dtype", "bfloat16", "--json", db=applied).stdout)
    assert (r["kind"], r["dtype"], r["head_seq"], len(r["facts"])) == ("model", "bfloat16", 1, 2)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    r = json.loads(ok("export", tmp_path / "lora", "--adapter", "--json", db=applied).stdout)
    assert r["kind"] == "adapter" and r["path"] == str(tmp_path / "lora")
    assert [(m["module"], m["rank"], m["total_rank"]) for m in r["adapter"]] == [
        ("model.layers.1.mlp.down_proj", 2, 2), ("model.layers.2.mlp.down_proj", 2, 2)]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "knowledger-export.json"]
    out = ok("export", tmp_path / "lora2", "--adapter", db=applied).stdout
    assert out.startswith("Exported the active edits as a LoRA adapter of 2 module(s) (seq 1, weights ")


def test_export_adapter_without_peft_is_one_line(applied, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    r = run("export", tmp_path / "lora", "--adapter", db=applied)
    assert (r.exit_code, r.output) == (1, 'Error: export --adapter needs peft: pip install "knowledger[peft]"\n')
    assert run("export", tmp_path / "x", "--dtype", "int8", db=applied).exit_code == 2
