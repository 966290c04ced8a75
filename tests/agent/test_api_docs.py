"""docs/api.md's examples run, in order, on the editable tiny model (MODEL and SETTINGS swapped in)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.agent.helpers import OVERRIDES, STATS_TOKENS

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_doc_has_examples_for_every_api_function():
    code = "\n".join(blocks(DOC.read_text(encoding="utf-8")))
    for name in ("init", "open_workspace", "submit", "plan", "apply", "undo", "redo", "audit", "export", "edit"):
        assert f"knowledger.{name}(" in code, name


def test_the_examples_run(tmp_path, tiny_dir, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = blocks(DOC.read_text(encoding="utf-8"))
    settings = dict(corpus=str(corpus), stats_tokens=STATS_TOKENS, overrides=OVERRIDES)
    first = code[0]
    first = re.sub(r'^MODEL = .*$', f"MODEL = {str(tiny_dir)!r}", first, flags=re.M)
    first = re.sub(r'^SETTINGS = .*$', f"SETTINGS = {settings!r}", first, flags=re.M)
    assert first != code[0]
    namespace: dict = {}
    for block in [first, *code[1:]]:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation)
    out = capsys.readouterr().out
    assert "no fact #999" in out
    assert (tmp_path / "edited-model" / "config.json").is_file()
    assert (tmp_path / "edits-adapter" / "adapter_config.json").is_file() and namespace["lora"].kind == "adapter"
    assert namespace["done"].facts[0]["metrics"]["rewrite_acc"] == 1.0
