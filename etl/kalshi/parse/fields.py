"""Reading one field of a record: the readers every record kind shares, each raising
:class:`RecordError` with the field's name, and the checks that keep what PostgreSQL cannot
store out of the tables (:func:`storage_problem`). Pure."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

_ENUMS: Final[dict[str, frozenset[str]]] = {
    "side": frozenset({"yes", "no"}),
    "action": frozenset({"buy", "sell"}),
    "type": frozenset({"limit", "market"}),
    "outcome_side": frozenset({"yes", "no"}),
    "book_side": frozenset({"bid", "ask"}),
    "self_trade_prevention_type": frozenset({"taker_at_cross", "maker"}),
}
_CENTS: Final = Decimal(100)
_ZERO: Final = Decimal(0)
_ONE: Final = Decimal(1)
_DOLLAR_PLACES: Final = 6
_COUNT_PLACES: Final = 2
_QUANTUM: Final = {p: Decimal(1).scaleb(-p) for p in (_DOLLAR_PLACES, _COUNT_PLACES)}
_NUMERIC_LIMIT: Final = {p: Decimal(10) ** (18 - p) for p in (_DOLLAR_PLACES, _COUNT_PLACES)}
_DOLLARS_Q: Final = _QUANTUM[_DOLLAR_PLACES]
_COUNT_Q: Final = _QUANTUM[_COUNT_PLACES]
INT4_MIN: Final = -(2**31)
INT4_MAX: Final = 2**31 - 1
# Indexed text (order_id, ticker) must fit a btree entry (~2.7 kB): 512 characters of up to
# 4 bytes each leave room. No real id or ticker comes near it.
MAX_KEY_LENGTH: Final = 512
# A payload nested deeper than this is not an order; it also keeps every recursive step
# (json encoder, jsonb input) far from its limits.
MAX_DEPTH: Final = 64
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


# An unsigned decimal that numeric(18, p) holds exactly: at most 18 - p integer digits and p
# decimals (what the API sends: "0.5600", "12.00").
def _decimal_form(places: int) -> str:
    return rf"\d{{1,{18 - places}}}(?:\.\d{{1,{places}}})?"


_PLAIN_DECIMAL: Final = {
    p: re.compile(_decimal_form(p)).fullmatch for p in (_DOLLAR_PLACES, _COUNT_PLACES)
}
# Every byte that is a digit as b"0", the rest as b" ": a run of 20 digits shows as a run of
# 20 b"0" (bytes.translate and bytes.find run at C speed; a regex here costs 10x more).
_DIGITS: Final = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_TWENTY_DIGITS: Final = b"0" * 20


def plain_body(body: bytes) -> bool:
    """Whether ``body`` holds no run of 20 digits, so no integer past 64 bits: then orjson
    reads it exactly as the standard library does (it turns such integers into floats)."""
    return _TWENTY_DIGITS not in body.translate(_DIGITS)


def screened_body(body: bytes, items: list[Any]) -> bool:
    """Whether every record of a list page (``{"key": [{...}, ...], ...}`` whose list orjson
    decoded into ``items``) is sure to pass :func:`storage_problem`: every item an object, no
    ``\\u`` escape (so no NUL and no lone surrogate), no object or list but the page's own (so
    nothing nested inside a record); and orjson never yields an infinite or NaN number."""
    return (
        body.count(b"{") == len(items) + 1
        and body.count(b"[") == 1
        # (a backslash is rare: one byte is searched far faster than two)
        and (b"\\" not in body or b"\\u" not in body)
        and all(type(item) is dict for item in items)
    )


class RecordError(ValueError):
    """Why a record was rejected (internal to this module; surfaces as ``Rejected.reason``)."""


@dataclass(frozen=True)
class Rejected:
    """A payload that could not be parsed, kept with the reason."""

    reason: str
    raw: Any


# -- field readers: each raises RecordError with the field name --------------------------------


def _text(
    data: Mapping[str, Any], name: str, *, required: bool = False, max_length: int | None = None
) -> str | None:
    value = data.get(name)
    if value is None or (required and value == ""):
        if required:
            raise RecordError(f"missing required field {name!r}")
        return None
    if not isinstance(value, str):
        raise RecordError(f"{name}: expected a string, got {type(value).__name__} {value!r:.40}")
    if max_length is not None and len(value) > max_length:
        raise RecordError(f"{name}: longer than {max_length} characters ({len(value)})")
    return value


def _enum(data: Mapping[str, Any], name: str) -> str | None:
    value = _text(data, name)
    if value is not None and value not in _ENUMS[name]:
        allowed = "|".join(sorted(_ENUMS[name]))
        raise RecordError(f"{name}: unknown value {value!r} (expected {allowed})")
    return value


def _int(
    data: Mapping[str, Any], name: str, *, minimum: int = INT4_MIN, maximum: int = INT4_MAX
) -> int | None:
    """An integer that fits its column (``integer`` unless ``maximum`` says otherwise)."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{name}: expected an integer, got {type(value).__name__} {value!r:.40}")
    if isinstance(value, float):
        if not value.is_integer():
            raise RecordError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    if value < minimum:
        raise RecordError(f"{name}: must be >= {minimum}, got {_digits(value)}")
    if value > maximum:
        raise RecordError(f"{name}: out of range (at most {maximum}), got {_digits(value)}")
    return value


def _digits(value: int) -> str:
    """A short rendering of a possibly huge integer, for a reason text."""
    if value.bit_length() < 200:
        return str(value)
    return f"a {math.floor(value.bit_length() * math.log10(2)) + 1}-digit number"


def _decimal(
    data: Mapping[str, Any],
    name: str,
    *,
    places: int,
    minimum: Decimal | None = None,
    maximum: Decimal | None = None,
) -> Decimal | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) is str and _PLAIN_DECIMAL[places](value):
        # The common case: unsigned, few enough digits for numeric(18, places), no more
        # decimals than it keeps. Only the bounds remain to check.
        number = Decimal(value)
        if maximum is not None and number > maximum:
            raise RecordError(f"{name}: must be <= {maximum}, got {value}")
        return number
    if type(value) is str:
        text = value
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(
            f"{name}: expected a decimal string, got {type(value).__name__} {value!r:.40}"
        )
    else:
        text = str(value)
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise RecordError(f"{name}: expected a decimal string, got {value!r:.40}") from None
    if not number.is_finite():
        raise RecordError(f"{name}: expected a finite number, got {value!r:.40}")
    if minimum is not None and number < minimum:
        raise RecordError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and number > maximum:
        raise RecordError(f"{name}: must be <= {maximum}, got {value}")
    if abs(number) >= _NUMERIC_LIMIT[places]:  # must fit numeric(18, places)
        raise RecordError(f"{name}: out of range: {value!r:.40}")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -places and number != number.quantize(_QUANTUM[places]):
        raise RecordError(f"{name}: more than {places} decimals: {value!r}")
    return number


def _time(data: Mapping[str, Any], name: str) -> datetime | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError(f"{name}: expected an RFC 3339 time, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RecordError(f"{name}: expected an RFC 3339 time, got {value!r:.40}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bool(data: Mapping[str, Any], name: str) -> bool | None:
    value = data.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise RecordError(f"{name}: expected true or false, got {value!r:.40}")


# -- derivations ------------------------------------------------------------------------------


def _dollars_from_cents(cents: int | None) -> Decimal | None:
    return None if cents is None else (Decimal(cents) / _CENTS).quantize(_DOLLARS_Q)


def _fp_from_count(count: int | None) -> Decimal | None:
    return None if count is None else Decimal(count).quantize(_COUNT_Q)


def direction(side: str | None, action: str | None) -> tuple[str | None, str | None]:
    """(outcome_side, book_side) of a legacy side/action: buying yes or selling no bids for yes;
    buying no or selling yes asks (outcome no)."""
    if side is None or action is None:
        return None, None
    if (side, action) in {("yes", "buy"), ("no", "sell")}:
        return "yes", "bid"
    return "no", "ask"


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS: Final = int((datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH).total_seconds()) * 1000


def _ms_time(data: Mapping[str, Any], name: str) -> datetime | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(
            f"{name}: expected epoch milliseconds, got {type(value).__name__} {value!r:.40}"
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise RecordError(f"{name}: expected whole epoch milliseconds, got {value!r}")
        value = int(value)
    if not 0 <= value <= _MAX_MS:
        raise RecordError(f"{name}: not a time in epoch milliseconds: {_digits(value)}")
    return _EPOCH + timedelta(milliseconds=value)


def storage_problem(value: Any) -> str | None:
    """Why PostgreSQL could not store ``value`` as ``jsonb`` (or its strings as ``text``), or
    ``None`` when it can: a NUL character, a lone UTF-16 surrogate, an infinite or NaN number
    (what ``1e400`` decodes to), or nesting deeper than :data:`MAX_DEPTH`. Iterative, so any
    depth is safe to scan."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
            if not item.isascii() and _SURROGATE.search(item):
                return "contains a lone UTF-16 surrogate (like \\ud800), which is not valid text"
        elif kind is float:
            if not math.isfinite(item):
                return f"contains the number {item!r}, which JSON and jsonb cannot hold"
        elif kind is dict or kind is list:
            if depth >= MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            if kind is dict:
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def escaped_text(raw: Any) -> str:
    """``raw`` as JSON text that PostgreSQL's ``text`` can hold whatever it contains: NUL and
    surrogates escaped, ``Infinity``/``NaN`` spelled out, nesting past 200 levels cut (marked)."""
    try:
        return json.dumps(raw, ensure_ascii=True)
    except (RecursionError, ValueError):
        return json.dumps(_cut(raw, 200), ensure_ascii=True)


def storable_text(text: str, *, limit: int | None = None) -> str:
    """``text`` with what PostgreSQL's ``text`` refuses escaped (NUL, lone surrogates), cut to
    ``limit`` characters."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _cut(value: Any, levels: int) -> Any:
    if not isinstance(value, dict | list):
        return value if not isinstance(value, int) or value.bit_length() < 10_000 else str(value)
    if levels <= 0:
        return "(nested deeper: not kept)"
    if isinstance(value, dict):
        return {str(key): _cut(item, levels - 1) for key, item in value.items()}
    return [_cut(item, levels - 1) for item in value]


def _rejected(reason: str, raw: Any) -> Rejected:
    """A rejection whose payload can be stored: as JSON when ``jsonb`` can hold it, else as
    escaped text."""
    return Rejected(reason, raw if storage_problem(raw) is None else escaped_text(raw))
