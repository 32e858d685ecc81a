"""The path a new user's machine takes: no DATABASE_URL, so an embedded PostgreSQL is started
under KALSHI_ETL_HOME, migrated, synced into, and reused by the next command."""

from __future__ import annotations

import os
import subprocess

import pytest
import sqlalchemy as sa

from etl.db import migrations
from etl.db.engine import create_engine, embedded_url
from etl.sync.orders import sync_orders
from tests.fix_exchange import CLI
from tests.sync.helpers import assert_table_equals_truth

pytestmark = pytest.mark.embedded


def test_without_database_url_an_embedded_postgresql_is_used_and_reused(tmp_path, client, exchange):
    home = tmp_path / "home"
    url = embedded_url(home)
    assert (home / "pgdata").is_dir()
    engine = create_engine(url)
    try:
        migrations.upgrade(engine)
        sync_orders(engine, client, account="acct")
        assert_table_equals_truth(engine, exchange)
    finally:
        engine.dispose()
    assert embedded_url(home) == url  # the same server, not a second one


def test_the_cli_migrates_the_embedded_database_from_a_bare_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))}
    env["KALSHI_ETL_HOME"] = str(tmp_path / "home")
    for _ in range(2):  # the second run reuses the data directory
        result = subprocess.run(
            [*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "(head)" in result.stdout
    status = subprocess.run([*CLI, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "no sync has run yet" in status.stdout
    engine = sa.create_engine(embedded_url(tmp_path / "home"))
    with engine.connect() as conn:
        assert migrations.current_revision(engine) == migrations.head_revision()
        assert conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 0
    engine.dispose()
