"""The simulated account's ledger: the fills its orders' executions make, and the settlements of
the markets that settle. Pure state; the exchange records into it, the app lists from it.

- A fill is recorded for each execution of an order (a partial fill is one fill; an order
  filled in several steps has several), with the order's price, the taker or maker side of
  that execution and its fee: the fills of an order add up to its ``fill_count_fp`` and, in
  cents, to its taker and maker fees.
- Fills created before the historical cutoff (``trades_created_ts``) are served only by
  ``/historical/fills``.
- A market that settles gives one settlement row per subaccount that held a position in it,
  by the money rules (YES positive, NO negative; a scalar result pays ``value`` cents per
  YES and 100 − ``value`` per NO). Archiving its event removes those rows from
  ``/portfolio/settlements`` for good, as the live API does.
"""

from __future__ import annotations

import base64
import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from etl.simulator.errors import ApiFault


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dollars(cents: int) -> str:
    return f"{Decimal(cents) / 100:.4f}"


@dataclass(frozen=True)
class SimFill:
    """One execution of an order."""

    fill_id: str
    order_id: str
    ticker: str
    side: str  # the order's legacy side and action
    action: str
    count: int
    price: int  # cents, for ``side``
    is_taker: bool
    fee: int  # cents
    created: datetime
    subaccount: int

    @property
    def yes_side(self) -> bool:
        """Whether this execution adds YES (buying yes, or selling no)."""
        return (self.side, self.action) in {("yes", "buy"), ("no", "sell")}

    @property
    def yes_price(self) -> int:
        return self.price if self.side == "yes" else 100 - self.price

    def render(self) -> dict[str, Any]:
        """The fill as ``GET /portfolio/fills`` sends it (2026 shape)."""
        body: dict[str, Any] = {
            "fill_id": self.fill_id,
            "trade_id": self.fill_id,
            "order_id": self.order_id,
            "ticker": self.ticker,
            "market_ticker": self.ticker,
            "outcome_side": "yes" if self.yes_side else "no",
            "book_side": "bid" if self.yes_side else "ask",
            "side": self.side,
            "action": self.action,
            "count_fp": f"{self.count}.00",
            "yes_price_dollars": _dollars(self.yes_price),
            "no_price_dollars": _dollars(100 - self.yes_price),
            "is_taker": self.is_taker,
            "fee_cost": _dollars(self.fee),
            "created_time": _rfc3339(self.created),
            "ts": int(self.created.timestamp()),
            "exchange_index": 0,
        }
        if self.subaccount:
            body["subaccount_number"] = self.subaccount
        return body

    def render_fill_message(self, post_position: int) -> dict[str, Any]:
        """The ``msg`` of the WebSocket ``fill`` message (KALSHI.md, "WebSocket"):
        ``trade_id`` and ``market_ticker``, no ``no_price_dollars``, times as ``ts`` and
        ``ts_ms``, the signed position after the fill; ``subaccount`` only when not 0."""
        message: dict[str, Any] = {
            "trade_id": self.fill_id,
            "order_id": self.order_id,
            "market_ticker": self.ticker,
            "exchange_index": 0,
            "is_taker": self.is_taker,
            "yes_price_dollars": _dollars(self.yes_price),
            "count_fp": f"{self.count}.00",
            "fee_cost": _dollars(self.fee),
            "outcome_side": "yes" if self.yes_side else "no",
            "book_side": "bid" if self.yes_side else "ask",
            "side": self.side,
            "action": self.action,
            "purchased_side": self.side if self.action == "buy" else _other(self.side),
            "ts": int(self.created.timestamp()),
            "ts_ms": round(self.created.timestamp() * 1000),
            "post_position_fp": f"{post_position}.00",
        }
        if self.subaccount:
            message["subaccount"] = self.subaccount
        return message


def _other(side: str) -> str:
    return "no" if side == "yes" else "yes"


@dataclass
class SimSettlement:
    """One market's settlement in one subaccount."""

    ticker: str
    event_ticker: str
    subaccount: int
    result: str  # yes | no | scalar
    value: int | None  # cents per YES contract (scalar), else 100 or 0
    yes_count: int
    no_count: int
    yes_cost: int  # cents
    no_cost: int
    fee: int  # cents: the market's trading fees in the subaccount
    settled: datetime
    archived: bool = False

    @property
    def revenue(self) -> int:
        per_yes = {"yes": 100, "no": 0}.get(self.result, self.value or 0)
        return self.yes_count * per_yes + self.no_count * (100 - per_yes)

    def render(self) -> dict[str, Any]:
        """The row as ``GET /portfolio/settlements`` sends it (no subaccount, no id)."""
        return {
            "ticker": self.ticker,
            "event_ticker": self.event_ticker,
            "exchange_index": 0,
            "market_result": self.result,
            "yes_count_fp": f"{self.yes_count}.00",
            "yes_total_cost_dollars": _dollars(self.yes_cost),
            "no_count_fp": f"{self.no_count}.00",
            "no_total_cost_dollars": _dollars(self.no_cost),
            "revenue": self.revenue,
            "value": self.value,
            "fee_cost": _dollars(self.fee),
            "settled_time": _rfc3339(self.settled),
        }


def _cursor(key: tuple[datetime, str]) -> str:
    return base64.urlsafe_b64encode(f"{key[0].isoformat()}|{key[1]}".encode()).decode()


def _uncursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, rest = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(stamp), rest
    except (ValueError, UnicodeDecodeError):
        raise ApiFault(400, "invalid_parameters", "cursor is not valid") from None


@dataclass(frozen=True)
class FillQuery:
    """The filters of ``GET /portfolio/fills`` and ``/historical/fills``."""

    ticker: str | None = None
    order_id: str | None = None
    min_ts: int | None = None  # compared with created_time
    max_ts: int | None = None
    subaccount: int | None = None
    limit: int = 100
    cursor: str | None = None


class Ledger:
    """Every fill and settlement of one simulated account."""

    def __init__(self) -> None:
        self._fills: dict[str, SimFill] = {}
        self._sorted: list[tuple[datetime, str]] = []  # (created, fill_id) ascending
        self._settlements: dict[tuple[int, str], SimSettlement] = {}
        # The signed position (YES positive) per (subaccount, ticker), after every fill.
        self._positions: dict[tuple[int, str], int] = {}
        # Called with each fill recorded and the position after it (the WebSocket feed).
        self.listeners: list[Callable[[SimFill, int], None]] = []
        self.version = 0  # bumped by every change (fills, settlements), for derived state

    def record(self, fill: SimFill) -> None:
        self.version += 1
        self._fills[fill.fill_id] = fill
        where = (fill.subaccount, fill.ticker)
        position = self._positions.get(where, 0) + (fill.count if fill.yes_side else -fill.count)
        self._positions[where] = position
        for listener in self.listeners:
            listener(fill, position)
        key = (fill.created, fill.fill_id)
        if not self._sorted or key > self._sorted[-1]:
            self._sorted.append(key)
        else:
            bisect.insort(self._sorted, key)

    def fills(self) -> Iterator[SimFill]:
        return iter(self._fills.values())

    def list_fills(
        self, query: FillQuery, *, cutoff: datetime | None, historical: bool, max_limit: int
    ) -> tuple[list[dict[str, Any]], str]:
        """A page of fills, newest first, keyset cursor; ``historical``: those created before
        ``cutoff`` (the others when not)."""
        if not 1 <= query.limit <= max_limit:
            raise ApiFault(400, "invalid_parameters", f"limit must be between 1 and {max_limit}")
        end = len(self._sorted)
        if query.cursor:
            end = bisect.bisect_left(self._sorted, _uncursor(query.cursor))
        found: list[SimFill] = []
        index = end - 1
        while index >= 0 and len(found) < query.limit:
            fill = self._fills[self._sorted[index][1]]
            index -= 1
            old = cutoff is not None and fill.created < cutoff
            if old != historical:
                continue
            stamp = fill.created.timestamp()
            if query.min_ts is not None and stamp < query.min_ts:
                break  # newest first: every later one is older still
            if query.max_ts is not None and stamp > query.max_ts:
                continue
            if query.ticker is not None and fill.ticker not in query.ticker.split(","):
                continue
            if query.order_id is not None and fill.order_id != query.order_id:
                continue
            if query.subaccount is not None and fill.subaccount != query.subaccount:
                continue
            found.append(fill)
        more = index >= 0 and len(found) == query.limit
        cursor = _cursor((found[-1].created, found[-1].fill_id)) if more else ""
        return [fill.render() for fill in found], cursor

    def settle(
        self, ticker: str, event_ticker: str, result: str, value: int | None, at: datetime
    ) -> list[SimSettlement]:
        """Settle ``ticker``: a row per subaccount that held a position or traded in it."""
        made = []
        for subaccount in sorted(
            {f.subaccount for f in self._fills.values() if f.ticker == ticker}
        ):
            held = [
                f for f in self._fills.values() if f.ticker == ticker and f.subaccount == subaccount
            ]
            net = sum(f.count if f.yes_side else -f.count for f in held)
            bought_yes = [f for f in held if f.yes_side]
            bought_no = [f for f in held if not f.yes_side]
            yes_count, no_count = max(net, 0), max(-net, 0)
            row = SimSettlement(
                ticker=ticker,
                event_ticker=event_ticker,
                subaccount=subaccount,
                result=result,
                value=value if result == "scalar" else (100 if result == "yes" else 0),
                yes_count=yes_count,
                no_count=no_count,
                yes_cost=_average_cost(bought_yes, yes_count, yes=True),
                no_cost=_average_cost(bought_no, no_count, yes=False),
                fee=sum(f.fee for f in held),
                settled=at,
            )
            self._settlements[(subaccount, ticker)] = row
            made.append(row)
        self.version += 1
        return made

    def archive(self, event_ticker: str) -> int:
        """The event moves to the historical tier: its settlements leave the live listing."""
        rows = [s for s in self._settlements.values() if s.event_ticker == event_ticker]
        for row in rows:
            row.archived = True
        return len(rows)

    def settlements(self, *, include_archived: bool = False) -> list[SimSettlement]:
        return [s for s in self._settlements.values() if include_archived or not s.archived]

    def list_settlements(
        self, *, subaccount: int | None, limit: int, cursor: str | None, max_limit: int
    ) -> tuple[list[dict[str, Any]], str]:
        """A page of the live settlements of ``subaccount`` (all when ``None``), newest first."""
        if not 1 <= limit <= max_limit:
            raise ApiFault(400, "invalid_parameters", f"limit must be between 1 and {max_limit}")
        rows = sorted(
            (
                s
                for s in self._settlements.values()
                if not s.archived and (subaccount is None or s.subaccount == subaccount)
            ),
            key=lambda s: (s.settled, s.ticker, s.subaccount),
            reverse=True,
        )
        start = int(cursor) if cursor else 0
        page = rows[start : start + limit]
        more = start + limit < len(rows)
        return [s.render() for s in page], str(start + limit) if more else ""


def _average_cost(fills: list[SimFill], held: int, *, yes: bool) -> int:
    """The cost in cents of ``held`` contracts at the average price of ``fills`` (that side's
    price: YES's for YES, NO's for NO)."""
    bought = sum(f.count for f in fills)
    if not held or not bought:
        return 0
    paid = sum(f.count * (f.yes_price if yes else 100 - f.yes_price) for f in fills)
    return round(paid * held / bought)
