"""The simulated account's money: positions, balances and cash movements, by the money rules
(KALSHI.md, "Money rules"). Pure state, derived from the ledger's fills and settlements plus
the cash movements recorded here, and recomputed when any of them changed.

- A market's position per subaccount is signed (YES positive, NO negative). A fill on the
  side held (or from flat) opens a lot at that side's price; a fill on the other side closes
  lots first in, first out at the held side's price (100 − the price paid for the other side:
  a YES/NO pair nets to $1), and what is left opens lots on the other side. A settlement
  closes every lot at its side's payout (100 or 0; ``value`` per YES and 100 − ``value`` per
  NO on a scalar). ``market_exposure_dollars`` is the cost of the open lots,
  ``realized_pnl_dollars`` what closed lots made (fees excluded), ``fees_paid_dollars`` the
  fills' fees, ``total_traded_dollars`` what every fill paid for the side it bought.
- A subaccount's balance moves exactly by the same rules: each fill pays its side's price per
  contract and receives $1 per pair it closes, less its fee; a settlement pays its
  ``revenue``; an applied deposit adds its amount less its fee, an applied withdrawal takes its
  amount plus its fee, a transfer moves its amount between two subaccounts. Every balance
  starts at 0 (the history opens with a deposit), so the books balance from the first cent.
- Archiving an event moves its markets' positions from ``/portfolio/positions`` to
  ``/historical/positions``.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from etl.simulator.errors import ApiFault
from etl.simulator.ledger import Ledger, SimFill, SimSettlement

CASH_KINDS = ("deposit", "withdrawal", "transfer")


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dollars(cents: int) -> str:
    return f"{Decimal(cents) / 100:.4f}"


@dataclass
class SimPosition:
    """One market's position in one subaccount (amounts in cents)."""

    subaccount: int
    ticker: str
    event_ticker: str
    position: int = 0  # signed: YES positive
    lots: deque[list[int]] = field(default_factory=deque)  # [count, entry price of the side]
    exposure: int = 0
    realized: int = 0
    fees: int = 0
    traded: int = 0
    updated: datetime | None = None
    settled: bool = False

    def render(self) -> dict[str, Any]:
        """The position as ``GET /portfolio/positions`` lists it in ``market_positions``."""
        return {
            "ticker": self.ticker,
            "exchange_index": 0,
            "position_fp": f"{self.position}.00",
            "market_exposure_dollars": _dollars(self.exposure),
            "realized_pnl_dollars": _dollars(self.realized),
            "fees_paid_dollars": _dollars(self.fees),
            "total_traded_dollars": _dollars(self.traded),
            "last_updated_ts": _rfc3339(self.updated) if self.updated else None,
        }

    def render_message(self) -> dict[str, Any]:
        """The ``msg`` of the WebSocket ``market_position`` message (no time, no exchange)."""
        message: dict[str, Any] = {
            "user_id": "sim-user",
            "market_ticker": self.ticker,
            "position_fp": f"{self.position}.00",
            "position_cost_dollars": _dollars(self.exposure),
            "realized_pnl_dollars": _dollars(self.realized),
            "fees_paid_dollars": _dollars(self.fees),
            "position_fee_cost_dollars": _dollars(self.fees),
            "volume_fp": f"{sum(count for count, _ in self.lots)}.00",
        }
        if self.subaccount:
            message["subaccount"] = self.subaccount
        return message

    def fill(self, fill: SimFill) -> int:
        """Apply ``fill``; returns its cash flow in cents (fee included)."""
        yes = fill.yes_side
        price = fill.yes_price if yes else 100 - fill.yes_price
        sign = 1 if yes else -1
        cash = -fill.count * price - fill.fee
        left = fill.count
        while left and self.position * sign < 0:  # closes the other side first
            lot = self.lots[0]
            closed = min(left, lot[0])
            exit_price = 100 - price  # the held side's price: a pair nets to $1
            self.realized += closed * (exit_price - lot[1])
            self.exposure -= closed * lot[1]
            cash += closed * 100
            lot[0] -= closed
            if not lot[0]:
                self.lots.popleft()
            self.position += sign * closed
            left -= closed
        if left:
            self.lots.append([left, price])
            self.exposure += left * price
            self.position += sign * left
        self.fees += fill.fee
        self.traded += fill.count * price
        self.updated = fill.created
        return cash

    def settle(self, row: SimSettlement) -> int:
        """Close every lot at its side's payout; returns the revenue in cents."""
        yes_payout = row.value if row.value is not None else 0
        payout = yes_payout if self.position > 0 else 100 - yes_payout
        revenue = abs(self.position) * payout
        for count, entry in self.lots:
            self.realized += count * (payout - entry)
        self.lots.clear()
        self.position = self.exposure = 0
        self.settled = True
        self.updated = row.settled
        return revenue


@dataclass
class SimCash:
    """One deposit, withdrawal or transfer (cents)."""

    kind: str
    id: str
    amount: int
    created: datetime
    status: str = "applied"
    type: str = "ach"
    fee: int = 0
    from_subaccount: int | None = None
    to_subaccount: int | None = None
    finalized: datetime | None = None

    def render(self) -> dict[str, Any]:
        if self.kind == "transfer":
            return {
                "transfer_id": self.id,
                "from_subaccount": self.from_subaccount,
                "to_subaccount": self.to_subaccount,
                "amount_cents": self.amount,
                "created_ts": int(self.created.timestamp()),
                "exchange_index": 0,
            }
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "type": self.type,
            "amount_cents": self.amount,
            "fee_cents": self.fee,
            "created_ts": int(self.created.timestamp()),
        }
        if self.finalized is not None:
            body["finalized_ts"] = int(self.finalized.timestamp())
        return body

    def applied_to(self, subaccount: int) -> int:
        """What this movement did to ``subaccount``'s balance, in cents."""
        if self.kind == "transfer":
            moved = (self.to_subaccount == subaccount) - (self.from_subaccount == subaccount)
            return moved * self.amount
        if self.status != "applied" or subaccount != 0:
            return 0
        return self.amount - self.fee if self.kind == "deposit" else -(self.amount + self.fee)


@dataclass(frozen=True)
class Books:
    """Positions and balances as of the ledger's and the cash's latest change."""

    positions: dict[tuple[int, str], SimPosition]
    balances: dict[int, int]
    updated: dict[int, datetime]


class Money:
    """The account's money over one :class:`Ledger` (see the module docstring)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.cash: dict[tuple[str, str], SimCash] = {}
        self.archived_events: set[str] = set()
        self._numbers = itertools.count(1)
        self._books: Books | None = None
        self._seen = -1  # the ledger's version the books reflect
        self._last: datetime | None = None  # the newest event the books reflect
        ledger.listeners.append(self._fill)

    def _fill(self, fill: SimFill, _after: int) -> None:
        """A fill as trading makes it: applied to the books at once when it is the newest
        event (the usual case), else the books are recomputed when next asked for."""
        books = self._books
        if books is None or self._seen != self.ledger.version - 1:
            self._books = None
            return
        if self._last is not None and fill.created < self._last:
            self._books = None
            return
        where = (fill.subaccount, fill.ticker)
        position = books.positions.get(where)
        if position is None:
            event = fill.ticker.rsplit("-", 1)[0]
            position = books.positions[where] = SimPosition(fill.subaccount, fill.ticker, event)
        books.balances[fill.subaccount] = books.balances.get(fill.subaccount, 0) + position.fill(
            fill
        )
        books.updated[fill.subaccount] = fill.created
        self._seen, self._last = self.ledger.version, fill.created

    # -- changes --------------------------------------------------------------------------

    def move(self, kind: str, amount: int, at: datetime, **fields: Any) -> SimCash:
        """Record a deposit, withdrawal or transfer of ``amount`` cents at ``at``."""
        assert kind in CASH_KINDS
        ident = f"{kind[:3]}-{next(self._numbers):06d}"
        movement = SimCash(kind=kind, id=ident, amount=amount, created=at, **fields)
        if movement.status in ("applied", "failed", "returned") and kind != "transfer":
            movement.finalized = movement.finalized or at
        self.cash[(kind, ident)] = movement
        self._books = None
        return movement

    def finalize(self, kind: str, ident: str, status: str, at: datetime) -> SimCash:
        """A pending deposit or withdrawal is applied (or fails) at ``at``."""
        movement = self.cash[(kind, ident)]
        movement.status, movement.finalized = status, at
        self._books = None
        return movement

    def archive(self, event_ticker: str) -> None:
        self.archived_events.add(event_ticker)

    # -- state ----------------------------------------------------------------------------

    def books(self) -> Books:
        """Positions and balances, recomputed when the ledger or the cash changed."""
        if self._books is None or self._seen != self.ledger.version:
            self._books, self._seen = self._compute(), self.ledger.version
        return self._books

    def _compute(self) -> Books:
        positions: dict[tuple[int, str], SimPosition] = {}
        balances: dict[int, int] = {0: 0}
        updated: dict[int, datetime] = {}
        events: list[tuple[datetime, int, str, Any]] = [
            *((f.created, 0, f.fill_id, f) for f in self.ledger.fills()),
            *((s.settled, 1, s.ticker, s) for s in self.ledger.settlements(include_archived=True)),
            *((c.created, 2, c.id, c) for c in self.cash.values()),
        ]
        ordered = sorted(events, key=lambda e: e[:3])
        self._last = ordered[-1][0] if ordered else None
        for at, kind, _, item in ordered:
            if kind == 2:
                for subaccount in {0, item.from_subaccount, item.to_subaccount} - {None}:
                    moved = item.applied_to(subaccount)
                    if moved:
                        balances[subaccount] = balances.get(subaccount, 0) + moved
                        updated[subaccount] = item.finalized or at
                continue
            where = (item.subaccount, item.ticker)
            position = positions.get(where)
            if position is None:
                event = item.ticker.rsplit("-", 1)[0]
                position = positions[where] = SimPosition(item.subaccount, item.ticker, event)
            moved = position.fill(item) if kind == 0 else position.settle(item)
            balances[item.subaccount] = balances.get(item.subaccount, 0) + moved
            updated[item.subaccount] = at
        return Books(positions, balances, updated)

    def positions(self, *, archived: bool) -> list[SimPosition]:
        """The live positions (``archived`` False) or those of archived events."""
        return [
            p
            for p in self.books().positions.values()
            if (p.event_ticker in self.archived_events) == archived
        ]

    # -- listings -------------------------------------------------------------------------

    def list_positions(
        self,
        *,
        subaccount: int,
        settlement_status: str,
        archived: bool,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[dict[str, Any]], str]:
        """A page of ``/portfolio/positions`` (``archived`` False) or
        ``/historical/positions`` of ``subaccount``, by ticker."""
        if not 1 <= limit <= 1000:
            raise ApiFault(400, "invalid_parameters", "limit must be between 1 and 1000")
        if settlement_status not in ("unsettled", "settled", "all"):
            raise ApiFault(400, "invalid_parameters", "unknown settlement_status")
        rows = sorted(
            (
                p
                for p in self.positions(archived=archived)
                if p.subaccount == subaccount
                and (
                    archived
                    or settlement_status == "all"
                    or p.settled == (settlement_status == "settled")
                )
            ),
            key=lambda p: p.ticker,
        )
        return _page([p.render() for p in rows], limit, cursor)

    def balance(self, subaccount: int) -> dict[str, Any]:
        """``GET /portfolio/balance`` of ``subaccount``."""
        books = self.books()
        cents = books.balances.get(subaccount, 0)
        exposure = sum(p.exposure for p in books.positions.values() if p.subaccount == subaccount)
        stamp = books.updated.get(subaccount)
        return {
            "balance": cents,
            "balance_dollars": _dollars(cents),
            "portfolio_value": exposure,
            "updated_ts": int(stamp.timestamp()) if stamp else 0,
            "balance_breakdown": [{"exchange_index": 0, "balance": _dollars(cents)}],
        }

    def list_cash(
        self, kind: str, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """A page of deposits, withdrawals or transfers, newest first."""
        most = 1000 if kind == "transfer" else 500
        if not 1 <= limit <= most:
            raise ApiFault(400, "invalid_parameters", f"limit must be between 1 and {most}")
        rows = sorted(
            (c for c in self.cash.values() if c.kind == kind),
            key=lambda c: (c.created, c.id),
            reverse=True,
        )
        return _page([c.render() for c in rows], limit, cursor)


def _page(rows: Iterable[dict[str, Any]], limit: int, cursor: str | None) -> tuple[list[Any], str]:
    items = list(rows)
    start = int(cursor) if cursor else 0
    more = start + limit < len(items)
    return items[start : start + limit], str(start + limit) if more else ""
