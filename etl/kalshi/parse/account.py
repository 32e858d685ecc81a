"""The account's state: a market position, a balance, a cash movement → a record with the
columns of its table, or a :class:`Rejected`. Pure.

- a **market position** is one item of ``market_positions`` in ``GET /portfolio/positions`` or
  ``/historical/positions`` (``position_fp`` signed: negative = NO contracts), or the ``msg``
  of a WebSocket ``market_position`` message (``market_ticker``; ``position_cost_dollars`` is
  the exposure; no time and no ``total_traded_dollars``: the fields it lacks are ``None`` and
  the snapshot keeps the latest row's);
- a **balance** is the body of ``GET /portfolio/balance`` (``balance_dollars``, never the
  truncated ``balance`` cents where both are sent; ``portfolio_value`` cents ÷ 100;
  ``updated_ts`` as sent);
- a **cash movement** is one deposit, withdrawal or subaccount transfer (``kind``), amounts
  from cents, times from Unix seconds; a transfer's ``id`` is its ``transfer_id``.

The subaccount is the one the caller asked for (these records carry none, except a
``market_position`` message's optional ``subaccount``).
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
    MAX_KEY_LENGTH,
    RecordError,
    Rejected,
    _decimal,
    _dollars_from_cents,
    _int,
    _rejected,
    _text,
    _time,
    storage_problem,
)

_BIGINT: Final = 2**63 - 1
_MAX_SECONDS: Final = 253402300799  # 9999-12-31

POSITION_COLUMNS = (
    "subaccount_number",
    "ticker",
    "position_fp",
    "market_exposure_dollars",
    "realized_pnl_dollars",
    "fees_paid_dollars",
    "total_traded_dollars",
    "last_updated_ts",
    "raw",
)
# What a market_positions message carries, and so what a snapshot from it compares.
POSITION_STREAM_COMPARES: Final = (
    "position_fp",
    "market_exposure_dollars",
    "realized_pnl_dollars",
    "fees_paid_dollars",
)
BALANCE_COLUMNS = (
    "subaccount_number",
    "balance_dollars",
    "portfolio_value_dollars",
    "updated_ts",
    "raw",
)
CASH_COLUMNS = (
    "kind",
    "id",
    "status",
    "type",
    "amount_dollars",
    "fee_dollars",
    "from_subaccount",
    "to_subaccount",
    "created_time",
    "finalized_time",
    "raw",
)
CASH_KINDS: Final = ("deposit", "withdrawal", "transfer")
CASH_STATUSES: Final = frozenset({"pending", "applied", "failed", "returned"})


@dataclass(frozen=True, slots=True)
class MarketPosition:
    """One market's position in one subaccount (``raw`` = the payload)."""

    subaccount_number: int
    ticker: str
    position_fp: Decimal | None
    market_exposure_dollars: Decimal | None
    realized_pnl_dollars: Decimal | None
    fees_paid_dollars: Decimal | None
    total_traded_dollars: Decimal | None
    last_updated_ts: datetime | None
    raw: Any
    captured_at: datetime | None = None  # a message's receive time (REST: the poll's)


@dataclass(frozen=True, slots=True)
class Balance:
    """One subaccount's balance (``raw`` = the payload, its breakdown included)."""

    subaccount_number: int
    balance_dollars: Decimal | None
    portfolio_value_dollars: Decimal | None
    updated_ts: int | None
    raw: Any


@dataclass(frozen=True, slots=True)
class CashMovement:
    """One deposit, withdrawal or transfer (``raw`` = the payload)."""

    kind: str
    id: str
    status: str | None
    type: str | None
    amount_dollars: Decimal | None
    fee_dollars: Decimal | None
    from_subaccount: int | None
    to_subaccount: int | None
    created_time: datetime | None
    finalized_time: datetime | None
    raw: Any


def _checked(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    problem = storage_problem(raw)
    if problem is not None:
        raise RecordError(problem)
    return raw


def parse_position(
    raw: Any, *, subaccount: int = 0, screened: bool = False
) -> MarketPosition | Rejected:
    """One market position of ``subaccount`` (REST), or a :class:`Rejected`."""
    try:
        d = raw if screened and isinstance(raw, dict) else _checked(raw, "position")
        ticker = _text(d, "ticker", max_length=MAX_KEY_LENGTH) or _text(
            d, "market_ticker", max_length=MAX_KEY_LENGTH
        )
        if not ticker:
            raise RecordError("missing required field 'ticker'")
        exposure = _dollars(d, "market_exposure")
        if exposure is None:
            exposure = _decimal(d, "position_cost_dollars", places=_DOLLAR_PLACES)
        position = _decimal(d, "position_fp", places=_COUNT_PLACES)
        if position is None:
            count = _int(d, "position")
            position = None if count is None else Decimal(count).quantize(Decimal("0.01"))
        return MarketPosition(
            subaccount_number=_subaccount(d, subaccount),
            ticker=ticker,
            position_fp=position,
            market_exposure_dollars=exposure,
            realized_pnl_dollars=_dollars(d, "realized_pnl"),
            fees_paid_dollars=_dollars(d, "fees_paid"),
            total_traded_dollars=_dollars(d, "total_traded"),
            last_updated_ts=_time_or_seconds(d, "last_updated_ts"),
            raw=d,
        )
    except RecordError as exc:
        return _rejected(_named("position", raw, "ticker", "market_ticker", reason=str(exc)), raw)


def parse_position_message(
    raw: Any, *, received: datetime | None = None
) -> MarketPosition | Rejected:
    """The ``msg`` of a WebSocket ``market_position`` message, stamped ``received`` (it has
    no time): a position with the fields the channel carries (``position_fp``, the exposure,
    realized P&L, fees paid); the others ``None``. No ``subaccount``: subaccount 0."""
    parsed = parse_position(raw)
    if isinstance(parsed, Rejected):
        return parsed
    if parsed.position_fp is None:
        return _rejected(
            _named("position", raw, "market_ticker", reason="missing required field 'position_fp'"),
            raw,
        )
    return MarketPosition(
        subaccount_number=parsed.subaccount_number,
        ticker=parsed.ticker,
        position_fp=parsed.position_fp,
        market_exposure_dollars=parsed.market_exposure_dollars,
        realized_pnl_dollars=parsed.realized_pnl_dollars,
        fees_paid_dollars=parsed.fees_paid_dollars,
        total_traded_dollars=None,
        last_updated_ts=None,
        raw=parsed.raw,
        captured_at=received,
    )


def parse_balance(raw: Any, *, subaccount: int = 0, screened: bool = False) -> Balance | Rejected:
    """The balance body of ``subaccount``, or a :class:`Rejected`."""
    try:
        d = _checked(raw, "balance")
        balance = _decimal(d, "balance_dollars", places=_DOLLAR_PLACES)
        if balance is None:
            balance = _dollars_from_cents(_int(d, "balance", minimum=-_BIGINT, maximum=_BIGINT))
        if balance is None:
            raise RecordError("missing required field 'balance_dollars' (or 'balance')")
        value = _decimal(d, "portfolio_value_dollars", places=_DOLLAR_PLACES)
        if value is None:
            value = _dollars_from_cents(
                _int(d, "portfolio_value", minimum=-_BIGINT, maximum=_BIGINT)
            )
        return Balance(
            subaccount_number=subaccount,
            balance_dollars=balance,
            portfolio_value_dollars=value,
            updated_ts=_int(d, "updated_ts", minimum=-_BIGINT, maximum=_BIGINT),
            raw=d,
        )
    except RecordError as exc:
        return _rejected(f"balance of subaccount {subaccount}: {exc}", raw)


def parse_cash(raw: Any, *, kind: str, screened: bool = False) -> CashMovement | Rejected:
    """One movement of ``kind`` (``deposit``, ``withdrawal``, ``transfer``), or a
    :class:`Rejected`."""
    try:
        d = _checked(raw, kind)
        ident = _text(d, "transfer_id" if kind == "transfer" else "id", max_length=MAX_KEY_LENGTH)
        if ident is None and kind == "transfer":
            ident = _text(d, "id", max_length=MAX_KEY_LENGTH)
        if not ident:
            raise RecordError(
                f"missing required field {'transfer_id' if kind == 'transfer' else 'id'!r}"
            )
        status = _text(d, "status")
        if status is not None and status not in CASH_STATUSES:
            allowed = "|".join(sorted(CASH_STATUSES))
            raise RecordError(f"status: unknown value {status!r} (expected {allowed})")
        return CashMovement(
            kind=kind,
            id=ident,
            status=status,
            type=_text(d, "type", max_length=MAX_KEY_LENGTH),
            amount_dollars=_dollars(d, "amount"),
            fee_dollars=_dollars(d, "fee"),
            from_subaccount=_int(d, "from_subaccount", minimum=0, maximum=63),
            to_subaccount=_int(d, "to_subaccount", minimum=0, maximum=63),
            created_time=_time_or_seconds(d, "created_time", "created_ts"),
            finalized_time=_time_or_seconds(d, "finalized_time", "finalized_ts"),
            raw=d,
        )
    except RecordError as exc:
        names = ("transfer_id", "id") if kind == "transfer" else ("id",)
        return _rejected(_named(kind, raw, *names, reason=str(exc)), raw)


def _subaccount(d: dict[str, Any], asked: int) -> int:
    """The subaccount a record names (a message's ``subaccount``), else the one asked for."""
    named = _int(d, "subaccount_number", minimum=0, maximum=63)
    if named is None:
        named = _int(d, "subaccount", minimum=0, maximum=63)
    return asked if named is None else named


def _dollars(d: dict[str, Any], name: str) -> Decimal | None:
    """``<name>_dollars``, else ``<name>_cents`` (or the legacy ``<name>``) in cents ÷ 100."""
    value = _decimal(d, name + "_dollars", places=_DOLLAR_PLACES)
    if value is not None:
        return value
    for cents in (name + "_cents", name):
        if isinstance(d.get(cents), int | float) and not isinstance(d.get(cents), bool):
            return _dollars_from_cents(_int(d, cents, minimum=-_BIGINT, maximum=_BIGINT))
    return None


def _time_or_seconds(d: dict[str, Any], *names: str) -> datetime | None:
    """The first of ``names`` present: an RFC 3339 time, or Unix seconds."""
    for name in names:
        value = d.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            return _time(d, name)
        seconds = _int(d, name, minimum=0, maximum=_MAX_SECONDS)
        assert seconds is not None
        return _EPOCH + timedelta(seconds=seconds)
    return None


def _named(what: str, raw: Any, *keys: str, reason: str) -> str:
    if isinstance(raw, dict):
        for key in keys:
            value = raw.get(key)
            if isinstance(value, str) and value and storage_problem(value) is None:
                return f"{what} {value[:80]}: {reason}"
    return f"{what}: {reason}"
