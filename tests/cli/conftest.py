import pytest

from tests.agent.fixtures import _one_thread, corpus, tiny_dir, ws  # noqa: F401 (fixtures)
from tests.ledger.helpers import make_workspace


@pytest.fixture
def ws_dir(tmp_path):
    """An initialised workspace directory (base model recorded from a fixed fingerprint)."""
    return make_workspace(tmp_path / "ws")
