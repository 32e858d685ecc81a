"""The schema belongs to alembic: upgrade → downgrade → upgrade works, the migrations agree
with the models, and `kalshi-etl migrate` is idempotent."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from etl.db import migrations
from etl.db.models import metadata


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
        assert {"ix_orders_ticker", "ix_orders_last_update_time", "ix_orders_open"} <= indexes
