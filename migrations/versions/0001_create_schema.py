"""Create orders, queue_position_snapshots, sync_state, sync_runs and rejected_records.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 00:03:41.372870+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("client_order_id", sa.Text(), nullable=True),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("side", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=True),
        sa.Column("outcome_side", sa.Text(), nullable=True),
        sa.Column("book_side", sa.Text(), nullable=True),
        sa.Column("yes_price", sa.Integer(), nullable=True),
        sa.Column("no_price", sa.Integer(), nullable=True),
        sa.Column("fill_count", sa.Integer(), nullable=True),
        sa.Column("remaining_count", sa.Integer(), nullable=True),
        sa.Column("initial_count", sa.Integer(), nullable=True),
        sa.Column("taker_fees", sa.Integer(), nullable=True),
        sa.Column("maker_fees", sa.Integer(), nullable=True),
        sa.Column("taker_fill_cost", sa.Integer(), nullable=True),
        sa.Column("maker_fill_cost", sa.Integer(), nullable=True),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("yes_price_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("no_price_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("taker_fees_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("maker_fees_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("taker_fill_cost_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("maker_fill_cost_dollars", sa.Numeric(precision=18, scale=6), nullable=True),
        sa.Column("fill_count_fp", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("remaining_count_fp", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("initial_count_fp", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("expiration_time", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("created_time", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_update_time", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("self_trade_prevention_type", sa.Text(), nullable=True),
        sa.Column("order_group_id", sa.Text(), nullable=True),
        sa.Column("cancel_order_on_pause", sa.Boolean(), nullable=True),
        sa.Column("subaccount_number", sa.Integer(), nullable=True),
        sa.Column("exchange_index", sa.Integer(), nullable=True),
        sa.Column("raw", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "first_synced_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "synced_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_orders")),
    )
    op.create_index(op.f("ix_orders_created_time"), "orders", ["created_time"], unique=False)
    op.create_index(
        op.f("ix_orders_last_update_time"), "orders", ["last_update_time"], unique=False
    )
    op.create_index(
        "ix_orders_open",
        "orders",
        ["order_id"],
        unique=False,
        postgresql_where=sa.text("status IN ('resting', 'pending')"),
    )
    op.create_index(op.f("ix_orders_ticker"), "orders", ["ticker"], unique=False)
    op.create_table(
        "queue_position_snapshots",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("captured_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("market_ticker", sa.Text(), nullable=False),
        sa.Column("queue_position", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.PrimaryKeyConstraint(
            "order_id", "captured_at", name=op.f("pk_queue_position_snapshots")
        ),
    )
    op.create_index(
        op.f("ix_queue_position_snapshots_market_ticker_captured_at"),
        "queue_position_snapshots",
        ["market_ticker", "captured_at"],
        unique=False,
    )
    op.create_table(
        "rejected_records",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("account", sa.Text(), nullable=True),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column(
            "received_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("payload_text", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_records")),
    )
    op.create_index(
        op.f("ix_rejected_records_stream_received_at"),
        "rejected_records",
        ["stream", "received_at"],
        unique=False,
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column(
            "started_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("fetched", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("inserted", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("unchanged", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("rejected", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_index(
        op.f("ix_sync_runs_account_stream_started_at"),
        "sync_runs",
        ["account", "stream", "started_at"],
        unique=False,
    )
    op.create_table(
        "sync_state",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("watermark", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column(
            "state",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("account", "stream", name=op.f("pk_sync_state")),
    )


def downgrade() -> None:
    op.drop_table("sync_state")
    op.drop_index(op.f("ix_sync_runs_account_stream_started_at"), table_name="sync_runs")
    op.drop_table("sync_runs")
    op.drop_index(op.f("ix_rejected_records_stream_received_at"), table_name="rejected_records")
    op.drop_table("rejected_records")
    op.drop_index(
        op.f("ix_queue_position_snapshots_market_ticker_captured_at"),
        table_name="queue_position_snapshots",
    )
    op.drop_table("queue_position_snapshots")
    op.drop_index(op.f("ix_orders_ticker"), table_name="orders")
    op.drop_index(
        "ix_orders_open",
        table_name="orders",
        postgresql_where=sa.text("status IN ('resting', 'pending')"),
    )
    op.drop_index(op.f("ix_orders_last_update_time"), table_name="orders")
    op.drop_index(op.f("ix_orders_created_time"), table_name="orders")
    op.drop_table("orders")
