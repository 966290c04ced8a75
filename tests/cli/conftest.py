import pytest

from tests.agent.fixtures import _one_thread, corpus, tiny_dir, ws  # noqa: F401 (fixtures)
from tests.ledger.helpers import make_workspace


@pytest.fixture
def ws_dir(ledger_db):
    """An initialised workspace (base model recorded from a fixed fingerprint): a directory for
    SQLite, a database URL for PostgreSQL (see tests/conftest.py: `ledger_db`)."""
    return make_workspace(ledger_db)
