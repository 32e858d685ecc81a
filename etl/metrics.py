"""Prometheus metrics: the names CONTRACT.md's "Operations" section lists, on one registry.

The data path records into them (the client: requests, retries, rate-limit waits; a run: its
outcome, rows, duration, watermark); :mod:`etl.health` serves them. Recording never raises
and costs a dictionary lookup, so it is always on; only serving them is opt-in.

The registry is this module's own, not prometheus-client's global one, so importing the
package registers nothing elsewhere. Counters count for the life of the process (Prometheus
computes rates); the timestamps and the lag are computed when scraped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# The `_created` series prometheus-client adds to each counter are noise for a daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter(
    "kalshi_etl_runs_total",
    "Sync runs finished, by outcome (succeeded/failed).",
    ["account", "stream", "status"],
    registry=REGISTRY,
)
ROWS = Counter(
    "kalshi_etl_rows_total",
    "Records a run handled, by what happened to them (inserted/updated/unchanged/rejected).",
    ["account", "stream", "outcome"],
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    "kalshi_etl_run_duration_seconds",
    "Wall time of a sync run, lock wait excluded.",
    ["account", "stream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "kalshi_etl_last_success_timestamp_seconds",
    "Unix time of the stream's last successful run in this process.",
    ["account", "stream"],
    registry=REGISTRY,
)
WATERMARK_LAG = Gauge(
    "kalshi_etl_watermark_lag_seconds",
    "Seconds between now and the stream's watermark (how stale the synced data is).",
    ["account", "stream"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "kalshi_etl_api_requests_total",
    "Kalshi API responses by route template and HTTP status ('error' when none came back).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
API_RETRIES = Counter(
    "kalshi_etl_api_retries_total",
    "Kalshi API requests retried, by reason (429, 5xx, network, timeout).",
    ["reason"],
    registry=REGISTRY,
)
RATE_LIMIT_WAIT = Counter(
    "kalshi_etl_rate_limit_wait_seconds_total",
    "Seconds spent waiting for read budget: the client's token bucket and 429 backoff.",
    registry=REGISTRY,
)
OPEN_ORDERS = Gauge(
    "kalshi_etl_open_orders",
    "Orders the database holds as open (resting or pending) at the last poll.",
    ["account"],
    registry=REGISTRY,
)

STREAM_CONNECTED = Gauge(
    "kalshi_etl_stream_connected",
    "1 while the account's WebSocket (user_orders, fill, market_positions) is subscribed, else 0.",
    ["account"],
    registry=REGISTRY,
)
STREAM_MESSAGES = Counter(
    "kalshi_etl_stream_messages_total",
    "WebSocket messages (user_orders, fill, market_positions) committed, by what they did "
    "(inserted/updated/unchanged/rejected).",
    ["account", "outcome"],
    registry=REGISTRY,
)
STREAM_LAG = Histogram(
    "kalshi_etl_stream_lag_seconds",
    "From a change's exchange timestamp (an order's update, a fill) to the commit of its message.",
    ["account"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
STREAM_RECONNECTS = Counter(
    "kalshi_etl_stream_reconnects_total",
    "WebSocket connections lost or refused (each is followed by a reconnect).",
    ["account"],
    registry=REGISTRY,
)

STREAM_BACKLOG = Gauge(
    "kalshi_etl_stream_backlog",
    "WebSocket messages received and not yet committed (bounded: see the dropped total).",
    ["account"],
    registry=REGISTRY,
)
STREAM_DROPPED = Counter(
    "kalshi_etl_stream_dropped_total",
    "WebSocket messages dropped because the backlog was full (the database away); the "
    "REST catch-up reads those records again.",
    ["account"],
    registry=REGISTRY,
)

OUTCOMES = ("inserted", "updated", "unchanged", "rejected")


@dataclass(frozen=True)
class StreamStatus:
    """What this process last saw of one stream, for ``/readyz``."""

    last_success: float | None
    last_error: str | None
    running_since: float | None


class _Streams:
    """Per (account, stream): last success, last error, the run in progress, the watermark."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[tuple[str, str], StreamStatus] = {}
        self._watermarks: dict[tuple[str, str], float] = {}

    def get(self, account: str, stream: str) -> StreamStatus:
        with self._lock:
            return self._status.get((account, stream), StreamStatus(None, None, None))

    def _change(
        self, account: str, stream: str, change: Callable[[StreamStatus], StreamStatus]
    ) -> None:
        with self._lock:
            old = self._status.get((account, stream), StreamStatus(None, None, None))
            self._status[(account, stream)] = change(old)

    def running(self, account: str, stream: str, at: float) -> None:
        self._change(account, stream, lambda s: replace(s, running_since=at))

    def succeeded(self, account: str, stream: str, at: float) -> None:
        self._change(account, stream, lambda s: replace(s, last_success=at, running_since=None))

    def failed(self, account: str, stream: str, error: str | None) -> None:
        self._change(
            account,
            stream,
            lambda s: replace(s, last_error=error, running_since=None),
        )

    def set_watermark(self, account: str, stream: str, watermark: datetime) -> None:
        key = (account, stream)
        with self._lock:
            first = key not in self._watermarks
            self._watermarks[key] = watermark.timestamp()
        if first:
            WATERMARK_LAG.labels(account, stream).set_function(
                lambda: max(0.0, time.time() - self._watermarks[key])
            )


STREAMS = _Streams()


@dataclass(frozen=True)
class LinkStatus:
    """The account's WebSocket as this process last saw it, for ``/readyz``."""

    connected: bool
    since: float  # when it last connected or dropped (or the daemon started)
    last_error: str | None


class _Links:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, LinkStatus] = {}

    def get(self, account: str) -> LinkStatus | None:
        with self._lock:
            return self._links.get(account)

    def set(self, account: str, status: LinkStatus) -> None:
        with self._lock:
            self._links[account] = status


LINKS = _Links()


def stream_starting(account: str) -> None:
    LINKS.set(account, LinkStatus(connected=False, since=time.time(), last_error=None))
    STREAM_CONNECTED.labels(account).set(0)


def stream_connected(account: str) -> None:
    LINKS.set(account, LinkStatus(connected=True, since=time.time(), last_error=None))
    STREAM_CONNECTED.labels(account).set(1)


def stream_dropped(account: str, reason: str) -> None:
    LINKS.set(account, LinkStatus(connected=False, since=time.time(), last_error=reason))
    STREAM_CONNECTED.labels(account).set(0)
    STREAM_RECONNECTS.labels(account).inc()


def stream_committed(account: str, rows: dict[str, int], lags: list[float]) -> None:
    """Count a committed batch of messages: what they did (the counts of its write, as for a
    run), and each change's lag."""
    for outcome in OUTCOMES:
        if rows.get(outcome):
            STREAM_MESSAGES.labels(account, outcome).inc(rows[outcome])
    histogram = STREAM_LAG.labels(account)
    for lag in lags:
        histogram.observe(max(0.0, lag))


def stream_backlog(account: str, waiting: int) -> None:
    STREAM_BACKLOG.labels(account).set(waiting)


def stream_dropped_messages(account: str, count: int = 1) -> None:
    STREAM_DROPPED.labels(account).inc(count)


def run_started(account: str, stream: str) -> None:
    STREAMS.running(account, stream, time.time())


def run_finished(
    account: str,
    stream: str,
    *,
    status: str,
    duration: float,
    rows: dict[str, int] | None,
    error: str | None,
) -> None:
    """Count a finished run: its outcome, duration and (when known) its rows."""
    RUNS.labels(account, stream, status).inc()
    RUN_DURATION.labels(account, stream).observe(duration)
    for outcome in OUTCOMES:
        if rows and rows.get(outcome):
            ROWS.labels(account, stream, outcome).inc(rows[outcome])
    now = time.time()
    if status == "succeeded":
        LAST_SUCCESS.labels(account, stream).set(now)
        STREAMS.succeeded(account, stream, now)
    else:
        STREAMS.failed(account, stream, error)


def watermark_moved(account: str, stream: str, watermark: datetime | None) -> None:
    if watermark is not None:
        STREAMS.set_watermark(account, stream, watermark)


def open_orders(account: str, count: int) -> None:
    OPEN_ORDERS.labels(account).set(count)


def api_response(endpoint: str, status: int | str) -> None:
    API_REQUESTS.labels(endpoint, str(status)).inc()


def api_retry(reason: str) -> None:
    API_RETRIES.labels(reason).inc()


def rate_limit_wait(seconds: float) -> None:
    if seconds > 0:
        RATE_LIMIT_WAIT.inc(seconds)
