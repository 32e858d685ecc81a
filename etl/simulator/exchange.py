"""Exchange: the simulated account's order book state and its query rules. Pure and seeded.

Time is explicit: :meth:`Exchange.advance_to` plays the random trading events (new orders,
partial and full fills, cancels, expiries, queue moves) that fall between the exchange's clock
and a given instant, at ``events_per_second``; :meth:`Exchange.step` plays events at the
current instant. The same seed and the same times give the same history, so tests are
deterministic. Queries raise :class:`ApiFault` with the status and message the API would send.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from etl.simulator.errors import ApiFault
from etl.simulator.ledger import FillQuery, Ledger, SimFill, SimSettlement
from etl.simulator.money import Money

__all__ = [
    "ApiFault",
    "Exchange",
    "FillQuery",
    "OrderQuery",
    "SimFill",
    "SimOrder",
    "SimSettlement",
]

ApiVersion = Literal["2025", "2026"]
MinTsOn = Literal["created_time", "last_update_time"]

FINAL = ("canceled", "executed")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(value: datetime) -> datetime:
    """``value`` cut to whole milliseconds: the exchange keeps times as the WebSocket sends
    them (epoch ms), so REST and stream versions of a change carry the same time."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def epoch_ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SimOrder:
    """One order as the exchange knows it (the canonical truth, rendered per API version)."""

    order_id: str
    user_id: str
    client_order_id: str
    ticker: str
    event_ticker: str
    side: str
    action: str
    type: str
    price: int  # cents, for `side`
    initial: int
    filled: int
    status: str
    created: datetime
    updated: datetime
    expiration: datetime | None
    subaccount: int
    stp: str | None
    order_group_id: str | None
    cancel_on_pause: bool
    queue_position: Decimal = Decimal(0)
    taker_fees: int = 0
    maker_fees: int = 0
    taker_fill_cost: int = 0
    maker_fill_cost: int = 0
    malformed: bool = False  # always served with an unknown status: no parser can take it

    @property
    def remaining(self) -> int:
        return self.initial - self.filled if self.status == "resting" else 0

    def render(self, api: ApiVersion) -> dict[str, Any]:
        """The payload the API of ``api`` sends for this order."""
        yes_price = self.price if self.side == "yes" else 100 - self.price
        common: dict[str, Any] = {
            "order_id": self.order_id,
            "user_id": self.user_id,
            "client_order_id": self.client_order_id,
            "ticker": self.ticker,
            "side": self.side,
            "action": self.action,
            "type": self.type,
            "status": self.status,
            "yes_price_dollars": f"{Decimal(yes_price) / 100:.4f}",
            "no_price_dollars": f"{Decimal(100 - yes_price) / 100:.4f}",
            "taker_fill_cost_dollars": f"{Decimal(self.taker_fill_cost) / 100:.4f}",
            "maker_fill_cost_dollars": f"{Decimal(self.maker_fill_cost) / 100:.4f}",
            "taker_fees_dollars": f"{Decimal(self.taker_fees) / 100:.4f}",
            # 2025 sent null for a zero maker fee; the 2026 SDK requires a string ("0.0000").
            "maker_fees_dollars": f"{Decimal(self.maker_fees) / 100:.4f}"
            if self.maker_fees or api == "2026"
            else None,
            "expiration_time": rfc3339(self.expiration) if self.expiration else None,
            "created_time": rfc3339(self.created),
            "last_update_time": rfc3339(self.updated),
            "self_trade_prevention_type": self.stp,
            "order_group_id": self.order_group_id,
            "cancel_order_on_pause": self.cancel_on_pause,
        }
        if self.malformed:
            common["status"] = "teleported"
        if api == "2025":
            common.update(
                yes_price=yes_price,
                no_price=100 - yes_price,
                fill_count=self.filled,
                remaining_count=self.remaining,
                initial_count=self.initial,
                taker_fees=self.taker_fees,
                maker_fees=self.maker_fees,
                taker_fill_cost=self.taker_fill_cost,
                maker_fill_cost=self.maker_fill_cost,
                queue_position=0,
            )
            return common
        yes_side = (self.side, self.action) in {("yes", "buy"), ("no", "sell")}
        common.update(
            fill_count_fp=f"{self.filled}.00",
            remaining_count_fp=f"{self.remaining}.00",
            initial_count_fp=f"{self.initial}.00",
            outcome_side="yes" if yes_side else "no",
            book_side="bid" if yes_side else "ask",
            subaccount_number=self.subaccount,
            exchange_index=0,
        )
        return common

    def render_user_order(self) -> dict[str, Any]:
        """The ``msg`` of the WebSocket ``user_order`` message for this order (KALSHI.md,
        "WebSocket"): 2026 fields, times in epoch ms, no ``no_price_dollars``, optional fields
        only when set."""
        full = self.render("2026")
        message = {
            name: full[name]
            for name in (
                "order_id",
                "user_id",
                "client_order_id",
                "ticker",
                "status",
                "outcome_side",
                "book_side",
                "yes_price_dollars",
                "fill_count_fp",
                "remaining_count_fp",
                "initial_count_fp",
                "taker_fill_cost_dollars",
                "maker_fill_cost_dollars",
                "taker_fees_dollars",
                "maker_fees_dollars",
                "subaccount_number",
            )
        }
        message["created_ts_ms"] = epoch_ms(self.created)
        message["last_updated_ts_ms"] = epoch_ms(self.updated)
        if self.expiration is not None:
            message["expiration_ts_ms"] = epoch_ms(self.expiration)
        for name in ("order_group_id", "self_trade_prevention_type"):
            if full[name] is not None:
                message[name] = full[name]
        return message


def _encode_cursor(key: tuple[datetime, str]) -> str:
    return base64.urlsafe_b64encode(f"{key[0].isoformat()}|{key[1]}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, order_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), order_id
    except (ValueError, UnicodeDecodeError):
        raise ApiFault(400, "invalid_parameters", "cursor is not valid") from None


@dataclass(frozen=True)
class OrderQuery:
    """The filters of ``GET /portfolio/orders`` and ``GET /historical/orders``."""

    ticker: str | None = None
    event_tickers: Sequence[str] = ()
    min_ts: int | None = None
    max_ts: int | None = None
    status: str | None = None
    subaccount: int | None = None
    limit: int = 100
    cursor: str | None = None


@dataclass
class Exchange:
    """A seeded, in-memory account on a simulated exchange.

    Args:
        seed: the random seed; same seed and same times give the same history.
        orders: how many orders the account has at ``now``.
        api: ``"2025"`` or ``"2026"`` payload shapes and limits.
        min_ts_on: which timestamp ``min_ts``/``max_ts`` compare.
        now: the exchange's clock at creation.
        history: how far back the initial orders go.
        live_window: 2026 only: final orders older than this are served only by the
            historical tier.
        events_per_second: trading intensity for :meth:`advance_to`.
        resting: the fraction of the initial orders still resting (default: about 8.7%).
        malformed: the fraction of the initial, final orders that the API always serves
            malformed (an unknown status): they must end in ``rejected_records``, never in
            ``orders``. They never change, so every rerun meets them again.
    """

    seed: int = 0
    orders: int = 200
    api: ApiVersion = "2026"
    min_ts_on: MinTsOn = "created_time"
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    history: timedelta = timedelta(days=60)
    live_window: timedelta = timedelta(days=14)
    events_per_second: float = 2.0
    markets: int = 12
    user_data_lag: timedelta = timedelta(seconds=1)
    # KALSHI.md leaves open whether /historical/orders without `subaccount` serves every
    # subaccount or only 0; False plays the second answer.
    historical_all_subaccounts: bool = True
    malformed: float = 0.0
    # The fraction of the initial orders left resting; None: 8%, and 40% of the last day's
    # (about 8.7% in all over 60 days).
    resting: float | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._ids = itertools.count(1)
        self._book: dict[str, SimOrder] = {}
        self._sorted: list[tuple[datetime, str]] = []  # (created, order_id) ascending
        self._resting: dict[str, None] = {}  # insertion-ordered set: deterministic choice
        self._carry = 0.0
        self.ledger = Ledger()  # the fills of the orders' executions, the settlements
        self.money = Money(self.ledger)  # positions, balances, deposits and transfers
        self._fill_numbers = itertools.count(1)
        # Called with each order a trading event creates or changes (the WebSocket feed).
        self.listeners: list[Callable[[SimOrder], None]] = []
        self.tickers = [
            f"KXSIM-E{e}-M{m}" for e in range(1, self.markets // 3 + 2) for m in range(1, 4)
        ][: self.markets]
        self._seed_history()
        self._seed_cash()

    # -- generation -----------------------------------------------------------------------

    def _new_id(self) -> str:
        n = next(self._ids)
        return f"{self.seed:04x}{n:08x}-{self.rng.getrandbits(16):04x}-4000-8000-{n:012x}"

    def _make(self, created: datetime, *, status: str = "resting") -> SimOrder:
        created = to_ms(created)
        ticker = self.rng.choice(self.tickers)
        order = SimOrder(
            order_id=self._new_id(),
            user_id="sim-user",
            client_order_id=f"c-{self.rng.getrandbits(32):08x}",
            ticker=ticker,
            event_ticker=ticker.rsplit("-", 1)[0],
            side=self.rng.choice(("yes", "no")),
            action=self.rng.choice(("buy", "buy", "buy", "sell")),
            type="limit" if self.rng.random() < 0.9 else "market",
            price=self.rng.randint(1, 99),
            initial=self.rng.randint(1, 50),
            filled=0,
            status=status,
            created=created,
            updated=created,
            expiration=created + timedelta(hours=self.rng.randint(1, 72))
            if self.rng.random() < 0.3
            else None,
            subaccount=self.rng.choice((0, 0, 0, 1)) if self.api == "2026" else 0,
            stp=self.rng.choice((None, "taker_at_cross", "maker")),
            order_group_id=None,
            cancel_on_pause=self.rng.random() < 0.1,
            queue_position=Decimal(self.rng.randint(0, 500)),
        )
        return order

    def _add(self, order: SimOrder) -> None:
        self._book[order.order_id] = order
        key = (order.created, order.order_id)
        if not self._sorted or key > self._sorted[-1]:
            self._sorted.append(key)
        else:
            bisect.insort(self._sorted, key)
        if order.status == "resting":
            self._resting[order.order_id] = None

    def _seed_history(self) -> None:
        span = self.history.total_seconds()
        offsets = sorted(self.rng.uniform(60, span) for _ in range(self.orders))
        for offset in reversed(offsets):
            created = self.now - timedelta(seconds=offset)
            order = self._make(created)
            age = (self.now - created).total_seconds()
            roll = self.rng.random()
            if (
                roll < self.resting
                if self.resting is not None
                else (roll < 0.08 or (age < 86400 and roll < 0.4))
            ):
                # A long-resting order, maybe partly filled: the case naive pullers miss.
                order.filled = self.rng.randint(0, order.initial - 1)
                if order.filled:
                    order.updated = to_ms(
                        created + timedelta(seconds=self.rng.uniform(0, min(age, 3600)))
                    )
                    self._charge(order, order.filled, order.updated)
                order.expiration = None
            else:
                later = created + timedelta(seconds=self.rng.uniform(0, min(age - 1, 6 * 3600)))
                if self.rng.random() < 0.6:
                    order.status = "executed"
                    self._charge(order, order.initial - order.filled, later)
                    order.filled = order.initial
                else:
                    order.status = "canceled"
                    order.filled = self.rng.randint(0, order.initial - 1)
                    self._charge(order, order.filled, later)
                order.updated = to_ms(later)
                order.malformed = self.malformed > 0 and self.rng.random() < self.malformed
            self._add(order)
        self._sorted.sort()

    def _seed_cash(self) -> None:
        """The account's money history: a first deposit before any trade, a transfer to
        each subaccount that trades, later an applied withdrawal, a pending deposit and a
        failed withdrawal (its own random stream: the orders' stay as they were)."""
        rng = random.Random(self.seed * 7919 + 1)
        start = self.now - self.history - timedelta(days=1)
        self.money.move("deposit", 5_000_000 + rng.randint(0, 99) * 100, start, fee=0)
        for number in self.subaccounts():
            if number:
                self.money.move(
                    "transfer",
                    rng.randint(100, 500) * 1000,
                    start + timedelta(minutes=number),
                    from_subaccount=0,
                    to_subaccount=number,
                )
        later = self.now - self.history / 2
        self.money.move("withdrawal", rng.randint(10, 90) * 1000, later, fee=200)
        self.money.move(
            "deposit", rng.randint(10, 90) * 1000, later + timedelta(hours=1), status="pending"
        )
        self.money.move("withdrawal", 123_456, later + timedelta(hours=2), status="failed", fee=0)

    def _charge(self, order: SimOrder, contracts: int, at: datetime) -> None:
        """Execute ``contracts`` of ``order`` at ``at``: its costs and fees, and the fill."""
        cost = contracts * order.price
        taker = order.type == "market" or self.rng.random() < 0.3
        if taker:
            fee = (contracts * 7 + 99) // 100 if contracts else 0
            order.taker_fill_cost += cost
            order.taker_fees += fee
        else:
            fee = contracts // 50
            order.maker_fill_cost += cost
            order.maker_fees += fee
        if contracts:
            self.ledger.record(
                SimFill(
                    fill_id=f"{order.order_id[:8]}-fill-{next(self._fill_numbers):08x}",
                    order_id=order.order_id,
                    ticker=order.ticker,
                    side=order.side,
                    action=order.action,
                    count=contracts,
                    price=order.price,
                    is_taker=taker,
                    fee=fee,
                    created=to_ms(at),
                    subaccount=order.subaccount,
                )
            )

    # -- trading ----------------------------------------------------------------------------

    def advance_to(self, instant: datetime) -> int:
        """Play the events between the exchange clock and ``instant``; returns how many."""
        if instant <= self.now:
            return 0
        elapsed = (instant - self.now).total_seconds()
        self._carry += elapsed * self.events_per_second
        count = int(self._carry)
        self._carry -= count
        start = self.now
        for i in range(count):
            self.now = start + timedelta(seconds=elapsed * (i + 1) / (count + 1))
            self._event()
        self.now = instant
        return count

    def step(self, events: int = 1, *, every: timedelta = timedelta(milliseconds=1)) -> None:
        """Play ``events`` events, moving the clock by ``every`` before each."""
        for _ in range(events):
            self.now += every
            self._event()

    def _event(self) -> None:
        roll = self.rng.random()
        resting = list(self._resting)
        if roll < 0.35 or not resting:
            self.create_order()
            return
        order = self._book[self.rng.choice(resting)]
        if roll < 0.65:
            self.fill(order.order_id, self.rng.randint(1, order.initial - order.filled))
        elif roll < 0.85:
            self.cancel(order.order_id)
        elif roll < 0.9 and order.expiration is not None:
            self.cancel(order.order_id)  # expiry looks like a cancel to the API
        else:
            self.move_queue(order.order_id, self.rng.randint(-20, 20))

    def create_order(self) -> SimOrder:
        """A new resting order now (sometimes filled at once, as a taker)."""
        order = self._make(self.now)
        if order.type == "market" or self.rng.random() < 0.15:
            order.status = "executed"
            self._charge(order, order.initial, self.now)
            order.filled = order.initial
            order.expiration = None
        self._add(order)
        self._changed(order)
        return order

    def fill(self, order_id: str, contracts: int) -> SimOrder:
        """Fill ``contracts`` of a resting order; fully filled becomes executed."""
        order = self._book[order_id]
        assert order.status == "resting", order.status
        contracts = max(1, min(contracts, order.initial - order.filled))
        order.filled += contracts
        self._charge(order, contracts, self.now)
        order.updated = to_ms(self.now)
        if order.filled >= order.initial:
            order.status = "executed"
            self._resting.pop(order_id, None)
        self._changed(order)
        for other_id in self._resting:
            other = self._book[other_id]
            if other.ticker == order.ticker and other.queue_position > 0:
                other.queue_position = max(Decimal(0), other.queue_position - contracts)
        return order

    def cancel(self, order_id: str) -> SimOrder:
        """Cancel a resting order."""
        order = self._book[order_id]
        assert order.status == "resting", order.status
        order.status = "canceled"
        order.updated = to_ms(self.now)
        self._changed(order)
        self._resting.pop(order_id, None)
        return order

    def _changed(self, order: SimOrder) -> None:
        for listener in self.listeners:
            listener(order)

    def move_queue(self, order_id: str, delta: int) -> None:
        order = self._book[order_id]
        order.queue_position = max(Decimal(0), order.queue_position + delta)

    # -- queries ----------------------------------------------------------------------------

    def _max_limit(self) -> int:
        return 200 if self.api == "2025" else 1000

    def cutoff(self) -> datetime | None:
        """Final orders last changed before this are served only by the historical tier."""
        return self.now - self.live_window if self.api == "2026" else None

    def is_historical(self, order: SimOrder) -> bool:
        cutoff = self.cutoff()
        return cutoff is not None and order.status in FINAL and order.updated < cutoff

    def _matches(self, order: SimOrder, query: OrderQuery) -> bool:
        if query.ticker is not None and order.ticker != query.ticker:
            return False
        if query.event_tickers and order.event_ticker not in query.event_tickers:
            return False
        if query.status is not None and order.status != query.status:
            return False
        if query.subaccount is not None and order.subaccount != query.subaccount:
            return False
        stamp = (order.created if self.min_ts_on == "created_time" else order.updated).timestamp()
        if query.min_ts is not None and stamp < query.min_ts:
            return False
        return not (query.max_ts is not None and stamp > query.max_ts)

    def _validate(self, query: OrderQuery) -> None:
        if not 1 <= query.limit <= self._max_limit():
            raise ApiFault(
                400, "invalid_parameters", f"limit must be between 1 and {self._max_limit()}"
            )
        if len(query.event_tickers) > 10:
            raise ApiFault(400, "invalid_parameters", "event_ticker accepts at most 10 tickers")
        if query.status is not None and query.status not in ("resting", "canceled", "executed"):
            raise ApiFault(400, "invalid_parameters", f"invalid status {query.status!r}")
        if query.subaccount is not None and not 0 <= query.subaccount <= 63:
            raise ApiFault(400, "invalid_parameters", "subaccount must be between 0 and 63")

    def _page(self, query: OrderQuery, *, historical: bool) -> tuple[list[SimOrder], str]:
        self._validate(query)
        end = len(self._sorted)
        if query.cursor:
            end = bisect.bisect_left(self._sorted, _decode_cursor(query.cursor))
        if self.min_ts_on == "created_time" and query.max_ts is not None:
            bound = datetime.fromtimestamp(query.max_ts + 1, UTC)
            end = min(end, bisect.bisect_left(self._sorted, (bound, "")))
        start = 0
        if self.min_ts_on == "created_time" and query.min_ts is not None:
            start = bisect.bisect_left(
                self._sorted, (datetime.fromtimestamp(query.min_ts, UTC), "")
            )
        found: list[SimOrder] = []
        index = end - 1
        while index >= start and len(found) < query.limit:
            order = self._book[self._sorted[index][1]]
            if self.is_historical(order) == historical and self._matches(order, query):
                found.append(order)
            index -= 1
        more = index >= start and len(found) == query.limit
        cursor = _encode_cursor((found[-1].created, found[-1].order_id)) if more else ""
        return found, cursor

    def list_orders(self, query: OrderQuery) -> tuple[list[dict[str, Any]], str]:
        """``GET /portfolio/orders``: live orders, newest created first, keyset cursor."""
        found, cursor = self._page(query, historical=False)
        return [order.render(self.api) for order in found], cursor

    def historical_orders(self, query: OrderQuery) -> tuple[list[dict[str, Any]], str]:
        """``GET /historical/orders`` (2026 only)."""
        if self.api != "2026":
            raise ApiFault(404, "not_found", "not found")
        if query.status is not None:
            raise ApiFault(400, "invalid_parameters", "historical orders take no status filter")
        if query.subaccount is None and not self.historical_all_subaccounts:
            query = replace(query, subaccount=0)
        found, cursor = self._page(query, historical=True)
        return [order.render(self.api) for order in found], cursor

    def get_order(self, order_id: str) -> dict[str, Any]:
        """``GET /portfolio/orders/{id}``: 404 for unknown and (2026) historical orders."""
        order = self._book.get(order_id)
        if order is None or self.is_historical(order):
            raise ApiFault(404, "not_found", "order not found")
        return order.render(self.api)

    def queue_positions(
        self, *, market_tickers: Sequence[str], event_ticker: str | None, subaccount: int | None
    ) -> list[dict[str, Any]]:
        """``GET /portfolio/orders/queue_positions`` for resting orders of the given markets."""
        if not market_tickers and not event_ticker:
            raise ApiFault(400, "invalid_parameters", "market_tickers or event_ticker is required")
        wanted_sub = 0 if subaccount is None else subaccount
        result = []
        for order_id in self._resting:
            order = self._book[order_id]
            if order.subaccount != wanted_sub:
                continue
            if market_tickers and order.ticker not in market_tickers:
                continue
            if event_ticker and order.event_ticker != event_ticker:
                continue
            entry: dict[str, Any] = {"order_id": order_id, "market_ticker": order.ticker}
            if self.api == "2025":
                entry["queue_position"] = int(order.queue_position)
            else:
                entry["queue_position_fp"] = f"{order.queue_position:.2f}"
            result.append(entry)
        return result

    def queue_position(self, order_id: str) -> dict[str, Any]:
        order = self._book.get(order_id)
        if order is None or order.status != "resting":
            raise ApiFault(404, "not_found", "order not found")
        return {"queue_position_fp": f"{order.queue_position:.2f}"}

    def user_data_timestamp(self) -> datetime:
        return self.now - self.user_data_lag

    # -- the account beyond orders ------------------------------------------------------------

    def list_fills(self, query: FillQuery, *, historical: bool) -> tuple[list[dict[str, Any]], str]:
        """``GET /portfolio/fills`` (live) or ``/historical/fills`` (2026 only): fills created
        before the cutoff are served only by the historical tier."""
        if historical and self.api != "2026":
            raise ApiFault(404, "not_found", "not found")
        return self.ledger.list_fills(
            query, cutoff=self.cutoff(), historical=historical, max_limit=self._max_limit()
        )

    def list_settlements(
        self, *, subaccount: int | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """``GET /portfolio/settlements``: the live (not archived) rows of ``subaccount``."""
        if subaccount is not None and not 0 <= subaccount <= 63:
            raise ApiFault(400, "invalid_parameters", "subaccount must be between 0 and 63")
        return self.ledger.list_settlements(
            subaccount=subaccount, limit=limit, cursor=cursor, max_limit=self._max_limit()
        )

    def subaccounts(self) -> list[int]:
        """The subaccounts that exist: 0 and every one an order was placed from."""
        return sorted({0} | {order.subaccount for order in self._book.values()})

    def settle_market(
        self, ticker: str, result: str, value: int | None = None
    ) -> list[SimSettlement]:
        """The market ``ticker`` settles now (``result`` yes, no or scalar with ``value`` cents
        per YES): its resting orders are canceled, each subaccount that traded it gets its
        settlement row, and it no longer trades."""
        for order_id in [i for i in self._resting if self._book[i].ticker == ticker]:
            self.cancel(order_id)
        if ticker in self.tickers and len(self.tickers) > 1:
            self.tickers.remove(ticker)
        event = ticker.rsplit("-", 1)[0]
        return self.ledger.settle(ticker, event, result, value, to_ms(self.now))

    def archive_event(self, event_ticker: str) -> int:
        """The event moves to the historical tier: its settlements vanish from the API and
        its positions move to ``/historical/positions``."""
        self.money.archive(event_ticker)
        return self.ledger.archive(event_ticker)

    # -- truth, for tests and the demo --------------------------------------------------------

    def truth(self) -> dict[str, dict[str, Any]]:
        """Every order as the API would render it now, by id (the malformed ones aside)."""
        return {
            order_id: order.render(self.api)
            for order_id, order in self._book.items()
            if not order.malformed
        }

    def malformed_records(self) -> dict[str, dict[str, Any]]:
        """The orders the API serves malformed, as served, by id."""
        return {
            order_id: order.render(self.api)
            for order_id, order in self._book.items()
            if order.malformed
        }

    def order(self, order_id: str) -> SimOrder:
        return self._book[order_id]

    def resting_ids(self) -> list[str]:
        return list(self._resting)

    def __iter__(self) -> Iterator[SimOrder]:
        return iter(self._book.values())
