"""SimulatorApp: the WSGI face of an :class:`~etl.simulator.exchange.Exchange`.

It checks each request's signature with :func:`etl.kalshi.auth.signing_message` (the client's
own rule) against the registered public keys, refuses timestamps more than 60 s off, spends a
per-key token bucket (429 ``{"error": "too many requests"}``, no ``Retry-After``, like the live
API), injects faults on demand, advances the exchange to the present, and routes. Serve it on
loopback with :func:`serve`, or in-process with ``httpx.WSGITransport(app=app)``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography.hazmat.primitives.asymmetric import rsa

from etl.errors import ConfigError
from etl.kalshi.auth import KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signing_message, verify
from etl.kalshi.client import LIST_COST, SINGLE_COST, TokenBucket
from etl.simulator.exchange import ApiFault, Exchange, FillQuery, OrderQuery, rfc3339
from etl.simulator.stream import StreamHub, is_websocket_request

log = logging.getLogger(__name__)

PREFIX = "/trade-api/v2"
MAX_SKEW_MS = 60_000

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Faults:
    """Fault injection: a fraction of 5xx answers, of 429s, of slow answers, a delay per
    request, a fraction of order pages carrying one extra malformed record."""

    error_rate: float = 0.0
    error_status: int = 503
    latency: float = 0.0
    malformed_rate: float = 0.0
    throttle_rate: float = 0.0  # 429 {"error": "too many requests"}, as the live API sends
    slow_rate: float = 0.0  # answers delayed by slow_seconds more
    slow_seconds: float = 0.5


class SimulatorApp:
    """WSGI app serving ``exchange`` (and, for several accounts, one exchange per key).

    Args:
        exchange: the state to serve (shared; access is serialised by a lock).
        public_keys: key id → RSA public key accepted for signatures.
        exchanges: key id → the account that key reads; keys not named read ``exchange``.
        tokens_per_second: per-key read budget (0 = no limit); costs as the live API.
        faults: what to inject.
        wall_clock: seconds since the epoch, for signature freshness.
        advance: play trading events up to the wall clock on each request.
        bucket_clock: monotonic seconds for the token buckets (a test can share one fake clock
            between the client and the server).
        serve_limits: answer ``GET /account/limits`` and ``/account/endpoint_costs``.
    """

    def __init__(
        self,
        exchange: Exchange,
        public_keys: Mapping[str, rsa.RSAPublicKey],
        *,
        tokens_per_second: float = 0.0,
        faults: Faults | None = None,
        wall_clock: Callable[[], float] = time.time,
        advance: bool = True,
        seed: int = 0,
        bucket_clock: Callable[[], float] = time.monotonic,
        exchanges: Mapping[str, Exchange] | None = None,
        stream_ping_interval: float = 10.0,
        serve_limits: bool = True,
    ) -> None:
        self.exchange = exchange
        # GET /account/limits and /account/endpoint_costs (404 when False, like an older API).
        self.serve_limits = serve_limits
        self.exchanges = dict(exchanges or {})
        self.public_keys = dict(public_keys)
        self.faults = faults or Faults()
        self.wall_clock = wall_clock
        self.advance = advance  # trade as wall-clock time passes; pause() and resume() flip it
        self._tokens_per_second = tokens_per_second
        self._bucket_clock = bucket_clock
        self._buckets: dict[str, TokenBucket] = {}
        self.lock = threading.RLock()  # routes and trading run under it
        self._rng = random.Random(seed ^ 0x5EED)
        # What was injected, by kind ("5xx", "429", "slow", "malformed"), for soak reports.
        self.injected: Counter[str] = Counter()
        # The latest requests as (path, query string), for tests; bounded for long runs.
        self.requests: deque[tuple[str, str]] = deque(maxlen=100_000)
        # The WebSocket (/trade-api/ws/v2) on the same port, and its faults.
        self.stream = StreamHub(self, ping_interval=stream_ping_interval)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, body = self._handle(environ)
        payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
        start_response(
            f"{status} {_REASONS.get(status, 'Error')}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    def _handle(self, environ: dict[str, Any]) -> tuple[int, Any]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        with self.lock:
            self.requests.append((path, environ.get("QUERY_STRING", "")))
        if not path.startswith(PREFIX + "/"):
            return 404, {"code": "not_found", "message": f"no route for {path}"}
        route = path[len(PREFIX) :]
        try:
            exchange = self.exchange
            if route != "/historical/cutoff":
                key_id = self._authenticate(environ, method, path)
                exchange = self.exchange_of(key_id)
                cost = SINGLE_COST if route.count("/") == 3 and "queue" not in route else LIST_COST
                self._spend(key_id, cost)
            faults = self.faults
            delay = faults.latency
            if faults.slow_rate and self._roll() < faults.slow_rate:
                delay += faults.slow_seconds
                self._count("slow")
            if delay:
                time.sleep(delay)
            if faults.throttle_rate and self._roll() < faults.throttle_rate:
                self._count("429")
                raise ApiFault(429, "too_many_requests", "too many requests")
            if faults.error_rate and self._roll() < faults.error_rate:
                self._count("5xx")
                return faults.error_status, {
                    "code": "service_unavailable",
                    "message": "injected fault",
                }
            if method != "GET":
                raise ApiFault(405, "method_not_allowed", f"{method} is not served")
            with self.lock:
                if self.advance:
                    now = datetime.fromtimestamp(self.wall_clock(), UTC)
                    exchange.advance_to(now)
                return 200, self._route(exchange, route, query)
        except ApiFault as fault:
            if fault.status == 401:
                return 401, {"error": {"code": fault.code, "message": fault.message}}
            if fault.status == 429:
                return 429, {"error": "too many requests"}
            return fault.status, {"code": fault.code, "message": fault.message, "details": ""}

    def pause(self) -> None:
        """Stop trading (after any request being answered): the truth holds still."""
        with self.lock:
            self.advance = False

    def resume(self) -> None:
        with self.lock:
            self.advance = True

    def _count(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.injected[kind] += n

    def _roll(self) -> float:
        with self.lock:
            return self._rng.random()

    def _authenticate(self, environ: dict[str, Any], method: str, path: str) -> str:
        def header(name: str) -> str:
            return str(environ.get("HTTP_" + name.replace("-", "_"), ""))

        return self.check_signature(
            header(KEY_HEADER), header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER), method, path
        )

    def check_signature(
        self, key_id: str, timestamp: str, signature: str, method: str, path: str
    ) -> str:
        """The key id of a correctly signed, fresh request; :class:`ApiFault` 401 otherwise."""
        if not key_id or not timestamp or not signature:
            raise ApiFault(401, "authentication_error", "missing authentication headers")
        public_key = self.public_keys.get(key_id)
        if public_key is None:
            raise ApiFault(401, "authentication_error", "unknown API key")
        if not timestamp.isdigit():
            raise ApiFault(401, "authentication_error", "timestamp must be milliseconds")
        if abs(int(timestamp) - self.wall_clock() * 1000) > MAX_SKEW_MS:
            raise ApiFault(401, "authentication_error", "timestamp is more than 60 s off")
        if not verify(public_key, signing_message(int(timestamp), method, path), signature):
            raise ApiFault(401, "authentication_error", "invalid signature")
        return key_id

    def exchange_of(self, key_id: str) -> Exchange:
        """The account ``key_id`` reads."""
        return self.exchanges.get(key_id, self.exchange)

    def _spend(self, key_id: str, cost: int) -> None:
        if self._tokens_per_second <= 0:
            return
        with self.lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = TokenBucket(
                    self._tokens_per_second, clock=self._bucket_clock
                )
        if not bucket.try_acquire(cost):
            raise ApiFault(429, "too_many_requests", "too many requests")

    def _route(self, ex: Exchange, route: str, query: dict[str, str]) -> Any:
        if route == "/portfolio/orders":
            asked = _order_query(query, statuses=True)
            orders, cursor = ex.list_orders(asked)
            self._count_malformed(orders)
            return {"orders": self._maybe_corrupt(orders, asked.limit), "cursor": cursor}
        if route == "/historical/orders":
            asked = _order_query(query, statuses=False)
            orders, cursor = ex.historical_orders(asked)
            self._count_malformed(orders)
            return {"orders": self._maybe_corrupt(orders, asked.limit), "cursor": cursor}
        if route == "/portfolio/orders/queue_positions":
            tickers = [t for t in query.get("market_tickers", "").split(",") if t]
            positions = ex.queue_positions(
                market_tickers=tickers,
                event_ticker=query.get("event_ticker") or None,
                subaccount=_int_param(query, "subaccount"),
            )
            # The 2025 API sent null for none; the 2026 SDK requires a list.
            return {"queue_positions": positions or ([] if ex.api == "2026" else None)}
        if route == "/historical/cutoff":
            cutoff = ex.cutoff()
            if cutoff is None:
                raise ApiFault(404, "not_found", "not found")
            stamp = rfc3339(cutoff)
            return {
                "market_settled_ts": stamp,
                "trades_created_ts": stamp,
                "orders_updated_ts": stamp,
            }
        if route in ("/portfolio/fills", "/historical/fills"):
            limit = _int_param(query, "limit")
            fills, cursor = ex.list_fills(
                FillQuery(
                    ticker=query.get("ticker") or None,
                    order_id=query.get("order_id") or None,
                    min_ts=_int_param(query, "min_ts"),
                    max_ts=_int_param(query, "max_ts"),
                    subaccount=_int_param(query, "subaccount"),
                    limit=100 if limit is None else limit,
                    cursor=query.get("cursor") or None,
                ),
                historical=route.startswith("/historical"),
            )
            return {"fills": fills, "cursor": cursor}
        if route == "/portfolio/settlements":
            limit = _int_param(query, "limit")
            rows, cursor = ex.list_settlements(
                subaccount=_int_param(query, "subaccount"),
                limit=100 if limit is None else limit,
                cursor=query.get("cursor") or None,
            )
            return {"settlements": rows, "cursor": cursor}
        if route == "/portfolio/subaccounts/balances":
            return {
                "subaccount_balances": [
                    {
                        "subaccount_number": n,
                        "exchange_index": 0,
                        "balance": ex.money.balance(n)["balance_dollars"],
                        "updated_ts": int(ex.now.timestamp()),
                    }
                    for n in ex.subaccounts()
                ]
            }
        if route in ("/portfolio/positions", "/historical/positions"):
            limit = _int_param(query, "limit")
            subaccount = _int_param(query, "subaccount")
            rows, cursor = ex.money.list_positions(
                subaccount=0 if subaccount is None else subaccount,  # 0 unless named
                settlement_status=query.get("settlement_status") or "unsettled",
                archived=route.startswith("/historical"),
                limit=100 if limit is None else limit,
                cursor=query.get("cursor") or None,
            )
            return {"market_positions": rows, "event_positions": [], "cursor": cursor}
        if route == "/portfolio/balance":
            subaccount = _int_param(query, "subaccount")
            return ex.money.balance(0 if subaccount is None else subaccount)
        cash = {
            "/portfolio/deposits": ("deposit", "deposits"),
            "/portfolio/withdrawals": ("withdrawal", "withdrawals"),
            "/portfolio/subaccounts/transfers": ("transfer", "transfers"),
        }.get(route)
        if cash is not None:
            limit = _int_param(query, "limit")
            rows, cursor = ex.money.list_cash(
                cash[0], limit=100 if limit is None else limit, cursor=query.get("cursor") or None
            )
            return {cash[1]: rows, "cursor": cursor}
        if route == "/exchange/user_data_timestamp":
            return {"as_of_time": rfc3339(ex.user_data_timestamp())}
        if route in ("/account/limits", "/account/endpoint_costs") and self.serve_limits:
            return self._limits() if route == "/account/limits" else _ENDPOINT_COSTS
        parts = route.split("/")
        if len(parts) == 4 and parts[1:3] == ["portfolio", "orders"]:
            return {"order": ex.get_order(unquote(parts[3]))}
        if (
            len(parts) == 5
            and parts[1:3] == ["portfolio", "orders"]
            and parts[4] == "queue_position"
        ):
            return ex.queue_position(unquote(parts[3]))
        raise ApiFault(404, "not_found", f"no route for {route}")

    def _limits(self) -> dict[str, Any]:
        """The key's budget as ``GET /account/limits`` says it: the bucket this simulator
        enforces (one without a limit says Prestige's 10,000 tokens/s)."""
        rate = self._tokens_per_second or 10_000.0
        tier = max(
            (t for t in _TIERS if _TIERS[t] <= rate), key=_TIERS.__getitem__, default="basic"
        )
        bucket = {"refill_rate": round(rate), "bucket_capacity": round(2 * rate)}
        return {"usage_tier": tier, "read": bucket, "write": dict(bucket), "grants": []}

    def _count_malformed(self, orders: list[dict[str, Any]]) -> None:
        served = sum(1 for order in orders if order.get("status") == "teleported")
        if served:
            self._count("malformed", served)

    def _maybe_corrupt(self, orders: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        """Add one malformed record to a page that has room for it (a page never holds more
        than its limit)."""
        if (
            not orders
            or len(orders) >= limit
            or not self.faults.malformed_rate
            or self._roll() >= self.faults.malformed_rate
        ):
            return orders
        broken = dict(orders[0])
        broken["order_id"] = f"malformed-{self._rng.getrandbits(48):012x}"
        broken["status"] = "teleported"  # an enum value no parser knows
        self._count("malformed")
        return [*orders, broken]


_TIERS = {"basic": 200, "advanced": 300, "premier": 1_000, "prime": 4_000, "prestige": 10_000}
# The costs this simulator charges that differ from the default (see SimulatorApp._handle).
_ENDPOINT_COSTS = {
    "default_cost": LIST_COST,
    "endpoint_costs": [
        {"method": "GET", "path": "/trade-api/v2/portfolio/orders/{order_id}", "cost": SINGLE_COST}
    ],
}


def _int_param(query: dict[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiFault(400, "invalid_parameters", f"{name} must be an integer") from None


def _order_query(query: dict[str, str], *, statuses: bool) -> OrderQuery:
    limit = _int_param(query, "limit")
    events = [t for t in query.get("event_ticker", "").split(",") if t]
    return OrderQuery(
        ticker=query.get("ticker") or None,
        event_tickers=events,
        min_ts=_int_param(query, "min_ts"),
        max_ts=_int_param(query, "max_ts"),
        status=(query.get("status") or None) if statuses else query.get("status"),
        subaccount=_int_param(query, "subaccount"),
        limit=100 if limit is None else limit,
        cursor=query.get("cursor") or None,
    )


class _Server(ThreadingMixIn, WSGIServer):
    """The WSGI server, which hands a WebSocket request to the app's :class:`StreamHub`."""

    daemon_threads = True
    allow_reuse_address = True

    def finish_request(self, request: Any, client_address: Any) -> None:
        app = self.get_app()
        if isinstance(app, SimulatorApp) and is_websocket_request(request):
            app.stream.serve_connection(request)
        else:
            super().finish_request(request, client_address)

    def server_close(self) -> None:
        app = self.get_app()
        if isinstance(app, SimulatorApp):
            app.stream.close()
        super().server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("simulator: " + format, *args)


def make_server_for(app: SimulatorApp, host: str = "127.0.0.1", port: int = 0) -> WSGIServer:
    """Bind a threaded HTTP server for ``app`` (port 0 = any free port), not yet serving.

    Raises:
        ConfigError: when the address cannot be bound.
    """
    try:
        return make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(
            f"the simulator cannot listen on {host}:{port} ({exc.strerror}); pick another --port"
        ) from None


def serve(app: SimulatorApp, host: str = "127.0.0.1", port: int = 0) -> WSGIServer:
    """Serve ``app`` on a background thread; call ``shutdown()`` then ``server_close()``."""
    server = make_server_for(app, host, port)
    thread = threading.Thread(target=server.serve_forever, name="simulator", daemon=True)
    thread.start()
    return server
