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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (with the reason) where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
