"""The house's one-way arrows, checked on the source: cli → agent → (ledger, editors).

An AST pass over every module of ledger/, editors/, agent/, cli/ and migrations/, counting imports
at module level and inside functions alike (a lazy import is still a dependency):
- cli imports agent (and click, the standard library, and its own modules): not ledger, editors,
  torch or sqlalchemy;
- agent imports ledger and editors, never cli;
- editors never imports ledger, agent or cli;
- ledger imports no torch and no editors, agent or cli (migrations only for Alembic's scripts);
- migrations imports only ledger.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ledger", "editors", "agent", "cli", "migrations")

# package -> prefixes it must not import (knowledger.* names and top-level distributions)
FORBIDDEN = {
    "cli": ("knowledger.ledger", "knowledger.editors", "knowledger.migrations", "torch", "sqlalchemy"),
    "agent": ("knowledger.cli",),
    "editors": ("knowledger.ledger", "knowledger.agent", "knowledger.cli", "knowledger.migrations"),
    "ledger": ("knowledger.editors", "knowledger.agent", "knowledger.cli", "torch", "transformers"),
    "migrations": ("knowledger.editors", "knowledger.agent", "knowledger.cli", "torch"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["knowledger", *parts])


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if node.module is None]
    return out


def violations(path: Path, package: str, root: Path = ROOT) -> list[str]:
    """The imports of `path` (a module of `package`) that break the layer rule."""
    module = module_name(path, root)
    bad = []
    for line, name in imported_names(path, module):
        for prefix in FORBIDDEN[package]:
            if name == prefix or name.startswith(prefix + "."):
                bad.append(f"{path.relative_to(root)}:{line}: {package} imports {name}")
    return bad


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield pkg, path


def test_every_module_keeps_to_its_layer():
    found = [v for pkg, path in modules() for v in violations(path, pkg)]
    assert not found, "\n".join(found)


def test_the_checker_sees_all_the_packages():
    seen = {pkg for pkg, _ in modules()}
    assert seen == set(PACKAGES)
    assert sum(1 for _ in modules()) > 50


@pytest.mark.parametrize("package, source, expect", [
    ("cli", "import knowledger.ledger.facts\n", "cli imports knowledger.ledger.facts"),
    ("cli", "def f():\n    from knowledger.editors import hooks\n", "cli imports knowledger.editors"),
    ("cli", "from ..ledger import errors\n", "cli imports knowledger.ledger"),
    ("cli", "import torch\n", "cli imports torch"),
    ("editors", "from knowledger.agent.live import LiveModel\n", "editors imports knowledger.agent.live"),
    ("editors", "def g():\n    import knowledger.ledger.repository as r\n", "editors imports knowledger.ledger"),
    ("ledger", "import torch.nn\n", "ledger imports torch.nn"),
    ("ledger", "from knowledger.editors.models import load_model\n", "ledger imports knowledger.editors"),
    ("agent", "from knowledger.cli.common import echo_json\n", "agent imports knowledger.cli.common"),
])
def test_a_planted_violation_is_caught(tmp_path, package, source, expect):
    (tmp_path / package).mkdir()
    planted = tmp_path / package / "planted.py"
    planted.write_text(source, encoding="utf-8")
    found = violations(planted, package, root=tmp_path)
    assert found and expect in found[0], found


@pytest.mark.parametrize("package, source", [
    ("cli", "from knowledger.agent.apply import apply_pending\nimport click\n"),
    ("cli", "from .common import echo_json\n"),
    ("agent", "from knowledger.ledger import repository\nfrom knowledger.editors.hooks import Trace\n"),
    ("ledger", "import sqlalchemy\nfrom knowledger.ledger.errors import KnowledgerError\n"),
])
def test_allowed_imports_pass(tmp_path, package, source):
    (tmp_path / package).mkdir()
    ok = tmp_path / package / "fine.py"
    ok.write_text(source, encoding="utf-8")
    assert violations(ok, package, root=tmp_path) == []
