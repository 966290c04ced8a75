"""`import knowledger` is the Python API, and the layers import as knowledger.* from anywhere."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ("import knowledger, knowledger.agent, knowledger.cli.main; "
         "assert callable(knowledger.apply) and callable(knowledger.edit); print(knowledger.__file__)")


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_the_installed_package_imports_from_the_repo_root_and_elsewhere(tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("__init__.py")


def test_import_knowledger_loads_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, knowledger; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_a_non_editable_install_imports_from_the_repo_root_and_elsewhere(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, capture_output=True, text=True,
                             timeout=120, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(target / "knowledger" / "__init__.py")


def test_the_installed_dependencies_satisfy_the_declared_ranges_and_transformers_is_capped():
    """pyproject's ranges hold for what is installed (CI installs from them), and transformers has
    an upper bound: the next major after the tested one, so a breaking release is not picked up."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in reqs:
        try:
            got = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is declared but not installed")
        assert req.specifier.contains(got, prereleases=True), f"{req.name} {got} is outside {req.specifier}"
    [tf] = [r for r in reqs if r.name == "transformers"]
    caps = [s for s in tf.specifier if s.operator == "<"]
    assert caps and int(caps[0].version.split(".")[0]) == int(version("transformers").split(".")[0]) + 1
