"""The account's WebSocket channels (``user_orders``, ``fill``): connect signed, subscribe, hand
every message on, reconnect.

The upgrade request carries the same three headers as a REST request, signed over
``timestamp + "GET" + "/trade-api/ws/v2"`` and **signed again for every connection attempt**
(a timestamp more than a minute old is refused). After ``{"cmd": "subscribe", "params":
{"channels": ["user_orders", "fill"]}}`` is acknowledged, :meth:`StreamListener.subscribed` is
called (the caller closes the gap with REST: the channels have no sequence numbers and no
snapshot), then each message of a subscribed channel is passed on as received. Pings from
the server are answered by the library; our own pings (every ``ping_interval``) detect a
connection that went silent without closing. Any failure (refused upgrade, network, a close,
a silent peer) ends the connection; the next attempt waits a full-jitter backoff, which
starts over once a connection has stayed up for ``stable_after`` seconds.

Blocking, on the caller's thread: :meth:`AccountStream.run` returns once ``stop`` is set.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from etl.errors import ConfigError
from etl.kalshi.auth import KalshiAuth

log = logging.getLogger(__name__)

WS_PATH = "/trade-api/ws/v2"
SUBSCRIBE_ID = 1
# The channels this client reads, and the type of their messages.
MESSAGE_TYPES = {"user_orders": "user_order", "fill": "fill", "market_positions": "market_position"}


def stream_url(api_base: str) -> str:
    """The WebSocket URL beside a REST root: ``https://host/trade-api/v2`` →
    ``wss://host/trade-api/ws/v2`` (``http`` → ``ws`` for a local simulator)."""
    parts = urlsplit(api_base.rstrip("/"))
    if not parts.path.endswith("/trade-api/v2"):
        raise ConfigError(f"cannot derive the WebSocket URL from {api_base!r}")
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"cannot derive the WebSocket URL from {api_base!r}")
    path = parts.path[: -len("/trade-api/v2")] + WS_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class StreamPolicy:
    """Timeouts and backoff of the stream (seconds)."""

    open_timeout: float = 10.0  # TCP, TLS and the upgrade
    ack_timeout: float = 10.0  # the subscription's acknowledgement
    ping_interval: float = 10.0  # our pings; no pong within ping_timeout ends the connection
    ping_timeout: float = 10.0
    base_delay: float = 0.5  # full jitter: uniform in [0, min(max_delay, base * 2**attempt)]
    max_delay: float = 30.0
    stable_after: float = 30.0  # a connection up this long resets the backoff

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        return float(rng() * min(self.max_delay, self.base_delay * 2.0**attempt))


class StreamListener(Protocol):
    """What the stream tells its owner. Called on the stream's thread: return quickly."""

    def subscribed(self) -> None:
        """The subscription was acknowledged (first connect and every reconnect)."""

    def message(self, body: Any, received: float) -> None:
        """A message of a subscribed channel (decoded JSON, or the text when it is not
        JSON), and when it arrived (Unix seconds)."""

    def disconnected(self, reason: str) -> None:
        """The connection ended (or could not be made); a reconnect follows."""


class StreamError(Exception):
    """The server answered the subscription with an error, or not at all."""


class AccountStream:
    """The WebSocket channels of one account (see the module docstring).

    Args:
        url: the WebSocket URL (:func:`stream_url`).
        auth: signs each connection attempt.
        listener: told of subscriptions, messages and drops.
        stop: set to end :meth:`run` (the connection is closed cleanly).
        channels: the channels to subscribe to (keys of :data:`MESSAGE_TYPES`).
        market_tickers: only these markets (default: every market).
        rng: for the backoff's jitter.
    """

    def __init__(
        self,
        url: str,
        auth: KalshiAuth,
        listener: StreamListener,
        *,
        stop: threading.Event,
        policy: StreamPolicy = StreamPolicy(),
        channels: Sequence[str] = ("user_orders",),
        market_tickers: Sequence[str] = (),
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.path = urlsplit(url).path
        self.auth = auth
        self.listener = listener
        self.stop = stop
        self.policy = policy
        self.channels = list(channels)
        self._types = {MESSAGE_TYPES[c] for c in self.channels}
        self.market_tickers = list(market_tickers)
        self._rng = rng
        self.attempts = 0  # connection attempts so far, for tests and logs

    def run(self) -> None:
        """Connect, subscribe and pass messages on until ``stop`` is set, reconnecting after
        every failure."""
        failures = 0
        while not self.stop.is_set():
            self.attempts += 1
            up_since: list[float] = []
            try:
                self._session(up_since)
                reason = "closed"
            except InvalidStatus as exc:
                reason = _refusal(exc)
            except (WebSocketException, OSError, StreamError) as exc:
                reason = _describe(exc)
            if self.stop.is_set():
                return
            if up_since and time.monotonic() - up_since[0] >= self.policy.stable_after:
                failures = 0
            delay = self.policy.backoff(failures, self._rng)
            failures += 1
            self.listener.disconnected(reason)
            log.warning(
                "%s stream: %s; reconnecting in %.1fs (the REST sync closes the gap)",
                self.name,
                reason,
                delay,
                extra={"stream": self.name, "error": reason},
            )
            if self.stop.wait(delay):
                return

    def _session(self, up_since: list[float]) -> None:
        headers = self.auth.headers("GET", self.path)  # signed now: every attempt anew
        with connect(
            self.url,
            additional_headers=headers,
            open_timeout=self.policy.open_timeout,
            ping_interval=self.policy.ping_interval,
            ping_timeout=self.policy.ping_timeout,
            close_timeout=2.0,
            max_size=4 * 1024 * 1024,
            user_agent_header="kalshi-etl",
        ) as ws:
            self._subscribe(ws)
            up_since.append(time.monotonic())
            log.info("%s stream subscribed (%s)", self.name, self.url)
            self.listener.subscribed()
            while not self.stop.is_set():
                try:
                    text = ws.recv(timeout=0.25)
                except TimeoutError:
                    continue
                received = time.time()
                body = _decode(text)
                kind = body.get("type") if isinstance(body, dict) else None
                if kind in self._types or not isinstance(body, dict):
                    self.listener.message(body, received)
                elif kind == "error":
                    log.warning(
                        "%s stream: the server sent an error: %s", self.name, body.get("msg")
                    )
                else:
                    log.debug("%s stream: ignored a %r message", self.name, kind)

    @property
    def name(self) -> str:
        """The channels, as logs name the stream (``user_orders+fill``)."""
        return "+".join(self.channels)

    def _subscribe(self, ws: ClientConnection) -> None:
        params: dict[str, Any] = {"channels": self.channels}
        if self.market_tickers:
            params["market_tickers"] = self.market_tickers
        ws.send(json.dumps({"id": SUBSCRIBE_ID, "cmd": "subscribe", "params": params}))
        deadline = time.monotonic() + self.policy.ack_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamError(
                    f"no answer to the subscription within {self.policy.ack_timeout:.0f}s"
                )
            try:
                body = _decode(ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if not isinstance(body, dict):
                continue
            if body.get("type") == "subscribed":
                return
            if body.get("type") == "error":
                detail = body.get("msg")
                msg = detail if isinstance(detail, dict) else {}
                raise StreamError(
                    f"the server refused the subscription: {msg.get('code')} {msg.get('msg')}"
                )
            if body.get("type") in self._types:  # a message racing the acknowledgement
                self.listener.message(body, time.time())


def _decode(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text if isinstance(text, str) else text.decode("utf-8", "backslashreplace")


def _refusal(exc: InvalidStatus) -> str:
    response = exc.response
    detail = bytes(response.body or b"").decode("utf-8", "replace").strip()
    try:
        body = json.loads(detail)
        error = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(error, dict) and error.get("message"):
            detail = f"{error.get('code')}: {error['message']}"
    except ValueError:
        pass
    hint = (
        " (check the API key and its private key, and that the clock is right)"
        if response.status_code in (401, 403)
        else ""
    )
    return (
        f"the server refused the connection with HTTP {response.status_code}"
        + (f" ({detail[:200]})" if detail else "")
        + hint
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        if exc.rcvd is None and exc.sent is not None and exc.sent.code == 1011:
            return "the connection went silent (no answer to our ping)"
        if exc.rcvd is None:
            return "the connection dropped without a close frame"
        return f"the server closed the connection ({exc.rcvd.code} {exc.rcvd.reason})".strip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
