"""``pnl_by_market`` reads one market's rows through the indexes.

Revision 0007's view aggregated every fill of every account before any filter could apply (its
aggregate was referenced twice, so PostgreSQL materialized it): asking for one market cost as
much as asking for all of them. Here the markets are those of the fills (every lot comes from a
fill), each aggregate is referenced once, and a filter on the account or the market reaches
both through the ``(account, subaccount_number, ticker)`` indexes. Same columns, same meaning.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 23:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PNL_BY_MARKET = """
CREATE VIEW pnl_by_market AS
SELECT t.account, t.subaccount_number, t.ticker,
       coalesce(s.event_ticker, regexp_replace(t.ticker, '-[^-]*$', '')) AS event_ticker,
       t.contracts_traded_fp, t.fees_dollars,
       coalesce(l.realized_pnl_dollars, 0) AS realized_pnl_dollars,
       coalesce(l.realized_pnl_before_fees_dollars, 0) AS realized_pnl_before_fees_dollars,
       coalesce(l.open_position_fp, 0) AS open_position_fp,
       coalesce(l.open_cost_dollars, 0) AS open_cost_dollars,
       s.market_result
FROM (
    SELECT account, subaccount_number, ticker, sum(count_fp) AS contracts_traded_fp,
           coalesce(sum(fee_cost), 0) AS fees_dollars
    FROM fills GROUP BY account, subaccount_number, ticker
) t
LEFT JOIN (
    SELECT account, subaccount_number, ticker,
           sum(realized_pnl_with_fees_dollars) AS realized_pnl_dollars,
           sum(realized_pnl_without_fees_dollars) AS realized_pnl_before_fees_dollars,
           sum(CASE WHEN close_time IS NULL THEN
                    CASE WHEN side = 'yes' THEN quantity_fp ELSE -quantity_fp END END)
               AS open_position_fp,
           round(sum(quantity_fp * entry_price_dollars) FILTER (WHERE close_time IS NULL), 6)
               AS open_cost_dollars
    FROM pnl_lots GROUP BY account, subaccount_number, ticker
) l ON l.account = t.account AND l.subaccount_number = t.subaccount_number AND l.ticker = t.ticker
LEFT JOIN settlements s
  ON s.account = t.account AND s.subaccount_number = t.subaccount_number AND s.ticker = t.ticker
"""


def upgrade() -> None:
    op.execute("DROP VIEW pnl_by_market")
    op.execute(PNL_BY_MARKET)


def downgrade() -> None:
    """Nothing to undo: the view means the same at revision 0007 (only slower there), and
    0007's downgrade drops it."""
