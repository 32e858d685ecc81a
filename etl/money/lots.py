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
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.db.engine import connection, driver_cursor, stream_lock
from etl.db.models import pnl_lots
from etl.money.fifo import Lot, LotFill, Settled, lots_of

log = logging.getLogger(__name__)

LOCK = "pnl"  # the advisory lock of an account's rebuild (not a stream: no runs recorded)
CHUNK = 500  # marked markets read at once

_MARKS = sa.text(
    "SELECT subaccount_number, ticker, version FROM pnl_marks WHERE account = :account "
    "ORDER BY subaccount_number, ticker"
)
# The fills and settlements of a chunk of marked markets, read in one query each.
_FILLS = sa.text(
    """
    SELECT f.subaccount_number, f.ticker, f.fill_id, f.created_time, f.outcome_side, f.count_fp,
           f.yes_price_dollars, f.fee_cost
    FROM fills f
    JOIN unnest(CAST(:subs AS int[]), CAST(:tickers AS text[])) AS m(sub, ticker)
      ON f.subaccount_number = m.sub AND f.ticker = m.ticker
    WHERE f.account = :account
    ORDER BY f.subaccount_number, f.ticker, f.created_time, f.fill_id COLLATE "C"
    """
)
_SETTLEMENTS = sa.text(
    """
    SELECT s.subaccount_number, s.ticker, s.market_result, s.value, s.settled_time
    FROM settlements s
    JOIN unnest(CAST(:subs AS int[]), CAST(:tickers AS text[])) AS m(sub, ticker)
      ON s.subaccount_number = m.sub AND s.ticker = m.ticker
    WHERE s.account = :account
    """
)
_COLUMNS = tuple(c.name for c in pnl_lots.c)


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
    with stream_lock(engine, account, LOCK, wait=lock_wait), connection(engine) as conn:
        marks = conn.execute(_MARKS, {"account": account}).all()
        conn.commit()
        # A commit need not wait for its WAL to reach the disk: a commit lost to a crash
        # takes the mark's clearing with it, and the market is rebuilt again.
        conn.execute(sa.text("SET synchronous_commit TO OFF"))
        conn.commit()
        try:
            for chunk in (marks[i : i + CHUNK] for i in range(0, len(marks), CHUNK)):
                fills, settled, left_out = _read(conn, account, chunk)
                conn.commit()
                skipped += left_out
                for sub, ticker, version in chunk:
                    made = lots_of(fills.get((sub, ticker), []), settled.get((sub, ticker)))
                    _replace(conn, account, sub, ticker, version, made)
                    conn.commit()  # one transaction per market
                    markets, lots = markets + 1, lots + len(made)
        finally:
            conn.rollback()
            conn.execute(sa.text("RESET synchronous_commit"))
            conn.commit()
    if markets:
        log.info("P&L of %s: %d markets rebuilt (%d lots)", account, markets, lots)
    if skipped:
        log.warning(
            "P&L of %s: %d fills without a side, a count or a price were left out of the lots",
            account,
            skipped,
        )
    return Rebuilt(markets, lots, skipped)


def _read(
    conn: Connection, account: str, chunk: Sequence[Any]
) -> tuple[dict[tuple[int, str], list[LotFill]], dict[tuple[int, str], Settled], int]:
    """The fills and settlements of a chunk of marked markets. Read before the markets'
    transactions: a fill written meanwhile marks its market again (a new version), so the
    mark read here is not cleared and the market is rebuilt once more."""
    params = {
        "account": account,
        "subs": [sub for sub, _, _ in chunk],
        "tickers": [ticker for _, ticker, _ in chunk],
    }
    fills: dict[tuple[int, str], list[LotFill]] = {}
    skipped = 0
    for row in conn.execute(_FILLS, params):
        if row.outcome_side not in ("yes", "no") or None in (
            row.count_fp,
            row.yes_price_dollars,
            row.created_time,
        ):
            skipped += 1
            continue
        fills.setdefault((row.subaccount_number, row.ticker), []).append(
            LotFill(
                row.fill_id,
                row.created_time,
                row.outcome_side,
                row.count_fp,
                row.yes_price_dollars,
                row.fee_cost or Decimal(0),
            )
        )
    settled = {
        (row.subaccount_number, row.ticker): priced
        for row in conn.execute(_SETTLEMENTS, params)
        if (priced := _settled(row)) is not None
    }
    return fills, settled, skipped


def _replace(
    conn: Connection, account: str, sub: int, ticker: str, version: int, made: list[Lot]
) -> None:
    """The market's lots replaced and its mark cleared (if still of ``version``), in the
    caller's transaction: a DELETE, one COPY, a DELETE."""
    where = {"account": account, "sub": sub, "ticker": ticker}
    # Planned each time (prepare=False): a plan prepared while pnl_lots was small (a seq scan)
    # must not be reused once it has grown, as it would during a first rebuild.
    with driver_cursor(conn) as cur:
        cur.execute(
            "DELETE FROM pnl_lots WHERE account = %(account)s AND subaccount_number = %(sub)s "
            "AND ticker = %(ticker)s",
            where,
            prepare=False,
        )
        if made:
            with cur.copy(f"COPY pnl_lots ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
                for number, lot in enumerate(made):
                    row = _row(account, sub, ticker, number, lot)
                    copy.write_row([row[c] for c in _COLUMNS])
        cur.execute(
            "DELETE FROM pnl_marks WHERE account = %(account)s AND subaccount_number = %(sub)s "
            "AND ticker = %(ticker)s AND version = %(version)s",
            {**where, "version": version},
            prepare=False,
        )


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
