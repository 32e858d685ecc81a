"""Fills: one item of ``GET /portfolio/fills`` or ``/historical/fills`` (or the ``msg`` of a
WebSocket ``fill`` message) → a :class:`Fill` with the columns of the ``fills`` table, or a
:class:`Rejected`. Pure.

Derived where the payload lacks them (CONTRACT.md, "The whole account and its money"):
``fill_id`` from ``trade_id`` (the same value), ``ticker`` from ``market_ticker``,
``outcome_side``/``book_side`` from the legacy ``side``/``action``, ``no_price_dollars`` as
1 − ``yes_price_dollars``, dollars from legacy integer cents, ``count_fp`` from a legacy
integer ``count``, ``created_time`` from ``ts`` (Unix seconds) or ``ts_ms``; a fill without a
subaccount is subaccount 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from etl.kalshi.parse.fields import (
    _COUNT_PLACES,
    _DOLLAR_PLACES,
    _EPOCH,
    _ONE,
    _ZERO,
    MAX_KEY_LENGTH,
    RecordError,
    Rejected,
    _bool,
    _decimal,
    _dollars_from_cents,
    _enum,
    _fp_from_count,
    _int,
    _ms_time,
    _rejected,
    _text,
    _time,
    direction,
    storage_problem,
)

# The columns of ``fills`` a parsed fill fills, in table order (``raw`` last).
FILL_COLUMNS = (
    "fill_id",
    "trade_id",
    "order_id",
    "ticker",
    "outcome_side",
    "book_side",
    "side",
    "action",
    "count_fp",
    "yes_price_dollars",
    "no_price_dollars",
    "is_taker",
    "fee_cost",
    "created_time",
    "subaccount_number",
    "exchange_index",
    "raw",
)


@dataclass(frozen=True, slots=True)
class Fill:
    """One fill, with the columns of the ``fills`` table (``raw`` = the payload)."""

    fill_id: str
    trade_id: str | None
    order_id: str | None
    ticker: str
    outcome_side: str | None
    book_side: str | None
    side: str | None
    action: str | None
    count_fp: Decimal | None
    yes_price_dollars: Decimal | None
    no_price_dollars: Decimal | None
    is_taker: bool | None
    fee_cost: Decimal | None
    created_time: datetime | None
    subaccount_number: int
    exchange_index: int | None
    raw: Any

    @property
    def from_stream(self) -> bool:
        """Whether this version came from the WebSocket (its ``msg`` has ``ts_ms``)."""
        return isinstance(self.raw, dict) and "ts_ms" in self.raw


def parse_fill(raw: Any, *, screened: bool = False) -> Fill | Rejected:
    """Parse one fill of either tier or of the ``fill`` channel.

    Returns:
        A :class:`Fill`, or a :class:`Rejected` whose reason names the first bad field.
    """
    if not isinstance(raw, dict):
        return _rejected(f"fill: expected a JSON object, got {type(raw).__name__}", raw)
    problem = None if screened else storage_problem(raw)
    if problem is not None:
        return _rejected(_named(raw, "fill: " + problem), raw)
    try:
        return _fill(raw)
    except RecordError as exc:
        return Rejected(_named(raw, "fill: " + str(exc)), raw)


def _named(raw: dict[str, Any], reason: str) -> str:
    fill_id = raw.get("fill_id") or raw.get("trade_id")
    if isinstance(fill_id, str) and fill_id and storage_problem(fill_id) is None:
        return f"fill {fill_id[:80]}: {reason.removeprefix('fill: ')}"
    return reason


def _fill(d: dict[str, Any]) -> Fill:
    trade_id = _text(d, "trade_id", max_length=MAX_KEY_LENGTH)
    fill_id = _text(d, "fill_id", max_length=MAX_KEY_LENGTH) or trade_id
    if not fill_id:
        raise RecordError("missing required field 'fill_id' (or 'trade_id')")
    ticker = _text(d, "ticker", max_length=MAX_KEY_LENGTH) or _text(
        d, "market_ticker", max_length=MAX_KEY_LENGTH
    )
    if not ticker:
        raise RecordError("missing required field 'ticker' (or 'market_ticker')")
    side, action = _enum(d, "side"), _enum(d, "action")
    outcome, book = _enum(d, "outcome_side"), _enum(d, "book_side")
    if outcome is None and book is None:
        outcome, book = direction(side, action)
    count = _decimal(d, "count_fp", places=_COUNT_PLACES, minimum=_ZERO)
    if count is None:
        count = _fp_from_count(_int(d, "count", minimum=0))
    yes = _decimal(d, "yes_price_dollars", places=_DOLLAR_PLACES, minimum=_ZERO, maximum=_ONE)
    if yes is None:
        yes = _dollars_from_cents(_int(d, "yes_price", minimum=0, maximum=100))
    no = _decimal(d, "no_price_dollars", places=_DOLLAR_PLACES, minimum=_ZERO, maximum=_ONE)
    if no is None:
        no = _dollars_from_cents(_int(d, "no_price", minimum=0, maximum=100))
    if no is None and yes is not None:
        no = _ONE - yes
    subaccount = _int(d, "subaccount_number", minimum=0, maximum=63)
    if subaccount is None:
        subaccount = _int(d, "subaccount", minimum=0, maximum=63)
    return Fill(
        fill_id=fill_id,
        trade_id=trade_id,
        order_id=_text(d, "order_id", max_length=MAX_KEY_LENGTH),
        ticker=ticker,
        outcome_side=outcome,
        book_side=book,
        side=side,
        action=action,
        count_fp=count,
        yes_price_dollars=yes,
        no_price_dollars=no,
        is_taker=_bool(d, "is_taker"),
        fee_cost=_decimal(d, "fee_cost", places=_DOLLAR_PLACES),
        created_time=_created(d),
        subaccount_number=0 if subaccount is None else subaccount,
        exchange_index=_int(d, "exchange_index"),
        raw=d,
    )


def _created(d: dict[str, Any]) -> datetime | None:
    """``created_time``; else ``ts_ms`` (the channel's), else ``ts`` (Unix seconds)."""
    created = _time(d, "created_time")
    if created is None and d.get("ts_ms") is not None:
        created = _ms_time(d, "ts_ms")
    if created is None and d.get("ts") is not None:
        seconds = _int(d, "ts", minimum=0, maximum=253402300799)
        assert seconds is not None
        created = _EPOCH + timedelta(seconds=seconds)
    return created
