"""The client: cursor pagination that resends filters, a repeated cursor detected, retries of
429/5xx/network errors with backoff (Retry-After honoured), 4xx surfaced and not retried, and a
token bucket that holds the request rate under its budget."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest

from etl.errors import ApiProtocolError, ApiStatusError, ApiTransportError
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import (
    KalshiClient,
    RetryPolicy,
    TokenBucket,
    decode_body,
    error_details,
    parse_retry_after,
)
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from tests.fix_exchange import BASE, NOW, Sleeps, make_client


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def orders_body(orders: list[dict], cursor: object = "") -> httpx.Response:
    return httpx.Response(200, json={"orders": orders, "cursor": cursor})


def test_pages_follow_the_cursor_and_resend_every_filter(app, private_key, exchange):
    client = make_client(app, private_key, page_size=3)
    event = exchange.tickers[0].rsplit("-", 1)[0]
    pages = list(client.iter_order_pages(event_tickers=[event], min_ts=1, max_ts=2_000_000_000))
    expected = sum(1 for o in exchange if o.event_ticker == event and not exchange.is_historical(o))
    assert len(pages) >= 5
    assert sum(len(p.items) for p in pages) == expected
    assert {o["ticker"].rsplit("-", 1)[0] for p in pages for o in p.items} == {event}
    queries = [parse_qs(q) for path, q in app.requests if path.endswith("/portfolio/orders")]
    assert len(queries) == len(pages)
    for query in queries:
        assert query["event_ticker"] == [event] and query["min_ts"] == ["1"]
        assert query["max_ts"] == ["2000000000"] and query["limit"] == ["3"]
    assert "cursor" not in queries[0] and all("cursor" in q for q in queries[1:])
    assert pages[-1].cursor is None and all(p.cursor for p in pages[:-1])


@pytest.mark.parametrize("end", ["", None, "missing"])
def test_an_empty_null_or_missing_cursor_ends_the_listing(private_key, end):
    def handler(request: httpx.Request) -> httpx.Response:
        body: dict[str, object] = {"orders": [{"order_id": "a"}]}
        if end != "missing":
            body["cursor"] = end
        return httpx.Response(200, json=body)

    pages = list(make_client(mock(handler), private_key).iter_order_pages())
    assert len(pages) == 1 and pages[0].is_last


def test_a_repeated_cursor_is_an_error_not_a_loop(private_key):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return orders_body([{"order_id": str(len(calls))}], cursor="same")

    with pytest.raises(ApiProtocolError, match="cursor 'same' twice"):
        list(make_client(mock(handler), private_key).iter_order_pages())
    assert len(calls) == 2


def test_429_and_5xx_are_retried_then_succeed(private_key):
    answers = [
        httpx.Response(429, json={"error": "too many requests"}),
        httpx.Response(503, json={"code": "unavailable", "message": "busy"}),
        httpx.Response(500, text="oops"),
        orders_body([{"order_id": "a"}]),
    ]
    sleeps = Sleeps()
    client = make_client(mock(lambda r: answers.pop(0)), private_key, sleep=sleeps)
    assert next(client.iter_order_pages()).items == [{"order_id": "a"}]
    assert not answers and len(sleeps) == 3
    assert all(0 <= s <= 0.05 for s in sleeps)


def test_retry_after_is_honoured(private_key):
    answers = [httpx.Response(429, headers={"Retry-After": "2"}), orders_body([])]
    sleeps = Sleeps()
    client = make_client(mock(lambda r: answers.pop(0)), private_key, sleep=sleeps)
    list(client.iter_order_pages())
    assert sleeps == [2.0]


def test_each_retry_is_signed_afresh(private_key):
    seen: list[str] = []
    clock = iter([1000.0, 1001.0, 1002.0])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["KALSHI-ACCESS-TIMESTAMP"])
        return httpx.Response(503) if len(seen) < 2 else orders_body([])

    client = KalshiClient(
        BASE,
        auth=KalshiAuth("k", private_key, clock=lambda: next(clock)),
        transport=mock(handler),
        sleep=Sleeps(),
    )
    list(client.iter_order_pages())
    assert seen == ["1000000", "1001000"]


def test_a_400_is_surfaced_with_the_api_message_and_not_retried(app, private_key):
    client = make_client(app, private_key, page_size=5000)
    with pytest.raises(ApiStatusError) as caught:
        next(client.iter_order_pages())
    assert caught.value.status == 400
    assert caught.value.api_message == "limit must be between 1 and 1000"
    assert "limit must be between 1 and 1000" in str(caught.value)
    assert len(app.requests) == 1


def limits_asked(app: SimulatorApp) -> list[str]:
    return [parse_qs(q)["limit"][0] for path, q in app.requests if path.endswith("/orders")]


def test_auto_page_size_asks_1000_where_the_server_accepts_it(app, private_key, exchange):
    client = make_client(app, private_key, page_size="auto")
    orders = [o for page in client.iter_order_pages() for o in page.items]
    assert len(orders) == sum(1 for o in exchange if not exchange.is_historical(o))
    assert set(limits_asked(app)) == {"1000"}


def test_auto_page_size_falls_back_to_200_after_a_400_and_remembers_for_that_endpoint(
    private_key,
):
    exchange = Exchange(seed=3, orders=450, api="2025", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    client = make_client(app, private_key, page_size="auto")
    first = [o for page in client.iter_order_pages() for o in page.items]
    assert len(first) == 450
    assert limits_asked(app) == ["1000", "200", "200", "200"]
    list(client.iter_order_pages(status="resting"))  # a later listing starts at 200
    assert limits_asked(app)[4:] and set(limits_asked(app)[4:]) == {"200"}
    assert client.page_size_of("portfolio/orders") == 200
    # Another endpoint asks 1000 until it refuses it itself (CONTRACT.md: per endpoint).
    list(client.iter_pages("portfolio/fills", "fills"))
    fills = [parse_qs(q)["limit"][0] for path, q in app.requests if path.endswith("/fills")]
    assert fills[0] == "1000"


def test_deposits_and_withdrawals_ask_at_most_500(private_key, app):
    client = make_client(app, private_key, page_size="auto")
    assert client.page_size_of("portfolio/deposits") == 500
    assert client.page_size_of("portfolio/withdrawals") == 500
    assert client.page_size_of("portfolio/fills") == 1000


def test_a_fixed_page_size_the_server_refuses_is_not_lowered(private_key):
    exchange = Exchange(seed=3, orders=10, api="2025", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    with pytest.raises(ApiStatusError, match="limit must be between 1 and 200"):
        list(make_client(app, private_key, page_size=1000).iter_order_pages())


def test_retries_are_bounded(private_key):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(502, json={"error": {"code": "bad_gateway", "message": "down"}})

    with pytest.raises(ApiStatusError, match="502 \\(bad_gateway: down\\)"):
        list(make_client(mock(handler), private_key).iter_order_pages())
    assert len(calls) == 4


def test_network_errors_are_retried_then_reported(private_key):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadTimeout("timed out")

    with pytest.raises(ApiTransportError, match="cannot reach the Kalshi API at simulator.test"):
        list(make_client(mock(handler), private_key).iter_order_pages())
    assert len(calls) == 4


def test_a_refused_connection_is_tried_only_a_few_times(private_key):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("connection refused")

    with pytest.raises(ApiTransportError, match="ConnectError: connection refused"):
        list(make_client(mock(handler), private_key).iter_order_pages())
    assert len(calls) == RetryPolicy().connect_attempts == 3


def test_a_body_that_is_not_json_is_a_protocol_error_that_keeps_the_body(private_key):
    client = make_client(
        mock(lambda r: httpx.Response(200, text="<html>gateway</html>")), private_key
    )
    with pytest.raises(ApiProtocolError) as caught:
        list(client.iter_order_pages())
    assert caught.value.body == "<html>gateway</html>"


def test_get_order_returns_none_on_404(client):
    assert client.get_order("no-such-order") is None


def test_get_order_returns_the_order(client, exchange):
    order_id = exchange.resting_ids()[0]
    assert client.get_order(order_id)["order_id"] == order_id


def test_queue_positions_are_asked_in_chunks_and_null_means_none(private_key):
    queries: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(parse_qs(request.url.query.decode()))
        return httpx.Response(200, json={"queue_positions": None})

    client = make_client(mock(handler), private_key)
    tickers = [f"M{i:03d}" for i in range(120)]
    assert client.queue_positions(market_tickers=tickers, subaccount=2).items == []
    assert len(queries) == 3
    assert sum(len(q["market_tickers"][0].split(",")) for q in queries) == 120
    assert all(q["subaccount"] == ["2"] for q in queries)


def test_queue_positions_of_the_simulator(client, exchange):
    positions = client.queue_positions(market_tickers=exchange.tickers).items
    resting_sub0 = [i for i in exchange.resting_ids() if exchange.order(i).subaccount == 0]
    assert sorted(p["order_id"] for p in positions) == sorted(resting_sub0)
    assert all(isinstance(p["queue_position_fp"], str) for p in positions)


def test_a_2025_server_has_no_historical_tier(private_key):
    exchange = Exchange(seed=2, orders=50, api="2025", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    client = make_client(app, private_key)
    assert client.historical_cutoff() is None
    assert list(client.iter_historical_order_pages()) == []


def test_the_2026_historical_tier_serves_old_final_orders(client, exchange):
    cutoff = client.historical_cutoff()
    assert cutoff is not None and cutoff.orders_updated_ts == exchange.cutoff()
    historical = [o for p in client.iter_historical_order_pages() for o in p.items]
    live = [o for p in client.iter_order_pages() for o in p.items]
    assert historical and live
    assert {o["order_id"] for o in historical}.isdisjoint(o["order_id"] for o in live)
    assert len(historical) + len(live) == len(exchange.truth())


def test_the_user_data_timestamp_is_read(client, exchange):
    assert client.user_data_timestamp() == exchange.user_data_timestamp()


class FakeClock:
    """Monotonic seconds that move only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_client_stays_under_a_server_bucket_of_the_same_budget_despite_jitter(
    exchange, private_key
):
    """Client and server buckets on one fake clock; each request reaches the server 0 to
    20 ms late (network jitter, alternating), which squeezes the gaps the server sees. The
    client, empty at start with 1 s of burst, never draws a 429; a client that started full
    with the server's 2 s burst would, as soon as both buckets ran dry."""
    budget = 200.0  # Kalshi's Basic tier: a list call costs 10, so 20 calls/s
    clock = FakeClock()
    jitter = [0.0]
    server_app = SimulatorApp(
        exchange,
        {key_id(private_key): private_key.public_key()},
        advance=False,
        tokens_per_second=budget,
        bucket_clock=lambda: clock.now + jitter[0],
    )
    answered: list[int] = []

    def transport(request: httpx.Request) -> httpx.Response:
        jitter[0] = 0.02 if len(answered) % 2 == 0 else 0.0
        answer = httpx.WSGITransport(app=server_app).handle_request(request)
        answer.read()
        answered.append(answer.status_code)
        return httpx.Response(answer.status_code, content=answer.content)

    client = KalshiClient(
        BASE,
        auth=KalshiAuth(key_id(private_key), private_key),
        transport=mock(transport),
        tokens_per_second=budget,
        sleep=clock.sleep,
        bucket_clock=clock,
        retry=RetryPolicy(max_attempts=1),
    )
    started = clock.now
    calls = 200
    for _ in range(calls):
        client.queue_positions(market_tickers=["X"])
    assert answered == [200] * calls  # not one 429
    # Empty at start: every token is paid for at the budget's pace.
    assert clock.now - started >= calls * 10 / budget - 1e-6


def test_the_token_bucket_waits_for_tokens_with_a_fake_clock():
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(10, burst=10, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        bucket.acquire(10)
    assert now[0] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            json.dumps({"code": "bad", "message": "limit too big", "details": ""}),
            ("bad", "limit too big"),
        ),
        (
            json.dumps({"error": {"code": "auth", "message": "invalid signature"}}),
            ("auth", "invalid signature"),
        ),
        (json.dumps({"error": "too many requests"}), (None, "too many requests")),
        ("<html>502 Bad Gateway</html>", (None, "<html>502 Bad Gateway</html>")),
    ],
)
def test_error_bodies_of_every_shape_give_code_and_message(body, expected):
    assert error_details(body) == expected


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_server_without_an_optional_endpoint_means_none_without_retrying(private_key, status):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, json={"code": "nope", "message": "not here"})

    client = make_client(mock(handler), private_key)
    assert client.user_data_timestamp() is None
    assert client.historical_cutoff() is None
    assert list(client.iter_historical_order_pages()) == []
    assert len(calls) == 3


def test_a_page_larger_than_its_limit_is_refused(private_key):
    handler = lambda r: orders_body([{"order_id": str(i)} for i in range(6)])  # noqa: E731
    with pytest.raises(ApiProtocolError, match="sent 6 orders for limit 5"):
        list(make_client(mock(handler), private_key, page_size=5).iter_order_pages())


def test_a_page_with_one_record_nested_too_deep_or_a_huge_number_still_decodes(private_key):
    deep = "[" * 5000 + "]" * 5000
    body = (
        '{"orders": [{"order_id": "good"}, {"order_id": "deep", "x": ' + deep + "}, "
        '{"order_id": "big", "x": ' + "7" * 5000 + '}], "cursor": ""}'
    ).encode()
    handler = lambda r: httpx.Response(200, content=body)  # noqa: E731
    (page,) = make_client(mock(handler), private_key).iter_order_pages()
    assert [o["order_id"] for o in page.items] == ["good", "deep", "big"]
    assert page.items[2]["x"] == float("inf")  # the parser rejects it, the page lives


def test_a_body_larger_than_the_cap_after_decompression_is_refused(private_key):
    bomb = gzip.compress(b'{"orders": [], "pad": "' + b"0" * 5_000_000 + b'"}')
    assert len(bomb) < 10_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(bomb)
        )

    client = make_client(mock(handler), private_key)
    client.max_response_bytes = 1_000_000
    with pytest.raises(ApiProtocolError, match="larger than 0 MiB|larger than"):
        list(client.iter_order_pages())
    client.max_response_bytes = 10_000_000  # the same body under a larger cap is fine
    assert list(client.iter_order_pages())[0].items == []


def test_a_server_that_trickles_its_answer_hits_the_whole_request_deadline(private_key):
    """Headers at once, then a byte every 0.2 s: no socket operation ever times out, the
    request's deadline does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            listener.settimeout(0.2)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break
                    time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = KalshiClient(
        f"http://127.0.0.1:{port}/trade-api/v2",
        auth=KalshiAuth(key_id(private_key), private_key),
        tokens_per_second=0,
        timeout=5.0,
        deadline=1.0,
        retry=RetryPolicy(max_attempts=1),
    )
    started = time.monotonic()
    try:
        with pytest.raises(ApiTransportError, match="did not finish GET /portfolio/orders within"):
            list(client.iter_order_pages())
    finally:
        stop.set()
        client.close()
        listener.close()
    assert time.monotonic() - started < 3.0


def test_the_simulator_refuses_queue_positions_without_markets_or_event(client):
    with pytest.raises(ApiStatusError) as caught:
        client._get_json("portfolio/orders/queue_positions")  # noqa: SLF001 - bypass the guard
    assert caught.value.status == 400
    assert caught.value.api_message == "market_tickers or event_ticker is required"


def test_the_client_will_not_send_a_queue_call_without_markets_or_event(client):
    with pytest.raises(ValueError, match="market_tickers or event_ticker"):
        client.queue_positions()


@pytest.mark.parametrize(
    ("text", "by_orjson"),
    [
        (b'{"orders": [{"n": 9007199254740993, "p": "0.5600", "f": 1.5}], "cursor": ""}', True),
        (b'{"orders": [{"n": 123456789012345678901234567890}]}', False),  # exact, not a float
        (b'{"orders": [{"n": NaN}]}', False),  # orjson refuses; the stdlib reads it
        (b'{"orders": [{"s": "\\ud800"}]}', False),
    ],
)
def test_a_body_decodes_exactly_as_the_standard_library_reads_it(text, by_orjson):
    value, fast = decode_body(text)
    assert fast is by_orjson
    expected = json.loads(text)
    assert json.dumps(value) == json.dumps(expected)  # NaN != NaN: compare the renderings
    assert type(value["orders"][0].get("n")) is type(expected["orders"][0].get("n"))
