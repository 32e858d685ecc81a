"""Money: FIFO lots and the views over them.

- ``pnl_lots``: one row per FIFO-matched lot (Kalshi's tax-export columns), per (account,
  subaccount, market), numbered in the market's FIFO order; open lots have the ``close_*``,
  ``exit_*`` and ``realized_*`` columns NULL.
- ``pnl_marks``: the markets whose fills or settlements changed since their lots were last
  built, marked in the transaction of the change (``version`` grows with every mark, so a
  rebuild clears only the mark it read).
- views ``pnl_by_market`` and ``pnl_daily``.

Every market that already has fills or a settlement is marked, so the first rebuild after
the upgrade builds them all.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DOLLARS = sa.Numeric(precision=18, scale=6)
CONTRACTS = sa.Numeric(precision=18, scale=2)
TIME = sa.TIMESTAMP(timezone=True)

PNL_BY_MARKET = """
CREATE VIEW pnl_by_market AS
WITH traded AS (
    SELECT account, subaccount_number, ticker, sum(count_fp) AS contracts_traded_fp,
           coalesce(sum(fee_cost), 0) AS fees_dollars
    FROM fills GROUP BY account, subaccount_number, ticker
), lots AS (
    SELECT account, subaccount_number, ticker,
           coalesce(sum(realized_pnl_with_fees_dollars), 0) AS realized_pnl_dollars,
           coalesce(sum(realized_pnl_without_fees_dollars), 0)
               AS realized_pnl_before_fees_dollars,
           coalesce(sum(CASE WHEN close_time IS NULL THEN
                    CASE WHEN side = 'yes' THEN quantity_fp ELSE -quantity_fp END END), 0)
               AS open_position_fp,
           round(coalesce(sum(quantity_fp * entry_price_dollars)
                          FILTER (WHERE close_time IS NULL), 0), 6) AS open_cost_dollars
    FROM pnl_lots GROUP BY account, subaccount_number, ticker
), markets AS (
    SELECT account, subaccount_number, ticker FROM traded
    UNION SELECT account, subaccount_number, ticker FROM lots
)
SELECT m.account, m.subaccount_number, m.ticker,
       coalesce(s.event_ticker, regexp_replace(m.ticker, '-[^-]*$', '')) AS event_ticker,
       coalesce(t.contracts_traded_fp, 0) AS contracts_traded_fp,
       coalesce(t.fees_dollars, 0) AS fees_dollars,
       coalesce(l.realized_pnl_dollars, 0) AS realized_pnl_dollars,
       coalesce(l.realized_pnl_before_fees_dollars, 0) AS realized_pnl_before_fees_dollars,
       coalesce(l.open_position_fp, 0) AS open_position_fp,
       coalesce(l.open_cost_dollars, 0) AS open_cost_dollars,
       s.market_result
FROM markets m
LEFT JOIN traded t USING (account, subaccount_number, ticker)
LEFT JOIN lots l USING (account, subaccount_number, ticker)
LEFT JOIN settlements s USING (account, subaccount_number, ticker)
"""

PNL_DAILY = """
CREATE VIEW pnl_daily AS
WITH realized AS (
    SELECT account, (close_time AT TIME ZONE 'UTC')::date AS day,
           sum(realized_pnl_with_fees_dollars) AS realized_pnl_dollars
    FROM pnl_lots WHERE close_time IS NOT NULL GROUP BY 1, 2
), fees AS (
    SELECT account, (created_time AT TIME ZONE 'UTC')::date AS day,
           coalesce(sum(fee_cost), 0) AS fees_dollars
    FROM fills WHERE created_time IS NOT NULL GROUP BY 1, 2
)
SELECT account, day,
       coalesce(r.realized_pnl_dollars, 0) AS realized_pnl_dollars,
       coalesce(f.fees_dollars, 0) AS fees_dollars,
       sum(coalesce(r.realized_pnl_dollars, 0))
           OVER (PARTITION BY account ORDER BY day) AS cumulative_realized_pnl_dollars
FROM realized r FULL JOIN fees f USING (account, day)
"""


def upgrade() -> None:
    op.create_table(
        "pnl_lots",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column("lot_number", sa.Integer(), nullable=False),
        sa.Column("side", sa.Text(), nullable=False),
        sa.Column("quantity_fp", CONTRACTS, nullable=False),
        sa.Column("open_time", TIME, nullable=True),
        sa.Column("close_time", TIME, nullable=True),
        sa.Column("entry_price_dollars", DOLLARS, nullable=False),
        sa.Column("exit_price_dollars", DOLLARS, nullable=True),
        sa.Column("open_fees_dollars", DOLLARS, nullable=False),
        sa.Column("close_fees_dollars", DOLLARS, nullable=True),
        sa.Column("realized_pnl_without_fees_dollars", DOLLARS, nullable=True),
        sa.Column("realized_pnl_with_fees_dollars", DOLLARS, nullable=True),
        sa.Column("close_type", sa.Text(), nullable=True),
        sa.Column("open_fill_id", sa.Text(), nullable=False),
        sa.Column("close_fill_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint(
            "account", "subaccount_number", "ticker", "lot_number", name=op.f("pk_pnl_lots")
        ),
    )
    op.create_index(op.f("ix_pnl_lots_account_close_time"), "pnl_lots", ["account", "close_time"])
    op.create_index(
        op.f("ix_fills_account_subaccount_number_ticker"),
        "fills",
        ["account", "subaccount_number", "ticker"],
    )
    op.execute("CREATE SEQUENCE pnl_mark_seq")
    op.create_table(
        "pnl_marks",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("subaccount_number", sa.Integer(), nullable=False),
        sa.Column("ticker", sa.Text(), nullable=False),
        sa.Column(
            "version",
            sa.BigInteger(),
            server_default=sa.text("nextval('pnl_mark_seq')"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "account", "subaccount_number", "ticker", name=op.f("pk_pnl_marks")
        ),
    )
    op.execute(
        "INSERT INTO pnl_marks (account, subaccount_number, ticker) "
        "SELECT account, subaccount_number, ticker FROM fills "
        "UNION SELECT account, subaccount_number, ticker FROM settlements"
    )
    op.execute(PNL_BY_MARKET)
    op.execute(PNL_DAILY)


def downgrade() -> None:
    op.execute("DROP VIEW pnl_daily")
    op.execute("DROP VIEW pnl_by_market")
    op.drop_table("pnl_marks")
    op.execute("DROP SEQUENCE pnl_mark_seq")
    op.drop_index(op.f("ix_fills_account_subaccount_number_ticker"), table_name="fills")
    op.drop_table("pnl_lots")
