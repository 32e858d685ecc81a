"""The whole account, second part: positions, balance and cash movements.

- ``position_snapshots``: change-only snapshots per (account, subaccount, market), from
  ``/portfolio/positions?settlement_status=all`` and the ``market_positions`` channel; a
  market no longer listed gets one row with ``position_fp`` 0. View ``positions_current``:
  the latest row of each market, where its position is not 0.
- ``archived_positions``: ``/historical/positions``, one row per (account, subaccount, market).
- ``balance_snapshots``: change-only snapshots per (account, subaccount).
- ``cash_movements``: deposits, withdrawals and transfers, per (account, kind, id).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 22:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOLLARS = sa.Numeric(precision=18, scale=6)
CONTRACTS = sa.Numeric(precision=18, scale=2)
TIME = sa.TIMESTAMP(timezone=True)

POSITIONS_CURRENT = """
CREATE VIEW positions_current AS
SELECT account, subaccount_number, ticker, position_fp, market_exposure_dollars,
       realized_pnl_dollars, fees_paid_dollars, total_traded_dollars, last_updated_ts,
       captured_at
FROM (
    SELECT DISTINCT ON (account, subaccount_number, ticker) *
    FROM position_snapshots
    ORDER BY account, subaccount_number, ticker, captured_at DESC
) latest
WHERE position_fp <> 0
"""


def _raw() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("raw", postgresql.JSONB(astext_type=sa.Text()), nullable=False)


def _synced() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("first_synced_at", TIME, server_default=sa.text("now()"), nullable=False),
        sa.Column("synced_at", TIME, server_default=sa.text("now()"), nullable=False),
    ]


def _position_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("position_fp", CONTRACTS, nullable=True),
        sa.Column("market_exposure_dollars", DOLLARS, nullable=True),
        sa.Column("realized_pnl_dollars", DOLLARS, nullable=True),
        sa.Column("fees_paid_dollars", DOLLARS, nullable=True),
        sa.Column("total_traded_dollars", DOLLARS, nullable=True),
        sa.Column("last_updated_ts", TIME, nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "position_snapshots",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column("captured_at", TIME, nullable=False),
        *_position_columns(),
        _raw(),
        sa.PrimaryKeyConstraint(
            "account",
            "subaccount_number",
            "ticker",
            "captured_at",
            name=op.f("pk_position_snapshots"),
        ),
    )
    op.create_index(
        op.f("ix_position_snapshots_account_captured_at"),
        "position_snapshots",
        ["account", "captured_at"],
    )
    op.create_table(
        "archived_positions",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("ticker", sa.Text(), nullable=False),
        *_position_columns(),
        _raw(),
        *_synced(),
        sa.PrimaryKeyConstraint(
            "account", "subaccount_number", "ticker", name=op.f("pk_archived_positions")
        ),
    )
    op.create_table(
        "balance_snapshots",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("captured_at", TIME, nullable=False),
        sa.Column("balance_dollars", DOLLARS, nullable=True),
        sa.Column("portfolio_value_dollars", DOLLARS, nullable=True),
        sa.Column("updated_ts", sa.BigInteger(), nullable=True),
        _raw(),
        sa.PrimaryKeyConstraint(
            "account", "subaccount_number", "captured_at", name=op.f("pk_balance_snapshots")
        ),
    )
    op.create_table(
        "cash_movements",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("type", sa.Text(), nullable=True),
        sa.Column("amount_dollars", DOLLARS, nullable=True),
        sa.Column("fee_dollars", DOLLARS, nullable=True),
        sa.Column("from_subaccount", sa.Integer(), nullable=True),
        sa.Column("to_subaccount", sa.Integer(), nullable=True),
        sa.Column("created_time", TIME, nullable=True),
        sa.Column("finalized_time", TIME, nullable=True),
        _raw(),
        *_synced(),
        sa.PrimaryKeyConstraint("account", "kind", "id", name=op.f("pk_cash_movements")),
    )
    op.create_index(
        op.f("ix_cash_movements_account_created_time"),
        "cash_movements",
        ["account", "created_time"],
    )
    op.execute(POSITIONS_CURRENT)


def downgrade() -> None:
    op.execute("DROP VIEW positions_current")
    op.drop_table("cash_movements")
    op.drop_table("balance_snapshots")
    op.drop_table("archived_positions")
    op.drop_table("position_snapshots")
