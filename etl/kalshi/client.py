"""KalshiClient: one method per endpoint of the Trade API v2 that kalshi-etl reads.

The client owns the wire: it signs (through :class:`~etl.kalshi.auth.KalshiAuth`), spends a
client-side token budget, retries 429/5xx/network errors with exponential backoff and full
jitter (honouring ``Retry-After``), follows cursors (resending every filter, stopping on an
empty cursor, refusing a repeated one) and translates httpx failures into
:mod:`etl.errors`. It returns raw JSON values: turning them into records is
:mod:`etl.kalshi.parse`'s job, so that a bad record never costs the rest of its page.

The transport is injected: tests pass the simulator's in-process transport or a
``httpx.MockTransport``; production uses httpx's default.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson

from etl import metrics
from etl.errors import (
    ApiError,
    ApiProtocolError,
    ApiStatusError,
    ApiTransportError,
    StopRequested,
)
from etl.kalshi import budget
from etl.kalshi.parse import plain_body, screened_body

log = logging.getLogger(__name__)

OrderStatus = Literal["resting", "canceled", "executed"]

LIST_COST = 10
SINGLE_COST = 2
QUEUE_TICKERS_PER_CALL = 50
# `KALSHI_PAGE_SIZE=auto`: today's largest page, and the 2025 limit a server that refuses it
# gets for the rest of the process.
AUTO_PAGE_SIZE = 1000
FALLBACK_PAGE_SIZE = 200
# Listings whose ``limit`` is capped below the others' 1000 (KALSHI.md): asked at most this.
MAX_PAGE_SIZE = {"portfolio/deposits": 500, "portfolio/withdrawals": 500}
PageSize = int | Literal["auto"]
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Answers that mean "this server does not have that endpoint", never worth a retry.
NOT_SERVED = frozenset({404, 405, 501})
_UNSERVED: set[str] = set()  # listing paths found not served, said once per process


class TokenBucket:
    """A thread-safe token bucket: ``rate`` tokens per second, bursts up to ``burst`` tokens.

    A rate of 0 turns the limit off. The server side (Kalshi, the simulator) starts full with
    2 s of budget; the client starts empty with 1 s (:meth:`for_client`), so that whatever the
    timing of the two, the client never asks for more than the server's bucket holds.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        start_full: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else 2 * rate
        self._tokens = self.capacity if start_full else 0.0
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def for_client(
        cls,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> TokenBucket:
        """The client's bucket: empty at start, 1 s of burst, half the server's margin."""
        return cls(rate, burst=rate, start_full=False, clock=clock, sleep=sleep)

    def _take(self, cost: float) -> float:
        """Refill, then take ``cost`` tokens if there; return the seconds still to wait (0 when
        taken). Call with the lock held."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        # A hair of tolerance: after sleeping exactly the wait computed below, float rounding
        # can leave the tokens a trillionth short, and waiting that long moves no clock.
        if self._tokens >= cost - 1e-9:
            self._tokens = max(0.0, self._tokens - cost)
            return 0.0
        return (cost - self._tokens) / self.rate

    def set_rate(self, rate: float, burst: float, *, full: bool = False) -> None:
        """A new budget from now on: the tokens held so far kept within the new burst, or
        (``full``) the whole burst at once."""
        with self._lock:
            self._take(0.0)
            self.rate = rate
            self.capacity = burst
            self._tokens = burst if full else min(self._tokens, burst)

    def try_acquire(self, cost: float) -> bool:
        """Take ``cost`` tokens if they are there now; never waits."""
        if self.rate <= 0:
            return True
        with self._lock:
            return self._take(cost) == 0.0

    def acquire(self, cost: float) -> None:
        """Take ``cost`` tokens, sleeping until they are there."""
        if self.rate <= 0:
            return
        cost = min(cost, self.capacity)
        while True:
            with self._lock:
                wait = self._take(cost)
            if wait == 0.0:
                return
            metrics.rate_limit_wait(wait)
            self._sleep(wait)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts, backoff base and cap, and a bound on the total wait."""

    max_attempts: int = 6
    # A refused connection is answered at once: the host is down or the URL is wrong. Try it
    # a few times quickly, not for minutes.
    connect_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total: float = 120.0

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**attempt)]."""
        return float(rng() * min(self.max_delay, self.base_delay * 2.0**attempt))


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint: its items as raw JSON values and the next cursor."""

    items: list[Any]
    cursor: str | None
    # Every item is sure to pass parse.storage_problem (see parse.screened_body).
    screened: bool = False

    @property
    def is_last(self) -> bool:
        return self.cursor is None


@dataclass(frozen=True)
class QueuePositions:
    """The raw entries of a queue-positions answer, and the server's clock when it answered
    (its ``Date`` header, whole seconds; ``None`` when it sent none)."""

    items: list[Any]
    server_time: datetime | None


@dataclass(frozen=True)
class HistoricalCutoff:
    """``GET /historical/cutoff``: final orders last changed before ``orders_updated_ts`` are
    served only by the historical tier."""

    orders_updated_ts: datetime | None
    raw: Mapping[str, Any]

    def of(self, field: str) -> datetime | None:
        """The cutoff of another record kind (``trades_created_ts`` for fills)."""
        return _rfc3339(self.raw.get(field), what=f"historical cutoff {field}")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _http_date(value: str | None) -> datetime | None:
    """An HTTP ``Date`` header as a UTC time; ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def error_details(body: str) -> tuple[str | None, str | None]:
    """The API's (code, message) from ``{"code","message"}``, ``{"error": {...}}`` or
    ``{"error": "text"}``; (None, a snippet) when the body is not such JSON."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        snippet = " ".join(body.split())[:200]
        return None, snippet or None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            data = inner
        elif isinstance(inner, str):
            return None, inner
        code, message = data.get("code"), data.get("message")
        return (str(code) if code is not None else None, str(message) if message else None)
    return None, None


_DEEP_STACK = 512 * 1024 * 1024
_DEEP_RECURSION = 200_000
_deep_lock = threading.Lock()


def decode_json(content: bytes) -> Any:
    """Decode a response body (see :func:`decode_body`)."""
    return decode_body(content)[0]


def decode_body(content: bytes) -> tuple[Any, bool]:
    """Decode a response body; also whether orjson decoded it.

    orjson reads a :func:`~etl.kalshi.parse.plain_body` body exactly as the standard library
    does, several times faster; what it refuses (NaN, an infinite number, a lone surrogate,
    deep nesting) the standard library decodes, or says why not. A body
    the standard decoder refuses only because one record in
    it is nested too deep or holds an integer of more than 4,300 digits is decoded again on a
    thread with a large stack, huge integers becoming floats, so that the parser can reject
    that one record instead of the whole page failing on every run.

    Raises:
        ValueError: the body is not JSON at all.
    """
    if plain_body(content):
        try:
            return orjson.loads(content), True
        except orjson.JSONDecodeError:
            pass  # the standard library reads it, or says why not
    try:
        return json.loads(content), False
    except (RecursionError, ValueError):
        if content.lstrip()[:1] not in (b"{", b"["):  # not JSON at all (an HTML error page)
            raise ValueError("not JSON") from None
    outcome: dict[str, Any] = {}

    def decode() -> None:
        with _deep_lock:  # the recursion limit is per interpreter: one deep decode at a time
            previous = sys.getrecursionlimit()
            sys.setrecursionlimit(_DEEP_RECURSION)
            try:
                outcome["value"] = json.loads(content, parse_int=_bounded_int)
            except (RecursionError, ValueError, MemoryError) as exc:
                outcome["error"] = exc
            finally:
                sys.setrecursionlimit(previous)

    with _deep_lock:
        size = threading.stack_size(_DEEP_STACK)
        try:
            worker = threading.Thread(target=decode, name="deep-json")
        finally:
            threading.stack_size(size)
    worker.start()
    worker.join()
    if "value" in outcome:
        return outcome["value"], False
    raise ValueError(f"not decodable as JSON: {outcome.get('error')}")


def _bounded_int(text: str) -> int | float:
    return int(text) if len(text) <= 4000 else float(text)


def _rfc3339(value: object, *, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiProtocolError(f"{what}: expected an RFC 3339 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ApiProtocolError(f"{what}: expected an RFC 3339 time, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class KalshiClient:
    """Reads a Kalshi account through the Trade API v2.

    Every request is bounded: ``deadline`` seconds for the whole exchange (each socket
    operation also times out sooner), ``max_response_bytes`` for the body after decompression,
    and a list page may hold no more items than the ``limit`` asked for.

    Args:
        base_url: API root including ``/trade-api/v2``.
        auth: signs requests; ``None`` only for unauthenticated endpoints in tests.
        transport: an httpx transport (the simulator's, a mock); default is the network.
        tokens_per_second: client-side read budget (0 = unlimited); ``None`` asks the server
            for the key's budget (``GET /account/limits``) before the first call, the Basic
            tier's where it does not say. Endpoint costs are then asked for too
            (``GET /account/endpoint_costs``).
        page_size: ``limit`` sent with list calls (never more than an endpoint's own cap,
            :data:`MAX_PAGE_SIZE`); ``"auto"`` sends 1000 until the server refuses it with a
            400, then 200 to that endpoint for the life of the client (the others keep 1000).
        retry: the retry policy.
        timeout: seconds per socket operation (connect, each read).
        deadline: seconds for a whole request, body included.
        max_response_bytes: the largest body accepted, after decompression.
        cancel: when set, waits (backoff, rate limit) end at once with
            :class:`~etl.errors.StopRequested`; the daemon sets it on SIGTERM.
        sleep, rng: injectable for deterministic tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None,
        transport: httpx.BaseTransport | None = None,
        tokens_per_second: float | None = 200.0,
        page_size: PageSize = "auto",
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 20.0,
        deadline: float = 60.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        cancel: threading.Event | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        bucket_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.auto_page_size = page_size == "auto"
        self._unserved: set[str] = set()  # listing paths this server does not serve
        self.page_size: int = AUTO_PAGE_SIZE if page_size == "auto" else page_size
        self._page_sizes: dict[str, int] = {}  # path → the size it fell back to
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self._cancel = cancel
        self._retry = retry
        self._sleep = sleep
        self._rng = rng
        self.bucket = TokenBucket.for_client(
            budget.BASIC_TOKENS_PER_SECOND if tokens_per_second is None else tokens_per_second,
            sleep=self._pause,
            clock=bucket_clock,
        )
        self._learn_budget = tokens_per_second is None
        self._learn_lock = threading.Lock()
        self.costs = budget.EndpointCosts()
        self.limits: budget.Limits | None = None
        # Seconds a list call takes, request to last byte (an exponential moving average):
        # with the budget, how many listings it takes to keep the budget busy.
        self.list_seconds: float | None = None
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            auth=auth,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": "kalshi-etl",
            },
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KalshiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------

    def iter_order_pages(
        self,
        *,
        ticker: str | None = None,
        event_tickers: Sequence[str] | None = None,
        min_ts: int | None = None,
        max_ts: int | None = None,
        status: OrderStatus | None = None,
        subaccount: int | None = None,
    ) -> Iterator[Page]:
        """Pages of ``GET /portfolio/orders``, yielded as they arrive (memory stays flat).

        ``min_ts``/``max_ts`` are Unix seconds. Every filter is resent with every page.
        """
        params = _drop_none(
            ticker=ticker,
            event_ticker=",".join(event_tickers) if event_tickers else None,
            min_ts=min_ts,
            max_ts=max_ts,
            status=status,
            subaccount=subaccount,
        )
        return self._paginate("portfolio/orders", params, items_key="orders")

    def iter_historical_order_pages(
        self,
        *,
        ticker: str | None = None,
        min_ts: int | None = None,
        max_ts: int | None = None,
        subaccount: int | None = None,
    ) -> Iterator[Page]:
        """Pages of ``GET /historical/orders``; nothing at all when the server has no such tier
        (404, 405 or 501)."""
        params = _drop_none(ticker=ticker, min_ts=min_ts, max_ts=max_ts, subaccount=subaccount)
        pages = self._paginate("historical/orders", params, items_key="orders")
        try:
            first = next(pages)
        except StopIteration:
            return
        except ApiStatusError as exc:
            if exc.status in NOT_SERVED:
                return
            raise
        yield first
        yield from pages

    def iter_pages(self, path: str, items_key: str, **filters: Any) -> Iterator[Page]:
        """Pages of any listing (``portfolio/fills``, ``historical/fills``,
        ``portfolio/settlements``…), ``None`` filters left out, every filter resent with every
        page. A server that does not serve ``path`` (404, 405 or 501 on the first page) lists
        nothing, and says so once per process."""
        pages = self._paginate(path, _drop_none(**filters), items_key=items_key)
        try:
            first = next(pages)
        except StopIteration:
            return
        except ApiStatusError as exc:
            self._not_served(path, exc)
            return
        yield first
        yield from pages

    def _not_served(self, path: str, exc: ApiStatusError) -> None:
        """Note that the server does not serve ``path`` (said once per process); re-raise
        ``exc`` when it means anything else."""
        if exc.status not in NOT_SERVED:
            raise exc
        self._unserved.add(path)
        if path not in _UNSERVED:
            _UNSERVED.add(path)
            log.info("GET /%s is not served by this server (%d): nothing to read", path, exc.status)

    def iter_object(self, path: str, **filters: Any) -> Iterator[Page]:
        """An endpoint that answers one object (``portfolio/balance``) as a page of one item;
        nothing where the server does not serve it (logged once per process, as for
        :meth:`iter_pages`)."""
        try:
            body = self._get_json(path, params=_drop_none(**filters), cost=LIST_COST)
        except ApiStatusError as exc:
            self._not_served(path, exc)
            return
        yield Page(items=[body], cursor=None)

    def serves(self, path: str) -> bool:
        """False once a listing of ``path`` by this client found the server does not serve it
        (404…)."""
        return path not in self._unserved

    def subaccount_numbers(self) -> set[int]:
        """The subaccounts ``GET /portfolio/subaccounts/balances`` lists (none where the server
        does not serve it, or refuses this key: 400, 403)."""
        try:
            body = self._optional_json("portfolio/subaccounts/balances")
        except ApiStatusError as exc:
            # A key without the right to read balances still has its subaccounts found in
            # its orders and fills: never let this listing stop a settlements run.
            if exc.status not in (400, 403):
                raise
            log.info("GET /portfolio/subaccounts/balances refused (%s): %s", exc.status, exc)
            return set()
        numbers: set[int] = set()
        for item in (body or {}).get("subaccount_balances") or []:
            number = item.get("subaccount_number") if isinstance(item, dict) else None
            if isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= 63:
                numbers.add(number)
        return numbers

    def get_order(self, order_id: str) -> Any | None:
        """``GET /portfolio/orders/{order_id}`` → the raw order, or ``None`` on 404.

        Raises:
            ApiProtocolError: the id cannot name a URL path segment (``.``, ``..``, empty), or
                the answer is not that order.
        """
        if order_id in ("", ".", ".."):
            raise ApiProtocolError(f"order id {order_id!r} cannot be fetched by id (not a path)")
        shown = f"GET /portfolio/orders/{order_id[:80]}"
        try:
            body = self._get_json(
                f"portfolio/orders/{quote(order_id, safe='')}",
                cost=SINGLE_COST,
                endpoint="/portfolio/orders/{order_id}",
            )
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise
        order = body.get("order") if isinstance(body, dict) else None
        if not isinstance(order, dict):
            raise ApiProtocolError(
                f"{shown}: expected an object with 'order'", body=json.dumps(body)
            )
        if order.get("order_id") != order_id:
            raise ApiProtocolError(
                f"{shown}: the answer is order {str(order.get('order_id'))[:80]!r}, not this one",
                body=json.dumps(body),
            )
        return order

    def queue_positions(
        self,
        *,
        market_tickers: Iterable[str] = (),
        event_ticker: str | None = None,
        subaccount: int | None = None,
    ) -> QueuePositions:
        """``GET /portfolio/orders/queue_positions`` for the given markets or event.

        Ticker lists are sent in chunks; ``null`` means none. Covers subaccount 0 only unless
        ``subaccount`` is given (that is the API's rule). The server time is that of the
        first answer, so that it never postdates an entry.
        """
        tickers = sorted(set(market_tickers))
        if not tickers and event_ticker is None:
            raise ValueError("queue_positions needs market_tickers or event_ticker")
        queries: list[dict[str, Any]] = [
            _drop_none(
                market_tickers=",".join(tickers[i : i + QUEUE_TICKERS_PER_CALL]),
                subaccount=subaccount,
            )
            for i in range(0, len(tickers), QUEUE_TICKERS_PER_CALL)
        ]
        if event_ticker is not None:
            queries.append(_drop_none(event_ticker=event_ticker, subaccount=subaccount))
        positions: list[Any] = []
        server_time: datetime | None = None
        for params in queries:
            answer = self._request(
                "GET", "portfolio/orders/queue_positions", params=params, cost=LIST_COST
            )
            if server_time is None:
                server_time = _http_date(answer.headers.get("Date"))
            body = _decode(answer, "portfolio/orders/queue_positions")
            if not isinstance(body, dict):
                raise ApiProtocolError(
                    "GET /portfolio/orders/queue_positions: expected a JSON object",
                    body=json.dumps(body),
                )
            items = body.get("queue_positions")
            if items is None:
                continue
            if not isinstance(items, list):
                raise ApiProtocolError(
                    "GET /portfolio/orders/queue_positions: 'queue_positions' is not a list",
                    body=json.dumps(body),
                )
            positions.extend(items)
        return QueuePositions(positions, server_time)

    def historical_cutoff(self) -> HistoricalCutoff | None:
        """``GET /historical/cutoff``, or ``None`` when the server has no historical tier."""
        body = self._optional_json("historical/cutoff")
        if body is None:
            return None
        ts = _rfc3339(body.get("orders_updated_ts"), what="historical cutoff orders_updated_ts")
        return HistoricalCutoff(orders_updated_ts=ts, raw=body)

    def user_data_timestamp(self) -> datetime | None:
        """How fresh the portfolio data is (``as_of_time``), or ``None`` where not served."""
        body = self._optional_json("exchange/user_data_timestamp")
        if body is None:
            return None
        return _rfc3339(body.get("as_of_time"), what="user_data_timestamp as_of_time")

    # -- machinery -------------------------------------------------------------------------

    def _optional_json(self, path: str) -> dict[str, Any] | None:
        """An object from an endpoint a server may lack: ``None`` on 404, 405 or 501."""
        try:
            body = self._get_json(path, cost=LIST_COST)
        except ApiStatusError as exc:
            if exc.status in NOT_SERVED:
                return None
            raise
        if not isinstance(body, dict):
            raise ApiProtocolError(f"GET /{path}: expected a JSON object", body=json.dumps(body))
        return body

    def page_size_of(self, path: str) -> int:
        """The ``limit`` a listing of ``path`` asks for."""
        size = self._page_sizes.get(path, self.page_size)
        return min(size, MAX_PAGE_SIZE.get(path, size))

    def _paginate(self, path: str, filters: dict[str, Any], *, items_key: str) -> Iterator[Page]:
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            limit = self.page_size_of(path)
            params = {**filters, "limit": limit}
            if cursor:
                params["cursor"] = cursor
            try:
                answer = self._request("GET", path, params=params, cost=LIST_COST)
            except ApiStatusError as exc:
                if not (exc.status == 400 and self.auto_page_size and limit > FALLBACK_PAGE_SIZE):
                    raise
                log.warning(
                    "the API refused limit=%d for GET /%s (%s); using limit=%d there from now on",
                    limit,
                    path,
                    exc.api_message or exc.code or "400",
                    FALLBACK_PAGE_SIZE,
                )
                self._page_sizes[path] = FALLBACK_PAGE_SIZE
                continue
            body, by_orjson = _decode_body(answer, path)
            if not isinstance(body, dict) or (
                items_key not in body or not isinstance(body[items_key], list | None)
            ):
                raise ApiProtocolError(
                    f"GET /{path}: expected an object with a '{items_key}' list",
                    body=json.dumps(body),
                )
            items = body[items_key] or []
            if len(items) > limit:
                raise ApiProtocolError(
                    f"GET /{path}: the server sent {len(items)} {items_key} for limit "
                    f"{limit}; refusing a page larger than asked for"
                )
            raw_cursor = body.get("cursor")
            cursor = str(raw_cursor) if raw_cursor else None
            if cursor is not None:
                if cursor in seen:
                    raise ApiProtocolError(
                        f"GET /{path}: the server sent cursor {cursor[:40]!r} twice; "
                        "stopping instead of looping (a server-side pagination bug)"
                    )
                seen.add(cursor)
            yield Page(
                items=items,
                cursor=cursor,
                screened=by_orjson and screened_body(answer.content, items),
            )
            if cursor is None:
                return

    def _get_json(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        cost: int = LIST_COST,
        endpoint: str | None = None,
    ) -> Any:
        answer = self._request("GET", path, params=params, cost=cost, endpoint=endpoint)
        return _decode(answer, path)

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when cancelled (then raise StopRequested)."""
        if self._cancel is None:
            self._sleep(seconds)
            return
        if self._cancel.wait(seconds):
            raise StopRequested("stopped while waiting to call the Kalshi API")

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        cost: int,
        endpoint: str | None = None,
        attempts: int | None = None,
    ) -> Answer:
        """One call, retried (at most ``attempts`` tries when given); ``endpoint`` is the
        route template the metrics count it under (the path itself when it holds no id), and
        whose token cost it spends."""
        if self._learn_budget:
            self._read_budget()
        started = time.monotonic()
        shown = "/" + path.split("?", 1)[0]
        endpoint = endpoint or shown
        cost = self.costs.of(method, endpoint, cost)
        host = self._http.base_url.host
        for attempt in range(attempts or self._retry.max_attempts):
            if self._cancel is not None and self._cancel.is_set():
                raise StopRequested("stopped before calling the Kalshi API")
            self.bucket.acquire(cost)
            retry_after: float | None = None
            tries = attempts or self._retry.max_attempts
            sent = time.monotonic()
            try:
                answer = self._exchange(method, path, params)
            except _RETRYABLE_TRANSPORT as exc:
                metrics.api_response(endpoint, "error")
                reason = "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
                failure: Exception = ApiTransportError(
                    f"cannot reach the Kalshi API at {host}: "
                    f"{type(exc).__name__}: {exc or 'no detail'}"
                )
                cause: Exception = exc
                if isinstance(exc, httpx.ConnectError):
                    tries = min(tries, self._retry.connect_attempts)
            except httpx.TransportError as exc:
                metrics.api_response(endpoint, "error")
                raise ApiTransportError(
                    f"cannot reach the Kalshi API at {host}: {type(exc).__name__}: {exc}"
                ) from exc
            except _Overdue as exc:
                metrics.api_response(endpoint, "error")
                reason = "timeout"
                failure = cause = ApiTransportError(
                    f"the Kalshi API at {host} did not finish {method} {shown} within "
                    f"{self.deadline:.0f}s ({exc})"
                )
            else:
                metrics.api_response(endpoint, answer.status)
                if answer.status < 400:
                    if cost >= LIST_COST:
                        self._timed(time.monotonic() - sent)
                    return answer
                code, message = error_details(answer.content.decode("utf-8", errors="replace"))
                failure = ApiStatusError(
                    method=method, path=shown, status=answer.status, code=code, api_message=message
                )
                cause = failure
                if answer.status != 429 and (answer.status < 500 or answer.status in NOT_SERVED):
                    raise failure
                retry_after = parse_retry_after(answer.headers.get("Retry-After"))
                reason = "429" if answer.status == 429 else "5xx"
            delay = (
                retry_after if retry_after is not None else self._retry.backoff(attempt, self._rng)
            )
            last = attempt >= tries - 1
            if last or time.monotonic() - started + delay > self._retry.max_total:
                if failure is cause:
                    raise failure
                raise failure from cause
            metrics.api_retry(reason)
            if reason == "429":
                metrics.rate_limit_wait(delay)
            log.warning(
                "%s %s failed (%s); retry %d/%d in %.2fs",
                method,
                shown,
                failure,
                attempt + 1,
                tries - 1,
                delay,
            )
            self._pause(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _timed(self, seconds: float) -> None:
        previous = self.list_seconds
        self.list_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _read_budget(self) -> None:
        """Set the bucket from the key's budget (``GET /account/limits``) and the costs from
        ``GET /account/endpoint_costs``, once, before the first other call. A server that does
        not answer them leaves the Basic budget and KALSHI.md's costs, said in one line."""
        with self._learn_lock:
            if not self._learn_budget:
                return
            self._learn_budget = False
            try:
                answer = self._request(
                    "GET", "account/limits", params=None, cost=LIST_COST, attempts=2
                )
                self.limits = budget.read_limits(_decode(answer, "account/limits"))
            except (ApiError, ValueError) as exc:
                if isinstance(exc, ApiTransportError) or (
                    isinstance(exc, ApiStatusError) and exc.status in (401, 403)
                ):
                    # An API out of reach or refusing the key: the call that follows says
                    # so, in the one line the user needs; the Basic budget meanwhile, and
                    # the next call asks again.
                    log.debug("GET /account/limits: %s", exc)
                    self._learn_budget = True
                    return
                log.warning(
                    "the key's read budget is not known (GET /account/limits: %s); using the "
                    "Basic tier's %g tokens/s (set KALSHI_READ_TOKENS_PER_SECOND to change it)",
                    exc,
                    budget.BASIC_TOKENS_PER_SECOND,
                )
                return
            rate, burst = budget.client_budget(self.limits)
            # A server bucket holding twice our burst can pay it at once: the client then
            # starts with its burst in hand, and never asks for more than the server holds.
            self.bucket.set_rate(rate, burst, full=self.limits.bucket_capacity >= 2 * burst)
            try:
                answer = self._request(
                    "GET", "account/endpoint_costs", params=None, cost=LIST_COST, attempts=2
                )
                self.costs = budget.read_endpoint_costs(_decode(answer, "account/endpoint_costs"))
            except (ApiError, ValueError) as exc:
                log.debug("endpoint costs not served (%s): using KALSHI.md's", exc)
            log.info("read budget: %s, from GET /account/limits", budget.describe(self.limits))

    def _exchange(self, method: str, path: str, params: Mapping[str, Any] | None) -> Answer:
        """One HTTP exchange, its body read within the deadline and the size cap."""
        deadline = time.monotonic() + self.deadline
        request = self._http.build_request(method, path, params=params)
        response = self._http.send(request, stream=True)
        try:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise ApiProtocolError(_too_large(method, path, self.max_response_bytes))
            if response.is_stream_consumed:  # an in-memory response, already read and decoded
                body = _Body("", self.max_response_bytes)
                chunks: Iterable[bytes] = [response.content]
            else:
                body = _Body(response.headers.get("Content-Encoding", ""), self.max_response_bytes)
                chunks = response.iter_raw()
            for chunk in chunks:
                if time.monotonic() > deadline:
                    raise _Overdue(f"{body.size} bytes read")
                if not body.feed(chunk):
                    raise ApiProtocolError(_too_large(method, path, self.max_response_bytes))
            if not body.finish():
                raise ApiProtocolError(_too_large(method, path, self.max_response_bytes))
        finally:
            response.close()
        return Answer(status=response.status_code, headers=response.headers, content=body.value)


@dataclass(frozen=True)
class Answer:
    """A response read in full: status, headers and the decoded body."""

    status: int
    headers: httpx.Headers
    content: bytes


class _Overdue(Exception):
    """A response still arriving when the request's deadline passed."""


def _too_large(method: str, path: str, limit: int) -> str:
    return (
        f"{method} /{path.split('?', 1)[0]}: the response is larger than "
        f"{limit // (1024 * 1024)} MiB; refusing it"
    )


class _Body:
    """Collects a response body, undoing gzip/deflate, never holding more than ``limit``
    decoded bytes: a small compressed body cannot expand past it."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []
        kind = encoding.strip().lower()
        self._inflate: Any = None
        if kind == "gzip" or kind == "x-gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "deflate":
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
        elif kind not in ("", "identity"):
            raise ApiProtocolError(f"unsupported Content-Encoding {encoding!r}")

    def feed(self, data: bytes) -> bool:
        """Add raw bytes; False once the decoded body would pass the limit."""
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data, self.limit - self.size + 1)
            except zlib.error as exc:
                raise ApiProtocolError(
                    f"a compressed body that does not decompress: {exc}"
                ) from None
            if self._inflate.unconsumed_tail:
                return False
        return self._keep(data)

    def finish(self) -> bool:
        if self._inflate is not None:
            return self._keep(self._inflate.flush())
        return True

    def _keep(self, data: bytes) -> bool:
        self.size += len(data)
        if self.size > self.limit:
            return False
        self._parts.append(data)
        return True

    @property
    def value(self) -> bytes:
        return b"".join(self._parts)


def _decode(answer: Answer, path: str) -> Any:
    return _decode_body(answer, path)[0]


def _decode_body(answer: Answer, path: str) -> tuple[Any, bool]:
    try:
        return decode_body(answer.content)
    except ValueError:
        text = answer.content.decode("utf-8", errors="replace")
        raise ApiProtocolError(
            f"GET /{path}: the API answered {answer.status} with a body that is "
            f"not JSON ({len(answer.content)} bytes)",
            body=text,
        ) from None


def _drop_none(**params: Any) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}
