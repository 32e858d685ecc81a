"""The schema as SQLAlchemy 2 tables: the only source ``migrations/env.py`` reads.

Only alembic migrations create or change these tables; ``tests/db/test_migrations.py`` checks
that the migrations and these models agree. Constraint names follow :data:`NAMING_CONVENTION`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import BigInteger, Index, MetaData, Numeric, Table, Text, text
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

Timestamp = TIMESTAMP(timezone=True)
Dollars = Numeric(18, 6)
Contracts = Numeric(18, 2)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: Timestamp, dict[str, Any]: JSONB, str: Text}


class OrderRow(Base):
    """``orders``: one row per order; the newest ``last_update_time`` wins."""

    __tablename__ = "orders"

    order_id: Mapped[str] = mapped_column(primary_key=True)
    # The account name (the API key id when there is no accounts file): whose order it is.
    account: Mapped[str]
    user_id: Mapped[str | None]
    client_order_id: Mapped[str | None]
    ticker: Mapped[str]
    type: Mapped[str | None]
    status: Mapped[str]
    side: Mapped[str | None]
    action: Mapped[str | None]
    outcome_side: Mapped[str | None]
    book_side: Mapped[str | None]
    yes_price: Mapped[int | None]
    no_price: Mapped[int | None]
    fill_count: Mapped[int | None]
    remaining_count: Mapped[int | None]
    initial_count: Mapped[int | None]
    taker_fees: Mapped[int | None]
    maker_fees: Mapped[int | None]
    taker_fill_cost: Mapped[int | None]
    maker_fill_cost: Mapped[int | None]
    queue_position: Mapped[int | None]
    yes_price_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    no_price_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    taker_fees_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    maker_fees_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    taker_fill_cost_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    maker_fill_cost_dollars: Mapped[Decimal | None] = mapped_column(Dollars)
    fill_count_fp: Mapped[Decimal | None] = mapped_column(Contracts)
    remaining_count_fp: Mapped[Decimal | None] = mapped_column(Contracts)
    initial_count_fp: Mapped[Decimal | None] = mapped_column(Contracts)
    expiration_time: Mapped[datetime | None]
    created_time: Mapped[datetime | None]
    last_update_time: Mapped[datetime | None]
    self_trade_prevention_type: Mapped[str | None]
    order_group_id: Mapped[str | None]
    cancel_order_on_pause: Mapped[bool | None]
    subaccount_number: Mapped[int | None]
    exchange_index: Mapped[int | None]
    raw: Mapped[dict[str, Any]]
    first_synced_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    synced_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

    __table_args__ = (
        Index(None, "ticker"),
        Index(None, "last_update_time"),
        Index(None, "created_time"),
        # A queue poll looks for orders that stopped being open since its last run.
        Index(None, "synced_at"),
        # The open orders of one account, read by every sync cycle and every queue poll.
        Index(None, "account", "status"),
    )


class QueuePositionSnapshotRow(Base):
    """``queue_position_snapshots``: a row when a position is first seen or changes, and a
    closing row (``queue_position`` NULL) when the order stops being open."""

    __tablename__ = "queue_position_snapshots"

    order_id: Mapped[str] = mapped_column(primary_key=True)
    captured_at: Mapped[datetime] = mapped_column(primary_key=True)
    account: Mapped[str]
    market_ticker: Mapped[str]
    queue_position: Mapped[Decimal | None] = mapped_column(Contracts)

    __table_args__ = (
        Index(None, "market_ticker", "captured_at"),
        # prune walks old rows in (captured_at, order_id) order, one batch at a time.
        Index(None, "captured_at", "order_id"),
    )


class SyncStateRow(Base):
    """``sync_state``: one watermark per (account, stream), written with the data it covers."""

    __tablename__ = "sync_state"

    account: Mapped[str] = mapped_column(primary_key=True)
    stream: Mapped[str] = mapped_column(primary_key=True)
    watermark: Mapped[datetime | None]
    state: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    updated_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class SyncRunRow(Base):
    """``sync_runs``: one row per run, ``running`` → ``succeeded``/``failed``."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account: Mapped[str]
    stream: Mapped[str]
    mode: Mapped[str]
    started_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    finished_at: Mapped[datetime | None]
    status: Mapped[str]
    fetched: Mapped[int] = mapped_column(server_default=text("0"))
    inserted: Mapped[int] = mapped_column(server_default=text("0"))
    updated: Mapped[int] = mapped_column(server_default=text("0"))
    unchanged: Mapped[int] = mapped_column(server_default=text("0"))
    rejected: Mapped[int] = mapped_column(server_default=text("0"))
    error: Mapped[str | None]

    __table_args__ = (Index(None, "account", "stream", "started_at"),)


class RejectedRecordRow(Base):
    """``rejected_records``: payloads that could not be parsed, kept with the reason."""

    __tablename__ = "rejected_records"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account: Mapped[str | None]
    stream: Mapped[str]
    received_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    error: Mapped[str]
    payload: Mapped[dict[str, Any] | None]
    payload_text: Mapped[str | None]

    __table_args__ = (Index(None, "stream", "received_at"),)


orders = cast(Table, OrderRow.__table__)
queue_position_snapshots = cast(Table, QueuePositionSnapshotRow.__table__)
sync_state = cast(Table, SyncStateRow.__table__)
sync_runs = cast(Table, SyncRunRow.__table__)
rejected_records = cast(Table, RejectedRecordRow.__table__)
