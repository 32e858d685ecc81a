"""The schema as SQLAlchemy 2 Core tables: the only source ``migrations/env.py`` reads.

Only alembic migrations create or change these tables; ``tests/db/test_migrations.py`` checks
that the migrations and these models agree. Constraint names follow :data:`NAMING_CONVENTION`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    Numeric,
    Sequence,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

# Core tables, not ORM classes: nothing here maps rows to objects, and leaving
# ``sqlalchemy.orm`` unimported saves every command about 0.1 s of start-up.

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
NOW = text("now()")


def _optional(name: str, type_: Any) -> Column[Any]:
    return Column(name, type_, nullable=True)


def _required(name: str, type_: Any, **options: Any) -> Column[Any]:
    return Column(name, type_, nullable=False, **options)


# ``orders``: one row per order; the newest ``last_update_time`` wins.
orders = Table(
    "orders",
    metadata,
    Column("order_id", Text, primary_key=True),
    # The account name (the API key id when there is no accounts file): whose order it is.
    _required("account", Text),
    _optional("user_id", Text),
    _optional("client_order_id", Text),
    _required("ticker", Text),
    _optional("type", Text),
    _required("status", Text),
    *(_optional(name, Text) for name in ("side", "action", "outcome_side", "book_side")),
    *(
        _optional(name, Integer)
        for name in (
            "yes_price",
            "no_price",
            "fill_count",
            "remaining_count",
            "initial_count",
            "taker_fees",
            "maker_fees",
            "taker_fill_cost",
            "maker_fill_cost",
            "queue_position",
        )
    ),
    *(
        _optional(name, Dollars)
        for name in (
            "yes_price_dollars",
            "no_price_dollars",
            "taker_fees_dollars",
            "maker_fees_dollars",
            "taker_fill_cost_dollars",
            "maker_fill_cost_dollars",
        )
    ),
    *(
        _optional(name, Contracts)
        for name in ("fill_count_fp", "remaining_count_fp", "initial_count_fp")
    ),
    *(
        _optional(name, Timestamp)
        for name in ("expiration_time", "created_time", "last_update_time")
    ),
    _optional("self_trade_prevention_type", Text),
    _optional("order_group_id", Text),
    _optional("cancel_order_on_pause", Boolean),
    _optional("subaccount_number", Integer),
    _optional("exchange_index", Integer),
    _required("raw", JSONB),
    _required("first_synced_at", Timestamp, server_default=NOW),
    _required("synced_at", Timestamp, server_default=NOW),
    Index(None, "ticker"),
    Index(None, "last_update_time"),
    Index(None, "created_time"),
    # A queue poll looks for orders that stopped being open since its last run.
    Index(None, "synced_at"),
    # The open orders of one account, read by every sync cycle and every queue poll.
    Index(None, "account", "status"),
)

# ``queue_position_snapshots``: a row when a position is first seen or changes, and a closing
# row (``queue_position`` NULL) when the order stops being open.
queue_position_snapshots = Table(
    "queue_position_snapshots",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("captured_at", Timestamp, primary_key=True),
    _required("account", Text),
    _required("market_ticker", Text),
    _optional("queue_position", Contracts),
    Index(None, "market_ticker", "captured_at"),
    # prune walks old rows in (captured_at, order_id) order, one batch at a time.
    Index(None, "captured_at", "order_id"),
)

# ``fills``: one row per fill (``fill_id``); a fill never changes.
fills = Table(
    "fills",
    metadata,
    Column("fill_id", Text, primary_key=True),
    _required("account", Text),
    _optional("trade_id", Text),
    _optional("order_id", Text),
    _required("ticker", Text),
    *(_optional(name, Text) for name in ("outcome_side", "book_side", "side", "action")),
    _optional("count_fp", Contracts),
    _optional("yes_price_dollars", Dollars),
    _optional("no_price_dollars", Dollars),
    _optional("is_taker", Boolean),
    _optional("fee_cost", Dollars),
    _optional("created_time", Timestamp),
    _required("subaccount_number", Integer, server_default=text("0")),
    _optional("exchange_index", Integer),
    _required("raw", JSONB),
    _required("first_synced_at", Timestamp, server_default=NOW),
    _required("synced_at", Timestamp, server_default=NOW),
    # Fills of an account over time (P&L, "fills per day"), of an order (verify's cross-check).
    Index(None, "account", "created_time"),
    Index(None, "order_id"),
    Index(None, "ticker"),
    # A market's fills, in FIFO order, for its lots.
    Index(None, "account", "subaccount_number", "ticker"),
)

# ``settlements``: one row per (account, subaccount, market); the newest ``settled_time`` wins.
settlements = Table(
    "settlements",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("ticker", Text, primary_key=True),
    _optional("event_ticker", Text),
    _optional("market_result", Text),
    _optional("yes_count_fp", Contracts),
    _optional("yes_total_cost_dollars", Dollars),
    _optional("no_count_fp", Contracts),
    _optional("no_total_cost_dollars", Dollars),
    _optional("revenue", BigInteger),
    _optional("value", Integer),
    _optional("fee_cost", Dollars),
    _optional("settled_time", Timestamp),
    _optional("exchange_index", Integer),
    _required("raw", JSONB),
    _required("first_synced_at", Timestamp, server_default=NOW),
    _required("synced_at", Timestamp, server_default=NOW),
    Index(None, "account", "settled_time"),
)


def _position_columns() -> list[Column[Any]]:
    """What a market position holds (``position_snapshots``, ``archived_positions``)."""
    return [
        _optional("position_fp", Contracts),
        _optional("market_exposure_dollars", Dollars),
        _optional("realized_pnl_dollars", Dollars),
        _optional("fees_paid_dollars", Dollars),
        _optional("total_traded_dollars", Dollars),
        _optional("last_updated_ts", Timestamp),
    ]


# ``position_snapshots``: a row when a market's position (per subaccount) is first seen or
# changes, or stops being listed (``position_fp`` 0).
position_snapshots = Table(
    "position_snapshots",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("ticker", Text, primary_key=True),
    Column("captured_at", Timestamp, primary_key=True),
    *_position_columns(),
    _required("raw", JSONB),
    Index(None, "account", "captured_at"),
)

# ``archived_positions``: the settled positions of archived events (``/historical/positions``).
archived_positions = Table(
    "archived_positions",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("ticker", Text, primary_key=True),
    *_position_columns(),
    _required("raw", JSONB),
    _required("first_synced_at", Timestamp, server_default=NOW),
    _required("synced_at", Timestamp, server_default=NOW),
)

# ``balance_snapshots``: a row when a subaccount's balance is first seen or changes.
balance_snapshots = Table(
    "balance_snapshots",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("captured_at", Timestamp, primary_key=True),
    _optional("balance_dollars", Dollars),
    _optional("portfolio_value_dollars", Dollars),
    _optional("updated_ts", BigInteger),
    _required("raw", JSONB),
)

# ``cash_movements``: deposits, withdrawals and subaccount transfers; the newest version wins.
cash_movements = Table(
    "cash_movements",
    metadata,
    Column("account", Text, primary_key=True),
    Column("kind", Text, primary_key=True),
    Column("id", Text, primary_key=True),
    _optional("status", Text),
    _optional("type", Text),
    _optional("amount_dollars", Dollars),
    _optional("fee_dollars", Dollars),
    _optional("from_subaccount", Integer),
    _optional("to_subaccount", Integer),
    _optional("created_time", Timestamp),
    _optional("finalized_time", Timestamp),
    _required("raw", JSONB),
    _required("first_synced_at", Timestamp, server_default=NOW),
    _required("synced_at", Timestamp, server_default=NOW),
    Index(None, "account", "created_time"),
)

# ``pnl_lots``: the FIFO lots of each (account, subaccount, market), numbered in FIFO order.
pnl_lots = Table(
    "pnl_lots",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("ticker", Text, primary_key=True),
    Column("lot_number", Integer, primary_key=True),
    _required("side", Text),
    _required("quantity_fp", Contracts),
    _optional("open_time", Timestamp),
    _optional("close_time", Timestamp),
    _required("entry_price_dollars", Dollars),
    _optional("exit_price_dollars", Dollars),
    _required("open_fees_dollars", Dollars),
    _optional("close_fees_dollars", Dollars),
    _optional("realized_pnl_without_fees_dollars", Dollars),
    _optional("realized_pnl_with_fees_dollars", Dollars),
    _optional("close_type", Text),
    _required("open_fill_id", Text),
    _optional("close_fill_id", Text),
    Index(None, "account", "close_time"),
)

# ``pnl_marks``: markets whose lots must be rebuilt (marked with the change that needs it).
PNL_MARK_SEQ = Sequence("pnl_mark_seq", metadata=metadata)
pnl_marks = Table(
    "pnl_marks",
    metadata,
    Column("account", Text, primary_key=True),
    Column("subaccount_number", Integer, primary_key=True),
    Column("ticker", Text, primary_key=True),
    _required("version", BigInteger, server_default=PNL_MARK_SEQ.next_value()),
)

# ``sync_state``: one watermark per (account, stream), written with the data it covers.
sync_state = Table(
    "sync_state",
    metadata,
    Column("account", Text, primary_key=True),
    Column("stream", Text, primary_key=True),
    _optional("watermark", Timestamp),
    _required("state", JSONB, server_default=text("'{}'::jsonb")),
    _required("updated_at", Timestamp, server_default=NOW),
)

# ``sync_runs``: one row per run, ``running`` → ``succeeded``/``failed``.
sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    _required("account", Text),
    _required("stream", Text),
    _required("mode", Text),
    _required("started_at", Timestamp, server_default=NOW),
    _optional("finished_at", Timestamp),
    _required("status", Text),
    *(
        _required(name, Integer, server_default=text("0"))
        for name in ("fetched", "inserted", "updated", "unchanged", "rejected")
    ),
    _optional("error", Text),
    Index(None, "account", "stream", "started_at"),
)

# ``rejected_records``: payloads that could not be parsed, kept with the reason.
rejected_records = Table(
    "rejected_records",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    _optional("account", Text),
    _required("stream", Text),
    _required("received_at", Timestamp, server_default=NOW),
    _required("error", Text),
    _optional("payload", JSONB),
    _optional("payload_text", Text),
    # MD5 of the payload (jsonb's text, or payload_text): a payload is kept once per stream.
    _required("payload_md5", Text),
    Index(None, "stream", "received_at"),
    Index(None, "stream", "payload_md5", unique=True),
)
