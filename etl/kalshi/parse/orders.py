"""Raw API JSON → typed records, for the 2025 and the 2026 shapes alike. Pure.

:func:`parse_order` returns an :class:`Order` with every column of the ``orders`` table, the
canonical fields derived when the payload lacks them (dollars from cents, ``*_fp`` from integer
counts, ``outcome_side``/``book_side`` from ``side``/``action``), or a :class:`Rejected` value
with a precise reason. It never raises for bad data: one broken record must not cost the rest
of its page. The payload travels with the record (``raw``), unknown fields included.

Every value is checked against the range of the column it lands in (``integer``,
``numeric(18, p)``, indexed text), and the whole payload against what ``jsonb`` can hold (no NUL,
no lone surrogate, no infinite number, bounded nesting), so that PostgreSQL never refuses a record
that parsed: such a record is rejected here, its payload kept as escaped JSON text
(:func:`escaped_text`).

Speed (a first load parses every order): a page :func:`screened_body` clears skips the
per-record storage scan, and a record whose values all have the plain forms the API sends
takes :func:`_plain_order`, one pass with no per-field calls, which also writes the record as
a line of COPY's text format (``Order.line``) from the payload's own decimal and time strings;
anything unusual goes through the full parser, which also words the rejection.
:func:`parse_user_order` reads the WebSocket's ``user_order`` messages into the same records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import orjson

from etl.kalshi.parse.fields import (
    _COUNT_PLACES,
    _DOLLAR_PLACES,
    _ENUMS,
    _ONE,
    _PLAIN_DECIMAL,
    _ZERO,
    INT4_MAX,
    INT4_MIN,
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

ORDER_STATUSES: Final = frozenset({"resting", "canceled", "executed", "pending"})
OPEN_STATUSES: Final = frozenset({"resting", "pending"})


@dataclass(slots=True)
class Order:
    """One order, with the columns of the ``orders`` table (``raw`` = the payload as received).

    Not frozen: a frozen dataclass pays a ``object.__setattr__`` per field at construction,
    the largest single cost of parsing a page. Treat it as a value all the same."""

    order_id: str
    ticker: str
    status: str
    user_id: str | None
    client_order_id: str | None
    type: str | None
    side: str | None
    action: str | None
    outcome_side: str | None
    book_side: str | None
    yes_price: int | None
    no_price: int | None
    fill_count: int | None
    remaining_count: int | None
    initial_count: int | None
    taker_fees: int | None
    maker_fees: int | None
    taker_fill_cost: int | None
    maker_fill_cost: int | None
    queue_position: int | None
    yes_price_dollars: Decimal | None
    no_price_dollars: Decimal | None
    taker_fees_dollars: Decimal | None
    maker_fees_dollars: Decimal | None
    taker_fill_cost_dollars: Decimal | None
    maker_fill_cost_dollars: Decimal | None
    fill_count_fp: Decimal | None
    remaining_count_fp: Decimal | None
    initial_count_fp: Decimal | None
    expiration_time: datetime | None
    created_time: datetime | None
    last_update_time: datetime | None
    self_trade_prevention_type: str | None
    order_group_id: str | None
    cancel_order_on_pause: bool | None
    subaccount_number: int | None
    exchange_index: int | None
    raw: Mapping[str, Any]
    # The order as a row of COPY's text format, every column but the account (``raw`` as
    # JSON), when the parser had the payload's own texts at hand: what COPY sends instead of
    # formatting each value again. Not a column.
    line: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_open(self) -> bool:
        """Resting or pending: the only orders that can still change."""
        return self.status in OPEN_STATUSES


# -- records ----------------------------------------------------------------------------------


def parse_order(raw: Any, *, screened: bool = False) -> Order | Rejected:
    """Parse one order payload of either API generation. ``screened``: the payload comes from
    a body :func:`screened_body` cleared, so the :func:`storage_problem` scan is skipped.

    Returns:
        An :class:`Order`, or a :class:`Rejected` whose reason names the first bad field.
    """
    if not isinstance(raw, dict):
        return _rejected(f"expected a JSON object, got {type(raw).__name__}", raw)
    problem = None if screened else storage_problem(raw)
    if problem is not None:
        return _rejected(_named(raw, problem), raw)
    fast = _plain_order(raw)
    if fast is not None:
        return fast
    try:
        return _order(raw)
    except RecordError as exc:
        return Rejected(_named(raw, str(exc)), raw)


def _named(raw: Mapping[str, Any], reason: str) -> str:
    """The reason, prefixed with the order's id when it has a usable one."""
    order_id = raw.get("order_id")
    if isinstance(order_id, str) and order_id and storage_problem(order_id) is None:
        return f"order {order_id[:80]}: {reason}"
    return reason


def _order(
    data: Mapping[str, Any],
    *,
    raw: Mapping[str, Any] | None = None,
    times: Mapping[str, datetime | None] | None = None,
) -> Order:
    """The Order of ``data``; ``times`` (when given) holds the three times already read, and
    ``raw`` the payload to keep when it is not ``data`` itself."""

    def when(name: str) -> datetime | None:
        return times[name] if times is not None else _time(data, name)

    order_id = _text(data, "order_id", required=True, max_length=MAX_KEY_LENGTH)
    ticker = _text(data, "ticker", required=True, max_length=MAX_KEY_LENGTH)
    status = _text(data, "status", required=True)
    assert order_id is not None and ticker is not None and status is not None
    if status not in ORDER_STATUSES:
        allowed = "|".join(sorted(ORDER_STATUSES))
        raise RecordError(f"status: unknown value {status!r} (expected {allowed})")

    side, action = _enum(data, "side"), _enum(data, "action")
    derived_outcome, derived_book = direction(side, action)
    outcome_side = _enum(data, "outcome_side") or derived_outcome
    book_side = _enum(data, "book_side") or derived_book

    cents = {
        name: _int(data, name, minimum=0)
        for name in ("yes_price", "no_price", "taker_fill_cost", "maker_fill_cost")
    }
    fees = {name: _int(data, name) for name in ("taker_fees", "maker_fees")}
    for name in ("yes_price", "no_price"):
        if (cents[name] or 0) > 100:
            raise RecordError(f"{name}: a price is at most 100 cents, got {cents[name]}")
    counts = {
        name: _int(data, name, minimum=0)
        for name in ("fill_count", "remaining_count", "initial_count")
    }

    def dollars(name: str, cents_value: int | None, *, price: bool = False) -> Decimal | None:
        given = _decimal(
            data,
            name,
            places=_DOLLAR_PLACES,
            minimum=_ZERO if price or "fill_cost" in name else None,
            maximum=_ONE if price else None,
        )
        return given if given is not None else _dollars_from_cents(cents_value)

    def count_fp(name: str, count: int | None) -> Decimal | None:
        given = _decimal(data, name, places=_COUNT_PLACES, minimum=_ZERO)
        return given if given is not None else _fp_from_count(count)

    subaccount = _int(data, "subaccount_number", minimum=0)
    if subaccount is not None and subaccount > 63:
        raise RecordError(f"subaccount_number: must be 0-63, got {subaccount}")

    return Order(
        order_id=order_id,
        ticker=ticker,
        status=status,
        user_id=_text(data, "user_id"),
        client_order_id=_text(data, "client_order_id"),
        type=_enum(data, "type"),
        side=side,
        action=action,
        outcome_side=outcome_side,
        book_side=book_side,
        yes_price=cents["yes_price"],
        no_price=cents["no_price"],
        fill_count=counts["fill_count"],
        remaining_count=counts["remaining_count"],
        initial_count=counts["initial_count"],
        taker_fees=fees["taker_fees"],
        maker_fees=fees["maker_fees"],
        taker_fill_cost=cents["taker_fill_cost"],
        maker_fill_cost=cents["maker_fill_cost"],
        queue_position=_int(data, "queue_position", minimum=0),
        yes_price_dollars=dollars("yes_price_dollars", cents["yes_price"], price=True),
        no_price_dollars=dollars("no_price_dollars", cents["no_price"], price=True),
        taker_fees_dollars=dollars("taker_fees_dollars", fees["taker_fees"]),
        maker_fees_dollars=dollars("maker_fees_dollars", fees["maker_fees"]),
        taker_fill_cost_dollars=dollars("taker_fill_cost_dollars", cents["taker_fill_cost"]),
        maker_fill_cost_dollars=dollars("maker_fill_cost_dollars", cents["maker_fill_cost"]),
        fill_count_fp=count_fp("fill_count_fp", counts["fill_count"]),
        remaining_count_fp=count_fp("remaining_count_fp", counts["remaining_count"]),
        initial_count_fp=count_fp("initial_count_fp", counts["initial_count"]),
        expiration_time=when("expiration_time"),
        created_time=when("created_time"),
        last_update_time=when("last_update_time"),
        self_trade_prevention_type=_enum(data, "self_trade_prevention_type"),
        order_group_id=_text(data, "order_group_id"),
        cancel_order_on_pause=_bool(data, "cancel_order_on_pause"),
        subaccount_number=subaccount,
        exchange_index=_int(data, "exchange_index"),
        raw=data if raw is None else raw,
    )


_SIDES: Final = _ENUMS["side"]
_ACTIONS: Final = _ENUMS["action"]
_TYPES: Final = _ENUMS["type"]
_OUTCOMES: Final = _ENUMS["outcome_side"]
_BOOKS: Final = _ENUMS["book_side"]
_STP: Final = _ENUMS["self_trade_prevention_type"]
_PLAIN_DOLLARS: Final = _PLAIN_DECIMAL[_DOLLAR_PLACES]
_PLAIN_COUNT: Final = _PLAIN_DECIMAL[_COUNT_PLACES]
_NO_INTS: Final = (None,) * 10
_NULL: Final = "\\N"  # NULL in COPY's text format
_NULL_INTS: Final = "\t".join([_NULL] * 10)
# Of each decimal of _DECIMAL_FIELDS, the 2025 integer (its index in _plain_order's ints) it is
# derived from when absent.
_FALLBACK_INT: Final = (0, 1, 5, 6, 7, 8, 2, 3, 4)
_INT_TOPS: Final = (100, 100, *(INT4_MAX,) * 8)
_DECIMAL_FIELDS: Final = (
    "yes_price_dollars",
    "no_price_dollars",
    "taker_fees_dollars",
    "maker_fees_dollars",
    "taker_fill_cost_dollars",
    "maker_fill_cost_dollars",
    "fill_count_fp",
    "remaining_count_fp",
    "initial_count_fp",
)
# Decimal texts already matched against their plain form, and their values (Decimal is
# immutable): at most _SEEN_MAX of each, the lot forgotten when full.
_PRICES_SEEN: Final[dict[str, Decimal]] = {}  # at most 1 as well
_DOLLARS_SEEN: Final[dict[str, Decimal]] = {}
_COUNTS_SEEN: Final[dict[str, Decimal]] = {}
_SEEN_BY_FIELD: Final = (
    *[(_PRICES_SEEN, _PLAIN_DOLLARS)] * 2,
    *[(_DOLLARS_SEEN, _PLAIN_DOLLARS)] * 4,
    *[(_COUNTS_SEEN, _PLAIN_COUNT)] * 3,
)
_SEEN_MAX: Final = 4096


def _as_postgres_reads(text: str) -> bool:
    """Whether ``text``, a time :meth:`datetime.fromisoformat` accepted, is in the form
    PostgreSQL reads to the same instant: ``YYYY-MM-DDTHH:MM:SS``, then at most six decimals
    (PostgreSQL rounds a seventh where Python truncates), then ``Z`` or ``±HH:MM``."""
    if text[4:17:3] != "--T::":
        return False
    if text[-1] == "Z":
        clock = len(text) - 1
    elif text[-3] == ":" and text[-6] in "+-":
        clock = len(text) - 6
    else:
        return False
    return clock == 19 or (21 <= clock <= 26 and text[19] == ".")


def _plain_nine(v: list[Any]) -> list[Decimal | None] | None:
    """The nine decimals of :func:`_plain_order` when every one is a text met before (as
    2026 sends them: prices, fees and counts repeat across orders); else ``None``."""
    prices, dollars, counts = _PRICES_SEEN, _DOLLARS_SEEN, _COUNTS_SEEN
    try:
        return [
            prices[v[0]],
            prices[v[1]],
            dollars[v[2]],
            dollars[v[3]],
            dollars[v[4]],
            dollars[v[5]],
            counts[v[6]],
            counts[v[7]],
            counts[v[8]],
        ]
    except (KeyError, TypeError):  # one not met before, absent, or not a string
        return None


def _plain_decimals(
    values: list[Any], ints: tuple[Any, ...]
) -> tuple[list[Decimal | None], list[str | None]] | None:
    """The nine decimals of :func:`_plain_order` and their texts, field by field: each given
    in its plain form (the prices at most 1; remembered for :func:`_plain_nine`), or derived
    from its 2025 integer; ``None`` when one is unusual."""
    decimals: list[Decimal | None] = []
    texts: list[str | None] = []
    for i, value in enumerate(values):
        if value is None:
            fallback = ints[_FALLBACK_INT[i]]
            derived = _dollars_from_cents(fallback) if i < 6 else _fp_from_count(fallback)
            decimals.append(derived)
            texts.append(None if derived is None else str(derived))
            continue
        seen, plain = _SEEN_BY_FIELD[i]
        number = seen.get(value) if type(value) is str else None
        if number is None:
            if type(value) is not str or not plain(value):
                return None
            number = Decimal(value)
            if seen is _PRICES_SEEN and number > _ONE:
                return None
            if len(seen) >= _SEEN_MAX:
                seen.clear()
            seen[value] = number
        decimals.append(number)
        texts.append(value)
    return decimals, texts


def _plain_order(d: dict[str, Any]) -> Order | None:
    """The :class:`Order` of a payload in which every value has the plain type and form the
    API sends, in one pass with no per-field calls: ``None`` as soon as anything is unusual,
    and :func:`_order` then decides (and says why when it rejects). For any payload it
    accepts, it gives exactly what :func:`_order` gives (tests/kalshi/test_parse.py checks)."""
    get = d.get
    order_id, ticker, status = get("order_id"), get("ticker"), get("status")
    if (
        type(order_id) is not str
        or type(ticker) is not str
        or not order_id
        or not ticker
        or len(order_id) > MAX_KEY_LENGTH
        or len(ticker) > MAX_KEY_LENGTH
        or type(status) is not str
        or status not in ORDER_STATUSES
    ):
        return None
    user_id, client_order_id, group = get("user_id"), get("client_order_id"), get("order_group_id")
    if (
        (user_id is not None and type(user_id) is not str)
        or (client_order_id is not None and type(client_order_id) is not str)
        or (group is not None and type(group) is not str)
    ):
        return None
    side, action, kind = get("side"), get("action"), get("type")
    outcome, book, stp = get("outcome_side"), get("book_side"), get("self_trade_prevention_type")
    if (
        (side is not None and (type(side) is not str or side not in _SIDES))
        or (action is not None and (type(action) is not str or action not in _ACTIONS))
        or (kind is not None and (type(kind) is not str or kind not in _TYPES))
        or (outcome is not None and (type(outcome) is not str or outcome not in _OUTCOMES))
        or (book is not None and (type(book) is not str or book not in _BOOKS))
        or (stp is not None and (type(stp) is not str or stp not in _STP))
    ):
        return None
    if (outcome is None or book is None) and side is not None and action is not None:
        derived_outcome, derived_book = direction(side, action)
        outcome = outcome or derived_outcome
        book = book or derived_book

    # The 2025 integer fields (absent from 2026 payloads), in the column order.
    ints = (
        get("yes_price"),
        get("no_price"),
        get("fill_count"),
        get("remaining_count"),
        get("initial_count"),
        get("taker_fees"),
        get("maker_fees"),
        get("taker_fill_cost"),
        get("maker_fill_cost"),
        get("queue_position"),
    )
    if ints != _NO_INTS:
        for value, top in zip(ints, _INT_TOPS, strict=True):
            if value is not None and (type(value) is not int or not 0 <= value <= top):
                return None

    values = [get(name) for name in _DECIMAL_FIELDS]
    decimals: list[Decimal | None] | None = _plain_nine(values)
    if decimals is not None:
        texts: list[str | None] = values
    else:
        read = _plain_decimals(values, ints)
        if read is None:
            return None
        decimals, texts = read

    times: list[Any] = []
    for name in ("expiration_time", "created_time", "last_update_time"):
        value = get(name)
        if value is None or value == "":
            times.append(None)
            texts.append(None)
            continue
        if type(value) is not str:
            return None
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        times.append(parsed)
        texts.append(value if _as_postgres_reads(value) else parsed.isoformat())
    pause, subaccount, index = (
        get("cancel_order_on_pause"),
        get("subaccount_number"),
        get("exchange_index"),
    )
    if (
        (pause is not None and type(pause) is not bool)
        or (subaccount is not None and (type(subaccount) is not int or not 0 <= subaccount <= 63))
        or (index is not None and (type(index) is not int or not INT4_MIN <= index <= INT4_MAX))
    ):
        return None
    order = Order(
        order_id,
        ticker,
        status,
        user_id,
        client_order_id,
        kind,
        side,
        action,
        outcome,
        book,
        ints[0],
        ints[1],
        ints[2],
        ints[3],
        ints[4],
        ints[5],
        ints[6],
        ints[7],
        ints[8],
        ints[9],
        decimals[0],
        decimals[1],
        decimals[2],
        decimals[3],
        decimals[4],
        decimals[5],
        decimals[6],
        decimals[7],
        decimals[8],
        times[0],
        times[1],
        times[2],
        stp,
        group,
        pause,
        subaccount,
        index,
        d,
    )
    # The COPY line. A character COPY would need escaped (a backslash, a tab, a line break)
    # can only be in the free-text ids: such an order is left to the full row writer.
    free = f"{order_id}{ticker}{user_id}{client_order_id}{group}"
    if "\\" in free or "\t" in free or "\n" in free or "\r" in free:
        return order
    try:
        raw = orjson.dumps(d).decode()
    except TypeError:  # an integer past 64 bits in a field of its own
        return order
    if "\\" in raw:  # orjson escapes control characters: a backslash is all to double
        raw = raw.replace("\\", "\\\\")
    order.line = "\t".join(
        (
            order_id,
            ticker,
            status,
            _NULL if user_id is None else user_id,
            _NULL if client_order_id is None else client_order_id,
            _NULL if kind is None else kind,
            _NULL if side is None else side,
            _NULL if action is None else action,
            _NULL if outcome is None else outcome,
            _NULL if book is None else book,
            _NULL_INTS
            if ints == _NO_INTS
            else "\t".join([_NULL if v is None else str(v) for v in ints]),
            *[_NULL if t is None else t for t in texts],
            _NULL if stp is None else stp,
            _NULL if group is None else group,
            _NULL if pause is None else ("t" if pause else "f"),
            _NULL if subaccount is None else str(subaccount),
            _NULL if index is None else str(index),
            raw,
        )
    )
    return order


# The times of a `user_order` message: epoch-millisecond fields, and the RFC 3339 field each
# replaces (deprecated; read when the millisecond one is absent).
_MS_TIMES: Final = {
    "created_time": "created_ts_ms",
    "last_update_time": "last_updated_ts_ms",
    "expiration_time": "expiration_ts_ms",
}


def parse_user_order(raw: Any) -> Order | Rejected:
    """Parse the ``msg`` of a WebSocket ``user_order`` message into the same :class:`Order` as
    REST: epoch-millisecond times become datetimes, ``no_price_dollars`` (which the message
    lacks) is ``1 - yes_price_dollars``, and ``raw`` is the message as received. Fields the
    channel never carries (``type``, ``action``, ``cancel_order_on_pause``,
    ``exchange_index``) are ``None``: see :data:`STREAM_LACKS`.
    """
    if not isinstance(raw, dict):
        return _rejected(f"user_order: expected a JSON object, got {type(raw).__name__}", raw)
    problem = storage_problem(raw)
    if problem is not None:
        return _rejected(_named(raw, "user_order: " + problem), raw)
    try:
        times = {
            name: _ms_time(raw, ms) if raw.get(ms) is not None else _time(raw, name)
            for name, ms in _MS_TIMES.items()
        }
        data = raw
        if raw.get("no_price_dollars") is None and raw.get("yes_price_dollars") is not None:
            yes = _decimal(
                raw, "yes_price_dollars", places=_DOLLAR_PLACES, minimum=_ZERO, maximum=_ONE
            )
            assert yes is not None
            data = {**raw, "no_price_dollars": str(_ONE - yes)}
        return _order(data, raw=raw, times=times)
    except RecordError as exc:
        return Rejected(_named(raw, "user_order: " + str(exc)), raw)


# Columns a `user_order` message never fills: a stream version keeps the stored values.
STREAM_LACKS: Final = ("type", "side", "action", "cancel_order_on_pause", "exchange_index")
