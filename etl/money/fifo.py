"""FIFO lots of one market in one subaccount: fills (and the settlement) in, lots out. Pure,
exact decimals (CONTRACT.md, "Money", lot rules; KALSHI.md, "Money rules").

- One net position: a fill whose ``outcome_side`` is ``yes`` adds YES contracts, ``no`` adds
  NO contracts; contracts of the side not held close the held side's lots first in, first out
  (a YES/NO pair nets to $1), and what is left opens lots of the other side.
- A lot is one opening fill's quantity matched with one closing fill, or with the settlement,
  or still open. Its ``side`` is the side held and its prices are that side's: a fill
  acquiring NO at a YES price of 0.30 enters (or exits) NO at 0.70; a closing fill that
  acquires the other side at ``p`` exits the held side at ``1 − p``; a settlement exits at
  that side's payout (YES: 1, 0 or ``value``/100; NO: 1 minus that).
- A fill's ``fee_cost`` is split over the lots it opens or closes in proportion to quantity,
  each share rounded half-even to 6 decimals, the last lot (in the order the lots were made,
  a lot still open last) taking the remainder: a fill's shares sum to its ``fee_cost``. A
  settlement charges nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

ONE = Decimal(1)
ZERO = Decimal(0)
MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class LotFill:
    """What FIFO needs of a fill."""

    fill_id: str
    created_time: datetime
    outcome_side: str  # the side it adds: "yes" or "no"
    count: Decimal
    yes_price: Decimal  # dollars
    fee_cost: Decimal

    @property
    def price(self) -> Decimal:
        """The price of the side it adds."""
        return self.yes_price if self.outcome_side == "yes" else ONE - self.yes_price


@dataclass(frozen=True)
class Settled:
    """A market's settlement: when, and what one YES contract paid (dollars)."""

    settled_time: datetime
    yes_payout: Decimal


@dataclass
class Lot:
    """One lot (see the module docstring); ``close_*``, ``exit_price`` and the P&L are
    ``None`` while it is open."""

    side: str
    quantity: Decimal
    open_time: datetime
    entry_price: Decimal
    opened_by: str
    close_time: datetime | None = None
    exit_price: Decimal | None = None
    closed_by: str | None = None  # a fill id; None for the settlement or an open lot
    close_type: str | None = None  # "trade" | "settlement"
    open_fees: Decimal = ZERO
    close_fees: Decimal = ZERO

    @property
    def realized_without_fees(self) -> Decimal | None:
        if self.exit_price is None:
            return None
        return _micro(self.quantity * (self.exit_price - self.entry_price))

    @property
    def realized_with_fees(self) -> Decimal | None:
        gross = self.realized_without_fees
        return None if gross is None else gross - self.open_fees - self.close_fees

    @property
    def signed_quantity(self) -> Decimal:
        return self.quantity if self.side == "yes" else -self.quantity


@dataclass
class _Open:
    """The part of an opening fill still open."""

    fill: LotFill
    left: Decimal
    side: str
    price: Decimal


@dataclass
class _Shares:
    """The lots each fill opened or closed, in order, for the fee split."""

    by_fill: dict[str, list[tuple[Lot, str]]] = field(default_factory=dict)

    def add(self, fill_id: str, lot: Lot, role: str) -> None:
        self.by_fill.setdefault(fill_id, []).append((lot, role))


def lots_of(fills: Iterable[LotFill], settled: Settled | None = None) -> list[Lot]:
    """The lots of one market's ``fills`` (in ``(created_time, fill_id)`` order, bytewise ids)
    and its settlement: closed lots in the order they closed, then the open ones."""
    ordered = sorted(fills, key=lambda f: (f.created_time, f.fill_id.encode()))
    book: deque[_Open] = deque()
    closed: list[Lot] = []
    shares = _Shares()
    for fill in ordered:
        if settled is not None and fill.created_time > settled.settled_time:
            break  # a market trades no more once settled
        left = fill.count
        while left > 0 and book and book[0].side != fill.outcome_side:
            opening = book[0]
            quantity = min(left, opening.left)
            lot = Lot(
                side=opening.side,
                quantity=quantity,
                open_time=opening.fill.created_time,
                entry_price=opening.price,
                opened_by=opening.fill.fill_id,
                close_time=fill.created_time,
                exit_price=ONE - fill.price,
                closed_by=fill.fill_id,
                close_type="trade",
            )
            closed.append(lot)
            shares.add(opening.fill.fill_id, lot, "open")
            shares.add(fill.fill_id, lot, "close")
            opening.left -= quantity
            left -= quantity
            if opening.left == 0:
                book.popleft()
        if left > 0:
            book.append(_Open(fill, left, fill.outcome_side, fill.price))
    still_open = [
        Lot(
            side=o.side,
            quantity=o.left,
            open_time=o.fill.created_time,
            entry_price=o.price,
            opened_by=o.fill.fill_id,
        )
        for o in book
    ]
    for lot in still_open:
        shares.add(lot.opened_by, lot, "open")
        if settled is not None:
            lot.close_time = settled.settled_time
            lot.exit_price = settled.yes_payout if lot.side == "yes" else ONE - settled.yes_payout
            lot.close_type = "settlement"
    _split_fees(ordered, shares)
    return closed + still_open


def _split_fees(fills: Sequence[LotFill], shares: _Shares) -> None:
    """Each fill's fee over its lots by quantity, half-even to 6 decimals, the last lot
    taking the remainder. A lot still open comes last among its fill's lots by construction
    (it is added after every closed one)."""
    for fill in fills:
        parts = shares.by_fill.get(fill.fill_id, [])
        if not parts or not fill.fee_cost:
            continue
        total = sum((lot.quantity for lot, _ in parts), ZERO)
        given = ZERO
        for index, (lot, role) in enumerate(parts):
            if index == len(parts) - 1:
                share = fill.fee_cost - given
            else:
                share = _micro(fill.fee_cost * lot.quantity / total)
            given += share
            if role == "open":
                lot.open_fees += share
            else:
                lot.close_fees += share


def _micro(value: Decimal) -> Decimal:
    return value.quantize(MICRO, rounding=ROUND_HALF_EVEN)
