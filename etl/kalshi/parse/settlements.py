"""Settlements: one item of ``GET /portfolio/settlements`` → a :class:`Settlement` with the
columns of the ``settlements`` table, or a :class:`Rejected`. Pure.

A settlement row carries no subaccount and no id: the caller lists settlements once per
subaccount and stamps the number it asked for. ``revenue`` and ``value`` stay the integer
cents the API sends; legacy integer counts and cent costs become ``*_fp`` and dollars;
``settled_time`` comes from ``settled_ts`` (Unix seconds) where the RFC 3339 field is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from etl.kalshi.parse.fields import (
    _COUNT_PLACES,
    _DOLLAR_PLACES,
    _EPOCH,
    _ZERO,
    MAX_KEY_LENGTH,
    RecordError,
    Rejected,
    _decimal,
    _dollars_from_cents,
    _fp_from_count,
    _int,
    _rejected,
    _text,
    _time,
    storage_problem,
)

MARKET_RESULTS: Final = frozenset({"yes", "no", "scalar"})
_BIGINT: Final = 2**63 - 1

SETTLEMENT_COLUMNS = (
    "ticker",
    "event_ticker",
    "subaccount_number",
    "market_result",
    "yes_count_fp",
    "yes_total_cost_dollars",
    "no_count_fp",
    "no_total_cost_dollars",
    "revenue",
    "value",
    "fee_cost",
    "settled_time",
    "exchange_index",
    "raw",
)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One market's settlement in one subaccount (``raw`` = the payload)."""

    ticker: str
    event_ticker: str | None
    subaccount_number: int
    market_result: str | None
    yes_count_fp: Decimal | None
    yes_total_cost_dollars: Decimal | None
    no_count_fp: Decimal | None
    no_total_cost_dollars: Decimal | None
    revenue: int | None
    value: int | None
    fee_cost: Decimal | None
    settled_time: datetime | None
    exchange_index: int | None
    raw: Any


def parse_settlement(
    raw: Any, *, subaccount: int = 0, screened: bool = False
) -> Settlement | Rejected:
    """Parse one settlement of subaccount ``subaccount`` (the listing's ``subaccount``).

    Returns:
        A :class:`Settlement`, or a :class:`Rejected` whose reason names the first bad field.
    """
    if not isinstance(raw, dict):
        return _rejected(f"settlement: expected a JSON object, got {type(raw).__name__}", raw)
    problem = None if screened else storage_problem(raw)
    if problem is not None:
        return _rejected(_named(raw, problem), raw)
    try:
        return _settlement(raw, subaccount)
    except RecordError as exc:
        return Rejected(_named(raw, str(exc)), raw)


def _named(raw: dict[str, Any], reason: str) -> str:
    ticker = raw.get("ticker")
    if isinstance(ticker, str) and ticker and storage_problem(ticker) is None:
        return f"settlement of {ticker[:80]}: {reason}"
    return f"settlement: {reason}"


def _settlement(d: dict[str, Any], subaccount: int) -> Settlement:
    ticker = _text(d, "ticker", required=True, max_length=MAX_KEY_LENGTH)
    assert ticker is not None
    result = _text(d, "market_result")
    if result is not None and result not in MARKET_RESULTS:
        allowed = "|".join(sorted(MARKET_RESULTS))
        raise RecordError(f"market_result: unknown value {result!r} (expected {allowed})")
    return Settlement(
        ticker=ticker,
        event_ticker=_text(d, "event_ticker", max_length=MAX_KEY_LENGTH),
        subaccount_number=subaccount,
        market_result=result,
        yes_count_fp=_count(d, "yes_count"),
        yes_total_cost_dollars=_dollars(d, "yes_total_cost"),
        no_count_fp=_count(d, "no_count"),
        no_total_cost_dollars=_dollars(d, "no_total_cost"),
        revenue=_int(d, "revenue", minimum=-_BIGINT, maximum=_BIGINT),
        value=_int(d, "value", minimum=0, maximum=100),
        fee_cost=_decimal(d, "fee_cost", places=_DOLLAR_PLACES),
        settled_time=_settled(d),
        exchange_index=_int(d, "exchange_index"),
        raw=d,
    )


def _count(d: dict[str, Any], name: str) -> Decimal | None:
    value = _decimal(d, name + "_fp", places=_COUNT_PLACES, minimum=_ZERO)
    return _fp_from_count(_int(d, name, minimum=0)) if value is None else value


def _dollars(d: dict[str, Any], name: str) -> Decimal | None:
    value = _decimal(d, name + "_dollars", places=_DOLLAR_PLACES)
    return _dollars_from_cents(_int(d, name)) if value is None else value


def _settled(d: dict[str, Any]) -> datetime | None:
    settled = _time(d, "settled_time")
    if settled is None and d.get("settled_ts") is not None:
        seconds = _int(d, "settled_ts", minimum=0, maximum=253402300799)
        assert seconds is not None
        settled = _EPOCH + timedelta(seconds=seconds)
    return settled
