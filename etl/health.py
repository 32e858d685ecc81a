"""The daemon's operator endpoints: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP.

- ``/metrics``: :data:`etl.metrics.REGISTRY` in the Prometheus text format.
- ``/healthz``: 200 while the daemon's loop is alive (it beats every half second), else 503.
- ``/readyz``: 200 when the database answers and every stream succeeded within three of its
  intervals, else 503; the JSON body says, per stream, when it last succeeded and why it is
  not ready (the last error, or that it is still running its first pass).

Served by the standard library's threading HTTP server on a daemon thread: scrapes and probes
never wait for a sync, and a sync never waits for them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.engine import Engine

from etl import metrics
from etl.db.engine import connection
from etl.db.state import last_successes
from etl.errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

READY_INTERVALS = 3  # a stream is late once it has not succeeded for this many intervals
LINK_GRACE = 30.0  # seconds a user_orders WebSocket may be down (reconnecting) and still ready
STALL = 10.0  # seconds without a beat after which the loop counts as dead


class Liveness:
    """The daemon loop's heartbeat."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def alive(self) -> bool:
        return self._clock() - self._last < STALL


class Readiness:
    """Whether the daemon is doing its job: the database answers and each (account, stream)
    of ``streams`` (→ its interval) succeeded within :data:`READY_INTERVALS` intervals.

    A success counts whichever replica ran it (``sync_runs`` is shared): replicas that skip
    a job because another one holds its lock are as ready as the one running it.

    With ``links`` (accounts streaming ``user_orders``), each account's WebSocket must also be
    subscribed, or have been down for less than :data:`LINK_GRACE` seconds (a reconnect).
    """

    def __init__(
        self,
        engine: Engine | None,
        streams: Mapping[tuple[str, str], timedelta],
        *,
        links: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.streams = dict(streams)
        self.links = list(links)
        self._clock = clock

    def check(self) -> tuple[bool, dict[str, Any]]:
        now = self._clock()
        problems: list[str] = []
        shared: dict[tuple[str, str], datetime | None] = {}
        database: dict[str, Any] = {"ok": True}
        # The body is for any prober: it says what is wrong, never where the database is or
        # who logs in (the daemon's log has the masked URL).
        if self.engine is None:
            database = {"ok": False, "error": "waiting for the database to answer at start"}
        else:
            try:
                with connection(self.engine) as conn:
                    conn.execute(sa.text("SELECT 1"))
                    shared = last_successes(conn, list(self.streams))
            except DatabaseError:
                database = {"ok": False, "error": "the database does not answer (see the log)"}
        if not database["ok"]:
            problems.append(f"database: {database['error']}")
        streams: list[dict[str, Any]] = []
        for (account, stream), every in self.streams.items():
            status = metrics.STREAMS.get(account, stream)
            anywhere = shared.get((account, stream))
            if anywhere is not None and (
                status.last_success is None or anywhere.timestamp() > status.last_success
            ):
                status = replace(status, last_success=anywhere.timestamp())
            limit = READY_INTERVALS * every.total_seconds()
            reason = _lateness(status, now=now, limit=limit)
            streams.append(
                {
                    "account": account,
                    "stream": stream,
                    "ok": reason is None,
                    "last_success": _iso(status.last_success),
                    "last_error": status.last_error,
                    "interval_seconds": every.total_seconds(),
                    **({"reason": reason} if reason else {}),
                }
            )
            if reason:
                problems.append(f"{stream} of {account}: {reason}")
        for account in self.links:
            entry = _link(account, metrics.LINKS.get(account), now=now)
            streams.append(entry)
            if not entry["ok"]:
                problems.append(f"user_orders stream of {account}: {entry['reason']}")
        ready = not problems
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "streams": streams,
            "problems": problems,
        }
        return ready, body


def _link(account: str, link: metrics.LinkStatus | None, *, now: float) -> dict[str, Any]:
    """The ``/readyz`` entry of an account's WebSocket."""
    entry: dict[str, Any] = {"account": account, "stream": "user_orders"}
    if link is None:
        return {**entry, "ok": False, "connected": False, "reason": "not started"}
    down_for = now - link.since
    ok = link.connected or down_for <= LINK_GRACE
    entry.update(
        ok=ok,
        connected=link.connected,
        since=_iso(link.since),
        last_error=link.last_error,
    )
    if not ok:
        entry["reason"] = f"not connected for {down_for:.0f}s" + (
            f"; last error: {link.last_error}" if link.last_error else ""
        )
    return entry


def _lateness(status: metrics.StreamStatus, *, now: float, limit: float) -> str | None:
    """Why a stream is not ready, or ``None`` when it succeeded within ``limit`` seconds."""
    if status.last_success is not None and now - status.last_success <= limit:
        return None
    if status.last_success is None:
        reason = "no successful run yet"
    else:
        reason = f"no successful run for {now - status.last_success:.0f}s (limit {limit:.0f}s)"
    if status.running_since is not None:
        reason += f"; a run is in progress since {_iso(status.running_since)}"
    if status.last_error:
        reason += f"; last error: {status.last_error}"
    return reason


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


IDLE_TIMEOUT = 5.0  # seconds a connection may sit without sending its request
MAX_HANDLERS = 16  # connections served at once; more are closed at once


class _BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_handlers`` handler threads: a connection
    beyond them is closed at once, so that a flood of half-open connections cannot grow the
    daemon's threads without bound (each also times out after ``IDLE_TIMEOUT``)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of probes is not refused

    def __init__(self, address: tuple[str, int], handler: Any, *, max_handlers: int) -> None:
        self._slots = threading.BoundedSemaphore(max_handlers)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class OperatorServer:
    """Serves the three endpoints on ``host:port`` (port 0 = any free port) on a thread, at
    most ``max_handlers`` connections at once, each closed after ``idle_timeout`` seconds of
    silence.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, no permission).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        liveness: Liveness,
        readiness: Readiness,
        idle_timeout: float = IDLE_TIMEOUT,
        max_handlers: int = MAX_HANDLERS,
    ) -> None:
        handler = _handler(liveness, readiness, idle_timeout=idle_timeout)
        try:
            self._server = _BoundedServer((host, port), handler, max_handlers=max_handlers)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port: cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                "another port (KALSHI_ETL_METRICS_PORT) or host (--metrics-host)"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="operator-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", host, port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    liveness: Liveness, readiness: Readiness, *, idle_timeout: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kalshi-etl"
        timeout = idle_timeout  # the socket's: a silent client is dropped

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                alive = liveness.alive()
                self._json(200 if alive else 503, {"status": "alive" if alive else "stalled"})
            elif path == "/readyz":
                ready, body = readiness.check()
                self._json(200 if ready else 503, body)
            else:
                self._json(404, {"error": f"no such endpoint {path}; try /metrics"})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            log.debug("operator http: " + format, *args)

    return Handler
