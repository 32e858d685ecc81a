"""Our P&L against the numbers Kalshi computes itself (``verify``'s money section).

- A market's ``realized_pnl_dollars`` in Kalshi's positions (the archived row where the event
  is archived, else the latest snapshot) against ``pnl_by_market``: Kalshi does not publish
  whether it counts fees, so a market agrees when either our figure before fees or after fees
  is within a cent.
- A settlement row against the lots it closed: ``yes_count_fp``/``no_count_fp`` against the
  contracts our lots still held, and ``revenue`` against what those lots were paid.

Reported, never an exit code of its own: Kalshi's rule is not published, and a snapshot may
predate the latest fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

CENT = Decimal("0.01")


@dataclass(frozen=True)
class MoneyCheck:
    """How our P&L compares with Kalshi's own figures, and a few of the markets that differ."""

    markets_compared: int
    markets_differing: int
    market_examples: list[str]
    settlements_compared: int
    settlements_differing: int
    settlement_examples: list[str]


_AGAINST_POSITIONS = sa.text(
    """
    SELECT m.subaccount_number, m.ticker, m.realized_pnl_before_fees_dollars AS before_fees,
           m.realized_pnl_dollars AS after_fees, k.realized_pnl_dollars AS kalshi, k.source
    FROM pnl_by_market m
    JOIN LATERAL (
        (SELECT a.realized_pnl_dollars, 'archived' AS source FROM archived_positions a
         WHERE a.account = m.account AND a.subaccount_number = m.subaccount_number
           AND a.ticker = m.ticker)
        UNION ALL
        (SELECT p.realized_pnl_dollars, 'live' FROM position_snapshots p
         WHERE p.account = m.account AND p.subaccount_number = m.subaccount_number
           AND p.ticker = m.ticker ORDER BY p.captured_at DESC LIMIT 1)
        LIMIT 1
    ) k ON k.realized_pnl_dollars IS NOT NULL
    WHERE m.account = :account
    ORDER BY m.subaccount_number, m.ticker
    """
)

_AGAINST_SETTLEMENTS = sa.text(
    """
    SELECT s.subaccount_number, s.ticker, s.yes_count_fp, s.no_count_fp, s.revenue,
           coalesce(sum(l.quantity_fp) FILTER (WHERE l.side = 'yes'), 0) AS yes_held,
           coalesce(sum(l.quantity_fp) FILTER (WHERE l.side = 'no'), 0) AS no_held,
           coalesce(sum(l.quantity_fp * l.exit_price_dollars), 0) AS paid
    FROM settlements s
    LEFT JOIN pnl_lots l ON l.account = s.account AND l.subaccount_number = s.subaccount_number
        AND l.ticker = s.ticker AND l.close_type = 'settlement'
    WHERE s.account = :account
    GROUP BY s.subaccount_number, s.ticker, s.yes_count_fp, s.no_count_fp, s.revenue
    ORDER BY s.subaccount_number, s.ticker
    """
)


def check_money(conn: Connection, account: str, *, examples: int = 5) -> MoneyCheck:
    """Compare ``account``'s P&L with Kalshi's positions and settlements (see the module
    docstring)."""
    markets = conn.execute(_AGAINST_POSITIONS, {"account": account}).all()
    differing = [
        f"{r.ticker} (subaccount {r.subaccount_number}): Kalshi's {r.source} position says "
        f"${r.kalshi:,.2f}, ours ${r.before_fees:,.2f} before fees, ${r.after_fees:,.2f} after"
        for r in markets
        if abs(r.kalshi - r.before_fees) > CENT and abs(r.kalshi - r.after_fees) > CENT
    ]
    settled = conn.execute(_AGAINST_SETTLEMENTS, {"account": account}).all()
    wrong = []
    for r in settled:
        problems = []
        if r.yes_count_fp is not None and r.yes_count_fp != r.yes_held:
            problems.append(f"yes_count {r.yes_count_fp}, our lots held {r.yes_held}")
        if r.no_count_fp is not None and r.no_count_fp != r.no_held:
            problems.append(f"no_count {r.no_count_fp}, our lots held {r.no_held}")
        if r.revenue is not None and abs(Decimal(r.revenue) / 100 - r.paid) > CENT:
            problems.append(f"revenue ${r.revenue / 100:,.2f}, our lots were paid ${r.paid:,.2f}")
        if problems:
            wrong.append(f"{r.ticker} (subaccount {r.subaccount_number}): " + "; ".join(problems))
    return MoneyCheck(
        markets_compared=len(markets),
        markets_differing=len(differing),
        market_examples=differing[:examples],
        settlements_compared=len(settled),
        settlements_differing=len(wrong),
        settlement_examples=wrong[:examples],
    )
