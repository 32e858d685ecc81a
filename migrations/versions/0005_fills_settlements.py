"""The whole account, first part: ``fills`` and ``settlements``.

- ``fills``: one row per fill (``fill_id``), both tiers and the ``fill`` channel; a fill never
  changes. Indexed by (account, created_time), order_id and ticker.
- ``settlements``: one row per (account, subaccount_number, ticker), listed per subaccount
  (the rows carry none); the newest ``settled_time`` wins. Settlements vanish from the API
  when their event is archived: these rows are the only copy left.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOLLARS = sa.Numeric(precision=18, scale=6)
CONTRACTS = sa.Numeric(precision=18, scale=2)
TIME = sa.TIMESTAMP(timezone=True)


def _kept() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("raw", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("first_synced_at", TIME, server_default=sa.text("now()"), nullable=False),
        sa.Column("synced_at", TIME, server_default=sa.text("now()"), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "fills",
        sa.Column("fill_id", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("trade_id", sa.Text(), nullable=True),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column("outcome_side", sa.Text(), nullable=True),
        sa.Column("book_side", sa.Text(), nullable=True),
        sa.Column("side", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=True),
        sa.Column("count_fp", CONTRACTS, nullable=True),
        sa.Column("yes_price_dollars", DOLLARS, nullable=True),
        sa.Column("no_price_dollars", DOLLARS, nullable=True),
        sa.Column("is_taker", sa.Boolean(), nullable=True),
        sa.Column("fee_cost", DOLLARS, nullable=True),
        sa.Column("created_time", TIME, nullable=True),
        sa.Column("subaccount_number", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("exchange_index", sa.Integer(), nullable=True),
        *_kept(),
        sa.PrimaryKeyConstraint("fill_id", name=op.f("pk_fills")),
    )
    op.create_index(op.f("ix_fills_account_created_time"), "fills", ["account", "created_time"])
    op.create_index(op.f("ix_fills_order_id"), "fills", ["order_id"])
    op.create_index(op.f("ix_fills_ticker"), "fills", ["ticker"])
    op.create_table(
        "settlements",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column("event_ticker", sa.Text(), nullable=True),
        sa.Column("market_result", sa.Text(), nullable=True),
        sa.Column("yes_count_fp", CONTRACTS, nullable=True),
        sa.Column("yes_total_cost_dollars", DOLLARS, nullable=True),
        sa.Column("no_count_fp", CONTRACTS, nullable=True),
        sa.Column("no_total_cost_dollars", DOLLARS, nullable=True),
        sa.Column("revenue", sa.BigInteger(), nullable=True),
        sa.Column("value", sa.Integer(), nullable=True),
        sa.Column("fee_cost", DOLLARS, nullable=True),
        sa.Column("settled_time", TIME, nullable=True),
        sa.Column("exchange_index", sa.Integer(), nullable=True),
        *_kept(),
        sa.PrimaryKeyConstraint(
            "account", "subaccount_number", "ticker", name=op.f("pk_settlements")
        ),
    )
    op.create_index(
        op.f("ix_settlements_account_settled_time"), "settlements", ["account", "settled_time"]
    )


def downgrade() -> None:
    op.drop_table("settlements")
    op.drop_table("fills")
