"""``pnl_lots``, rebuilt for the markets marked in ``pnl_marks``.

A fill or settlement write marks its market in the same statement (:mod:`etl.db.write`), so
no change ever goes unmarked. :func:`rebuild_marked` then, under the account's ``pnl`` lock,
recomputes each marked market's lots from all of its fills and its settlement
(:mod:`etl.money.fifo`) and replaces them in one transaction per market, clearing the mark
only if it still has the version read: a market marked again meanwhile is rebuilt again. A
crash at any point leaves the mark, and readers never see half a market.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.db.engine import connection, stream_lock, transaction
from etl.db.models import pnl_lots
from etl.money.fifo import Lot, LotFill, Settled, lots_of

log = logging.getLogger(__name__)

LOCK = "pnl"  # the advisory lock of an account's rebuild (not a stream: no runs recorded)

_MARKS = sa.text(
    "SELECT subaccount_number, ticker, version FROM pnl_marks WHERE account = :account "
    "ORDER BY subaccount_number, ticker"
)
_FILLS = sa.text(
    """
    SELECT fill_id, created_time, outcome_side, count_fp, yes_price_dollars, fee_cost
    FROM fills WHERE account = :account AND subaccount_number = :sub AND ticker = :ticker
    ORDER BY created_time, fill_id COLLATE "C"
    """
)
_SETTLEMENT = sa.text(
    "SELECT market_result, value, settled_time FROM settlements "
    "WHERE account = :account AND subaccount_number = :sub AND ticker = :ticker"
)
_CLEAR = sa.text(
    "DELETE FROM pnl_marks WHERE account = :account AND subaccount_number = :sub "
    "AND ticker = :ticker AND version = :version"
)


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild did."""

    markets: int
    lots: int
    skipped_fills: int  # fills without a side, a count or a price: left out of the lots


def rebuild_marked(engine: Engine, account: str, *, lock_wait: float = 30.0) -> Rebuilt:
    """Rebuild the lots of every marked market of ``account`` (see the module docstring).

    Raises:
        LockBusyError: another rebuild of ``account`` holds the lock after ``lock_wait``.
    """
    markets = lots = skipped = 0
    with connection(engine) as conn:  # nothing marked (the usual case): no lock to take
        if not conn.execute(_MARKS, {"account": account}).first():
            return Rebuilt(0, 0, 0)
    with stream_lock(engine, account, LOCK, wait=lock_wait):
        with connection(engine) as conn:
            marks = conn.execute(_MARKS, {"account": account}).all()
        for sub, ticker, version in marks:
            with transaction(engine) as tx:
                made, left_out = _rebuild(tx, account, sub, ticker)
                tx.execute(
                    _CLEAR, {"account": account, "sub": sub, "ticker": ticker, "version": version}
                )
            markets, lots, skipped = markets + 1, lots + made, skipped + left_out
    if markets:
        log.info("P&L of %s: %d markets rebuilt (%d lots)", account, markets, lots)
    if skipped:
        log.warning(
            "P&L of %s: %d fills without a side, a count or a price were left out of the lots",
            account,
            skipped,
        )
    return Rebuilt(markets, lots, skipped)


def _rebuild(conn: Connection, account: str, sub: int, ticker: str) -> tuple[int, int]:
    where = {"account": account, "sub": sub, "ticker": ticker}
    fills: list[LotFill] = []
    skipped = 0
    for row in conn.execute(_FILLS, where):
        if row.outcome_side not in ("yes", "no") or None in (
            row.count_fp,
            row.yes_price_dollars,
            row.created_time,
        ):
            skipped += 1
            continue
        fills.append(
            LotFill(
                row.fill_id,
                row.created_time,
                row.outcome_side,
                row.count_fp,
                row.yes_price_dollars,
                row.fee_cost or Decimal(0),
            )
        )
    settled = _settled(conn.execute(_SETTLEMENT, where).first())
    made = lots_of(fills, settled)
    conn.execute(
        sa.delete(pnl_lots).where(
            pnl_lots.c.account == account,
            pnl_lots.c.subaccount_number == sub,
            pnl_lots.c.ticker == ticker,
        )
    )
    if made:
        conn.execute(
            sa.insert(pnl_lots), [_row(account, sub, ticker, n, lot) for n, lot in enumerate(made)]
        )
    return len(made), skipped


def _settled(row: Any) -> Settled | None:
    """The settlement's YES payout in dollars: 1 (yes), 0 (no), ``value``/100 (scalar)."""
    if row is None or row.settled_time is None:
        return None
    if row.market_result == "yes":
        payout = Decimal(1)
    elif row.market_result == "no":
        payout = Decimal(0)
    elif row.market_result == "scalar" and row.value is not None:
        payout = Decimal(row.value) / 100
    else:
        return None  # a result we cannot price: the lots stay open (and `pnl` says so)
    return Settled(row.settled_time, payout)


def _row(account: str, sub: int, ticker: str, number: int, lot: Lot) -> dict[str, Any]:
    closed = lot.exit_price is not None
    return {
        "account": account,
        "subaccount_number": sub,
        "ticker": ticker,
        "lot_number": number,
        "side": lot.side,
        "quantity_fp": lot.quantity,
        "open_time": lot.open_time,
        "close_time": lot.close_time,
        "entry_price_dollars": lot.entry_price,
        "exit_price_dollars": lot.exit_price,
        "open_fees_dollars": lot.open_fees,
        "close_fees_dollars": lot.close_fees if closed else None,
        "realized_pnl_without_fees_dollars": lot.realized_without_fees,
        "realized_pnl_with_fees_dollars": lot.realized_with_fees,
        "close_type": lot.close_type,
        "open_fill_id": lot.opened_by,
        "close_fill_id": lot.closed_by,
    }
