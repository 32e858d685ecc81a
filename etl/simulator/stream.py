"""The simulator's WebSocket: ``/trade-api/ws/v2`` with the ``user_orders``, ``fill`` and
``market_positions`` channels.

Served on the REST port: the HTTP server hands a connection whose request line asks for
:data:`WS_PATH` to :meth:`StreamHub.serve_connection`, which speaks the protocol with the
sans-I/O core of ``websockets`` on the raw socket, so that every fault is in our hands.

- The upgrade must carry the three signed headers (message ``timestamp + "GET" +
  "/trade-api/ws/v2"``), checked like a REST request's; a bad or stale one is refused with 401.
- ``{"id", "cmd": "subscribe", "params": {"channels": [...], "market_tickers"?}}`` is
  acknowledged with one ``{"id", "type": "subscribed", "msg": {"channel", "sid"}}`` per
  channel; from then on every change the exchange makes to an order of that key's account is
  sent as ``{"type": "user_order", "sid", "msg": {...}}`` (``user_orders``), every fill as
  ``{"type": "fill", "sid", "msg": {...}}`` (``fill``) and the position it leaves as
  ``{"type": "market_position", "sid", "msg": {...}}`` (``market_positions``), as KALSHI.md,
  "WebSocket" says.
- The server pings every ``ping_interval`` seconds; the client's pings are answered.
- Once an account has been subscribed to, a ticker plays its exchange's trading events as the
  wall clock passes (REST requests do too), so that changes are pushed as they happen.

Faults on demand: :meth:`StreamHub.drop` cuts every connection without a close frame;
:meth:`StreamHub.mute` makes connections go silent without closing (no messages, no pings,
no pongs: what a dead network path looks like); :class:`StreamFaults` delays, duplicates and
reorders messages.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from etl.kalshi.auth import KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from etl.simulator.exchange import ApiFault, Exchange, SimOrder
from etl.simulator.ledger import SimFill

if TYPE_CHECKING:
    from etl.simulator.app import SimulatorApp

log = logging.getLogger(__name__)

WS_PATH = "/trade-api/ws/v2"
# The channels served, and the type of their messages.
CHANNELS = {"user_orders": "user_order", "fill": "fill", "market_positions": "market_position"}
TICK = 0.01  # seconds between the ticker's trading steps while someone listens


@dataclass
class StreamFaults:
    """Message faults: a delay before each message, a fraction of messages sent twice, a
    fraction held back for ``reorder_hold`` seconds, so that later messages overtake them."""

    delay: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    reorder_hold: float = 0.02


class StreamHub:
    """Every WebSocket connection of one :class:`SimulatorApp`, and the feed of its exchanges.

    Attributes:
        faults: message faults, changeable at any time.
        ping_interval: seconds between the server's pings.
        counts: what happened, by kind ("connections", "refused", "subscriptions",
            "messages", "duplicated", "reordered", "dropped", "muted").
    """

    def __init__(self, app: SimulatorApp, *, ping_interval: float = 10.0) -> None:
        self.app = app
        self.faults = StreamFaults()
        self.ping_interval = ping_interval
        self.counts: Counter[str] = Counter()
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._muted = False
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        self._rng = random.Random(0x57EA)
        self._sids = itertools.count(1)
        self._watched: dict[int, Exchange] = {}
        # The signed headers of every accepted upgrade, for tests (bounded).
        self.upgrades: deque[dict[str, str]] = deque(maxlen=1000)

    # -- operator faults ------------------------------------------------------------------

    def drop(self) -> int:
        """Cut every open connection at once, without a close frame; returns how many."""
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.cut()
        self.counts["dropped"] += len(sessions)
        return len(sessions)

    def mute(self) -> None:
        """Open connections stop sending and answering (nothing is closed); new ones are
        served normally."""
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.muted = True
        self.counts["muted"] += len(sessions)

    def subscribers(self) -> int:
        """Connections with an open subscription (muted ones excluded)."""
        with self._lock:
            return sum(1 for s in self._sessions if s.sids and not s.muted)

    def close(self) -> None:
        """End every connection and the ticker (the server is shutting down)."""
        self._closed.set()
        self.drop()

    # -- the feed -------------------------------------------------------------------------

    def watch(self, exchange: Exchange) -> None:
        """Send ``exchange``'s changes to its subscribers (once per exchange)."""
        with self._lock:
            if id(exchange) in self._watched:
                return
            self._watched[id(exchange)] = exchange
        exchange.listeners.append(lambda order: self._publish_order(exchange, order))
        exchange.ledger.listeners.append(
            lambda fill, after: self._publish_fill(exchange, fill, after)
        )

    def trade_continuously(self, exchange: Exchange) -> None:
        """Play ``exchange``'s trading as the wall clock passes from now on, whether or not
        anyone is connected (``kalshi-etl simulate`` does this)."""
        self.watch(exchange)
        self._ensure_ticker()

    def _publish_order(self, exchange: Exchange, order: SimOrder) -> None:
        if not order.malformed:
            self._publish(exchange, "user_orders", order.render_user_order(), order.ticker)

    def _publish_fill(self, exchange: Exchange, fill: SimFill, after: int) -> None:
        self._publish(exchange, "fill", fill.render_fill_message(after), fill.ticker)
        if self._listening(exchange, "market_positions"):  # the books cost: only when asked
            position = exchange.money.books().positions[(fill.subaccount, fill.ticker)]
            self._publish(exchange, "market_positions", position.render_message(), fill.ticker)

    def _listening(self, exchange: Exchange, channel: str) -> bool:
        with self._lock:
            return any(s.exchange is exchange and channel in s.sids for s in self._sessions)

    def _publish(
        self, exchange: Exchange, channel: str, message: dict[str, Any], ticker: str
    ) -> None:
        # Called under the app's lock by the exchange: only queue, never block.
        with self._lock:
            listening = [s for s in self._sessions if s.exchange is exchange and channel in s.sids]
        for session in listening:
            session.offer(channel, message, ticker)

    def _ensure_ticker(self) -> None:
        with self._lock:
            if self._ticker is not None:
                return
            self._ticker = threading.Thread(target=self._tick, name="sim-ticker", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Play trading events as time passes on every exchange anyone has subscribed to, so
        that changes are pushed as they happen (not when the next REST request arrives), and
        those made while no connection is up are lost to the stream, as on the real one."""
        while not self._closed.wait(TICK):
            with self._lock:
                exchanges = list(self._watched.values())
            with self.app.lock:
                if not self.app.advance:
                    continue
                now = datetime.fromtimestamp(self.app.wall_clock(), UTC)
                for exchange in exchanges:
                    exchange.advance_to(now)

    # -- connections ----------------------------------------------------------------------

    def serve_connection(self, sock: socket.socket) -> None:
        """Speak the WebSocket protocol on ``sock`` until either side ends it."""
        self.counts["connections"] += 1
        session = _Session(self, sock)
        with self._lock:
            self._sessions.add(session)
        try:
            session.run()
        except OSError as exc:
            log.debug("simulator websocket: connection ended: %s", exc)
        finally:
            with self._lock:
                self._sessions.discard(session)
            session.close_socket()

    def authenticate(self, request: Request) -> Exchange:
        """The exchange the upgrade's key reads; :class:`ApiFault` 401 when the signature is
        missing, stale or wrong."""
        signed = {
            name: request.headers.get(name, "")
            for name in (KEY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
        }
        key_id = self.app.check_signature(
            signed[KEY_HEADER],
            signed[TIMESTAMP_HEADER],
            signed[SIGNATURE_HEADER],
            "GET",
            request.path.split("?", 1)[0],
        )
        self.upgrades.append(signed)
        return self.app.exchange_of(key_id)

    def roll(self) -> float:
        with self._lock:
            return self._rng.random()

    def next_sid(self) -> int:
        with self._lock:
            return next(self._sids)


class _Session:
    """One connection: handshake, then one loop that reads the client's frames and sends what
    the feed queued (woken through a socket pair)."""

    def __init__(self, hub: StreamHub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.protocol = ServerProtocol(max_size=1 << 20)
        self.exchange: Exchange | None = None
        self.sids: dict[str, int] = {}  # channel → subscription id
        self.tickers: set[str] | None = None
        self.muted = False
        # (when due, channel, message)
        self._outbox: deque[tuple[float, str, dict[str, Any]]] = deque()
        # Messages held back (reorder fault): (when due, message).
        self._held: deque[tuple[float, dict[str, Any]]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._cut = False

    # called from other threads

    def offer(self, channel: str, message: Mapping[str, Any], ticker: str) -> None:
        if self.tickers is not None and ticker not in self.tickers:
            return
        self._outbox.append((time.monotonic() + self.hub.faults.delay, channel, dict(message)))
        self._wake()

    def cut(self) -> None:
        self._cut = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the session has ended

    # the session's own thread

    def run(self) -> None:
        if not self._handshake():
            return
        next_ping = time.monotonic() + self.hub.ping_interval
        while not self._cut:
            if self.muted:
                self._go_silent()
                return
            due = min(next_ping, self._next_due() or next_ping)
            timeout = max(0.0, due - time.monotonic())
            readable, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                self._wake_r.recv(4096)
            if self._interrupted():
                continue
            if self.sock in readable and not self._read():
                return
            if time.monotonic() >= next_ping:
                self.protocol.send_ping(b"")
                next_ping = time.monotonic() + self.hub.ping_interval
            self._send_queued()
            if not self._flush():
                return

    def _interrupted(self) -> bool:
        """Cut or muted from another thread since the loop last looked."""
        return self._cut or self.muted

    def _handshake(self) -> bool:
        self.sock.settimeout(10.0)
        request: Request | None = None
        while request is None:
            data = self.sock.recv(65536)
            if not data:
                return False
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Request):
                    request = event
            if self.protocol.state is State.CLOSED or self.protocol.handshake_exc:
                self._flush()
                return False
        try:
            self.exchange = self.hub.authenticate(request)
        except ApiFault as fault:
            self.hub.counts["refused"] += 1
            body = json.dumps({"error": {"code": fault.code, "message": fault.message}})
            response = self.protocol.reject(fault.status, body)
            response.headers["Content-Type"] = "application/json"
            self.protocol.send_response(response)
            self._flush()
            return False
        self.protocol.send_response(self.protocol.accept(request))
        if self.protocol.handshake_exc is not None:
            self._flush()
            return False
        self.sock.settimeout(None)
        return self._flush()

    def _read(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.protocol.receive_eof()
            self._flush()
            return False
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._command(bytes(event.data))
        return self.protocol.state is not State.CLOSED

    def _command(self, data: bytes) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            self._reply({"type": "error", "msg": {"code": 1, "msg": "not JSON"}})
            return
        ident = command.get("id") if isinstance(command, dict) else None
        params = command.get("params") if isinstance(command, dict) else None
        if not isinstance(command, dict) or command.get("cmd") != "subscribe":
            self._reply(
                {"id": ident, "type": "error", "msg": {"code": 5, "msg": "Unknown command"}}
            )
            return
        channels = params.get("channels") if isinstance(params, dict) else None
        if (
            not isinstance(channels, list)
            or not channels
            or any(c not in CHANNELS for c in channels)
        ):
            self._reply(
                {"id": ident, "type": "error", "msg": {"code": 6, "msg": "Unknown channel"}}
            )
            return
        assert isinstance(params, dict)
        tickers = params.get("market_tickers")
        self.tickers = set(tickers) if isinstance(tickers, list) and tickers else None
        assert self.exchange is not None
        self.hub.watch(self.exchange)
        for channel in dict.fromkeys(channels):
            sid = self.sids[channel] = self.hub.next_sid()
            self.hub.counts["subscriptions"] += 1
            self._reply(
                {"id": ident, "type": "subscribed", "msg": {"channel": channel, "sid": sid}}
            )
        self.hub._ensure_ticker()

    def _reply(self, body: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(body).encode())

    def _send_queued(self) -> None:
        faults = self.hub.faults
        now = time.monotonic()
        while self._outbox and self._outbox[0][0] <= now:
            _, channel, msg = self._outbox.popleft()
            message = {"type": CHANNELS[channel], "sid": self.sids[channel], "msg": msg}
            if faults.reorder_rate and self.hub.roll() < faults.reorder_rate:
                self._held.append((now + faults.reorder_hold, message))  # later ones overtake
                self.hub.counts["reordered"] += 1
                continue
            self._send(message)
            if faults.duplicate_rate and self.hub.roll() < faults.duplicate_rate:
                self._send(message)
                self.hub.counts["duplicated"] += 1
        while self._held and self._held[0][0] <= now:
            self._send(self._held.popleft()[1])

    def _next_due(self) -> float | None:
        dues = [queue[0][0] for queue in (self._outbox, self._held) if queue]
        return min(dues) if dues else None

    def _send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self.hub.counts["messages"] += 1

    def _flush(self) -> bool:
        for chunk in self.protocol.data_to_send():
            if not chunk:  # the protocol asks to close the TCP connection
                return False
            self.sock.sendall(chunk)
        return True

    def _go_silent(self) -> None:
        """Neither send nor answer; read and discard until the client gives up (or the
        server closes)."""
        while not self._cut:
            readable, _, _ = select.select([self.sock, self._wake_r], [], [], 0.5)
            if self._wake_r in readable:
                self._wake_r.recv(4096)
            if self.sock in readable and not self.sock.recv(65536):
                return

    def close_socket(self) -> None:
        for sock in (self.sock, self._wake_r, self._wake_w):
            try:
                if sock is self.sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def is_websocket_request(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the request waiting on ``sock`` asks for :data:`WS_PATH` (peeked, not read)."""
    wanted = f"GET {WS_PATH}".encode()
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        while True:
            head = sock.recv(len(wanted), socket.MSG_PEEK)
            if len(head) >= len(wanted) or not head or not wanted.startswith(head):
                return head == wanted
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    except OSError:
        return False
    finally:
        sock.settimeout(None)
