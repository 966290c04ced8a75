"""Fixtures of the editable tiny model and its workspace, shared by tests/agent and tests/cli
(each conftest imports them)."""
import pytest
import torch

from knowledger.agent.workspace import init_workspace
from tests.agent.helpers import save_editable_tiny, write_corpus


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two shared cores: one torch thread is faster than contended ones for these tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_editable_tiny(tmp_path_factory.mktemp("models") / "tiny-editable")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def ws(ledger_db, tiny_dir):
    """An initialised workspace on the editable tiny model: a directory for SQLite, a database URL
    for PostgreSQL (see tests/conftest.py: `ledger_db`)."""
    init_workspace(ledger_db, str(tiny_dir)).workspace.close()
    return ledger_db
