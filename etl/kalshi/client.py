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
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from etl.errors import ApiProtocolError, ApiStatusError, ApiTransportError

log = logging.getLogger(__name__)

OrderStatus = Literal["resting", "canceled", "executed"]

LIST_COST = 10
SINGLE_COST = 2
QUEUE_TICKERS_PER_CALL = 50
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Answers that mean "this server does not have that endpoint", never worth a retry.
_NOT_SERVED = frozenset({404, 405, 501})


class TokenBucket:
    """A thread-safe token bucket: ``rate`` tokens per second, bursts up to ``burst`` tokens.

    A rate of 0 turns the limit off.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else 2 * rate
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def _take(self, cost: float) -> float:
        """Refill, then take ``cost`` tokens if there; return the seconds still to wait (0 when
        taken). Call with the lock held."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate

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
            self._sleep(wait)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts, backoff base and cap, and a bound on the total wait."""

    max_attempts: int = 6
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

    @property
    def is_last(self) -> bool:
        return self.cursor is None


@dataclass(frozen=True)
class HistoricalCutoff:
    """``GET /historical/cutoff``: final orders last changed before ``orders_updated_ts`` are
    served only by the historical tier."""

    orders_updated_ts: datetime | None
    raw: Mapping[str, Any]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_details(body: str) -> tuple[str | None, str | None]:
    """The API's (code, message) from ``{"code","message"}``, ``{"error": {...}}`` or
    ``{"error": "text"}``; (None, a snippet) when the body is not such JSON."""
    try:
        data = json.loads(body)
    except ValueError:
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

    Args:
        base_url: API root including ``/trade-api/v2``.
        auth: signs requests; ``None`` only for unauthenticated endpoints in tests.
        transport: an httpx transport (the simulator's, a mock); default is the network.
        tokens_per_second: client-side read budget (0 = unlimited).
        page_size: ``limit`` sent with list calls.
        retry: the retry policy.
        timeout: seconds per request.
        sleep, rng: injectable for deterministic tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None,
        transport: httpx.BaseTransport | None = None,
        tokens_per_second: float = 200.0,
        page_size: int = 200,
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.bucket = TokenBucket(tokens_per_second, sleep=sleep)
        self._retry = retry
        self._sleep = sleep
        self._rng = rng
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            auth=auth,
            transport=transport,
            timeout=timeout,
            headers={"Accept": "application/json", "User-Agent": "kalshi-etl"},
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
        """Pages of ``GET /historical/orders``; nothing at all when the server has no such tier."""
        params = _drop_none(ticker=ticker, min_ts=min_ts, max_ts=max_ts, subaccount=subaccount)
        pages = self._paginate("historical/orders", params, items_key="orders")
        try:
            first = next(pages)
        except StopIteration:
            return
        except ApiStatusError as exc:
            if exc.status == 404:
                return
            raise
        yield first
        yield from pages

    def get_order(self, order_id: str) -> Any | None:
        """``GET /portfolio/orders/{order_id}`` → the raw order, or ``None`` on 404."""
        try:
            body = self._get_json(f"portfolio/orders/{quote(order_id, safe='')}", cost=SINGLE_COST)
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(body, dict) or "order" not in body:
            raise ApiProtocolError(
                f"GET /portfolio/orders/{order_id}: expected an object with 'order'",
                body=json.dumps(body),
            )
        return body["order"]

    def queue_positions(
        self,
        *,
        market_tickers: Iterable[str] = (),
        event_ticker: str | None = None,
        subaccount: int | None = None,
    ) -> list[Any]:
        """``GET /portfolio/orders/queue_positions`` for the given markets or event.

        Ticker lists are sent in chunks; ``null`` means none. Covers subaccount 0 only unless
        ``subaccount`` is given (that is the API's rule).
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
        for params in queries:
            body = self._get_json("portfolio/orders/queue_positions", params=params)
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
        return positions

    def historical_cutoff(self) -> HistoricalCutoff | None:
        """``GET /historical/cutoff``, or ``None`` when the server has no historical tier."""
        try:
            body = self._get_json("historical/cutoff", cost=SINGLE_COST)
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(body, dict):
            raise ApiProtocolError("GET /historical/cutoff: expected a JSON object")
        ts = _rfc3339(body.get("orders_updated_ts"), what="historical cutoff orders_updated_ts")
        return HistoricalCutoff(orders_updated_ts=ts, raw=body)

    def user_data_timestamp(self) -> datetime | None:
        """How fresh the portfolio data is (``as_of_time``), or ``None`` where not served."""
        try:
            body = self._get_json("exchange/user_data_timestamp", cost=SINGLE_COST)
        except ApiStatusError as exc:
            if exc.status in _NOT_SERVED:
                return None
            raise
        if not isinstance(body, dict):
            raise ApiProtocolError("GET /exchange/user_data_timestamp: expected a JSON object")
        return _rfc3339(body.get("as_of_time"), what="user_data_timestamp as_of_time")

    # -- machinery -------------------------------------------------------------------------

    def _paginate(self, path: str, filters: dict[str, Any], *, items_key: str) -> Iterator[Page]:
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            params = {**filters, "limit": self.page_size}
            if cursor:
                params["cursor"] = cursor
            body = self._get_json(path, params=params)
            if not isinstance(body, dict) or (
                items_key not in body or not isinstance(body[items_key], list | None)
            ):
                raise ApiProtocolError(
                    f"GET /{path}: expected an object with a '{items_key}' list",
                    body=json.dumps(body),
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
            yield Page(items=body[items_key] or [], cursor=cursor)
            if cursor is None:
                return

    def _get_json(
        self, path: str, *, params: Mapping[str, Any] | None = None, cost: int = LIST_COST
    ) -> Any:
        response = self._request("GET", path, params=params, cost=cost)
        try:
            return json.loads(response.content)
        except ValueError:
            text = response.content.decode("utf-8", errors="replace")
            raise ApiProtocolError(
                f"GET /{path}: the API answered {response.status_code} with a body that is "
                f"not JSON ({len(text)} bytes)",
                body=text,
            ) from None

    def _request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None, cost: int
    ) -> httpx.Response:
        started = time.monotonic()
        shown = "/" + path
        for attempt in range(self._retry.max_attempts):
            self.bucket.acquire(cost)
            retry_after: float | None = None
            try:
                response = self._http.request(method, path, params=params)
            except _RETRYABLE_TRANSPORT as exc:
                failure: Exception = ApiTransportError(
                    f"cannot reach the Kalshi API at {self._http.base_url.host}: "
                    f"{type(exc).__name__}: {exc or 'no detail'}"
                )
                cause: Exception = exc
            except httpx.TransportError as exc:
                raise ApiTransportError(
                    f"cannot reach the Kalshi API at {self._http.base_url.host}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            else:
                if response.status_code < 400:
                    return response
                code, message = error_details(response.text)
                failure = ApiStatusError(
                    method=method,
                    path=shown,
                    status=response.status_code,
                    code=code,
                    api_message=message,
                )
                cause = failure
                if response.status_code != 429 and (
                    response.status_code < 500 or response.status_code in _NOT_SERVED
                ):
                    raise failure
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            delay = (
                retry_after if retry_after is not None else self._retry.backoff(attempt, self._rng)
            )
            last = attempt == self._retry.max_attempts - 1
            if last or time.monotonic() - started + delay > self._retry.max_total:
                if failure is cause:
                    raise failure
                raise failure from cause
            log.warning(
                "%s %s failed (%s); retry %d/%d in %.2fs",
                method,
                shown,
                failure,
                attempt + 1,
                self._retry.max_attempts - 1,
                delay,
            )
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _drop_none(**params: Any) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}
