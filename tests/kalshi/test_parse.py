"""The parser turns 2025, 2026 and mixed payloads into complete Order records, and every
broken payload into a Rejected value with a precise reason."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from etl.kalshi.parse import (
    Order,
    QueuePosition,
    RecordError,
    Rejected,
    _order,
    _plain_order,
    parse_order,
    parse_queue_position,
    parse_user_order,
    plain_body,
    screened_body,
    storable_text,
    storage_problem,
)

ORDER_2025: dict[str, Any] = {
    "order_id": "ord-2025",
    "user_id": "u1",
    "client_order_id": "c1",
    "ticker": "KXBTC-25NOV21-T100",
    "side": "no",
    "action": "sell",
    "type": "limit",
    "status": "resting",
    "yes_price": 44,
    "no_price": 56,
    "yes_price_dollars": "0.4400",
    "no_price_dollars": "0.5600",
    "fill_count": 3,
    "remaining_count": 7,
    "initial_count": 10,
    "taker_fees": 2,
    "maker_fees": 0,
    "taker_fill_cost": 132,
    "maker_fill_cost": 0,
    "taker_fill_cost_dollars": "1.3200",
    "maker_fill_cost_dollars": "0.0000",
    "queue_position": 0,
    "taker_fees_dollars": "0.0200",
    "maker_fees_dollars": None,
    "expiration_time": None,
    "created_time": "2025-11-01T10:00:00.123456Z",
    "last_update_time": "2025-11-01T10:05:00Z",
    "self_trade_prevention_type": "maker",
    "order_group_id": None,
    "cancel_order_on_pause": False,
}

ORDER_2026: dict[str, Any] = {
    "order_id": "ord-2026",
    "user_id": "u1",
    "client_order_id": "c2",
    "ticker": "KXBTC-26NOV21-T100",
    "outcome_side": "no",
    "book_side": "ask",
    "type": "limit",
    "status": "executed",
    "yes_price_dollars": "0.123456",
    "no_price_dollars": "0.876544",
    "fill_count_fp": "2.50",
    "remaining_count_fp": "0.00",
    "initial_count_fp": "2.50",
    "taker_fill_cost_dollars": "0.308640",
    "maker_fill_cost_dollars": "0.000000",
    "taker_fees_dollars": "0.010000",
    "maker_fees_dollars": "0.000000",
    "created_time": "2026-11-01T10:00:00Z",
    "last_update_time": "2026-11-01T10:00:01Z",
    "self_trade_prevention_type": None,
    "cancel_order_on_pause": True,
    "subaccount_number": 3,
    "exchange_index": 0,
    "a_field_from_the_future": {"nested": [1, 2]},
}


# ORDER_2026 without its nested unknown field: what the live API sends today.
ORDER_2026_PLAIN: dict[str, Any] = {
    k: v for k, v in ORDER_2026.items() if k != "a_field_from_the_future"
}


def parsed(payload: dict[str, Any]) -> Order:
    result = parse_order(payload)
    assert isinstance(result, Order), result
    return result


def test_a_2025_order_gets_its_canonical_columns_derived():
    order = parsed(ORDER_2025)
    assert (order.side, order.action) == ("no", "sell")
    assert (order.outcome_side, order.book_side) == ("yes", "bid")  # selling no bids for yes
    assert order.yes_price == 44 and order.yes_price_dollars == Decimal("0.44")
    assert order.fill_count_fp == Decimal("3.00")
    assert order.remaining_count_fp == Decimal("7.00")
    assert order.initial_count_fp == Decimal("10.00")
    assert order.taker_fees_dollars == Decimal("0.02")
    assert order.maker_fees_dollars == Decimal("0")  # from maker_fees = 0, as the value was null
    assert order.created_time == datetime(2025, 11, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert order.subaccount_number is None


def test_a_2026_order_keeps_fractional_counts_and_six_decimal_dollars():
    order = parsed(ORDER_2026)
    assert order.side is None and order.action is None
    assert order.yes_price is None and order.fill_count is None
    assert order.fill_count_fp == Decimal("2.50")
    assert order.yes_price_dollars == Decimal("0.123456")
    assert (order.outcome_side, order.book_side) == ("no", "ask")
    assert order.subaccount_number == 3


def test_unknown_fields_travel_in_raw():
    assert parsed(ORDER_2026).raw["a_field_from_the_future"] == {"nested": [1, 2]}


def test_a_mixed_payload_prefers_the_given_canonical_fields():
    mixed = {**ORDER_2025, "fill_count_fp": "3.00", "outcome_side": "no", "book_side": "ask"}
    order = parsed(mixed)
    assert order.fill_count == 3 and order.fill_count_fp == Decimal("3.00")


@pytest.mark.parametrize(
    ("side", "action", "outcome", "book"),
    [
        ("yes", "buy", "yes", "bid"),
        ("no", "sell", "yes", "bid"),
        ("no", "buy", "no", "ask"),
        ("yes", "sell", "no", "ask"),
    ],
)
def test_the_legacy_direction_maps_to_outcome_and_book_side(side, action, outcome, book):
    payload = {**ORDER_2025, "side": side, "action": action}
    order = parsed(payload)
    assert (order.outcome_side, order.book_side) == (outcome, book)


def without(payload: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


BROKEN = [
    (without(ORDER_2025, "order_id"), "missing required field 'order_id'"),
    ({**ORDER_2025, "order_id": ""}, "missing required field 'order_id'"),
    (without(ORDER_2025, "ticker"), "missing required field 'ticker'"),
    (without(ORDER_2026, "status"), "missing required field 'status'"),
    ({**ORDER_2025, "status": "teleported"}, "status: unknown value 'teleported'"),
    ({**ORDER_2025, "side": "maybe"}, "side: unknown value 'maybe'"),
    ({**ORDER_2026, "book_side": "middle"}, "book_side: unknown value 'middle'"),
    ({**ORDER_2025, "type": "stop"}, "type: unknown value 'stop'"),
    ({**ORDER_2025, "yes_price": "44"}, "yes_price: expected an integer, got str"),
    ({**ORDER_2025, "fill_count": True}, "fill_count: expected an integer, got bool"),
    ({**ORDER_2025, "fill_count": 2.5}, "fill_count: expected an integer, got 2.5"),
    ({**ORDER_2025, "remaining_count": -1}, "remaining_count: must be >= 0, got -1"),
    ({**ORDER_2025, "yes_price": 150}, "yes_price: a price is at most 100 cents"),
    ({**ORDER_2026, "fill_count_fp": "-2.00"}, "fill_count_fp: must be >= 0"),
    ({**ORDER_2026, "fill_count_fp": "lots"}, "fill_count_fp: expected a decimal string"),
    ({**ORDER_2026, "fill_count_fp": "1.005"}, "fill_count_fp: more than 2 decimals"),
    ({**ORDER_2026, "yes_price_dollars": "1.5"}, "yes_price_dollars: must be <= 1"),
    ({**ORDER_2026, "taker_fees_dollars": "NaN"}, "taker_fees_dollars: expected a finite"),
    ({**ORDER_2026, "created_time": "yesterday"}, "created_time: expected an RFC 3339 time"),
    ({**ORDER_2026, "last_update_time": 1700000000}, "last_update_time: expected an RFC 3339"),
    ({**ORDER_2026, "ticker": 42}, "ticker: expected a string, got int"),
    ({**ORDER_2026, "cancel_order_on_pause": "yes"}, "cancel_order_on_pause: expected true"),
    ({**ORDER_2026, "subaccount_number": 64}, "subaccount_number: must be 0-63"),
    ({**ORDER_2026, "fill_count_fp": "1e30"}, "fill_count_fp: out of range"),
    # Values that parse but that PostgreSQL would refuse: rejected by the parser, never a page.
    ({**ORDER_2025, "fill_count": 2**31}, "fill_count: out of range (at most 2147483647)"),
    ({**ORDER_2025, "fill_count": 10**30}, "fill_count: out of range (at most 2147483647)"),
    ({**ORDER_2025, "taker_fees": -(2**31) - 1}, "taker_fees: must be >= -2147483648"),
    ({**ORDER_2026, "exchange_index": 2**40}, "exchange_index: out of range"),
    ({**ORDER_2026, "order_id": "o" * 3000}, "order_id: longer than 512 characters"),
    ({**ORDER_2026, "ticker": "T" * 3000}, "ticker: longer than 512 characters"),
    ({**ORDER_2026, "extra": float("inf")}, "contains the number inf"),
    ({**ORDER_2026, "extra": float("nan")}, "contains the number nan"),
    ({**ORDER_2026, "client_order_id": "x\ud800y"}, "lone UTF-16 surrogate"),
    ({**ORDER_2026, "extra": {"\udc00key": 1}}, "lone UTF-16 surrogate"),
    ({**ORDER_2026, "extra": json.loads("[" * 100 + "]" * 100)}, "nested deeper than 64 levels"),
]


@pytest.mark.parametrize(("payload", "reason"), BROKEN, ids=[r for _, r in BROKEN])
def test_a_broken_order_is_rejected_with_its_reason(payload, reason):
    result = parse_order(payload)
    assert isinstance(result, Rejected)
    assert reason in result.reason
    if storage_problem(payload) is None:
        assert result.raw is payload
    else:  # what jsonb cannot hold is kept as escaped JSON text, which text can
        assert isinstance(result.raw, str) and storage_problem(result.raw) is None


def test_an_unstorable_payload_is_kept_as_escaped_text_that_reads_back():
    payload = {**ORDER_2026, "extra": float("inf"), "note": "a\x00b\ud800"}
    result = parse_order(payload)
    assert isinstance(result, Rejected) and isinstance(result.raw, str)
    assert "Infinity" in result.raw and "\\u0000" in result.raw and "\\ud800" in result.raw
    assert json.loads(result.raw)["order_id"] == ORDER_2026["order_id"]


def test_text_that_postgresql_refuses_is_escaped():
    assert storable_text("a\x00b\ud800c") == "a\\u0000b\\ud800c"
    assert storable_text("x" * 10, limit=5) == "xxxx…"


def test_a_rejection_names_the_order_when_it_has_an_id():
    result = parse_order({**ORDER_2025, "status": "bogus"})
    assert isinstance(result, Rejected)
    assert result.reason.startswith("order ord-2025: ")


@pytest.mark.parametrize("payload", [None, "order", 42, ["order_id"]])
def test_a_payload_that_is_not_an_object_is_rejected(payload):
    result = parse_order(payload)
    assert isinstance(result, Rejected)
    assert "expected a JSON object" in result.reason


@pytest.mark.parametrize(
    ("payload", "position"),
    [
        ({"order_id": "a", "market_ticker": "M", "queue_position": 12}, Decimal("12.00")),
        ({"order_id": "a", "market_ticker": "M", "queue_position_fp": "10.50"}, Decimal("10.50")),
    ],
)
def test_queue_positions_of_both_generations_parse(payload, position):
    result = parse_queue_position(payload)
    assert isinstance(result, QueuePosition)
    assert result.queue_position == position


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"market_ticker": "M", "queue_position": 1}, "missing required field 'order_id'"),
        ({"order_id": "a", "market_ticker": "M"}, "missing required field 'queue_position_fp'"),
        ({"order_id": "a", "market_ticker": "M", "queue_position_fp": "x"}, "expected a decimal"),
        ({"order_id": "a", "market_ticker": "M", "queue_position": -3}, "must be >= 0"),
        ({"order_id": "a", "market_ticker": "M", "queue_position": 10**17}, "out of range"),
        ({"order_id": "a", "market_ticker": "M", "queue_position_fp": "1e17"}, "out of range"),
        ({"order_id": "a", "market_ticker": "M" * 600, "queue_position": 1}, "longer than 512"),
    ],
)
def test_broken_queue_positions_are_rejected(payload, reason):
    result = parse_queue_position(payload)
    assert isinstance(result, Rejected)
    assert reason in result.reason


def test_a_nul_character_anywhere_rejects_the_order_keeping_it_as_json_text():
    result = parse_order({**ORDER_2026, "extra": {"note": "a\x00b"}})
    assert isinstance(result, Rejected)
    assert "NUL" in result.reason
    assert isinstance(result.raw, str) and "\\u0000" in result.raw


# -- user_order messages of the WebSocket ------------------------------------------------------

USER_ORDER: dict[str, Any] = {
    "order_id": "ord-ws",
    "user_id": "u1",
    "client_order_id": "c1",
    "ticker": "KXBTC-26NOV21-T100",
    "status": "resting",
    "outcome_side": "no",
    "book_side": "ask",
    "yes_price_dollars": "0.4400",
    "fill_count_fp": "3.00",
    "remaining_count_fp": "7.00",
    "initial_count_fp": "10.00",
    "taker_fill_cost_dollars": "1.3200",
    "maker_fill_cost_dollars": "0.0000",
    "taker_fees_dollars": "0.0200",
    "maker_fees_dollars": "0.0000",
    "created_ts_ms": 1763640000123,
    "last_updated_ts_ms": 1763640005456,
    "expiration_ts_ms": 1763726400000,
    "subaccount_number": 2,
}


def test_a_user_order_message_becomes_the_same_record_as_rest():
    order = parse_user_order(USER_ORDER)
    assert isinstance(order, Order), order
    assert order.created_time == datetime(2025, 11, 20, 12, 0, 0, 123000, tzinfo=UTC)
    assert order.last_update_time == datetime(2025, 11, 20, 12, 0, 5, 456000, tzinfo=UTC)
    assert order.expiration_time == datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
    assert order.no_price_dollars == Decimal("0.5600")  # derived: the message lacks it
    assert (order.outcome_side, order.book_side, order.subaccount_number) == ("no", "ask", 2)
    assert order.remaining_count_fp == Decimal("7.00")
    assert order.type is None and order.cancel_order_on_pause is None
    assert order.raw == USER_ORDER  # the message as received, not the derived fields


def test_a_user_order_message_equals_the_rest_version_of_the_same_change():
    rest = {
        **{k: v for k, v in USER_ORDER.items() if not k.endswith("_ms")},
        "no_price_dollars": "0.5600",
        "created_time": "2025-11-20T12:00:00.123Z",
        "last_update_time": "2025-11-20T12:00:05.456Z",
        "expiration_time": "2025-11-21T12:00:00Z",
    }
    from_rest, from_stream = parsed(rest), parse_user_order(USER_ORDER)
    assert isinstance(from_stream, Order)
    assert replace(from_rest, raw={}) == replace(from_stream, raw={})


def test_deprecated_rfc3339_times_are_read_when_the_milliseconds_are_absent():
    message = {
        **{k: v for k, v in USER_ORDER.items() if not k.endswith("_ms")},
        "created_time": "2025-11-20T12:00:00Z",
        "last_update_time": "2025-11-20T12:00:01Z",
        "side": "no",
    }
    order = parse_user_order(message)
    assert isinstance(order, Order)
    assert order.last_update_time == datetime(2025, 11, 20, 12, 0, 1, tzinfo=UTC)
    assert order.side == "no"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"created_ts_ms": "1763640000123"}, "created_ts_ms: expected epoch milliseconds, got str"),
        ({"last_updated_ts_ms": 1.5}, "last_updated_ts_ms: expected whole epoch milliseconds"),
        ({"last_updated_ts_ms": -1}, "last_updated_ts_ms: not a time in epoch milliseconds"),
        ({"expiration_ts_ms": 10**20}, "expiration_ts_ms: not a time in epoch milliseconds"),
        ({"yes_price_dollars": "1.5"}, "yes_price_dollars: must be <= 1"),
        ({"status": "teleported"}, "status: unknown value 'teleported'"),
        ({"ticker": None}, "missing required field 'ticker'"),
    ],
)
def test_a_broken_user_order_message_is_rejected_with_its_reason(change, reason):
    result = parse_user_order({**USER_ORDER, **change})
    assert isinstance(result, Rejected)
    assert result.reason.startswith("order ord-ws: user_order: ")
    assert reason in result.reason


def test_a_user_order_message_that_is_not_an_object_is_rejected():
    result = parse_user_order(["not", "an", "order"])
    assert isinstance(result, Rejected)
    assert result.reason == "user_order: expected a JSON object, got list"


# -- the fast path gives what the full parser gives -------------------------------------------

ODD_VALUES: list[Any] = [
    None,
    "",
    " ",
    0,
    -1,
    1,
    101,
    2**31,
    1.5,
    2.0,
    True,
    "x",
    "yes",
    "bid",
    "limit",
    "resting",
    "1e3",
    "0.5",
    "0.1234567",
    "-0.5",
    "12.00",
    "1.0000001",
    "٣",
    "0.5 ",
    "2026-01-01T00:00:00Z",
    " 2026-01-01T00:00:00+02:00 ",
    "2026-01-01T00:00:00",
    "2026-01-01T00:00:00.1234567Z",
    "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00.5-05:00",
    "2026-13-01",
    [],
    {},
    "a" * 600,
    "tab\there",
    "back\\slash",
    'a "quoted" id',
]


def columns(order: Order) -> list[Any]:
    return [getattr(order, f.name) for f in fields(Order) if f.name != "line"]


def copy_values(line: str) -> list[Any]:
    """The values a line of COPY's text format denotes, read by each column's type."""
    types = {f.name: str(f.type) for f in fields(Order) if f.name != "line"}
    cells = line.split("\t")
    assert len(cells) == len(types)
    values: list[Any] = []
    for cell, kind in zip(cells, types.values(), strict=True):
        text = None if cell == "\\N" else cell.replace("\\\\", "\\")
        if text is None:
            values.append(None)
        elif kind.startswith("int"):
            values.append(int(text))
        elif kind.startswith("Decimal"):
            values.append(Decimal(text))
        elif kind.startswith("datetime"):
            values.append(datetime.fromisoformat(text))
        elif kind.startswith("bool"):
            values.append({"t": True, "f": False}[text])
        elif kind.startswith("Mapping"):
            values.append(json.loads(text))
        else:
            values.append(text)
    return values


def mutations(base: dict[str, Any]):
    yield base
    for key in {*base, "yes_price", "fill_count", "queue_position", "exchange_index"}:
        for value in ODD_VALUES:
            yield {**base, key: value}
        changed = dict(base)
        changed.pop(key, None)
        yield changed


@pytest.mark.parametrize("base", [ORDER_2025, ORDER_2026], ids=["2025", "2026"])
def test_the_fast_path_accepts_only_what_the_full_parser_accepts_and_gives_the_same(base):
    accepted = lines = 0
    for payload in mutations(base):
        fast = _plain_order(payload)
        try:
            full: Order | None = _order(payload)
        except RecordError:
            full = None
        if fast is not None:
            accepted += 1
            assert full is not None and fast == full, payload
            if fast.line is not None:
                lines += 1
                assert copy_values(fast.line) == columns(fast), payload
    assert accepted > 50  # the common forms do take the fast path
    assert lines > 50  # and are handed to COPY as lines


# -- the page screen that lets plain records skip the storage scan -----------------------------


def page(*orders: Any) -> tuple[bytes, list[Any]]:
    body = json.dumps({"orders": list(orders), "cursor": ""}).encode()
    return body, json.loads(body)["orders"]


@pytest.mark.parametrize(
    ("orders", "screened"),
    [
        pytest.param([ORDER_2026_PLAIN, ORDER_2026_PLAIN], True, id="plain records"),
        pytest.param([{**ORDER_2026_PLAIN, "user_id": "a\x00b"}], False, id="a NUL escape"),
        pytest.param([{**ORDER_2026_PLAIN, "user_id": "\ud800"}], False, id="a lone surrogate"),
        pytest.param([{**ORDER_2026_PLAIN, "user_id": "\u00e9"}], False, id="any \\u escape"),
        pytest.param([{**ORDER_2026_PLAIN, "extra": {"a": 1}}], False, id="a nested object"),
        pytest.param([{**ORDER_2026_PLAIN, "extra": [1]}], False, id="a nested list"),
        pytest.param(
            [5, {**ORDER_2026_PLAIN, "extra": {"a": 1}}], False, id="a non-object hiding a brace"
        ),
    ],
)
def test_a_page_is_screened_only_when_no_record_can_hold_what_jsonb_refuses(orders, screened):
    body, items = page(*orders)
    assert screened_body(body, items) is screened


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        (b'{"a": 123456789012345678, "b": "0.5"}', True),
        (b'{"a": 12345678901234567890123}', False),
        (b'{"id": "12345678901234567890123"}', False),  # in a string: the safe side
    ],
)
def test_a_body_is_plain_unless_it_may_hold_an_integer_past_64_bits(text, plain):
    assert plain_body(text) is plain
