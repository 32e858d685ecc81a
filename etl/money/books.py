"""The cash check (CONTRACT.md, ``kalshi-etl books``): does the balance move exactly by the
movements we hold?

residual = Σ latest balance − Σ balance at ``since`` (0 without it: the whole history)
           − [fill cash flows − fill fees + settlement revenue + applied deposits (amount −
              fee) − applied withdrawals (amount + fee)],

over every subaccount of the account, movements dated by fill ``created_time``,
``settled_time`` and ``finalized_time`` in (since, the latest balance snapshot's
``captured_at``]; transfers between subaccounts net out. A fill's cash flow follows the money
rules: adding a side pays that side's price per contract, and each contract that closes the
side held (a YES/NO pair) pays $1 back, so its flow needs the position before it (a window
function over the market's fills in FIFO order).

On the simulator the residual is 0.00 exactly. On a real account a residual is a gap — a
fill never synced, a settlement archived before it was captured — and :func:`explain` names
the movements that would close it: orders whose fills do not add up to their fill count, and
markets whose fills do not add up to the position Kalshi reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

ZERO = Decimal(0)


def dollars(value: Decimal | None) -> str:
    """``-$1,234.50`` (``$0.00`` for a zero of either sign; ``n/a`` for ``None``)."""
    if value is None:
        return "n/a"
    return f"{'-' if value < 0 else ''}${abs(value):,.2f}"


@dataclass(frozen=True)
class Books:
    """The terms of the check, in dollars."""

    account: str
    since: datetime | None
    until: datetime | None  # the latest balance snapshot's time (None: no balance yet)
    balance_now: Decimal
    balance_then: Decimal
    fill_flows: Decimal  # before fees
    fees: Decimal
    settlements: Decimal
    deposits: Decimal
    withdrawals: Decimal

    @property
    def movements(self) -> Decimal:
        return self.fill_flows - self.fees + self.settlements + self.deposits - self.withdrawals

    @property
    def residual(self) -> Decimal:
        return self.balance_now - self.balance_then - self.movements


_BALANCES = sa.text(
    """
    SELECT coalesce(sum(balance_dollars), 0), max(captured_at) FROM (
        SELECT DISTINCT ON (subaccount_number) balance_dollars, captured_at
        FROM balance_snapshots
        WHERE account = :account AND (CAST(:at AS timestamptz) IS NULL OR captured_at <= :at)
        ORDER BY subaccount_number, captured_at DESC
    ) latest
    """
)

# Each fill's cash flow: −count × the price of the side it adds, + the contracts it closes.
_FILL_FLOWS = sa.text(
    """
    WITH signed AS (
        SELECT created_time, fee_cost, count_fp,
               CASE WHEN outcome_side = 'yes' THEN yes_price_dollars
                    ELSE coalesce(no_price_dollars, 1 - yes_price_dollars) END AS price,
               CASE WHEN outcome_side = 'yes' THEN count_fp ELSE -count_fp END AS q,
               coalesce(sum(CASE WHEN outcome_side = 'yes' THEN count_fp ELSE -count_fp END)
                   OVER (PARTITION BY subaccount_number, ticker
                         ORDER BY created_time, fill_id COLLATE "C"
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
        FROM fills
        WHERE account = :account AND outcome_side IN ('yes', 'no') AND created_time <= :until
    )
    SELECT coalesce(sum(-count_fp * price
                        + CASE WHEN sign(q) <> sign(before) AND before <> 0
                               THEN least(count_fp, abs(before)) ELSE 0 END), 0),
           coalesce(sum(fee_cost), 0)
    FROM signed
    WHERE CAST(:since AS timestamptz) IS NULL OR created_time > :since
    """
)

_SETTLED = sa.text(
    """
    SELECT round(coalesce(sum(revenue), 0) / 100.0, 2) FROM settlements
    WHERE account = :account AND settled_time <= :until
      AND (CAST(:since AS timestamptz) IS NULL OR settled_time > :since)
    """
)

_CASH = sa.text(
    """
    SELECT coalesce(sum(amount_dollars - coalesce(fee_dollars, 0))
                        FILTER (WHERE kind = 'deposit'), 0),
           coalesce(sum(amount_dollars + coalesce(fee_dollars, 0))
                        FILTER (WHERE kind = 'withdrawal'), 0)
    FROM cash_movements
    WHERE account = :account AND status = 'applied'
      AND coalesce(finalized_time, created_time) <= :until
      AND (CAST(:since AS timestamptz) IS NULL OR coalesce(finalized_time, created_time) > :since)
    """
)


def books(conn: Connection, account: str, *, since: datetime | None = None) -> Books:
    """The terms of ``account``'s cash check (see the module docstring)."""
    now, until = conn.execute(_BALANCES, {"account": account, "at": None}).one()
    then = ZERO
    if since is not None:
        then = conn.execute(_BALANCES, {"account": account, "at": since}).one()[0]
    window = {"account": account, "since": since, "until": until}
    flows, fees = (ZERO, ZERO)
    settled = deposits = withdrawals = ZERO
    if until is not None:
        flows, fees = conn.execute(_FILL_FLOWS, window).one()
        settled = conn.execute(_SETTLED, window).scalar_one()
        deposits, withdrawals = conn.execute(_CASH, window).one()
    return Books(
        account=account,
        since=since,
        until=until,
        balance_now=Decimal(now),
        balance_then=Decimal(then),
        fill_flows=Decimal(flows),
        fees=Decimal(fees),
        settlements=Decimal(settled),
        deposits=Decimal(deposits),
        withdrawals=Decimal(withdrawals),
    )


@dataclass(frozen=True)
class Gap:
    """A movement the tables lack, as far as the other tables can tell."""

    what: str
    dollars: Decimal  # its size, as well as it is known (0 when unknown)


_ORDER_GAPS = sa.text(
    """
    SELECT o.order_id, o.ticker, o.fill_count_fp - coalesce(f.filled, 0) AS missing,
           o.taker_fill_cost_dollars + o.maker_fill_cost_dollars - coalesce(f.cost, 0) AS cost,
           o.taker_fees_dollars + coalesce(o.maker_fees_dollars, 0) - coalesce(f.fees, 0) AS fees
    FROM orders o
    LEFT JOIN (
        SELECT order_id, sum(count_fp) AS filled, coalesce(sum(fee_cost), 0) AS fees,
               sum(count_fp * CASE WHEN outcome_side = 'yes' THEN yes_price_dollars
                                   ELSE coalesce(no_price_dollars, 1 - yes_price_dollars) END)
                   AS cost
        FROM fills WHERE account = :account GROUP BY order_id
    ) f USING (order_id)
    WHERE o.account = :account AND o.fill_count_fp > coalesce(f.filled, 0)
    ORDER BY abs(o.taker_fill_cost_dollars + o.maker_fill_cost_dollars - coalesce(f.cost, 0))
             DESC
    LIMIT :limit
    """
)

_UNSETTLED = sa.text(
    """
    SELECT l.subaccount_number, l.ticker, sum(l.quantity_fp * l.entry_price_dollars) AS cost
    FROM pnl_lots l
    WHERE l.account = :account AND l.close_time IS NULL
      AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.account = l.account
                      AND s.subaccount_number = l.subaccount_number AND s.ticker = l.ticker)
      AND (EXISTS (SELECT 1 FROM archived_positions a WHERE a.account = l.account
                   AND a.subaccount_number = l.subaccount_number AND a.ticker = l.ticker)
           OR (SELECT p.position_fp FROM position_snapshots p WHERE p.account = l.account
               AND p.subaccount_number = l.subaccount_number AND p.ticker = l.ticker
               ORDER BY p.captured_at DESC LIMIT 1) = 0)
    GROUP BY l.subaccount_number, l.ticker
    ORDER BY 3 DESC
    LIMIT :limit
    """
)


def unsettled_markets(
    conn: Connection, account: str, *, limit: int | None = None
) -> list[sa.Row[Any]]:
    """The markets (``subaccount_number, ticker, cost``) whose lots are still open although
    Kalshi reports them closed or archived, and no settlement was captured: costliest first."""
    return list(conn.execute(_UNSETTLED, {"account": account, "limit": limit}).all())


def explain(conn: Connection, account: str, *, limit: int = 5) -> list[Gap]:
    """The movements most likely missing: fills of orders that do not add up to the order's
    fill count (with the order's cost and fees they lack), and markets whose lots are open
    although Kalshi reports them closed or archived (a settlement never captured)."""
    gaps = []
    for row in conn.execute(_ORDER_GAPS, {"account": account, "limit": limit}):
        gaps.append(
            Gap(
                f"order {row.order_id} ({row.ticker}): {row.missing} contracts filled without "
                f"a fill row (about ${row.cost:,.2f} of trades, ${row.fees:,.2f} of fees)",
                Decimal(row.cost),
            )
        )
    for row in unsettled_markets(conn, account, limit=limit):
        gaps.append(
            Gap(
                f"market {row.ticker} (subaccount {row.subaccount_number}): closed or archived "
                f"at Kalshi but no settlement captured (open cost ${row.cost:,.2f})",
                Decimal(row.cost),
            )
        )
    return gaps
