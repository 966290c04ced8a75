"""PostgreSQL specifics: the driver named when missing (the rest of tests/ledger runs on both)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from knowledger.ledger.db import DriverMissing, make_engine

_NO_PSYCOPG = "import sys; sys.modules['psycopg'] = None; "


def test_a_postgresql_url_without_its_driver_names_the_extra_in_one_line():
    code = (_NO_PSYCOPG + "from knowledger.cli.main import cli; "
            "cli(['status', '--db', 'postgresql://user@db.example/ledger'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r
    assert r.stderr.strip().splitlines() == [
        'Error: the database URL needs the psycopg driver for postgresql, which is not installed: '
        'pip install "knowledger[postgres]"'], r.stderr


def test_another_driver_is_named_with_the_one_knowledger_supports():
    with pytest.raises(DriverMissing, match=r"needs the psycopg2 driver .*'psycopg2', or use "
                                            r'postgresql\+psycopg:// after pip install "knowledger\[postgres\]"'):
        make_engine("postgresql+psycopg2://user@db.example/ledger")


def test_a_plain_postgresql_url_means_psycopg_3():
    engine = make_engine("postgresql://user@db.example/ledger")
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()
