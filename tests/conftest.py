import os
import uuid
from pathlib import Path

import pytest

from tests.tiny import save_tiny

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads or writes the user's workspace or cache."""
    monkeypatch.setenv("KNOWLEDGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KNOWLEDGER_DB", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The scheduler's lifelong rule is tuned on the default model; tiny models drift far faster,
    # so tests that do not test the rule itself keep `auto` on EMMET/MEMIT.
    from knowledger.agent import scheduler

    monkeypatch.setattr(scheduler, "DEFAULT_LIFELONG_MIN_ACTIVE", 10**9)
    monkeypatch.setattr(scheduler, "DEFAULT_LIFELONG_NORM_GROWTH", 1e9)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny("llama", tmp_path / "tiny-llama")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA} (it sits beside the checkout)")
    return SHARED_DATA


# --- the ledger on both databases -----------------------------------------------------------------
# A test that takes `ledger_db` (directly or through `ws_dir` / `ws`) gets the place of a fresh
# ledger: a workspace directory (SQLite), or the URL of a new, empty PostgreSQL database on the
# server KNOWLEDGER_TEST_POSTGRES_URL names (created for the test, dropped after it). The tests
# selected below run once per database; without KNOWLEDGER_TEST_POSTGRES_URL (a fresh clone) the
# PostgreSQL run is skipped with that reason. `.ci/run` (and `.ci/with-postgres CMD`) start a
# server and set it.
POSTGRES_ENV = "KNOWLEDGER_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
# every test under tests/ledger, and these agent/CLI modules (apply/undo/redo/replay/submit through
# the agent and the CLI); a test that reads the workspace's files by path is marked sqlite_only
BOTH_DATABASES_DIRS = ("ledger",)
BOTH_DATABASES_MODULES = ("tests/agent/test_operations.py", "tests/agent/test_concurrency.py",
                          "tests/cli/test_submit.py", "tests/cli/test_edits.py",
                          "tests/cli/test_listing.py", "tests/agent/test_nas_ops.py",
                          "tests/agent/test_consolidate_ops.py", "tests/agent/test_ultraedit_ops.py",
                          "tests/agent/test_memory.py")
# tests in those modules that look at the workspace's files by path (SQLite layout)
SQLITE_ONLY = {"test_status"}


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: the test reads the SQLite workspace layout; "
                                       "it is not repeated on PostgreSQL")


def _on_both(metafunc) -> bool:
    path = Path(str(metafunc.definition.path)).resolve()
    tests = Path(__file__).resolve().parent
    try:
        rel = path.relative_to(tests.parent).as_posix()
    except ValueError:
        return False
    if metafunc.definition.get_closest_marker("sqlite_only") or metafunc.function.__name__ in SQLITE_ONLY:
        return False
    return rel.split("/")[1] in BOTH_DATABASES_DIRS or rel in BOTH_DATABASES_MODULES


def pytest_generate_tests(metafunc):
    if "ledger_db" in metafunc.fixturenames and _on_both(metafunc):
        metafunc.parametrize("ledger_db", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def _postgres_admin():
    """An AUTOCOMMIT engine on the test server (to create and drop databases), or a skip."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (`.ci/with-postgres python -m pytest` sets it)")
    from sqlalchemy import create_engine

    from knowledger.ledger.db import make_engine

    make_engine(url).dispose()  # a missing driver: the one-line DriverMissing, not a traceback
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(_postgres_admin):
    """The URL of a new, empty PostgreSQL database, dropped (connections and all) after the test."""
    name = f"kt_{uuid.uuid4().hex[:16]}"
    with _postgres_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield _postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    with _postgres_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def ledger_db(request, tmp_path):
    """Where the test's ledger goes: `tmp_path / "ws"` (SQLite) or a fresh PostgreSQL URL (str)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return tmp_path / "ws"
    return request.getfixturevalue("postgres_url")
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (with the reason) where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
