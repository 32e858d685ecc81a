"""The schema belongs to alembic: upgrade → downgrade → upgrade works, the migrations agree
with the models, and `kalshi-etl migrate` is idempotent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from etl.db import migrations
from etl.db.engine import create_engine
from etl.db.models import metadata
from etl.db.state import write_state
from etl.errors import ConfigError
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from tests.sync.helpers import ACCOUNT


def test_upgrade_downgrade_upgrade_and_models_agree(database_server):
    engine = sa.create_engine(database_server.create())
    try:
        migrations.upgrade(engine)
        migrations.downgrade(engine, "base")
        with engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == ["alembic_version"]
        migrations.upgrade(engine)
        migrations.upgrade(engine)  # idempotent
        assert migrations.current_revision(engine) == migrations.head_revision()
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            config = migrations.alembic_config()
            config.attributes["connection"] = conn
            command.check(config)  # raises when models and migrations drift
        assert tables >= {t.name for t in metadata.sorted_tables}
    finally:
        engine.dispose()


def test_the_contract_columns_and_types_exist(engine):
    with engine.connect() as conn:
        columns = {c["name"]: c for c in sa.inspect(conn).get_columns("orders")}
        assert str(columns["yes_price_dollars"]["type"]) == "NUMERIC(18, 6)"
        assert str(columns["fill_count_fp"]["type"]) == "NUMERIC(18, 2)"
        assert str(columns["raw"]["type"]) == "JSONB"
        assert not columns["ticker"]["nullable"] and not columns["status"]["nullable"]
        assert not columns["raw"]["nullable"]
        pk = sa.inspect(conn).get_pk_constraint("queue_position_snapshots")
        assert pk["constrained_columns"] == ["order_id", "captured_at"]
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("orders")}
        assert {"ix_orders_ticker", "ix_orders_last_update_time", "ix_orders_account_status"} <= (
            indexes
        )
        for table in ("orders", "queue_position_snapshots"):
            account = {c["name"]: c for c in sa.inspect(conn).get_columns(table)}["account"]
            assert str(account["type"]) == "TEXT" and not account["nullable"]


_FINGERPRINT = {
    "orders": "SELECT count(*), md5(string_agg(to_jsonb(o)::text, '' ORDER BY order_id)) FROM "
    "(SELECT order_id, status, raw, last_update_time, synced_at FROM orders) o",
    "queue_position_snapshots": "SELECT count(*), md5(string_agg(to_jsonb(s)::text, '' ORDER BY "
    "order_id, captured_at)) FROM (SELECT order_id, captured_at, queue_position "
    "FROM queue_position_snapshots) s",
    "sync_runs": "SELECT count(*), max(id) FROM sync_runs",
    "sync_state": "SELECT count(*), md5(string_agg(stream, ',' ORDER BY stream)) FROM sync_state",
}


def _fingerprints(engine: sa.Engine) -> dict[str, tuple[object, ...]]:
    with engine.connect() as conn:
        return {t: tuple(conn.exec_driver_sql(q).one()) for t, q in _FINGERPRINT.items()}


@pytest.fixture
def previous_release(database_server, client) -> Iterator[sa.Engine]:
    """A database of the previous release (revision 0002) holding a synced account."""
    engine = create_engine(database_server.create())
    try:
        migrations.upgrade(engine)
        sync_orders(engine, client, account=ACCOUNT)
        poll_queue_positions(engine, client, account=ACCOUNT)
        migrations.downgrade(engine, "0002")  # the schema the previous release created
        yield engine
    finally:
        engine.dispose()


def test_upgrading_a_database_of_the_previous_release_keeps_every_row(
    previous_release, client, exchange
):
    engine = previous_release
    before = _fingerprints(engine)
    assert before["orders"][0] == len(exchange.truth()) and before["queue_position_snapshots"][0]
    migrations.upgrade(engine)
    assert _fingerprints(engine) == before
    with engine.connect() as conn:
        for table in ("orders", "queue_position_snapshots"):
            owners = conn.exec_driver_sql(f"SELECT DISTINCT account FROM {table}").scalars()
            assert list(owners) == [ACCOUNT]
    # ... and the upgraded database syncs on: nothing new, nothing duplicated.
    again = sync_orders(engine, client, account=ACCOUNT)
    assert again.counts.inserted == 0 and again.counts.updated == 0


def test_the_upgrade_stops_when_the_owner_of_existing_rows_is_ambiguous(
    previous_release, monkeypatch
):
    engine = previous_release
    with engine.begin() as conn:
        write_state(conn, "another-key", "orders", watermark=None)
    with pytest.raises(ConfigError, match=r"KALSHI_ETL_MIGRATION_ACCOUNT") as caught:
        migrations.upgrade(engine)
    assert "it names 2: " in str(caught.value) and "another-key" in str(caught.value)
    assert migrations.current_revision(engine) == "0002"  # nothing half-done
    monkeypatch.setenv("KALSHI_ETL_MIGRATION_ACCOUNT", ACCOUNT)
    migrations.upgrade(engine)
    assert migrations.current_revision(engine) == migrations.head_revision()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT DISTINCT account FROM orders").scalar() == ACCOUNT


def test_the_head_the_program_knows_is_the_newest_migration():
    """``upgrade`` skips alembic when the database is at HEAD: HEAD must be alembic's head."""
    assert migrations.HEAD == migrations.head_revision()


def test_a_downgrade_below_accounts_is_refused_while_two_accounts_have_rows(database_server):
    engine = sa.create_engine(database_server.create())
    try:
        migrations.upgrade(engine)
        with engine.begin() as conn:
            write_state(conn, "alpha", "orders", watermark=None)
            write_state(conn, "beta", "orders", watermark=None)
        with pytest.raises(ConfigError, match=r"2 accounts have rows here \(alpha, beta\)"):
            migrations.downgrade(engine, "0002")
        assert migrations.current_revision(engine) == migrations.head_revision()
        migrations.downgrade(engine, "0002", force=True)
        assert migrations.current_revision(engine) == "0002"
    finally:
        engine.dispose()


def test_the_upgrade_keeps_one_row_of_each_rejected_payload_per_stream(database_server):
    engine = sa.create_engine(database_server.create())
    try:
        migrations.upgrade(engine, "0003")
        with engine.begin() as conn:  # what earlier releases wrote: a copy per cycle
            for stream, payload in [
                ("orders", '{"order_id": "x", "status": "teleported"}'),
                ("orders", '{"status": "teleported", "order_id": "x"}'),  # same jsonb
                ("orders", '{"order_id": "y"}'),
                ("queue_positions", '{"order_id": "x", "status": "teleported"}'),
            ]:
                conn.execute(
                    sa.text(
                        "INSERT INTO rejected_records (stream, error, payload) "
                        "VALUES (:stream, 'bad', CAST(:payload AS jsonb))"
                    ),
                    {"stream": stream, "payload": payload},
                )
        migrations.upgrade(engine)
        with engine.connect() as conn:
            kept = conn.execute(
                sa.text("SELECT id, stream FROM rejected_records ORDER BY id")
            ).all()
        assert [tuple(row) for row in kept] == [
            (1, "orders"),
            (3, "orders"),
            (4, "queue_positions"),
        ]
    finally:
        engine.dispose()
